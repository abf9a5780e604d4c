"""Diffusers model folders on disk: opening, checking and describing them.

A base folder is a Stable Diffusion 1.x/2.x-style pipeline folder (model_index.json, unet/,
text_encoder/, tokenizer/, vae/, scheduler/); a ControlNet folder is what
``ControlNetModel.save_pretrained`` writes. Everything controlrt needs to know about the model
(residual count and shapes, VAE factor, latent channels, cross-attention width, native size) is
read from their configs into a :class:`ModelInfo`; nothing is hard-coded to SD1.5.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlrt.errors import ModelError
from controlrt.families import family_for, family_of
from controlrt.families.info import ModelInfo, Residual

if TYPE_CHECKING:
    import torch

    from controlrt.lora import Lora

logger = logging.getLogger(__name__)

BASE_COMPONENTS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
    "tokenizer": "tokenizer_config.json",
}
# SDXL's second text encoder and tokenizer, present when model_index.json lists them.
SDXL_COMPONENTS = {"text_encoder_2": "config.json", "tokenizer_2": "tokenizer_config.json"}
# SD3's: a transformer in place of the UNet, three text encoders
SD3_COMPONENTS = {
    "transformer": "config.json",
    "vae": "config.json",
    **{f"text_encoder{s}": "config.json" for s in ("", "_2", "_3")},
    **{f"tokenizer{s}": "tokenizer_config.json" for s in ("", "_2", "_3")},
    "scheduler": "scheduler_config.json",
}
# Flux's: a transformer, CLIP and T5
FLUX_COMPONENTS = {
    "transformer": "config.json",
    "vae": "config.json",
    **{f"text_encoder{s}": "config.json" for s in ("", "_2")},
    **{f"tokenizer{s}": "tokenizer_config.json" for s in ("", "_2")},
    "scheduler": "scheduler_config.json",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
CONTROLNET_CLASSES = ("ControlNetModel", "ControlNetUnionModel", "SD3ControlNetModel", "FluxControlNetModel")
# AutoencoderKL encodes to a distribution (sampled with the request's generator), AutoencoderTiny
# (TAESD) to latents directly
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def residual_layout(config: dict[str, Any], what: str) -> tuple[Residual, ...]:
    """Residuals a UNet consumes or a ControlNet produces, in diffusers order.

    conv_in gives one; each down block gives one per resnet layer plus one for its downsampler
    (every block but the last has one); the mid block gives the last.
    """
    channels = list(config["block_out_channels"])
    per_block = config.get("layers_per_block", 2)
    if isinstance(per_block, int):
        per_block = [per_block] * len(channels)
    if len(per_block) != len(channels) or len(config["down_block_types"]) != len(channels):
        raise ModelError(f"{what}: block_out_channels, layers_per_block and down_block_types disagree in length")
    layout = [Residual(channels[0], 0)]
    for i, (width, layers) in enumerate(zip(channels, per_block, strict=True)):
        layout += [Residual(width, i)] * layers
        if i < len(channels) - 1:
            layout.append(Residual(width, i + 1))
    layout.append(Residual(channels[-1], len(channels) - 1))
    return tuple(layout)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{what}: {path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{what}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{what}: {path} does not hold a JSON object")
    return data


def _config_hash(config_path: Path) -> str:
    return hashlib.sha256(config_path.read_bytes()).hexdigest()


def _weight_paths(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]


def _weight_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Each weight file's size and sha256 (cached by size and mtime: see controlrt.io.sha256_cached)."""
    from controlrt.io import sha256_cached

    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_cached(p)} for p in _weight_paths(folder)}


