"""Single-file checkpoints -> diffusers folders that ``controlrt export`` takes.

The community ships Stable Diffusion 1.x as one original-format checkpoint (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``), SDXL likewise with its two text
encoders under ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L, Hugging Face names) and
``conditioner.embedders.1.model.*`` (OpenCLIP bigG, OpenCLIP names), and ControlNet 1.0/1.1 as
``control_model.*`` checkpoints, in .safetensors or pickled .ckpt/.pth files. SDXL ControlNets
(including ControlNet-Union) circulate as single files in diffusers' own key names; their config is
SDXL's ControlNet config with the depth of each block read from the file. controlrt reads them
safely (safetensors, or ``torch.load(weights_only=True)``, which refuses pickles that hold anything
but tensors), converts them with diffusers' own single-file converters
(``diffusers.loaders.single_file_utils``) against configs that ship with controlrt
(``controlrt/configs/``) or a diffusers folder given with ``--config``, loads the result strictly
(every weight present, none left over), and saves diffusers folders. Nothing is downloaded.

The CLIP tokenizers are not part of a checkpoint: give ``--tokenizer DIR`` (the ``tokenizer/``
folder of any SD1.x diffusers model; for SDXL also ``--tokenizer-2 DIR``, its ``tokenizer_2/``)
unless the config folder has them.
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
SDXL_CONFIG = CONFIGS / "sdxl"
CONTROLNET_SDXL_CONFIG = CONFIGS / "controlnet-sdxl"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
CONTROLNET_KEY = "input_blocks.0.0.weight"
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_KEY = SDXL_OPEN_CLIP_PREFIX + "positional_embedding"
DIFFUSERS_CONTROLNET_KEY = "controlnet_cond_embedding.conv_in.weight"


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


def _load_strict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, ignore=(), assign: bool = False
) -> None:
    """Load ``state`` into ``module``; ModelError if the checkpoint and the config disagree. With
    ``assign`` the module (made on the meta device) takes the tensors themselves, in their dtype."""
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
    module.load_state_dict(state, strict=False, assign=assign)


def convert_sd_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    force: bool = False,
    tokenizer_2: str | Path | None = None,
) -> Path:
    """An original-format SD 1.x or SDXL checkpoint -> a diffusers pipeline folder at ``out_dir``.

    SDXL is recognised by its OpenCLIP bigG text encoder; the default configs follow the kind. (SD3
    and Flux: :func:`controlrt.transformer_checkpoints.convert_base_checkpoint`, which takes all.)
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    keys = checkpoint_keys(checkpoint)
    if UNET_KEY not in keys:
        raise InputError(f"{checkpoint} is not an original-format Stable Diffusion checkpoint (no {UNET_KEY})")
    sdxl = SDXL_KEY in keys
    config_dir = _config_dir(config, SDXL_CONFIG if sdxl else SD15_CONFIG)
    if sdxl != (config_dir / "text_encoder_2").is_dir():
        raise InputError(
            f"the configs in {config_dir} describe {'SD 1.x/2.x' if sdxl else 'SDXL'}, but {checkpoint} is "
            f"{'SDXL' if sdxl else 'SD 1.x/2.x'}; give the matching --config"
        )
    tokenizers = {"tokenizer": _tokenizer_dir(tokenizer, config_dir / "tokenizer", "--tokenizer", "tokenizer/")}
    if sdxl:
        tokenizers["tokenizer_2"] = _tokenizer_dir(
            tokenizer_2, config_dir / "tokenizer_2", "--tokenizer-2", "tokenizer_2/"
        )
    elif tokenizer_2 is not None:
        raise InputError(f"{checkpoint} is an SD 1.x/2.x checkpoint, which has one tokenizer: drop --tokenizer-2")
    out = _check_out(out_dir, force)
    state = read_checkpoint(checkpoint)

    unet_config = UNet2DConditionModel.load_config(config_dir / "unet")
    vae_config = AutoencoderKL.load_config(config_dir / "vae")
    unet = UNet2DConditionModel.from_config(unet_config)
    _load_strict(unet, convert_ldm_unet_checkpoint(state, unet_config), "UNet")
    vae = AutoencoderKL.from_config(vae_config)
    vae_state = convert_ldm_vae_checkpoint(state, vae_config)
    expected = vae.state_dict()
    vae_state = {k: v.reshape(expected[k].shape) if k in expected else v for k, v in vae_state.items()}
    _load_strict(vae, vae_state, "VAE")
    encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))}
    _load_strict(encoders["text_encoder"], convert_ldm_clip_checkpoint(state), "text encoder", ignore=("position_ids",))
    if sdxl:
        second = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
        converted = convert_open_clip_checkpoint(second, state, prefix=SDXL_OPEN_CLIP_PREFIX)
        _load_strict(second, converted, "second text encoder", ignore=("position_ids",))
        encoders["text_encoder_2"] = second
    del state

    with staged_folder(out, "convert-checkpoint sd", force) as staging:
        unet.save_pretrained(staging / "unet")
        vae.save_pretrained(staging / "vae")
        for name, encoder in encoders.items():
            encoder.save_pretrained(staging / name)
        for name, folder in tokenizers.items():
            shutil.copytree(folder, staging / name)
        shutil.copytree(config_dir / "scheduler", staging / "scheduler")
        shutil.copy2(config_dir / "model_index.json", staging / "model_index.json")
        _write_source(staging, checkpoint, config_dir)
    return out


