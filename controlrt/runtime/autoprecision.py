"""``--precision auto``: the precision a build runs fastest in on this machine, found by measuring.

Which precision is fastest depends on the machine, not on its vendor or its feature flags (bf16
ran slower than fp32 on one AVX-512 BF16 Xeon and 1.9x faster on an AVX-512 BF16 EPYC), so it is
measured. At first use of a build on a machine, one UNet call at the model's native size (batch 2,
as classifier-free guidance runs it) is timed in each precision the build has and the backend can
compute here (on OpenVINO, int8 pipelines twice: float layers in fp32 and in bf16), after one
untimed call. Each candidate's output is judged against the fp32 graph's on the same input (on
the same backend; for TensorRT, whose candidates are the UNet engines built, at a shape of the
first engine's profiles, on onnxruntime) by the UNet tolerance of the precision it computes in
(controlrt.compare's gates); the fastest candidate that passes is chosen, and a candidate that
fails is never used. On the CPU backends fp32 is always a candidate, so there is always a choice;
TensorRT engines that all fail are one clear error.

The choice and its table are cached in the build (``BUILD/precision-auto/<key>.json``) under a key
of the machine (CPU model and features, or the GPU's name), the backend and its settings, the
runtime versions (controlrt, onnxruntime, OpenVINO, TensorRT) and the UNet files of every
candidate: another CPU, another OpenVINO or other graphs measure again. A build that cannot be
written measures at every load.

The torch backend is the reference: auto is fp32 there (bf16 only when asked).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from controlrt.errors import BackendError, BuildError
from controlrt.manifest import Build
from controlrt.precision import Precision
from controlrt.specs import GraphKind

logger = logging.getLogger(__name__)

AUTO = "auto"


def requested(value: str | Precision) -> Precision | None:
    """The precision a user asked for; None for "auto" (chosen by measurement). InputError, naming
    auto among the choices, for anything else."""
    return None if str(value).lower() == AUTO else Precision.parse(value, also=(AUTO,))


CACHE_FOLDER = "precision-auto"
REPEATS = 2  # timed calls per candidate (the fastest counts), after one untimed call
SEED = 20_240_601

# timer(candidate, call) -> seconds of one call; the default times REPEATS calls and keeps the fastest
Timer = Callable[["Candidate", Callable[[], object]], float]


@dataclass(frozen=True)
class Candidate:
    """One way to run the build: a precision and, for OpenVINO int8 pipelines, what the float
    layers and graphs compute in (fp32 or bf16)."""

    precision: Precision
    float_precision: Precision | None = None

    @property
    def label(self) -> str:
        if self.float_precision is None:
            return str(self.precision)
        return f"{self.precision}+{self.float_precision}"


@dataclass
class Measured:
    """One candidate's UNet call: its fastest time, and its output against fp32's."""

    label: str
    precision: str
    float_precision: str | None
    seconds: float | None = None
    rel_l2: float | None = None
    max_rel: float | None = None
    tolerance: dict[str, float] | None = None
    passed: bool = False
    note: str = ""


@dataclass
class Choice:
    """What auto chose, and why: ``rows`` per candidate (empty when there was only one)."""

    precision: Precision
    float_precision: Precision | None = None
    rows: list[Measured] = field(default_factory=list)
    shape: str = ""
    source: str = "only candidate"  # "measured", "cached" or "only candidate"
    machine: str = ""

    @property
    def label(self) -> str:
        return Candidate(self.precision, self.float_precision).label

    def describe(self) -> str:
        """One line: the choice and each candidate's time."""
        if not self.rows:
            return f"precision auto: {self.label} (the only precision this build has for this backend)"
        times = ", ".join(
            f"{r.label} {r.seconds * 1e3:.0f} ms" + ("" if r.passed else " (failed its gate)")
            if r.seconds is not None
            else f"{r.label} {r.note}"
            for r in self.rows
        )
        return f"precision auto: {self.label} on {self.machine} ({self.source}; UNet {self.shape}: {times})"

    def table(self) -> str:
        lines = [
            f"precision auto on {self.machine}: UNet {self.shape}, {self.source}",
            f"{'candidate':<12} {'ms':>9} {'rel L2':>9} {'gate':>9}  result",
        ]
        for r in self.rows:
            ms = f"{r.seconds * 1e3:>9.1f}" if r.seconds is not None else f"{'':>9}"
            rel = f"{r.rel_l2:>9.2e}" if r.rel_l2 is not None else f"{'':>9}"
            gate = f"{r.tolerance['rel_l2']:>9.0e}" if r.tolerance else f"{'':>9}"
            verdict = "chosen" if r.label == self.label else ("passed" if r.passed else "failed")
            lines.append(f"{r.label:<12} {ms} {rel} {gate}  {verdict}{' ' + r.note if r.note else ''}")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Choice:
        float_precision = data.get("float_precision")
        return cls(
            Precision(data["precision"]),
            Precision(float_precision) if float_precision else None,
            [Measured(**r) for r in data["rows"]],
            data["shape"],
            data["source"],
            data.get("machine", ""),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": str(self.precision),
            "float_precision": None if self.float_precision is None else str(self.float_precision),
            "shape": self.shape,
            "source": self.source,
            "machine": self.machine,
            "rows": [asdict(r) for r in self.rows],
        }