def source_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed in a source folder since its record was made, in words (empty: unchanged).

    Weights are compared by sha256, so a fine-tune of the same architecture is a change; records
    of older builds that hold only sizes are compared by size.
    """
    reasons = []
    for component, digest in current["config_sha256"].items():
        if recorded.get("config_sha256", {}).get(component) != digest:
            reasons.append(f"{component} config")
    recorded_weights = recorded.get("weights", {})
    for component, files in current["weights"].items():
        before = recorded_weights.get(component, {})
        if set(before) != set(files):
            reasons.append(f"{component} weight files")
            continue
        for name, now in files.items():
            then = before[name]
            same = then == now["bytes"] if isinstance(then, int) else then.get("sha256") == now["sha256"]
            if not same:
                reasons.append(f"{component}/{name}")
    if [(r["sha256"], r["scale"]) for r in recorded.get("loras", [])] != [
        (r["sha256"], r["scale"]) for r in current.get("loras", [])
    ]:
        reasons.append("LoRAs")
    return reasons


def _require_dir(path: Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"{what} {path} is not a folder")
    return path.resolve()


def _components(index: dict[str, Any]) -> dict[str, str]:
    """The components a base folder must have, with their config file names."""
    if index.get("transformer") and index["transformer"][0] is not None:
        flux = index["transformer"][-1] == "FluxTransformer2DModel"
        return dict(FLUX_COMPONENTS if flux else SD3_COMPONENTS)
    sdxl = bool(index.get("text_encoder_2") and index["text_encoder_2"][0] is not None)
    return {**BASE_COMPONENTS, **(SDXL_COMPONENTS if sdxl else {})}


def _check_unsupported(config: dict[str, Any], what: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = config.get(key)
        if value is not None and not (key == "addition_embed_type" and value == "text_time"):
            raise ModelError(
                f"{what}: {key}={value!r} is set; controlrt supports Stable Diffusion 1.x/2.x-style models "
                "and SDXL (addition_embed_type 'text_time'), not UNets with other added conditions"
            )


def model_info(configs: dict[str, dict[str, Any]]) -> ModelInfo:
    """What the toolchain needs to know about a base model, from its components' configs
    (unet, vae, text_encoder, tokenizer, scheduler); ModelError if they do not fit together. A
    family whose denoiser is not a UNet (SD3's transformer) reads its own."""
    family = family_for(configs)
    if family.denoiser_component != "unet":
        return family.read_info(configs)
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    if unet.get("_class_name") != "UNet2DConditionModel":
        raise ModelError(f"base model: the unet is a {unet.get('_class_name')}, expected UNet2DConditionModel")
    _check_unsupported(
        unet,
        "base model unet",
        ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type"),
    )
    if unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        raise ModelError("base model unet has no mid block; ControlNet needs one")
    if vae.get("_class_name") not in VAE_CLASSES:
        raise ModelError(f"base model: the vae is a {vae.get('_class_name')}, expected {' or '.join(VAE_CLASSES)}")
    cross = unet["cross_attention_dim"]
    if isinstance(cross, list):
        if len(set(cross)) != 1:
            raise ModelError("base model unet: per-block cross_attention_dim is not supported")
        cross = cross[0]
    conditions = family.read_conditions(configs)
    widths = conditions.get("text_hidden_sizes", (text.get("hidden_size"),))
    if sum(w or 0 for w in widths) != cross:
        raise ModelError(
            f"base model: the text encoders' hidden sizes {list(widths)} do not add up to the UNet's "
            f"cross_attention_dim {cross}"
        )
    latent = int(vae.get("latent_channels", 4))
    if unet["in_channels"] not in (latent, 2 * latent + 1):
        raise ModelError(
            f"base model: the UNet takes {unet['in_channels']} input channels; the VAE makes {latent} latent channels, "
            f"so it must take {latent} (or {2 * latent + 1}: an inpainting UNet)"
        )
    if unet["out_channels"] != latent:
        raise ModelError(f"base model: the UNet predicts {unet['out_channels']} channels, the VAE has {latent}")
    sample = unet["sample_size"]
    sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
    encoders = [configs[c] for c in family.text_components]
    tokenizers = [configs[c] for c in family.tokenizer_components]
    lengths = [int(t.get("model_max_length", 77)) for t in tokenizers]
    lengths += [int(e["max_position_embeddings"]) for e in encoders]
    tile = vae.get("sample_size") or 0
    return ModelInfo(
        vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
        latent_channels=latent,
        unet_out_channels=unet["out_channels"],
        cross_attention_dim=cross,
        sequence_length=min(lengths),
        vocab_size=min(int(e["vocab_size"]) for e in encoders),
        sample_size=sample,
        scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        image_channels=vae["out_channels"],
        num_train_timesteps=int(configs["scheduler"].get("num_train_timesteps", 1000)),
        residuals=residual_layout(unet, "base model unet"),
        text_attention_mask=bool(text.get("use_attention_mask", False)),
        guidance_embedding_dim=int(unet.get("time_cond_proj_dim") or 0),
        inpainting_unet=unet["in_channels"] == 2 * latent + 1,
        vae_class=str(vae["_class_name"]),
        latents_mean=tuple(float(v) for v in vae.get("latents_mean") or ()),
        latents_std=tuple(float(v) for v in vae.get("latents_std") or ()),
        vae_tile_size=int(tile[0] if isinstance(tile, (list, tuple)) else tile),
        requires_aesthetics_score=bool(configs.get("model_index", {}).get("requires_aesthetics_score", False)),
        **conditions,
    )


@dataclass(frozen=True)
class BaseModel:
    """A Stable Diffusion pipeline folder, opened and checked, with no weights loaded.

    ``loras`` are fused into the UNet and text encoders whenever they are loaded, so that export,
    the torch reference and calibration all see the same weights. Modules load in fp32 unless
    ``dtype`` says otherwise (``with_dtype``: a 16-bit export loads them in 16 bits directly).
    """

    path: Path
    index: dict[str, Any]
    configs: dict[str, dict[str, Any]]
    loras: tuple[Lora, ...] = ()
    vae_dir: Path | None = None  # a VAE folder used in place of the base's vae/ (a tiny VAE, TAESD)
    dtype: str = "float32"  # the torch dtype its modules load in

    def with_dtype(self, dtype: str) -> BaseModel:
        """This model with its modules loaded in ``dtype`` ("float32", "float16")."""
        return replace(self, dtype=dtype)

    def with_loras(self, loras: Sequence[Lora]) -> BaseModel:
        """This model with ``loras`` fused in at load; ModelError if one does not fit it."""
        from controlrt.lora import check_loras, read_lora

        loras = tuple(check_loras(list(loras)))
        pipeline = family_of(self.info()).lora_pipeline
        for lora in loras:
            missing = set(read_lora(lora, pipeline)) - {self.denoiser_component, *self.text_encoder_names}
            if missing:
                raise ModelError(f"LoRA {lora.path} adapts {sorted(missing)[0]}, which the base model does not have")
        return replace(self, loras=loras)

    def with_vae(self, vae_dir: str | Path | None) -> BaseModel:
        """This model with the VAE in ``vae_dir`` (an AutoencoderKL or AutoencoderTiny folder) in place
        of its own; ModelError if it is not one or does not fit the UNet."""
        if vae_dir is None:
            return self
        path, config = _model_folder(vae_dir, "VAE", VAE_CLASSES)
        base = replace(self, configs={**self.configs, "vae": config}, vae_dir=path)
        base.info()  # it fits the UNet
        return base

    @property
    def vae_path(self) -> Path:
        return self.vae_dir or self.path / "vae"

    @classmethod
    def open(cls, path: str | Path) -> BaseModel:
        path = _require_dir(Path(path), "base model folder")
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); "
                "point at a folder written by StableDiffusionPipeline.save_pretrained"
            )
        index = _read_json(path / "model_index.json", "base model")
        configs: dict[str, dict[str, Any]] = {"model_index": index}
        for component, config_name in _components(index).items():
            if not index.get(component) or index[component][0] is None:
                raise ModelError(f"base model {path}: model_index.json lists no {component}")
            configs[component] = _read_json(path / component / config_name, f"base model {component}")
        base = cls(path, index, configs)
        base.info()  # checks the configs fit together
        return base

    def _class(self, component: str) -> tuple[str, str]:
        library, class_name = self.index[component][:2]
        return library, class_name

    def info(self) -> ModelInfo:
        return model_info(self.configs)

    @property
    def text_encoder_names(self) -> list[str]:
        """The text encoder components, in order (text_encoder, and text_encoder_2 for SDXL, …)."""
        return list(family_for(self.configs).text_components)

    @property
    def denoiser_component(self) -> str:
        """The denoiser's folder: unet/, or transformer/ (SD3)."""
        return family_for(self.configs).denoiser_component

    def source_record(self) -> dict[str, Any]:
        """Paths, config hashes and weight files' sizes and sha256, for the manifest's staleness checks."""
        components = _components(self.index)
        folders = {c: self.vae_path if c == "vae" else self.path / c for c in components}
        return {
            "path": str(self.path),
            "config_sha256": {c: _config_hash(folders[c] / name) for c, name in components.items()},
            "weights": {
                c: _weight_files(folders[c]) for c in (self.denoiser_component, "vae", *self.text_encoder_names)
            },
            **({"loras": self._lora_records()} if self.loras else {}),
            **({"vae": str(self.vae_dir)} if self.vae_dir else {}),
        }

    # --- loading (weights) -------------------------------------------------------------------

    def load_unet(self, meta: bool = False) -> torch.nn.Module:
        """The denoiser (the UNet, or SD3's transformer) with the LoRAs fused in; with ``meta`` its
        architecture alone, on the meta device."""
        import diffusers

        component = self.denoiser_component
        cls = getattr(diffusers, str(self.configs[component]["_class_name"]))
        unet = _load(cls, self.path / component, f"base model {component}", meta, self.dtype)
        return unet if meta else self._fused(unet, component)

    def load_denoiser_weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """The denoiser's weights whose names start with ``prefix``, the prefix removed: read alone
        from its safetensors files (a large transformer's other weights stay on disk), or from the
        whole module where it has none."""
        folder = self.path / self.denoiser_component
        files = [p for p in _weight_paths(folder) if p.suffix == ".safetensors" and p.name.count(".") == 1]
        if not files:  # .bin weights, or variants only: as diffusers loads them
            state = self.load_unet().state_dict()
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        from safetensors import safe_open

        found: dict[str, torch.Tensor] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key.startswith(prefix):
                        found[key[len(prefix) :]] = weights.get_tensor(key)
        return found

    def _lora_records(self) -> list[dict[str, Any]]:
        from controlrt.lora import adapted_components

        pipeline = family_of(self.info()).lora_pipeline
        return [{**lora.record(), "components": sorted(adapted_components([lora], pipeline))} for lora in self.loras]

    def _fused(self, module: torch.nn.Module, component: str) -> torch.nn.Module:
        if not self.loras:
            return module
        from controlrt.lora import fuse_into

        return fuse_into(module, component, list(self.loras), family_of(self.info()).lora_pipeline)

    def load_vae(self, meta: bool = False) -> torch.nn.Module:
        import diffusers

        cls = getattr(diffusers, str(self.configs["vae"]["_class_name"]))
        what = "base model vae" if self.vae_dir is None else f"VAE {self.vae_dir}"
        return _load(cls, self.vae_path, what, meta, self.dtype)

    def load_text_encoder(self, component: str = "text_encoder", meta: bool = False) -> torch.nn.Module:
        import transformers

        _, class_name = self._class(component)
        cls = getattr(transformers, class_name, None)
        if cls is None:
            raise ModelError(f"base model: unknown text encoder class {class_name}")
        encoder = _load(cls, self.path / component, f"base model {component}", meta, self.dtype)
        return encoder if meta else self._fused(encoder, component)

    def load_tokenizer(self, component: str = "tokenizer"):
        import transformers

        _, class_name = self._class(component)
        cls = getattr(transformers, class_name, None) or transformers.AutoTokenizer
        try:
            return cls.from_pretrained(self.path / component)
        except (OSError, ValueError) as exc:
            raise ModelError(f"base model {component}: cannot load {self.path / component}: {exc}") from None


