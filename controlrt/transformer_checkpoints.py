"""SD3/SD3.5 and Flux single-file checkpoints -> diffusers pipeline folders.

Stability AI ships SD3 and SD3.5 as one file in MMDiT's own names: the transformer under
``model.diffusion_model.`` (joint_blocks, fused q/k/v, shift-then-scale modulations), the VAE under
``first_stage_model.`` and, in some files, the text encoders under ``text_encoders.clip_l.transformer.``,
``text_encoders.clip_g.transformer.`` and ``text_encoders.t5xxl.transformer.`` (transformers' own names).
Black Forest Labs ships Flux's transformer alone in its names (double_blocks, single_blocks with q, k,
v and the MLP fused in one projection); ComfyUI's all-in-one files add ``model.diffusion_model.``
before it and the VAE and text encoders as above. Fine-tunes of both circulate the same ways.

A checkpoint is converted against a diffusers pipeline folder of the same model (``--config DIR``):
the transformer's config comes from there (and must match the weights), as do the tokenizers, the
scheduler and every component the file does not hold. SD3's transformer is converted by diffusers'
own converter; Flux's by :func:`flux_transformer_to_diffusers`, which follows diffusers' converter but
reads the block width from the weights (diffusers' fixes it at FLUX.1's 3072). Weights keep the
checkpoint's dtype (16-bit files stay 16-bit) and each component is converted, saved and let go
before the next, so the memory needed is about the largest component's.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from controlrt.errors import InputError, ModelError
from controlrt.models import WEIGHT_SUFFIXES

logger = logging.getLogger(__name__)

DIFFUSION_PREFIX = "model.diffusion_model."
TRANSFORMER_KEYS = {  # family -> a key only its transformer has (without DIFFUSION_PREFIX)
    "sd3": "joint_blocks.0.x_block.attn.qkv.weight",
    "flux": "double_blocks.0.img_attn.qkv.weight",
}
TITLES = {"sd3": "an SD3/SD3.5", "flux": "a Flux"}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# Where the single files keep the components other than the transformer, when they hold them.
COMPONENT_PREFIXES = {
    "sd3": {
        "vae": "first_stage_model.",
        "text_encoder": "text_encoders.clip_l.transformer.",
        "text_encoder_2": "text_encoders.clip_g.transformer.",
        "text_encoder_3": "text_encoders.t5xxl.transformer.",
    },
    "flux": {
        "vae": "first_stage_model.",
        "text_encoder": "text_encoders.clip_l.transformer.",
        "text_encoder_2": "text_encoders.t5xxl.transformer.",
    },
}


def transformer_family(keys: set[str]) -> str | None:
    """ "sd3" or "flux" when ``keys`` hold that family's transformer, else None."""
    for family, key in TRANSFORMER_KEYS.items():
        if key in keys or DIFFUSION_PREFIX + key in keys:
            return family
    return None