def has_precision(build: Build, precision: Precision) -> bool:
    """Whether every graph has the variant a ``precision`` pipeline runs."""
    return all(g.runs_in(precision) in g.variants for g in build.manifest.graphs.values())


def candidates(build: Build, backend: str) -> list[Candidate]:
    """The ways ``backend`` can run ``build`` on this machine, fp32 first."""
    if backend == "torch":
        return [Candidate(Precision.FP32)]
    have = [p for p in (Precision.FP32, Precision.FP16, Precision.INT8) if has_precision(build, p)]
    if backend == "tensorrt":
        from controlrt.engine.cache import EngineStore

        store = EngineStore(build)  # the engines built (judged against the fp32 graph on onnxruntime)
        return [Candidate(p) for p in have if store.record(build.manifest.denoiser, p) is not None]
    if backend != "openvino":
        return [Candidate(p) for p in have]
    from controlrt.runtime.ov_backend import supports_bf16

    bf16 = supports_bf16()
    out = [Candidate(Precision.FP32)]
    if bf16:
        out.append(Candidate(Precision.BF16))
    # fp16 graphs compute in f32 on OpenVINO: never faster than the fp32 graphs, so not timed
    if Precision.INT8 in have:
        out.append(Candidate(Precision.INT8, Precision.FP32))
        if bf16:
            out.append(Candidate(Precision.INT8, Precision.BF16))
    return out


def machine() -> dict[str, Any]:
    """What the measurement depends on besides the build: the CPU (or GPU) and runtime versions."""
    from controlrt.cpu import cpu_features, cpu_name
    from controlrt.version import __version__

    return {"cpu": cpu_name(), "features": list(cpu_features()), "controlrt": __version__}