@dataclass(frozen=True)
class ControlNetModelFolder:
    """A ControlNet folder, opened and checked, with no weights loaded (loaded in ``dtype``)."""

    path: Path
    config: dict[str, Any]
    dtype: str = "float32"

    def with_dtype(self, dtype: str) -> ControlNetModelFolder:
        return replace(self, dtype=dtype)

    @classmethod
    def open(cls, path: str | Path) -> ControlNetModelFolder:
        return cls(*_model_folder(path, "ControlNet", CONTROLNET_CLASSES))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def union(self) -> bool:
        """A ControlNet-Union (diffusers' ControlNetUnionModel): one network, several condition types."""
        return self.config.get("_class_name") == "ControlNetUnionModel"

    @property
    def num_control_type(self) -> int:
        return int(self.config.get("num_control_type", 6)) if self.union else 0

    @property
    def conditioning_channels(self) -> int:
        """The control input's channels: an image's (3), or for an SD3 ControlNet the latents' and
        its extra conditioning channels, for a Flux ControlNet without an input hint block the
        latents' (its in_channels are 2 x 2 packed); with one (XLabs-style), an RGB image's."""
        if self.config.get("_class_name") == "SD3ControlNetModel":
            return int(self.config["in_channels"]) + int(self.config.get("extra_conditioning_channels") or 0)
        if self.config.get("_class_name") == "FluxControlNetModel":
            if self.config.get("conditioning_embedding_channels") is not None:
                return 3  # diffusers' ControlNetConditioningEmbedding default
            return int(self.config["in_channels"]) // 4
        return int(self.config.get("conditioning_channels", 3))

    def check_fits(self, info: ModelInfo) -> None:
        """Raise ModelError unless this ControlNet's residuals and inputs fit the base UNet."""
        what = f"ControlNet {self.name!r} does not fit the base UNet"
        config = self.config
        family = family_of(info)
        family.check_controlnet_class(config, f"ControlNet {self.name!r} does not fit the base model")
        if family.denoiser_component != "unet":
            family.check_controlnet(config, f"ControlNet {self.name!r} does not fit the base model")
            return
        _check_unsupported(config, f"ControlNet {self.name!r}", ("addition_embed_type", "class_embed_type"))
        if config.get("global_pool_conditions"):
            raise ModelError(
                f"ControlNet {self.name!r} pools its conditions (global_pool_conditions, a "
                "shuffle-style model); such ControlNets are not supported yet"
            )
        if config["in_channels"] != info.latent_channels:
            raise ModelError(
                f"{what}: it takes {config['in_channels']} latent channels, the UNet {info.latent_channels}"
            )
        family.check_controlnet(config, what)
        cross = config["cross_attention_dim"]
        cross = cross[0] if isinstance(cross, list) else cross
        if cross != info.cross_attention_dim:
            raise ModelError(
                f"{what}: cross_attention_dim {cross} vs the UNet's {info.cross_attention_dim} "
                "(a ControlNet made for another Stable Diffusion version?)"
            )
        layout = residual_layout(config, f"ControlNet {self.name!r}")
        if layout != info.residuals:
            raise ModelError(
                f"{what}: it yields {len(layout)} residuals "
                f"{[(r.channels, r.level) for r in layout]}, the UNet takes {len(info.residuals)} "
                f"{[(r.channels, r.level) for r in info.residuals]} as (channels, level)"
            )
        embed = config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        factor = 2 ** (len(embed) - 1)
        if factor != info.vae_scale_factor:
            raise ModelError(
                f"{what}: its condition encoder downsamples control images {factor}x, the "
                f"VAE factor is {info.vae_scale_factor}x"
            )

    def source_record(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "config_sha256": {"controlnet": _config_hash(self.path / "config.json")},
            "weights": {"controlnet": _weight_files(self.path)},
        }

    def load(self, meta: bool = False) -> torch.nn.Module:
        import diffusers

        cls = getattr(diffusers, self.config["_class_name"])
        return _load(cls, self.path, f"ControlNet {self.name!r}", meta, self.dtype)