class TensorReader:
    """A checkpoint's tensors read by name: a safetensors file one tensor at a time, a weights-only
    pickle whole (it cannot be read in parts)."""

    def __init__(self, path: str | Path) -> None:
        from controlrt.checkpoints import checkpoint_keys, read_checkpoint

        self.path = Path(path).expanduser()
        self._state = None if self.path.suffix.lower() == ".safetensors" else read_checkpoint(self.path)
        self.keys = checkpoint_keys(self.path) if self._state is None else set(self._state)

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)

    def read(self, prefix: str, strip: bool = True) -> dict[str, torch.Tensor]:
        """The tensors whose names start with ``prefix`` (removed from the names if ``strip``)."""
        names = sorted(k for k in self.keys if k.startswith(prefix))
        cut = len(prefix) if strip else 0
        if self._state is not None:
            return {k[cut:]: self._state[k] for k in names}
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as weights:
            return {k[cut:]: weights.get_tensor(k) for k in names}


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    """The originals' (shift, scale) modulation halves as diffusers' (scale, shift)."""
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def flux_transformer_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Black Forest Labs' Flux transformer names -> FluxTransformer2DModel's, as diffusers'
    convert_flux_transformer_checkpoint_to_diffusers maps them, with the block width and the single
    blocks' MLP width read from the weights. ``state`` is consumed."""
    out: dict[str, torch.Tensor] = {}

    def move(new: str, old: str) -> None:
        for part in ("weight", "bias"):
            if f"{old}.{part}" in state:
                out[f"{new}.{part}"] = state.pop(f"{old}.{part}")

    def split(new: list[str], old: str, sizes: list[int]) -> None:
        for part in ("weight", "bias"):
            for name, piece in zip(new, torch.split(state.pop(f"{old}.{part}"), sizes), strict=True):
                out[f"{name}.{part}"] = piece.clone()

    width = int(state["img_in.weight"].shape[0])
    for new, old in (
        ("time_text_embed.timestep_embedder", "time_in"),
        ("time_text_embed.text_embedder", "vector_in"),
        ("time_text_embed.guidance_embedder", "guidance_in"),
    ):
        move(f"{new}.linear_1", f"{old}.in_layer")
        move(f"{new}.linear_2", f"{old}.out_layer")
    move("context_embedder", "txt_in")
    move("x_embedder", "img_in")
    doubles = _count(state, "double_blocks.")
    for i in range(doubles):
        new, old = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        move(f"{new}norm1.linear", f"{old}img_mod.lin")
        move(f"{new}norm1_context.linear", f"{old}txt_mod.lin")
        split([f"{new}attn.to_{p}" for p in "qkv"], f"{old}img_attn.qkv", [width] * 3)
        split([f"{new}attn.add_{p}_proj" for p in "qkv"], f"{old}txt_attn.qkv", [width] * 3)
        for stream, added in (("img", ""), ("txt", "added_")):
            out[f"{new}attn.norm_{added}q.weight"] = state.pop(f"{old}{stream}_attn.norm.query_norm.scale")
            out[f"{new}attn.norm_{added}k.weight"] = state.pop(f"{old}{stream}_attn.norm.key_norm.scale")
        move(f"{new}ff.net.0.proj", f"{old}img_mlp.0")
        move(f"{new}ff.net.2", f"{old}img_mlp.2")
        move(f"{new}ff_context.net.0.proj", f"{old}txt_mlp.0")
        move(f"{new}ff_context.net.2", f"{old}txt_mlp.2")
        move(f"{new}attn.to_out.0", f"{old}img_attn.proj")
        move(f"{new}attn.to_add_out", f"{old}txt_attn.proj")
    for i in range(_count(state, "single_blocks.")):
        new, old = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        move(f"{new}norm.linear", f"{old}modulation.lin")
        mlp = int(state[f"{old}linear1.weight"].shape[0]) - 3 * width
        names = [f"{new}attn.to_{p}" for p in "qkv"] + [f"{new}proj_mlp"]
        split(names, f"{old}linear1", [width, width, width, mlp])
        out[f"{new}attn.norm_q.weight"] = state.pop(f"{old}norm.query_norm.scale")
        out[f"{new}attn.norm_k.weight"] = state.pop(f"{old}norm.key_norm.scale")
        move(f"{new}proj_out", f"{old}linear2")
    move("proj_out", "final_layer.linear")
    for part in ("weight", "bias"):
        out[f"norm_out.linear.{part}"] = _swap_scale_shift(state.pop(f"final_layer.adaLN_modulation.1.{part}"))
    if state:
        raise ModelError(f"the Flux checkpoint has weights no Flux transformer has, e.g. {sorted(state)[0]!r}")
    return out


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


def _transformer_state(family: str, reader: TensorReader) -> dict[str, torch.Tensor]:
    prefix = DIFFUSION_PREFIX if reader.has_prefix(DIFFUSION_PREFIX) else ""
    others = tuple(COMPONENT_PREFIXES[family].values())
    state = {k: v for k, v in reader.read(prefix).items() if prefix or not k.startswith(others)}
    if family == "flux":
        return flux_transformer_to_diffusers(state)
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    try:
        return convert_sd3_transformer_checkpoint_to_diffusers(state)
    except KeyError as exc:
        raise ModelError(f"the SD3 checkpoint lacks the transformer weight {exc.args[0]!r}") from None


def _component_state(component: str, prefix: str, reader: TensorReader, module: torch.nn.Module) -> dict:
    """A VAE or text encoder's weights from the file, in the diffusers or transformers names of ``module``."""
    if component != "vae":  # text encoders: transformers' names after the prefix
        return reader.read(prefix)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = convert_ldm_vae_checkpoint(reader.read(prefix, strip=False), dict(module.config))
    expected = module.state_dict()  # the original attention's 1x1 convolutions as linear layers
    return {k: v.reshape(expected[k].shape) if k in expected else v for k, v in state.items()}


