"""Engine and timing caches: what an engine was built from, and whether it may still run.

An engine lives in ``BUILD/engines/<graph>.<precision>.plan`` beside a record,
``<graph>.<precision>.json``, written after the plan. The record holds the engine's key (the ONNX
files' sha256, external data included; precision; profiles; build options; TensorRT version; GPU
name and compute capability) and the plan's sha256. An engine runs only if its record exists,
its plan matches the record and its key matches the build's current ONNX, this TensorRT and this
GPU; anything else is stale or foreign and is refused with the reason, never run.

The timing cache is valid only for the TensorRT version that wrote it, so it is kept per version
(``BUILD/engines/timing-<version>.cache``) and reused by every later build with that version.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controlrt.engine.profiles import Profile, profiles_from_json, profiles_to_json
from controlrt.errors import BuildError, InputError
from controlrt.io import atomic_write_bytes, atomic_write_text, file_lock, sha256_file
from controlrt.manifest import Build
from controlrt.precision import Precision

logger = logging.getLogger(__name__)

ENGINE_DIR = "engines"
RECORD_FORMAT = "controlrt-engine"


@dataclass(frozen=True)
class Gpu:
    """The device an engine was built for: engines are specific to its compute capability."""

    name: str
    compute_capability: str

    @classmethod
    def current(cls, device: int = 0) -> Gpu:
        import torch

        if not torch.cuda.is_available():
            raise BuildError("TensorRT engines need a CUDA GPU, and torch sees none here")
        major, minor = torch.cuda.get_device_capability(device)
        return cls(torch.cuda.get_device_name(device), f"{major}.{minor}")


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings that change the engine (so they are part of its key).

    Attributes:
        refittable: Weights can be replaced later (BuilderFlag.REFIT): swap a ControlNet for another
            of the same architecture without a rebuild.
        weight_stripped: The plan holds no refittable weights (STRIP_PLAN); they are refitted from
            the ONNX at load, so the plan is small and the weights live once, in the build.
        optimization_level: Builder optimization level 0-5 (TensorRT's default is 3).
        workspace_gb: Workspace memory pool limit in GiB; None leaves TensorRT's default.
        weight_streaming: Build with BuilderFlag.WEIGHT_STREAMING so a budget can be set at load.
    """

    refittable: bool = False
    weight_stripped: bool = False
    optimization_level: int = 3
    workspace_gb: float | None = None
    weight_streaming: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise InputError(f"builder optimization level {self.optimization_level} is not in 0..5")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise InputError(f"workspace {self.workspace_gb} GiB must be positive")


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Two equal keys describe interchangeable engines."""

    graph: str
    precision: str
    onnx: tuple[tuple[str, str], ...]  # (file, sha256) for the .onnx and its external data
    profiles: list[Profile]
    options: BuildOptions
    tensorrt: str
    gpu: Gpu

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "precision": self.precision,
            "onnx": [list(pair) for pair in self.onnx],
            "profiles": profiles_to_json(self.profiles),
            "options": asdict(self.options),
            "tensorrt": self.tensorrt,
            "gpu": asdict(self.gpu),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineKey:
        return cls(
            graph=data["graph"],
            precision=data["precision"],
            onnx=tuple((str(a), str(b)) for a, b in data["onnx"]),
            profiles=profiles_from_json(data["profiles"]),
            options=BuildOptions(**data["options"]),
            tensorrt=data["tensorrt"],
            gpu=Gpu(**data["gpu"]),
        )

    def differences(self, other: EngineKey) -> list[str]:
        """What differs from ``other``, in words (empty when the keys are equal)."""
        reasons = []
        if self.onnx != other.onnx:
            reasons.append("its ONNX graph changed since the engine was built")
        if self.precision != other.precision:
            reasons.append(f"it is {other.precision}, not {self.precision}")
        if self.tensorrt != other.tensorrt:
            reasons.append(f"it was built by TensorRT {other.tensorrt}, this is TensorRT {self.tensorrt}")
        if self.gpu != other.gpu:
            reasons.append(
                f"it was built for {other.gpu.name} (compute {other.gpu.compute_capability}), "
                f"this is {self.gpu.name} (compute {self.gpu.compute_capability})"
            )
        if self.profiles != other.profiles:
            reasons.append("its shape profiles differ from those asked for")
        if self.options != other.options:
            reasons.append(f"its build options differ ({asdict(other.options)})")
        return reasons


def onnx_identity(build: Build, graph: str, precision: Precision) -> tuple[tuple[str, str], ...]:
    """(file, sha256) of every file of a graph variant, as the manifest records them."""
    return tuple((f.path, f.sha256) for f in build.variant(graph, precision).files)


@dataclass(frozen=True)
class EngineRecord:
    """What ``<graph>.<precision>.json`` says about its plan."""

    key: EngineKey
    plan_sha256: str
    plan_bytes: int
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    refitted_from: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": RECORD_FORMAT,
                "key": self.key.to_dict(),
                "plan_sha256": self.plan_sha256,
                "plan_bytes": self.plan_bytes,
                "created": self.created,
                "refitted_from": [list(p) for p in self.refitted_from],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> EngineRecord:
        data = json.loads(text)
        if data.get("format") != RECORD_FORMAT:
            raise ValueError("not a controlrt engine record")
        return cls(
            EngineKey.from_dict(data["key"]),
            data["plan_sha256"],
            int(data["plan_bytes"]),
            data["created"],
            tuple((str(a), str(b)) for a, b in data.get("refitted_from", [])),
        )


class EngineStore:
    """The engines of one build: where they live, writing them safely, refusing stale ones."""

    def __init__(self, build: Build) -> None:
        self.build = build
        self.root = build.path / ENGINE_DIR

    def plan_path(self, graph: str, precision: Precision) -> Path:
        return self.root / f"{graph}.{precision}.plan"

    def record_path(self, graph: str, precision: Precision) -> Path:
        return self.root / f"{graph}.{precision}.json"

    def timing_cache_path(self, tensorrt_version: str) -> Path:
        return self.root / f"timing-{tensorrt_version}.cache"

    def record(self, graph: str, precision: Precision) -> EngineRecord | None:
        """The engine's record, or None if there is none (or it is unreadable)."""
        path = self.record_path(graph, precision)
        if not path.is_file():
            return None
        try:
            return EngineRecord.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable engine record %s: %s", path, exc)
            return None

    def current(self, key: EngineKey, verify: bool = True) -> EngineRecord | None:
        """The record if its plan is intact and built with exactly ``key``, else None."""
        record = self.record(key.graph, Precision(key.precision))
        if record is None or record.key != key:
            return None
        return record if self._plan_intact(record, verify) else None

    def problems(
        self,
        graph: str,
        precision: Precision,
        tensorrt_version: str | None = None,
        gpu: Gpu | None = None,
        verify: bool = True,
    ) -> tuple[EngineRecord | None, list[str]]:
        """The engine's record and why it may not run, in words (empty: it may).

        The one staleness check, used to load engines, to fill a Triton repository and by
        ``inspect``: the record must exist, name the build's current ONNX graph of that precision,
        and describe the plan beside it (its size, and with ``verify`` its sha256); with
        ``tensorrt_version`` and ``gpu`` given, it must also have been built by that TensorRT for
        that GPU. The profiles and build options are the builder's choice, taken from the record.
        """
        record = self.record(graph, precision)
        if record is None:
            plan = self.plan_path(graph, precision)
            return None, ["there is no readable record beside its plan" if plan.exists() else "there is none"]
        reasons = []
        if str(precision) not in self.build.manifest.graphs[graph].variants:
            reasons.append(f"the build no longer has the {precision} {graph} graph")
        else:
            wanted = replace(
                record.key,
                onnx=onnx_identity(self.build, graph, precision),
                tensorrt=tensorrt_version or record.key.tensorrt,
                gpu=gpu or record.key.gpu,
            )
            reasons += wanted.differences(record.key)
        plan = self.plan_path(graph, precision)
        if not plan.is_file() or plan.stat().st_size != record.plan_bytes:
            reasons.append(f"its plan {plan.name} is missing or truncated")
        elif verify and sha256_file(plan) != record.plan_sha256:
            reasons.append(f"its plan {plan.name} is corrupted (its sha256 differs from the record)")
        return record, reasons

    def check_runnable(
        self, graph: str, precision: Precision, tensorrt_version: str, gpu: Gpu, verify: bool = True
    ) -> EngineRecord:
        """The record of an engine that may run here; BuildError with the reasons otherwise."""
        build_cmd = f"controlrt build {self.build.path} --precision {precision}"
        record, reasons = self.problems(graph, precision, tensorrt_version, gpu, verify)
        if record is None:
            raise BuildError(f"build {self.build.path} has no {precision} TensorRT engine for {graph}; run {build_cmd}")
        if reasons:
            raise BuildError(f"the {precision} engine for {graph} is stale: {'; '.join(reasons)}; run {build_cmd}")
        return record

    def _plan_intact(self, record: EngineRecord, verify: bool) -> bool:
        plan = self.plan_path(record.key.graph, Precision(record.key.precision))
        if not plan.is_file() or plan.stat().st_size != record.plan_bytes:
            return False
        return not verify or sha256_file(plan) == record.plan_sha256

    def write(self, key: EngineKey, plan: bytes, refitted_from: tuple[tuple[str, str], ...] = ()) -> EngineRecord:
        """Store a plan, then its record: a plan without a current record is never trusted."""
        import hashlib

        self.root.mkdir(parents=True, exist_ok=True)
        precision = Precision(key.precision)
        self.record_path(key.graph, precision).unlink(missing_ok=True)  # invalid until rewritten
        atomic_write_bytes(self.plan_path(key.graph, precision), plan)
        record = EngineRecord(key, hashlib.sha256(plan).hexdigest(), len(plan), refitted_from=refitted_from)
        atomic_write_text(self.record_path(key.graph, precision), record.to_json())
        return record

    def write_current(self, key: EngineKey, plan: bytes) -> EngineRecord:
        """``write``, under the build's lock, if the key's ONNX is still the build's graph.

        BuildError if the graph changed while the engine was built (a convert or refit ran).
        """
        with file_lock(self.build.path):
            now = Build.open(self.build.path, verify=False)
            precision = Precision(key.precision)
            if (
                str(precision) not in now.manifest.graphs[key.graph].variants
                or onnx_identity(now, key.graph, precision) != key.onnx
            ):
                raise BuildError(
                    f"the {precision} {key.graph} graph changed while its engine was built; run controlrt build again"
                )
            return self.write(key, plan)

    def read_plan(self, record: EngineRecord) -> bytes:
        return self.plan_path(record.key.graph, Precision(record.key.precision)).read_bytes()