def _model_folder(path: str | Path, what: str, classes: tuple[str, ...]) -> tuple[Path, dict[str, Any]]:
    """A single-model folder (``save_pretrained``'s: config.json and weights) and its config;
    ModelError unless its class is one of ``classes`` and it has weights."""
    path = _require_dir(Path(path), f"{what} folder")
    config = _read_json(path / "config.json", f"{what} {path}")
    if config.get("_class_name") not in classes:
        raise ModelError(
            f"{path} is not a {what} folder (config.json describes a {config.get('_class_name')}, expected "
            f"{' or '.join(classes)})"
        )
    if not _weight_paths(path):
        raise ModelError(f"{what} {path} has no weights (*.safetensors or *.bin)")
    return path, config


def _load(cls, path: Path, what: str, meta: bool = False, dtype: str = "float32"):
    """``cls`` from ``path`` in ``dtype``; with ``meta`` from its config alone, on the meta device
    (no weights). A 16-bit ``dtype`` is the loader's own (each weight cast as it is read, the
    modules that the class keeps in fp32 kept), so that the fp32 model is never held."""
    import torch

    try:
        if meta:
            with torch.device("meta"):
                if hasattr(cls, "load_config"):  # diffusers
                    return cls.from_config(cls.load_config(path)).eval()
                return cls._from_config(cls.config_class.from_pretrained(path)).eval()  # transformers
        if dtype == "float32":
            module = cls.from_pretrained(path).float()
        else:  # diffusers names the argument torch_dtype, transformers dtype
            key = "torch_dtype" if hasattr(cls, "load_config") else "dtype"
            module = cls.from_pretrained(path, **{key: getattr(torch, dtype)})
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{what}: cannot load weights from {path}: {first}") from None
    return module.eval().requires_grad_(False)
