"""Exporting one graph module to an ONNX file described by its spec."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from controlrt.errors import ExportError, InputError
from controlrt.logs import stdout_to_log
from controlrt.specs import GraphSpec

logger = logging.getLogger(__name__)

# ONNX protobuf files cannot exceed 2 GiB; larger graphs keep their weights in a .data file.
EXTERNAL_DATA_THRESHOLD = 1536 << 20
DEFAULT_OPSET = 18
# Attention's ops need opset 14 or newer; 20 is the newest the TorchScript exporter writes.
MIN_OPSET, MAX_OPSET = 14, 20
# The precisions a graph can be exported in, and the torch dtype its module is traced in.
EXPORT_PRECISIONS = {"fp32": "float32", "fp16": "float16"}


@dataclass(frozen=True)
class ExportSettings:
    """How graphs are exported.

    Attributes:
        opset: ONNX opset version.
        external_data: True or False forces weights into (or out of) a ``.onnx.data`` file;
            None chooses by size (graphs over ~1.5 GiB of weights use external data).
        trace_batch: Batch size of the dummy inputs the graph is traced with.
        precision: "fp32", or "fp16": the modules loaded and traced in fp16 (inputs and outputs
            kept fp32), so that a model too large to hold in fp32 is never held in fp32.
    """

    opset: int = DEFAULT_OPSET
    external_data: bool | None = None
    trace_batch: int = 2
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise InputError(
                f"ONNX opset {self.opset!r} is not supported: give {MIN_OPSET} to {MAX_OPSET} "
                f"(the TorchScript exporter's range for these graphs; default {DEFAULT_OPSET})"
            )
        if self.trace_batch < 1:
            raise InputError(f"trace batch {self.trace_batch} must be at least 1")
        if self.precision not in EXPORT_PRECISIONS:
            raise InputError(
                f"export precision {self.precision!r} is not supported: give fp32 or fp16 (bf16 computes the "
                "fp32 graphs in bf16 on the backends that have it; int8 comes from controlrt calibrate)"
            )

    def to_dict(self) -> dict:
        return {
            "opset": self.opset,
            "external_data": self.external_data,
            "trace_batch": self.trace_batch,
            "precision": self.precision,
            "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        }

    @classmethod
    def from_dict(cls, data: dict) -> ExportSettings:
        """The settings a manifest recorded (unknown keys, such as the exporter's name, ignored)."""
        return cls(**{k: data[k] for k in ("opset", "external_data", "trace_batch", "precision") if k in data})


def _is_16_bit(module: nn.Module) -> bool:
    return any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters())


def _initializer_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


@contextmanager
def _decomposed_rms_norms(module: nn.Module):
    """torch.nn.RMSNorm layers (Flux's and SD3.5's query and key norms) traced as their math: the
    TorchScript exporter has no aten::rms_norm below opset 23 (ONNX's RMSNormalization)."""

    def decomposed(norm: nn.RMSNorm):
        dims = tuple(range(-len(norm.normalized_shape), 0))

        def forward(x: torch.Tensor) -> torch.Tensor:
            eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
            y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
            return y * norm.weight if norm.weight is not None else y

        return forward

    norms = [m for m in module.modules() if isinstance(m, nn.RMSNorm)]
    for norm in norms:
        norm.forward = decomposed(norm)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