class TimingCache:
    """A TensorRT timing cache file for one TensorRT version.

    The cache sits at ``path``; a sidecar ``path.json`` names the TensorRT version that wrote it
    and the cache's sha256. A cache of another version, or one whose bytes no longer match its
    sidecar, is not loaded. Saving writes a temporary file and renames it over the cache (having
    first removed a sidecar that would vouch for other bytes), then writes the sidecar, under a
    lock beside the cache: the sidecar never describes a file it was not written for.

    A path the user gave (``owned=False``) that holds a file with no sidecar was not written by
    controlrt: it is neither read nor replaced, and :meth:`check` refuses it. The build's own
    cache (``owned=True``) is replaced whatever it holds.
    """

    def __init__(self, path: Path, tensorrt_version: str, owned: bool = False) -> None:
        self.path = Path(path)
        self.version = tensorrt_version
        self.owned = owned
        self._sidecar = self.path.with_name(self.path.name + ".json")

    def _record(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self._sidecar.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def check(self) -> None:
        """InputError if the cache path is a user's file controlrt may not replace."""
        if self.owned:
            return
        if self.path.exists() and not self.path.is_file():
            raise InputError(f"--timing-cache {self.path} is not a file")
        if self.path.exists() and self._record() is None:
            raise InputError(
                f"--timing-cache {self.path} exists but controlrt did not write it (no {self._sidecar.name} "
                "beside it); controlrt neither reads nor replaces it: give a new path"
            )
        if not self.path.parent.is_dir():
            raise InputError(f"--timing-cache {self.path}: folder {self.path.parent} does not exist")

    def usable(self) -> bool:
        """Whether the cache file exists, was written by this TensorRT version and is intact."""
        if not self.path.is_file():
            return False
        record = self._record() or {}
        if record.get("tensorrt") != self.version:
            logger.warning(
                "timing cache %s was written by TensorRT %s, this is %s: starting a new one",
                self.path,
                record.get("tensorrt") or "an unknown version",
                self.version,
            )
            return False
        if record.get("sha256") != sha256_file(self.path):
            logger.warning("timing cache %s does not match its record: starting a new one", self.path)
            return False
        return True

    def load(self) -> bytes | None:
        return self.path.read_bytes() if self.usable() else None

    def save(self, data: bytes) -> None:
        """Replace the cache with ``data``, written by this TensorRT version."""
        import hashlib

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path):
            self.check()
            record = self._record()
            if record is not None and (record.get("tensorrt") != self.version or record.get("sha256") is None):
                self._sidecar.unlink()  # it would vouch for bytes of another version meanwhile
            atomic_write_bytes(self.path, data)
            sidecar = {"tensorrt": self.version, "sha256": hashlib.sha256(data).hexdigest()}
            atomic_write_text(self._sidecar, json.dumps(sidecar))