def checkpoint_keys(path: str | Path) -> set[str]:
    """The tensor names of a checkpoint; a safetensors file is not read for this, only its header."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return set(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path} is not a readable safetensors file ({exc})") from None
    return set(read_checkpoint(path))


def _tokenizer_dir(given: str | Path | None, default: Path, option: str, folder: str) -> Path:
    path = Path(given).expanduser() if given else default
    if not (path / "tokenizer_config.json").is_file():
        raise InputError(
            f"no CLIP tokenizer at {path} (a checkpoint does not contain one); give {option} DIR, the {folder} "
            "folder of a diffusers model of the same kind"
        )
    return path


def convert_controlnet_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, config: str | Path | None = None, force: bool = False
) -> Path:
    """A ControlNet 1.0/1.1 checkpoint (original names), or an SDXL ControlNet or ControlNet-Union
    single file (diffusers names), -> a diffusers ControlNet folder at ``out_dir``."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint as convert

    keys = checkpoint_keys(checkpoint)
    if DIFFUSERS_CONTROLNET_KEY in keys:
        return _convert_diffusers_controlnet(checkpoint, out_dir, config, force)
    config_dir = _config_dir(config, CONTROLNET_SD15_CONFIG)
    out = _check_out(out_dir, force)
    state = read_checkpoint(checkpoint)
    state = {k.removeprefix("control_model."): v for k, v in state.items()}
    if CONTROLNET_KEY not in state or "zero_convs.0.0.weight" not in state:
        raise InputError(
            f"{checkpoint} is not a ControlNet checkpoint (neither ControlNet 1.x's control_model input blocks "
            "nor a diffusers ControlNet's conditioning embedding)"
        )
    if "input_hint_block.14.weight" not in state:
        raise InputError(
            f"{checkpoint} has a non-standard conditioning encoder (ControlNet 1.x has 8 hint convolutions); "
            "convert it with the tool that made it"
        )
    if "label_emb.0.0.weight" in state:
        raise InputError(
            f"{checkpoint} is an SDXL ControlNet in the original layout, which diffusers' converters do not read; "
            "convert it with the tool that made it"
        )
    cn_config = ControlNetModel.load_config(config_dir)
    controlnet = ControlNetModel.from_config(cn_config)
    _load_strict(controlnet, convert(state, cn_config), "ControlNet")
    with staged_folder(out, "convert-checkpoint controlnet", force) as staging:
        controlnet.save_pretrained(staging)
        _write_source(staging, checkpoint, config_dir)
    return out


