"""LoRA adapters fused into a base model's weights, as diffusers' ``fuse_lora`` fuses them.

A LoRA is read the way diffusers' ``load_lora_weights`` reads it: any format its ``lora_state_dict``
takes (diffusers/peft, the older diffusers attention-processor names, kohya's ``lora_unet_*`` /
``lora_te*_*``), with per-module alphas from the file (kohya's ``.alpha`` tensors, or the adapter
metadata diffusers writes into safetensors files) and alpha = rank where none is stored. Each
adapted layer's weight becomes ``W + scale * alpha / rank * (B @ A)`` (``alpha / sqrt(rank)``
for rsLoRA). The fusing is done here, not through peft, so text-encoder adapters need no peft
integration in transformers; the tests check it against diffusers' own fused UNet and peft's merged
text-encoder layers.

LoRAs touch the denoiser (the UNet, or SD3's and Flux's transformer) and the text encoders, never the
ControlNets or the VAE. For SD3 and Flux the file is read by their pipelines' ``lora_state_dict``
(StableDiffusion3Pipeline, FluxPipeline), which turn kohya's, XLabs' and BFL's Flux layouts into
diffusers' names with their alphas already applied.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from controlrt.errors import InputError, ModelError

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
MAX_LORAS = 8


@dataclass(frozen=True)
class Lora:
    """One LoRA file and the scale it is fused at."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Lora:
        """``PATH[:SCALE]``: a LoRA file (or a folder holding pytorch_lora_weights.*), scale 1 by default."""
        path, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                scale = float(tail)
                path = head
            except ValueError:
                pass  # a colon inside the path
        if not math.isfinite(scale) or abs(scale) > 16:
            raise InputError(f"LoRA {text!r}: scale {scale} must be a finite number within [-16, 16]")
        return cls(resolve_file(path), scale)

    def record(self) -> dict[str, Any]:
        """What a manifest records: the file, its sha256 and the scale."""
        return {"path": str(self.path), "sha256": sha256_of(self.path), "scale": self.scale}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Lora:
        return cls(Path(record["path"]), float(record["scale"]))

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def resolve_file(path: str | Path) -> Path:
    """The LoRA weight file at ``path`` (a file, or a folder with diffusers' weight file)."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise InputError(f"LoRA folder {path} holds no {' or '.join(WEIGHT_NAMES)}")
    if not path.is_file():
        raise InputError(f"LoRA {path} does not exist")
    return path


def sha256_of(path: Path) -> str:
    from controlrt.io import sha256_cached

    return sha256_cached(path)


def check_loras(loras: list[Lora]) -> list[Lora]:
    """At most MAX_LORAS, each file once."""
    if len(loras) > MAX_LORAS:
        raise InputError(f"{len(loras)} LoRAs given; at most {MAX_LORAS} are fused into one build")
    seen = set()
    for lora in loras:
        if lora.path in seen:
            raise InputError(f"LoRA {lora.path} is given twice; give it once with the sum of the scales")
        seen.add(lora.path)
    return loras


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: down (A) [rank, in(, kh, kw)], up (B) [out, rank(, 1, 1)] and alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """alpha / rank * (B @ A), shaped as the layer's weight."""
        factor = self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
        up, down = self.up.flatten(1), self.down.flatten(1)
        if up.shape[0] != shape[0] or down.shape[1] != math.prod(shape[1:]) or up.shape[1] != down.shape[0]:
            raise ModelError(
                f"a LoRA layer of {tuple(self.up.shape[:1])}x{tuple(self.down.shape[1:])} does not fit a weight "
                f"of {tuple(shape)}"
            )
        return (factor * (up.double() @ down.double())).reshape(shape)


def read_lora(lora: Lora, pipeline: str) -> dict[str, dict[str, LoraLayer]]:
    """The adapted layers of ``lora``, per component (unet, text_encoder, text_encoder_2) and module path,
    as the diffusers ``pipeline`` class reads the file (the model family's lora_pipeline).

    Raises InputError for a file diffusers cannot read, ModelError for adapters controlrt cannot
    fuse (DoRA, LoRA biases, components other than the UNet and the text encoders). Cached per
    file state (path, size, modification time).
    """
    try:
        stat = lora.path.stat()
    except OSError:
        raise InputError(f"LoRA {lora.path} does not exist") from None
    return _read_lora(lora.path, stat.st_size, stat.st_mtime_ns, pipeline)


@functools.lru_cache(maxsize=16)
def _read_lora(path: Path, size: int, mtime_ns: int, pipeline: str) -> dict[str, dict[str, LoraLayer]]:
    import diffusers

    from controlrt.checkpoints import read_checkpoint

    loader = getattr(diffusers, pipeline)
    raw = read_checkpoint(path)
    # SD's and SDXL's loaders return (state, alphas); Flux's only when asked; SD3's the state alone
    asks = "return_alphas" in inspect.signature(loader.lora_state_dict).parameters
    try:
        read = loader.lora_state_dict(dict(raw), **({"return_alphas": True} if asks else {}))
        state, alphas = read if isinstance(read, tuple) else (read, None)
    except (ValueError, KeyError, RuntimeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"LoRA {path}: diffusers cannot read it ({first})") from None
    metadata = _metadata(path)
    layers: dict[str, dict[str, LoraLayer]] = {}
    for component in sorted({key.split(".", 1)[0] for key in state}):
        if component not in COMPONENTS:
            raise ModelError(
                f"LoRA {path} adapts {component!r}; controlrt fuses LoRAs into the denoiser and text encoders only"
            )
        own = {k[len(component) + 1 :]: v for k, v in state.items() if k.startswith(component + ".")}
        own_alphas = {
            k[len(component) + 1 :].removesuffix(".alpha"): torch.tensor(float(v))
            for k, v in (alphas or {}).items()
            if k.startswith(component + ".")
        }
        layers[component] = _component_layers(path, component, own, own_alphas, _prefixed(metadata, component))
    if not any(layers.values()):
        raise InputError(f"LoRA {path} holds no LoRA layers")
    return layers


