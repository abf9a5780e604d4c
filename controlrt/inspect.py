"""``controlrt inspect BUILD``: a build's manifest at a glance.

Graphs with their inputs and outputs (symbolic shapes), the precisions each graph has with their
size on disk, TensorRT engines and whether each may still run here, and the source models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from controlrt.manifest import Build
from controlrt.precision import Precision


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def engine_status(build: Build, graph: str, precision: Precision) -> dict[str, Any] | None:
    """What is known about one engine without running it; None if there is none.

    Judged by the engines' one staleness check (EngineStore.problems), against this machine's
    TensorRT and GPU where they are present; plans are checked by size, not hashed.
    """
    from controlrt.engine.cache import EngineStore

    store = EngineStore(build)
    if not store.record_path(graph, precision).exists() and not store.plan_path(graph, precision).exists():
        return None
    tensorrt_version, gpu, unchecked = _this_machine()
    record, reasons = store.problems(graph, precision, tensorrt_version, gpu, verify=False)
    if record is None:
        return {"status": f"unusable: {reasons[0]}"}
    info: dict[str, Any] = {
        "bytes": record.plan_bytes,
        "tensorrt": record.key.tensorrt,
        "gpu": f"{record.key.gpu.name} (compute {record.key.gpu.compute_capability})",
        "profiles": len(record.key.profiles),
        "options": {k: v for k, v in record.key.options.__dict__.items() if v},
    }
    if reasons:
        info["status"] = "stale: " + "; ".join(reasons)
    else:
        info["status"] = "current" + (f" ({unchecked} not checked)" if unchecked else "")
    return info


def _this_machine():
    """(TensorRT version or None, GPU or None, what could not be checked, in words)."""
    try:
        import tensorrt

        version: str | None = str(tensorrt.__version__)
    except Exception:
        return None, None, "TensorRT version and GPU: no TensorRT here"
    from controlrt.engine.cache import Gpu
    from controlrt.errors import BuildError

    try:
        return version, Gpu.current(), ""
    except BuildError:
        return version, None, "GPU: none visible"


def inspect_build(build_dir: str | Path) -> dict[str, Any]:
    build = Build.open(build_dir, verify=False)
    m = build.manifest
    graphs = {}
    for name, g in m.graphs.items():
        variants = {
            p: {"files": [f.path for f in v.files], "bytes": sum(f.bytes for f in v.files)}
            for p, v in g.variants.items()
        }
        engines = {}
        for precision in Precision:
            status = engine_status(build, name, precision)
            if status is not None:
                engines[str(precision)] = status
        graphs[name] = {
            "kind": str(g.spec.kind),
            "inputs": {t.name: f"{t.dtype} {t.shape_text()}" for t in g.spec.inputs},
            "outputs": {t.name: f"{t.dtype} {t.shape_text()}" for t in g.spec.outputs},
            "variants": variants,
            "engines": engines,
        }
    return {
        "build": str(build.path),
        "created": m.created,
        "model": {
            "native_size": list(m.info.default_size),
            "size_multiple": m.info.size_multiple,
            "vae_scale_factor": m.info.vae_scale_factor,
            "latent_channels": m.info.latent_channels,
        },
        "graphs": graphs,
        "sources": {
            "base": m.sources["base"]["path"],
            "controlnets": [s["path"] for s in m.sources["controlnets"]],
            "loras": [
                {"path": r["path"], "sha256": r["sha256"], "scale": r["scale"]}
                for r in m.sources["base"].get("loras", [])
            ],
        },
        "tools": m.tools,
    }


def format_inspection(info: dict[str, Any]) -> str:
    lines = [f"build {info['build']} (created {info['created']})"]
    model = info["model"]
    lines.append(
        f"model: native {model['native_size'][0]}x{model['native_size'][1]} px, sizes in multiples of "
        f"{model['size_multiple']}, VAE factor {model['vae_scale_factor']}, {model['latent_channels']} latent channels"
    )
    for name, g in info["graphs"].items():
        lines.append(f"\n{name} ({g['kind']})")
        for label in ("inputs", "outputs"):
            items = g[label]
            if len(items) > 4:  # the UNet's residual inputs: first two, last one
                keys = list(items)
                shown = [*keys[:4], "…", keys[-1]]
                text = ", ".join(k if k == "…" else f"{k} {items[k]}" for k in shown)
                text += f" ({len(keys)} in all)"
            else:
                text = ", ".join(f"{k} {v}" for k, v in items.items())
            lines.append(f"  {label}: {text}")
        variants = ", ".join(f"{p} {_mib(v['bytes'])}" for p, v in g["variants"].items())
        lines.append(f"  precisions: {variants}")
        for precision, e in g["engines"].items():
            size = f" {_mib(e['bytes'])}" if "bytes" in e else ""
            lines.append(f"  engine {precision}{size}: {e['status']}")
        if not g["engines"]:
            lines.append("  engines: none")
    lines.append(f"\nsources: base {info['sources']['base']}")
    for k, path in enumerate(info["sources"]["controlnets"]):
        lines.append(f"         controlnet_{k} {path}")
    for lora in info["sources"]["loras"]:
        lines.append(f"         LoRA {lora['path']} at scale {lora['scale']:g} (sha256 {lora['sha256'][:12]})")
    return "\n".join(lines)