def _runtime_versions(backend: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    packages = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "openvino": ("openvino",)}
    packages["tensorrt"] = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")
    out = {}
    for name in packages.get(backend, ()):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def cache_key(build: Build, backend: str, settings: Mapping[str, Any], cands: Sequence[Candidate]) -> dict[str, Any]:
    """Everything a measurement depends on; its sha256 names the cache file."""
    fields: dict[str, Any] = {"machine": machine(), "backend": backend, "runtime": _runtime_versions(backend)}
    fields["settings"] = {k: v for k, v in sorted(settings.items())}
    if backend == "tensorrt":
        import torch

        fields["machine"]["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    unet = build.manifest.graphs[build.manifest.denoiser]
    fields["unet"] = {c.label: [f.sha256 for f in unet.variants[unet.runs_in(c.precision)].files] for c in cands}
    return fields


def _key_name(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def time_calls(call: Callable[[], object], repeats: int = REPEATS) -> float:
    """The fastest of ``repeats`` timed calls, in seconds."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _default_timer(_: Candidate, call: Callable[[], object]) -> float:
    return time_calls(call)


def choose_precision(
    build: Build,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    device: str | None = None,
    timer: Timer | None = None,
    use_cache: bool = True,
    **options: Any,
) -> Choice:
    """The fastest precision of ``build`` on ``backend`` here that meets its gate (see the module).

    ``options`` are the other BackendOptions (threads, cuda_graphs, weight_streaming_budget).
    """
    if build.manifest.exported != Precision.FP32 and backend != "torch":  # its only graphs
        return Choice(Precision(build.manifest.exported), source="the build's only graphs")
    cands = candidates(build, backend)
    if not cands:  # only on tensorrt; a missing TensorRT or GPU is the first thing to say
        from controlrt.engine.trt import import_tensorrt, require_cuda

        import_tensorrt()
        require_cuda()
        raise BuildError(f"build {build.path} has no TensorRT engine of its UNet: run controlrt build {build.path}")
    if len(cands) == 1:
        return Choice(cands[0].precision, cands[0].float_precision)
    settings = {"providers": list(providers) if providers else None, "device": device, **options}
    fields = cache_key(build, backend, settings, cands)
    path = build.path / CACHE_FOLDER / f"{_key_name(fields)}.json"
    labels = {c.label: c for c in cands}
    if use_cache:
        cached = _read(path, labels)
        if cached is not None:
            logger.info("%s", cached.describe())
            return cached
    logger.warning(
        "precision auto: timing one UNet call in %s (first use of this build here; the choice is cached)",
        ", ".join(c.label for c in cands),
    )
    choice = _measure(build, backend, providers, device, cands, timer or _default_timer, options)
    choice.machine = fields["machine"]["cpu"] if backend != "tensorrt" else str(fields["machine"]["gpu"])
    logger.warning("%s", choice.describe())
    _write(path, {"key": fields, "choice": choice.to_dict()})
    return choice


def _measure(build, backend, providers, device, cands, timer: Timer, options) -> Choice:
    from controlrt.compare import judge
    from controlrt.families import family_of
    from controlrt.runtime.backends import BackendOptions, SessionFactory

    spec = build.manifest.spec(build.manifest.denoiser)
    name = spec.name
    first = cands[0]
    base = BackendOptions(backend, tuple(providers) if providers else None, device, first.precision, **options)
    sizes = SessionFactory(build, base).accepted_sizes(name, [spec.sizes(2, *spec.default_size)])[0]
    shape = f"{sizes['batch']}x{sizes['height']}x{sizes['width']}"
    feeds = spec.dummy_inputs(sizes, seed=SEED)
    reference = None
    if backend == "tensorrt":  # engines are judged against the fp32 graph, on onnxruntime (CPU)
        from controlrt.ort_session import OrtSession

        with OrtSession(build.graph_path(name, Precision.FP32), spec) as session:
            reference = session.infer(feeds)
    rows: list[Measured] = []
    for candidate in cands:
        opts = replace(base, precision=candidate.precision, float_precision=candidate.float_precision)
        factory = SessionFactory(build, opts)
        try:
            with factory.open(name) as session:
                got = session.infer(feeds)  # untimed: compilation, first allocations
                seconds = timer(candidate, lambda session=session: session.infer(feeds))
        except (BackendError, BuildError) as exc:
            if reference is None:
                raise  # fp32 itself cannot run: nothing to measure against
            rows.append(Measured(candidate.label, str(candidate.precision), None, note=str(exc)))
            continue
        finally:
            gc.collect()
        float_precision = None if candidate.float_precision is None else str(candidate.float_precision)
        if reference is None:  # fp32 on a CPU backend, the first candidate: the reference
            reference = got
            rows.append(Measured(candidate.label, "fp32", None, seconds, 0.0, 0.0, passed=True))
            continue
        computes = factory.computes(name)
        quantizer = build.int8_quantizer if computes is Precision.INT8 else None
        tolerance = family_of(build.manifest.info).tolerance(computes, GraphKind.UNET, quantizer)
        results = [judge(name, shape, n, reference[n], got[n], tolerance) for n in spec.output_names]
        rows.append(
            Measured(
                candidate.label,
                str(candidate.precision),
                float_precision,
                seconds,
                max(r.rel_l2 for r in results),
                max(r.max_abs / r.ref_max_abs if r.ref_max_abs else math.inf for r in results),
                asdict(tolerance),
                all(r.passed for r in results),
                "; ".join(r.note for r in results if r.note),
            )
        )
    passed = [r for r in rows if r.passed and r.seconds is not None]
    if not passed:
        failed = "; ".join(f"{r.label}: rel L2 {r.rel_l2:.2e}" if r.rel_l2 is not None else r.label for r in rows)
        raise BuildError(
            f"build {build.path}: no {backend} UNet of this build reproduces the fp32 graph here ({failed}); "
            "rebuild the engines (controlrt build --force) or pass --precision"
        )
    best = min(passed, key=lambda r: r.seconds or math.inf)
    chosen = next(c for c in cands if c.label == best.label)
    return Choice(chosen.precision, chosen.float_precision, rows, shape, "measured")


def _read(path: Path, labels: Mapping[str, Candidate]) -> Choice | None:
    """The cached choice, if it is readable and names a candidate that passed."""
    try:
        choice = Choice.from_dict(json.loads(path.read_text())["choice"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.info("measuring again: the cached precision choice %s is unreadable (%s)", path, exc)
        return None
    if choice.label not in labels or not any(r.label == choice.label and r.passed for r in choice.rows):
        return None  # never use a candidate that is not one now, or that failed its gate
    choice.source = "cached"
    return choice


def _write(path: Path, data: Mapping[str, Any]) -> None:
    """Write the cache file whole (a temporary file renamed into place), or log why not."""
    from controlrt.io import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=2))
    except OSError as exc:
        logger.info("not caching the precision choice: %s cannot be written (%s)", path, exc)