@contextmanager
def _masks_in_query_dtype(active: bool):
    """Attention masks traced in the query's dtype: the TorchScript exporter writes causal and
    boolean masks as fp32 constants, which turns the scores of a 16-bit graph (CLIP's causal
    attention) to fp32 and leaves ill-typed nodes behind. For 16-bit modules only."""
    if not active:
        yield
        return
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if is_causal:
            rows, columns = query.shape[-2], key.shape[-2]
            attn_mask, is_causal = torch.ones(rows, columns, dtype=torch.bool, device=query.device).tril(), False
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            lowest = torch.finfo(query.dtype).min
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attn_mask, lowest
            )
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _rotary(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    """diffusers' apply_rotary_emb for Flux (real cos/sin, pairs on the last axis), written with
    unflatten so that the traced reshapes keep the batch and sequence symbolic (the original's
    ``x.reshape(*x.shape[:-1], -1, 2)`` traces them as constants)."""
    if not use_real or use_real_unbind_dim != -1:
        raise ExportError("only Flux-style rotary embeddings (real, pairs on the last axis) can be exported")
    cos, sin = freqs_cis
    index = (None, None, slice(None), slice(None)) if sequence_dim == 2 else (None, slice(None), None, slice(None))
    cos, sin = cos[index].to(x.device), sin[index].to(x.device)
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@contextmanager
def _traceable_rotary():
    """Flux's attention traced with :func:`_rotary` in place of apply_rotary_emb."""
    try:
        from diffusers.models.transformers import transformer_flux
    except ImportError:  # pragma: no cover (diffusers is a dependency)
        yield
        return
    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = _rotary
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original


def export_onnx(module: nn.Module, spec: GraphSpec, path: Path, settings: ExportSettings) -> list[Path]:
    """Trace ``module`` at the spec's native size and write ``path`` (plus ``path.data`` if large).

    Returns the files written. Raises ExportError if the exporter fails.
    """

    feeds = spec.dummy_inputs(spec.sizes(batch=settings.trace_batch), seed=0)
    args = tuple(feeds[name] for name in spec.input_names)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with (
                warnings.catch_warnings(),
                torch.no_grad(),
                stdout_to_log(logger),
                _decomposed_rms_norms(module),
                _traceable_rotary(),
                _masks_in_query_dtype(_is_16_bit(module)),
            ):
                warnings.simplefilter("ignore")  # tracer and deprecation chatter
                torch.onnx.export(
                    module,
                    args,
                    str(raw),
                    input_names=spec.input_names,
                    output_names=spec.output_names,
                    dynamic_axes=spec.dynamic_axes(),
                    opset_version=settings.opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except Exception as exc:  # the exporter raises many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ExportError(f"{spec.name}: ONNX export at opset {settings.opset} failed: {first}") from exc
        files = _rewrite(raw, path, settings.external_data)
    logger.info("exported %s (%d file(s))", spec.name, len(files))
    return files


def _rewrite(raw: Path, path: Path, external: bool | None) -> list[Path]:
    """The exporter's output as ``path`` (+ one ``path.data``), its weights streamed, not held.

    For graphs over 2 GiB the exporter writes one file per weight; loading them into one protobuf
    to save them again would hold the weights a second time beside the module. Instead the graph is
    read without its weights and each weight is copied, one at a time, into the single data file,
    and its file deleted once copied, so that the disk holds the weights about once, not twice.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(raw), load_external_data=False)
    tensors = list(_get_all_tensors(model))
    stored = [t for t in tensors if uses_external_data(t)]
    if external is None:
        external = bool(stored) or is_large(model)
    if not external:
        return save_onnx(onnx.load(str(raw), load_external_data=True), path, False)
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    offset = 0
    readers = Counter(ExternalDataInfo(t).location for t in stored)  # tensors left to read per file
    with open(data_path, "wb") as out:
        for tensor in tensors:
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                with open(raw.parent / info.location, "rb") as source:
                    source.seek(info.offset or 0)
                    blob = source.read(info.length) if info.length else source.read()
                readers[info.location] -= 1
                if not readers[info.location]:  # copied: the disk holds each weight about once
                    (raw.parent / info.location).unlink()
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                blob = tensor.raw_data
            else:
                continue  # small tensors stay in the graph, as onnx.save_model keeps them
            out.write(blob)
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.ClearField("raw_data")
            offset += len(blob)
            del blob
    onnx.save_model(model, str(path))
    return [path, data_path] if offset else [path]


def is_large(model) -> bool:
    """Whether a model's weights are too big for one protobuf file."""
    return _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD


def save_onnx(model, path: Path, external: bool | None = None) -> list[Path]:
    """Save ``model`` to ``path``; weights go to ``path.data`` if ``external`` (None: if large).

    Returns the files written, the .onnx first.
    """
    import onnx

    if external is None:
        external = is_large(model)
    data_name = path.name + ".data"
    (path.parent / data_name).unlink(missing_ok=True)  # external data is appended to, never replaced
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    files = [path]
    if external and (path.parent / data_name).exists():
        files.append(path.parent / data_name)
    return files