def _metadata(path: Path) -> dict[str, Any]:
    """The adapter metadata diffusers writes into a safetensors LoRA (lora_alpha, r, patterns), if any."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise InputError(f"LoRA {path}: its adapter metadata is not JSON") from None


def _prefixed(metadata: dict[str, Any], component: str) -> dict[str, Any]:
    return {k[len(component) + 1 :]: v for k, v in metadata.items() if k.startswith(component + ".")}


def _to_peft_names(component: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as peft names them (``path.lora_A.weight``), from any of diffusers' LoRA namings."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.state_dict_utils import StateDictType

    if not state or any(".lora_A." in k or ".lora_B." in k or "lora_magnitude_vector" in k for k in state):
        return state
    if component == "unet":
        return convert_unet_state_dict_to_peft(state)
    if any("lora_linear_layer" in k for k in state):
        return convert_state_dict_to_peft(state)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state, StateDictType.DIFFUSERS_OLD))


def _component_layers(
    path: Path,
    component: str,
    state: dict[str, torch.Tensor],
    alphas: dict[str, torch.Tensor],
    metadata: dict[str, Any],
) -> dict[str, LoraLayer]:
    state = _to_peft_names(component, state)
    unsupported = [k for k in state if "lora_magnitude_vector" in k or (".lora_B." in k and k.endswith(".bias"))]
    if unsupported or metadata.get("use_dora"):
        raise ModelError(
            f"LoRA {path} is a DoRA or has LoRA biases ({(unsupported or ['use_dora'])[0]}); "
            "controlrt fuses plain LoRA layers only"
        )
    # alphas as the file stores them (kohya's per-module tensors), named like their down weights
    # (diffusers keeps "….down.weight.alpha" for attention layers and "<module>.alpha" for the
    # others) and renamed by the same conversion, so that they land on the same module paths
    as_down = {k if k.endswith(".down.weight") else f"{k}.lora.down.weight": v for k, v in alphas.items()}
    alpha_of = {
        k.removesuffix(".lora_A.weight"): float(v)
        for k, v in _to_peft_names(component, as_down).items()
        if k.endswith(".lora_A.weight")
    }
    unmatched = sorted(set(alpha_of) - {k.split(".lora_A.")[0] for k in state if ".lora_A." in k})
    if unmatched:
        raise ModelError(f"LoRA {path}: an alpha for {component}.{unmatched[0]}, which has no LoRA matrices")
    modules = sorted({k.split(".lora_A.")[0] for k in state if ".lora_A." in k})
    layers = {}
    for module in modules:
        down, up = state.get(f"{module}.lora_A.weight"), state.get(f"{module}.lora_B.weight")
        if down is None or up is None:
            raise InputError(f"LoRA {path}: {component}.{module} has only one of its two matrices")
        rank = int(down.shape[0])
        alpha = alpha_of.get(module, _pattern(metadata.get("alpha_pattern"), module, metadata.get("lora_alpha")))
        layers[module] = LoraLayer(
            down.float(), up.float(), float(rank if alpha is None else alpha), bool(metadata.get("use_rslora"))
        )
    extra = [k for k in state if ".lora_A." not in k and ".lora_B." not in k]
    if extra:
        raise ModelError(f"LoRA {path}: {component}.{extra[0]} is not a LoRA matrix; controlrt cannot fuse it")
    return layers


def _pattern(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """peft's pattern lookup: the first pattern that matches the end of the module's name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def fuse_into(module: torch.nn.Module, component: str, loras: list[Lora], pipeline: str) -> torch.nn.Module:
    """Fuse every LoRA's layers for ``component`` into ``module`` (in place) and return it."""
    for lora in loras:
        layers = read_lora(lora, pipeline).get(component, {})
        with torch.no_grad():
            for name, layer in layers.items():
                target = _submodule(module, name)
                if target is None or not hasattr(target, "weight"):
                    raise ModelError(
                        f"LoRA {lora.path} adapts {component}.{name}, which the base model's {component} does not have"
                    )
                weight = target.weight
                try:
                    delta = layer.delta(weight.shape)
                except ModelError as exc:
                    raise ModelError(f"LoRA {lora.path}: {component}.{name}: {exc}; is it for another model?") from None
                weight.copy_((weight.double() + lora.scale * delta).to(weight.dtype))
    return module


def _submodule(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """``module.name``, also where the LoRA was saved without (or with) transformers' ``text_model.``."""
    for candidate in (name, f"text_model.{name}", name.removeprefix("text_model.")):
        try:
            return module.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def adapted_components(loras: list[Lora], pipeline: str) -> set[str]:
    """The components the LoRAs change (their graphs need re-exporting when the LoRAs change)."""
    return {component for lora in loras for component, layers in read_lora(lora, pipeline).items() if layers}
