"""The build folder and its manifest.

A build folder holds the exported graphs, the tokenizer and scheduler config the runtime needs,
and ``manifest.json``, written last. The manifest records the graph specs, every file with its
sha256, the source folders with their config hashes, the tool versions and the export settings.
A folder without a readable manifest is not a build; a file whose hash differs from the
manifest's is corrupted or truncated and is refused.
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from controlrt.errors import BuildError
from controlrt.families.info import ModelInfo
from controlrt.io import atomic_write_text, sha256_file
from controlrt.precision import Precision, variant_for
from controlrt.specs import GraphKind, GraphSpec

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT = "controlrt-build"
FORMAT_VERSION = 1
TOOLS = ("controlrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "numpy")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class FileRecord:
    """A file of the build, relative to the build folder."""

    path: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, root: Path, path: Path) -> FileRecord:
        return cls(str(path.relative_to(root)), sha256_file(path), path.stat().st_size)

    def resolve(self, root: Path) -> Path:
        """The file's path; BuildError unless it lies inside the build folder."""
        relative = Path(self.path)
        path = (root / relative).resolve()
        if relative.is_absolute() or ".." in relative.parts or not path.is_relative_to(root.resolve()):
            raise BuildError(
                f"build {root}: the manifest names {self.path!r}, outside the build; re-run controlrt export"
            )
        return path

    def check(self, root: Path, verify_hash: bool = True) -> None:
        path = self.resolve(root)
        if not path.is_file():
            raise BuildError(f"build {root}: {self.path} is missing; re-run controlrt export")
        if path.stat().st_size != self.bytes:
            raise BuildError(
                f"build {root}: {self.path} is truncated or changed ({path.stat().st_size} bytes, "
                f"the manifest says {self.bytes}); re-run controlrt export"
            )
        if verify_hash and sha256_file(path) != self.sha256:
            raise BuildError(
                f"build {root}: {self.path} is corrupted (sha256 differs from the manifest); re-run controlrt export"
            )


@dataclass(frozen=True)
class Variant:
    """One precision of a graph: its files (the .onnx first), how it was made, how it validated."""

    files: tuple[FileRecord, ...]
    validation: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [f.__dict__ for f in self.files],
            "settings": self.settings,
            "validation": self.validation,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Variant:
        return cls(
            tuple(FileRecord(**f) for f in data["files"]),
            list(data.get("validation", [])),
            dict(data.get("settings", {})),
        )


@dataclass(frozen=True)
class GraphRecord:
    """One graph: its spec and its variants by precision ("fp32", "fp16", "int8")."""

    spec: GraphSpec
    variants: dict[str, Variant]

    def runs_in(self, precision: Precision) -> Precision:
        """The variant this graph runs in a ``precision`` pipeline, among those it has (the one
        place precision.variant_for is asked, for every backend, engine and serve)."""
        return variant_for(self.spec.kind, precision, set(self.variants))

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "variants": {p: v.to_dict() for p, v in self.variants.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphRecord:
        return cls(
            GraphSpec.from_dict(data["spec"]),
            {p: Variant.from_dict(v) for p, v in data["variants"].items()},
        )


@dataclass(frozen=True)
class Manifest:
    """Everything recorded about a build."""

    info: ModelInfo
    graphs: dict[str, GraphRecord]
    assets: tuple[FileRecord, ...]
    sources: dict[str, Any]
    settings: dict[str, Any]
    tools: dict[str, str] = field(default_factory=tool_versions)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def spec(self, name: str) -> GraphSpec:
        return self.graphs[name].spec

    @property
    def exported(self) -> str:
        """The precision export wrote the graphs in: "fp32", or "fp16" for a build exported in
        fp16 (``controlrt export --precision fp16``), which has no fp32 graphs."""
        return str(self.settings.get("precision", "fp32"))

    @property
    def denoiser(self) -> str:
        """The denoiser graph's name: "unet", or "transformer" (SD3)."""
        return next(name for name, g in self.graphs.items() if g.spec.kind is GraphKind.UNET)

    @property
    def controlnet_specs(self) -> list[GraphSpec]:
        """The ControlNet graphs in the order they were given to export."""
        specs = [g.spec for g in self.graphs.values() if g.spec.kind is GraphKind.CONTROLNET]
        return sorted(specs, key=lambda s: s.index)

    def with_variants(self, precision: str, variants: dict[str, Variant]) -> Manifest:
        """A copy with ``variants`` (graph name -> Variant) recorded under ``precision``.

        The export's tool versions stay as they were; each variant records its own.
        """
        graphs = {
            name: GraphRecord(g.spec, {**g.variants, **({precision: variants[name]} if name in variants else {})})
            for name, g in self.graphs.items()
        }
        return replace(self, graphs=graphs)

    def without_variant(self, precision: str, names: Iterable[str]) -> Manifest:
        """A copy in which the graphs ``names`` no longer list a ``precision`` variant."""
        drop = set(names)
        graphs = {
            name: GraphRecord(g.spec, {p: v for p, v in g.variants.items() if not (name in drop and p == precision)})
            for name, g in self.graphs.items()
        }
        return replace(self, graphs=graphs)

    @property
    def files(self) -> set[str]:
        """Every file the manifest lists (graphs of every precision, assets), relative to the build."""
        out = {f.path for f in self.assets}
        for graph in self.graphs.values():
            for variant in graph.variants.values():
                out.update(f.path for f in variant.files)
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created": self.created,
                "tools": self.tools,
                "settings": self.settings,
                "sources": self.sources,
                "model": self.info.to_dict(),
                "graphs": {name: g.to_dict() for name, g in self.graphs.items()},
                "assets": [f.__dict__ for f in self.assets],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, where: Path) -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise BuildError(f"{where / MANIFEST_NAME} is not a controlrt build manifest")
            if data.get("format_version") != FORMAT_VERSION:
                raise BuildError(
                    f"build {where} has manifest format {data.get('format_version')}, this "
                    f"controlrt reads {FORMAT_VERSION}; re-run controlrt export"
                )
            return cls(
                info=ModelInfo.from_dict(data["model"]),
                graphs={n: GraphRecord.from_dict(g) for n, g in data["graphs"].items()},
                assets=tuple(FileRecord(**f) for f in data["assets"]),
                sources=data["sources"],
                settings=data["settings"],
                tools=data["tools"],
                created=data["created"],
            )
        except BuildError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BuildError(f"build {where}: manifest.json is malformed ({exc}); re-run controlrt export") from None

    def write(self, root: Path) -> None:
        atomic_write_text(root / MANIFEST_NAME, self.to_json())