def _empty_module(library: str, class_name: str, folder: Path) -> torch.nn.Module:
    """``class_name`` of ``library`` with ``folder``'s config, on the meta device (no weights)."""
    import diffusers
    import transformers

    cls = getattr(diffusers if library == "diffusers" else transformers, class_name, None)
    if cls is None:
        raise ModelError(f"unknown {library} class {class_name}")
    with torch.device("meta"):
        if hasattr(cls, "load_config"):
            return cls.from_config(cls.load_config(folder))
        return cls._from_config(cls.config_class.from_pretrained(folder))


def _with_tied(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each weight the module ties to another (T5's shared embedding and its
    encoder's) under every name it has, as a file holds it once."""
    names: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    state = dict(state)
    for group in names.values():
        present = [n for n in group if n in state]
        for name in group if present else ():
            state.setdefault(name, state[present[0]])
    return state


def _link_tree(source: Path, target: Path) -> None:
    """``source`` copied to ``target``, its weight files hard-linked where the file system allows
    (weights are not edited in place; configs, which a user might edit, are copied)."""

    def link(src: str, dst: str) -> None:
        if src.endswith(WEIGHT_SUFFIXES):
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def convert_base_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    force: bool = False,
    tokenizer_2: str | Path | None = None,
) -> Path:
    """A base model's single file of any family -> a diffusers pipeline folder: SD3/SD3.5 and Flux
    here (``config``: their pipeline folder), SD 1.x and SDXL by
    :func:`controlrt.checkpoints.convert_sd_checkpoint`."""
    from controlrt.checkpoints import checkpoint_keys, convert_sd_checkpoint

    family = transformer_family(checkpoint_keys(checkpoint))
    if family is None:
        return convert_sd_checkpoint(checkpoint, out_dir, config, tokenizer, force, tokenizer_2=tokenizer_2)
    if tokenizer is not None or tokenizer_2 is not None:
        raise InputError(
            f"{checkpoint} is {TITLES[family]} checkpoint: its tokenizers come from --config; drop --tokenizer"
        )
    return convert_transformer_checkpoint(checkpoint, family, out_dir, config, force)


def convert_transformer_checkpoint(
    checkpoint: str | Path, family: str, out: str | Path, config: str | Path | None, force: bool
) -> Path:
    """An SD3/SD3.5 or Flux single file -> a diffusers pipeline folder at ``out``, against the
    pipeline folder ``config`` of the same model. Nothing is written unless every component the file
    holds matches that folder's configs."""
    from controlrt.checkpoints import _check_out, _load_strict, _write_source
    from controlrt.families import family_of
    from controlrt.io import staged_folder
    from controlrt.models import BaseModel

    if config is None:
        raise InputError(
            f"{checkpoint} is {TITLES[family]} checkpoint: give --config DIR, the diffusers {PIPELINES[family]} "
            "folder of the same model (its configs, tokenizers and scheduler, and the components the file "
            "does not hold, come from there)"
        )
    config_dir = Path(config).expanduser()
    try:
        base = BaseModel.open(config_dir)
    except ModelError as exc:
        raise InputError(f"--config: {exc}") from None
    found = family_of(base.info())
    if found.name != family:
        raise InputError(
            f"{checkpoint} is {TITLES[family]} checkpoint but {config_dir} is a {found.title} pipeline folder; give "
            f"the {PIPELINES[family]} folder of the same model with --config"
        )
    out = _check_out(out, force)
    reader = TensorReader(checkpoint)
    prefixes = COMPONENT_PREFIXES[family]
    with staged_folder(out, "convert-checkpoint sd", force) as staging:
        held = ["transformer"]
        module = _empty_module(*base.index["transformer"][:2], config_dir / "transformer")
        _load_strict(module, _with_tied(module, _transformer_state(family, reader)), "transformer", assign=True)
        module.save_pretrained(staging / "transformer")
        del module
        for component in [c for c in base.index if c.startswith(("vae", "text_encoder"))]:
            prefix = prefixes.get(component)
            if prefix is None or not reader.has_prefix(prefix):
                _link_tree(config_dir / component, staging / component)
                continue
            module = _empty_module(*base.index[component][:2], config_dir / component)
            state = _with_tied(module, _component_state(component, prefix, reader, module))
            _load_strict(module, state, component.replace("_", " "), ignore=("position_ids",), assign=True)
            module.save_pretrained(staging / component)
            held.append(component)
            del module, state
        for component in [c for c in base.index if c.startswith(("tokenizer", "scheduler"))]:
            shutil.copytree(config_dir / component, staging / component)
        shutil.copy2(config_dir / "model_index.json", staging / "model_index.json")
        _write_source(staging, checkpoint, config_dir, converted=held)
    logger.info("converted %s from the checkpoint, the rest from %s", ", ".join(held), config_dir)
    return out
