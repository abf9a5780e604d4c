"""Single-file checkpoints -> diffusers folders that ``controlrt export`` takes.

The community ships Stable Diffusion 1.x as one original-format checkpoint (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``) and ControlNet 1.0/1.1 as
``control_model.*`` checkpoints, in .safetensors or pickled .ckpt/.pth files. controlrt reads them
safely (safetensors, or ``torch.load(weights_only=True)``, which refuses pickles that hold anything
but tensors), converts them with diffusers' own single-file converters
(``diffusers.loaders.single_file_utils``) against configs that ship with controlrt
(``controlrt/configs/``) or a diffusers folder given with ``--config``, loads the result strictly
(every weight present, none left over), and saves diffusers folders. Nothing is downloaded.

The CLIP tokenizer is not part of an SD checkpoint: give ``--tokenizer DIR`` (the ``tokenizer/``
folder of any SD1.x diffusers model) unless the config folder has one.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import torch

from controlrt.errors import InputError, ModelError
from controlrt.io import check_replaceable, output_folder, staged_folder

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
SD15_CONFIG = CONFIGS / "sd15"
CONTROLNET_SD15_CONFIG = CONFIGS / "controlnet-sd15"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
CONTROLNET_KEY = "input_blocks.0.0.weight"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a weights-only pickle; InputError for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path} is not a readable safetensors file ({exc})") from None
    elif suffix in PICKLE_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise InputError(
                f"{path} was refused: it is a pickle holding Python objects besides tensors, which could run "
                "code when loaded; convert it to .safetensors with a tool you trust"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise InputError(f"{path} is not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    else:
        raise InputError(f"{path}: unknown checkpoint type {suffix!r}; use .safetensors, .ckpt, .pt or .pth")
    while isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a flat dictionary of tensors")
    return state


def _config_dir(config: str | Path | None, default: Path) -> Path:
    path = Path(config).expanduser() if config is not None else default
    if not path.is_dir():
        raise InputError(f"config folder {path} does not exist")
    return path


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, ignore=()) -> None:
    """Load ``state`` into ``module``; ModelError if the checkpoint and the config disagree."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not any(i in k for i in ignore)]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        detail = ", ".join(
            f"{label} {keys[0]}" + (f" (+{len(keys) - 1})" if len(keys) > 1 else "")
            for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape:", wrong))
            if keys
        )
        raise ModelError(f"the checkpoint's {what} does not match its config: {detail}; give the matching --config")
    module.load_state_dict(state, strict=False)


def convert_sd_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    force: bool = False,
) -> Path:
    """An original-format SD 1.x checkpoint -> a diffusers pipeline folder at ``out_dir``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    config_dir = _config_dir(config, SD15_CONFIG)
    tokenizer_dir = Path(tokenizer).expanduser() if tokenizer else config_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise InputError(
            f"no CLIP tokenizer at {tokenizer_dir} (an SD checkpoint does not contain one); give --tokenizer DIR, "
            "the tokenizer/ folder of an SD1.x diffusers model"
        )
    out = _check_out(out_dir, force)
    state = read_checkpoint(checkpoint)
    if UNET_KEY not in state:
        raise InputError(f"{checkpoint} is not an original-format Stable Diffusion 1.x checkpoint (no {UNET_KEY})")

    unet_config = UNet2DConditionModel.load_config(config_dir / "unet")
    vae_config = AutoencoderKL.load_config(config_dir / "vae")
    unet = UNet2DConditionModel.from_config(unet_config)
    _load_strict(unet, convert_ldm_unet_checkpoint(state, unet_config), "UNet")
    vae = AutoencoderKL.from_config(vae_config)
    vae_state = convert_ldm_vae_checkpoint(state, vae_config)
    expected = vae.state_dict()
    vae_state = {k: v.reshape(expected[k].shape) if k in expected else v for k, v in vae_state.items()}
    _load_strict(vae, vae_state, "VAE")
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    _load_strict(text_encoder, convert_ldm_clip_checkpoint(state), "text encoder", ignore=("position_ids",))
    del state

    with staged_folder(out, "convert-checkpoint sd", force) as staging:
        unet.save_pretrained(staging / "unet")
        vae.save_pretrained(staging / "vae")
        text_encoder.save_pretrained(staging / "text_encoder")
        shutil.copytree(tokenizer_dir, staging / "tokenizer")
        shutil.copytree(config_dir / "scheduler", staging / "scheduler")
        shutil.copy2(config_dir / "model_index.json", staging / "model_index.json")
        _write_source(staging, checkpoint, config_dir)
    return out


def convert_controlnet_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, config: str | Path | None = None, force: bool = False
) -> Path:
    """A ControlNet 1.0/1.1 checkpoint -> a diffusers ControlNet folder at ``out_dir``."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint as convert

    config_dir = _config_dir(config, CONTROLNET_SD15_CONFIG)
    out = _check_out(out_dir, force)
    state = read_checkpoint(checkpoint)
    state = {k.removeprefix("control_model."): v for k, v in state.items()}
    if CONTROLNET_KEY not in state or "zero_convs.0.0.weight" not in state:
        raise InputError(f"{checkpoint} is not a ControlNet 1.x checkpoint (no control_model input blocks)")
    if "input_hint_block.14.weight" not in state:
        raise InputError(
            f"{checkpoint} has a non-standard conditioning encoder (ControlNet 1.x has 8 hint convolutions); "
            "convert it with the tool that made it"
        )
    cn_config = ControlNetModel.load_config(config_dir)
    controlnet = ControlNetModel.from_config(cn_config)
    _load_strict(controlnet, convert(state, cn_config), "ControlNet")
    with staged_folder(out, "convert-checkpoint controlnet", force) as staging:
        controlnet.save_pretrained(staging)
        _write_source(staging, checkpoint, config_dir)
    return out


def _check_out(out_dir: str | Path, force: bool) -> Path:
    """The output folder, checked before any work (and again by staged_folder before the rename)."""
    out = output_folder(out_dir)
    check_replaceable(out, force)
    return out


def _write_source(folder: Path, checkpoint: str | Path, config_dir: Path) -> None:
    from controlrt.io import sha256_file

    record = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "sha256": sha256_file(checkpoint),
        "config": str(config_dir),
    }
    (folder / "controlrt_source.json").write_text(json.dumps(record, indent=2))