# Files controlrt writes in a build besides those its manifest lists: graphs a crash left unlisted,
# engines with their records and timing caches, calibration captures, OpenVINO's compiled blobs.
_BUILD_PATTERNS = (
    "graphs/*.onnx",
    "graphs/*.onnx.data",
    "engines/*.plan",
    "engines/*.json",
    "engines/*.cache",
    "engines/*.cache.json",
    "calibration/captures-*/*.npz",
    "openvino/*/*.blob",
    "precision-auto/*.json",
)


def _matches(path: str, pattern: str) -> bool:
    """fnmatch, part by part, so that ``*`` never crosses a ``/``."""
    from fnmatch import fnmatchcase

    parts, wanted = Path(path).parts, Path(pattern).parts
    return len(parts) == len(wanted) and all(fnmatchcase(a, b) for a, b in zip(parts, wanted, strict=True))


def explain_build(folder: Path) -> set[str] | None:
    """The files of a build folder that controlrt wrote, or None if ``folder`` is not a build.

    Those the manifest lists, the manifest, and what controlrt's commands write beside them
    (_BUILD_PATTERNS), and the temporary files of interrupted commands (controlrt.io.is_temporary).
    """
    from controlrt.io import files_under, is_temporary

    try:
        manifest = Manifest.from_json((folder / MANIFEST_NAME).read_text(), folder)
    except (OSError, UnicodeDecodeError, BuildError):
        return None
    listed = {*manifest.files, MANIFEST_NAME}
    return {
        f for f in files_under(folder) if f in listed or any(_matches(f, p) for p in _BUILD_PATTERNS) or is_temporary(f)
    }


@dataclass(frozen=True)
class Build:
    """An opened, checked build folder."""

    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Build:
        """Open a build; with ``verify`` every file's sha256 is checked, else only its size."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise BuildError(f"build folder {path} does not exist; create one with controlrt export")
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BuildError(
                f"{path} is not a controlrt build (no {MANIFEST_NAME}; an export that did not "
                "finish leaves none); create one with controlrt export"
            )
        try:
            text = manifest_path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise BuildError(f"cannot read {manifest_path}: {exc}") from None
        manifest = Manifest.from_json(text, path)
        for record in manifest.assets:
            record.check(path, verify)
        for graph in manifest.graphs.values():
            for variant in graph.variants.values():
                for record in variant.files:
                    record.check(path, verify)
        return cls(path.resolve(), manifest)

    def variant(self, name: str, precision: str = "fp32") -> Variant:
        """The graph's variant in ``precision``; BuildError naming the command that makes it."""
        from controlrt.precision import Precision

        precision = Precision.parse(precision)
        record = self.manifest.graphs[name]
        if precision is Precision.FP32 and self.manifest.exported != Precision.FP32:
            raise BuildError(
                f"build {self.path} was exported in {self.manifest.exported} and has no fp32 graphs: run it in "
                f"{self.manifest.exported} (--precision {self.manifest.exported} or auto; export it again without "
                "--precision for fp32 graphs)"
            )
        if precision not in record.variants:
            raise BuildError(
                f"build {self.path} has no {precision} {name} graph; make it with "
                f"{precision.command.replace('BUILD', str(self.path))}"
            )
        return record.variants[precision]

    def require_fp32_graphs(self, command: str) -> None:
        """BuildError unless the build has its fp32 graphs: ``controlrt command`` (calibrate, convert,
        lora, refit) works from them, and a build exported in fp16 has none."""
        exported = self.manifest.exported
        if exported != "fp32":
            raise BuildError(
                f"controlrt {command} works from fp32 graphs, and build {self.path} was exported in {exported} "
                f"(its graphs are {exported} already): export it again without --precision"
            )

    def graph_path(self, name: str, precision: str = "fp32") -> Path:
        return self.variant(name, precision).files[0].resolve(self.path)

    @property
    def int8_quantizer(self) -> str | None:
        """The quantizer that made the build's int8 graphs (None without int8 graphs)."""
        unet = self.manifest.graphs[self.manifest.denoiser].variants.get("int8")
        return None if unet is None else unet.settings.get("quantizer")

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def tokenizer_dirs(self) -> list[Path]:
        """One tokenizer folder per text encoder: tokenizer/ (and tokenizer_2/ for SDXL)."""
        return [
            self.path / ("tokenizer" if k == 0 else f"tokenizer_{k + 1}")
            for k in range(self.manifest.info.text_encoders)
        ]

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return json.loads((self.path / "scheduler" / "scheduler_config.json").read_text())
