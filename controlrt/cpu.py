"""What this CPU can do: its name, the instruction features that matter for inference, and the
matrix-multiply rate it reaches per precision (the peak that achieved rates are judged against).

Machines differ (AMX tiles, AVX-512 with bf16 and VNNI, AVX2 only), so every figure controlrt
reports names the CPU it came from.
"""

from __future__ import annotations

import os
import platform
import time
from functools import cache
from pathlib import Path

# Instruction features that decide which kernels a CPU engine can use, as /proc/cpuinfo names them.
FEATURES = (
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
    "amx_tile",
    "avx512_bf16",
    "avx512_vnni",
    "avx512_fp16",
    "avx512f",
    "avx_vnni",
    "avx2",
)


@cache
def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key and key not in fields:
            fields[key] = value.strip()
        if not line.strip() and fields:
            break  # the first processor is enough
    return fields


def cpu_name() -> str:
    return _cpuinfo().get("model name", "unknown CPU")


def cpu_features() -> tuple[str, ...]:
    """The features of FEATURES this CPU has, in FEATURES' order."""
    flags = set(_cpuinfo().get("flags", "").split())
    return tuple(f for f in FEATURES if f in flags)


def has_bf16() -> bool:
    """bf16 instructions: AVX-512 BF16 or AMX."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_features()))


def int8_sums_saturate() -> bool:
    """Whether this CPU's int8 matrix kernels can saturate: on x86 without VNNI (or AMX int8),
    onnxruntime's and oneDNN's u8 x s8 products go through ``vpmaddubsw``, which adds pairs of
    products into 16-bit sums that clip (onnxruntime's quantization docs: "saturation on AVX2 and
    AVX512 (non-VNNI) machines"). A graph's int8 math then differs from what it states (on the
    tiny test model's ControlNets: relative error 0.25 instead of 0.02)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False  # Arm's dot-product instructions sum in 32 bits
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_features())


def describe() -> dict[str, object]:
    """Name, logical cores and features, for reports."""
    return {"name": cpu_name(), "cores": os.cpu_count(), "features": list(cpu_features())}


def matmul_peaks(size: int = 2048, repeats: int = 4, threads: int | None = None) -> dict[str, float | None]:
    """GFLOP/s of a square matrix multiply through torch (oneDNN), best of ``repeats``, per
    precision: fp32, bf16 (None without bf16 instructions) and int8 (int8 x int8 -> int32; None
    where the CPU engines run no int8 kernels, ``int8_sums_saturate``: there torch's int8 product is
    a reference loop, about 1 GFLOP/s and a minute to time, and no engine's rate to judge)."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator)
        b = torch.randn(size, size, generator=generator)
        operands = {"fp32": (a, b)}
        if has_bf16():
            operands["bf16"] = (a.bfloat16(), b.bfloat16())
        if not int8_sums_saturate():
            operands["int8"] = tuple(m.clamp(-1, 1).mul(127).to(torch.int8) for m in (a, b))  # type: ignore[assignment]
        runs = {
            name: (lambda x=x, y=y, name=name: torch._int_mm(x, y) if name == "int8" else x @ y)
            for name, (x, y) in operands.items()
        }
        peaks: dict[str, float | None] = {}
        for name in ("fp32", "bf16", "int8"):
            run = runs.get(name)
            if run is None:
                peaks[name] = None
                continue
            run()  # warm-up
            best = min(_timed(run) for _ in range(repeats))
            peaks[name] = 2 * size**3 / best / 1e9
        return peaks
    finally:
        torch.set_num_threads(previous)


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start
