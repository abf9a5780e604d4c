"""Full-size SD3.5 and Flux graphs on the meta device: parameters and bytes per graph, nothing loaded.

    python benchmarks/transformer_sizes.py            # a table; --json FILE writes it too

What an export of the full-size models needs, without their weights (nothing is downloaded): each
graph's module is made from its published config on torch's meta device, through the family's own
module factory (so the count is of what controlrt exports: the ControlNet graphs of SD3.5-Large hold
the transformer's position embedding), and its parameters and buffers counted. Printed per graph:
parameters, fp32 and 16-bit bytes, and the memory of exporting the graph, 1.05x its fp32 bytes (an
export holds each weight once: ``controlrt export`` of SD3.5-Medium's shapes, tests/test_full_size.py,
peaked at 22.3 GB over T5-XXL's 19.0 GB of weights and the transformer's check), against this
machine's memory. The per-graph check adds the activations at the native size on top (SD3.5-Medium's
transformer at 1024 px and at batch 2, 768x1280: 21.3 GB for 9.9 GB of weights); ``--no-validate``
skips it. Figures are of the configs, not of a run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXPORT_PEAK = 1.05  # export memory / fp32 weights (SD3.5-Medium's shapes, tests/test_full_size.py)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def graph_sizes(name: str, root: Path) -> list[dict]:
    """One row per graph of ``name``'s build (its transformer and one ControlNet): parameters
    (buffers included), fp32 and 16-bit bytes, the expected export peak. Config folders go in ``root``."""
    from controlrt.families import family_of, load_graph_module
    from controlrt.fullsize import write_full_size
    from controlrt.models import BaseModel, ControlNetModelFolder

    base_dir, net_dir = write_full_size(root / name, name, weights=False)
    base, net = BaseModel.open(base_dir), ControlNetModelFolder.open(net_dir)
    rows = []
    family = family_of(base.info())
    kept = family.kept_in_fp32()  # what ``controlrt export --precision fp16`` still exports in fp32
    for spec in family.graph_specs([net]):
        params = count(load_graph_module(spec, base, [net], meta=True))
        rows.append(
            dict(
                model=name,
                graph=spec.name,
                params=params,
                fp32=4 * params,
                half=2 * params,
                peak=EXPORT_PEAK * 4 * params,
                peak_fp16=EXPORT_PEAK * (4 if spec.name in kept else 2) * params,
            )
        )
    return rows


def main() -> None:
    import tempfile

    import psutil

    from controlrt import cpu
    from controlrt.fullsize import MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    memory = psutil.virtual_memory().total
    info = cpu.describe()
    print(f"machine: {info['name']}, {info['cores']} cores, {memory / 2**30:.1f} GiB memory")
    print(
        f"{'model':<14} {'graph':<16} {'params':>9} {'fp32 GB':>8} {'16-bit GB':>9} {'export peak GB':>14} "
        f"{'fits':>4} {'fp16 export GB':>14} {'fits':>4}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for row in graph_sizes(name, Path(tmp)):
                rows.append(row)
                fits, fits_fp16 = ("yes" if row[k] < memory else "no" for k in ("peak", "peak_fp16"))
                print(
                    f"{name:<14} {row['graph']:<16} {row['params'] / 1e9:>8.2f}B {row['fp32'] / 1e9:>8.1f} "
                    f"{row['half'] / 1e9:>9.1f} {row['peak'] / 1e9:>14.1f} {fits:>4} "
                    f"{row['peak_fp16'] / 1e9:>14.1f} {fits_fp16:>4}",
                    flush=True,
                )
    print(
        f"export peak: {EXPORT_PEAK}x the graph's fp32 weights, one graph at a time; the per-graph check adds "
        "the activations at the native size (measured: +11.4 GB for SD3.5-Medium's transformer at 1024 px); "
        "fp16 export (--precision fp16): the same ratio over 16-bit weights, the graphs the family keeps in fp32 "
        "(T5) at fp32 (an estimate: a 16-bit export of a large model was not run here)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "memory": memory, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