def _convert_diffusers_controlnet(checkpoint: str | Path, out_dir: str | Path, config, force: bool) -> Path:
    from diffusers import ControlNetModel, ControlNetUnionModel

    config_dir = _config_dir(config, CONTROLNET_SDXL_CONFIG)
    out = _check_out(out_dir, force)
    state = read_checkpoint(checkpoint)
    union = "task_embedding" in state
    template = ControlNetModel.load_config(config_dir)
    if config is None:
        cn_config = controlnet_config_from_weights(state, template)
    else:
        cn_config = dict(template)
        if (cn_config.get("_class_name") == "ControlNetUnionModel") != union:
            raise InputError(
                f"{checkpoint} is {'a ControlNet-Union' if union else 'a plain ControlNet'} but the config in "
                f"{config_dir} is a {cn_config.get('_class_name')}; give the matching --config"
            )
    model_class = ControlNetUnionModel if union else ControlNetModel
    controlnet = model_class.from_config(cn_config)
    _load_strict(controlnet, state, "ControlNet-Union" if union else "ControlNet")
    with staged_folder(out, "convert-checkpoint controlnet", force) as staging:
        controlnet.save_pretrained(staging)
        _write_source(staging, checkpoint, config_dir)
    return out


def _blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children ``prefix`` has in ``state`` (``down_blocks.`` -> the block count)."""
    found = {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
    return len({int(i) for i in found if i.isdigit()})


def controlnet_config_from_weights(state: dict[str, torch.Tensor], template: dict) -> dict:
    """An SDXL ControlNet's config for the weights of a diffusers-named single file.

    SDXL ControlNets come full size (the template: SDXL's depths 1/2/10), or smaller (-mid, -small)
    with fewer transformer layers per block, and ControlNet-Union adds its control-type embedding;
    the weights say which. What they cannot say (the attention heads per block) comes from the
    template, so the channel widths must be the template's.
    """
    config = {k: v for k, v in template.items() if not k.startswith("_")}
    n = _blocks(state, "down_blocks.")
    channels = [int(state[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(n)]
    if channels != list(template["block_out_channels"]):
        raise InputError(
            f"the ControlNet's block widths {channels} are not SDXL's {list(template['block_out_channels'])}; "
            "give its config with --config"
        )
    depths = [_blocks(state, f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(n)]
    config["down_block_types"] = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths]
    mid_depth = _blocks(state, "mid_block.attentions.0.transformer_blocks.")
    config["transformer_layers_per_block"] = [d or (mid_depth if i == n - 1 else 1) for i, d in enumerate(depths)]
    config["mid_block_type"] = "UNetMidBlock2DCrossAttn" if mid_depth else "UNetMidBlock2D"
    hint = [int(state["controlnet_cond_embedding.conv_in.weight"].shape[0])]
    hint += [
        int(state[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"].shape[0])
        for i in range(_blocks(state, "controlnet_cond_embedding.blocks.") // 2)
    ]
    config["conditioning_embedding_out_channels"] = hint
    config["conditioning_channels"] = int(state["controlnet_cond_embedding.conv_in.weight"].shape[1])
    if "task_embedding" in state:
        del config["mid_block_type"]  # ControlNet-Union always has the cross-attention middle block
        config["_class_name"] = "ControlNetUnionModel"
        config["num_control_type"] = int(state["task_embedding"].shape[0])
        config["num_trans_channel"] = int(state["task_embedding"].shape[1])
        config["num_trans_layer"] = _blocks(state, "transformer_layes.")
        config["num_proj_channel"] = int(state["spatial_ch_projs.weight"].shape[0])
    return config


def _check_out(out_dir: str | Path, force: bool) -> Path:
    """The output folder, checked before any work (and again by staged_folder before the rename)."""
    out = output_folder(out_dir)
    check_replaceable(out, force)
    return out


def _write_source(folder: Path, checkpoint: str | Path, config_dir: Path, converted: list[str] | None = None) -> None:
    """controlrt_source.json: the checkpoint (path, sha256), the configs, and which components came
    from the checkpoint (the others are the config folder's)."""
    from controlrt.io import sha256_file

    record = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "sha256": sha256_file(checkpoint),
        "config": str(config_dir),
        **({"converted": converted} if converted is not None else {}),
    }
    (folder / "controlrt_source.json").write_text(json.dumps(record, indent=2))
