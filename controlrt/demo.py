"""``controlrt demo``: the whole toolchain on the built-in trained model, in well under a minute."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from controlrt.builtin import write_trained_models
from controlrt.errors import InputError
from controlrt.export.build import export_build
from controlrt.io import (
    OWNER_FILE,
    check_replaceable,
    explain_owned,
    file_lock,
    files_under,
    is_temporary,
    output_folder,
    owner_record,
    write_output_file,
    write_owner_record,
)
from controlrt.manifest import explain_build
from controlrt.parity import run_parity
from controlrt.runtime.images import save_image
from controlrt.runtime.pipeline import Pipeline
from controlrt.runtime.request import GenerationRequest

logger = logging.getLogger(__name__)


# The held-out shapes scene the demo draws (never seen in training).
DEMO_SCENE = 3
MAX_DEMO_STEPS = 1000


@dataclass(frozen=True)
class DemoResult:
    build: Path
    image: Path
    image_off: Path
    prompt: str
    f1: float
    f1_off: float
    parity_json: Path
    parity_table: str
    passed: bool


DEMO_OUTPUTS = ("control_*.png", "demo.png", "demo-off.png", "parity.json")


def explain_demo(folder: Path) -> set[str] | None:
    """What a demo folder (one with the demo's owner record) holds that controlrt wrote: the demo's
    outputs, its models/ folder, its build/ (with what later commands such as convert or build
    added to it), and the temporary files of an interrupted run."""
    from fnmatch import fnmatchcase

    if owner_record(folder) is None:
        return None
    models = explain_owned(folder / "models") or set()
    build = explain_build(folder / "build") or set()
    known = set()
    for f in files_under(folder):
        top, _, rest = f.partition("/")
        if (
            f == OWNER_FILE
            or is_temporary(f)
            or (not rest and any(fnmatchcase(f, p) for p in DEMO_OUTPUTS))
            or (top == "models" and rest in models)
            or (top == "build" and rest in build)
        ):
            known.add(f)
    return known


def run_demo(
    out_dir: str | Path, steps: int = 20, seed: int = 0, force: bool = False, progress: bool = False
) -> DemoResult:
    """Write the trained built-in models, export them, generate with two controls, run parity.

    The controls are the canny edges and the segmentation map of a held-out shapes scene, the
    prompt its caption. The same request with the controls at scale 0 shows what the base model
    draws without them; the edge F1 of both against the scene says how closely the control was
    followed.

    Layout under ``out_dir``: models/ (diffusers folders), build/ (ONNX graphs + manifest),
    control_canny.png, control_seg.png, demo.png and demo-off.png (onnxruntime), parity.json.
    ``out_dir`` must be new or empty, or (with ``force``) an earlier demo's folder holding nothing
    but what controlrt wrote. Two demos into one folder run one after the other. ``progress``
    reports the export and the denoising steps on stderr (a bar on a terminal, lines elsewhere).

    Raises ParityError if parity fails (the report is written first).
    """
    from controlrt.errors import ParityError

    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_DEMO_STEPS:
        raise InputError(f"--steps {steps!r} must be a whole number from 1 to {MAX_DEMO_STEPS}")
    out = output_folder(out_dir)
    with file_lock(out):
        check_replaceable(out, force, explain_demo)
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_owner_record(out, "demo")  # first: an interrupted demo's folder is still the demo's
        except OSError as exc:
            raise InputError(f"cannot write {out}: {exc.strerror}") from None
        result = _run(out, steps, seed, progress)
    if not result.passed:
        raise ParityError(f"demo parity failed; see {result.parity_json}")
    return result


def _run(out: Path, steps: int, seed: int, progress: bool) -> DemoResult:
    from controlrt.training import shapes
    from controlrt.training.fidelity import edge_f1, image_edges, scene_edges

    logger.info("writing the built-in models to %s", out / "models")
    models = write_trained_models(out / "models", force=True)  # the demo's own, checked above
    logger.info("exporting to %s", out / "build")
    export_build(models.base, models.controlnets, out / "build", force=True, progress=progress)

    scene = shapes.sample(shapes.HELD_OUT + DEMO_SCENE)
    target = scene_edges(scene)
    # the demo's folder is its own (checked under its lock): its earlier outputs are replaced
    with Pipeline.load(out / "build", backend="onnxruntime") as pipe:
        controls = [out / f"control_{name}.png" for name in pipe.controlnet_names]
        for name, path in zip(pipe.controlnet_names, controls, strict=True):
            save_image(scene.conditions[name], path, {"control": name, "scene": scene.caption}, force=True)
        results = {}
        for label, scale in (("demo", 1.0), ("demo-off", 0.0)):
            request = GenerationRequest(
                prompt=scene.caption, controls=controls, scales=scale, steps=steps, guidance=4.0, seed=seed
            )
            result = pipe.generate(request, progress=progress)
            save_image(result.image, out / f"{label}.png", result.settings, force=True)
            results[label] = edge_f1(image_edges(result.image), target)

    report = run_parity(out / "build", backend="onnxruntime", steps=4, seed=seed)
    write_output_file(out / "parity.json", report.to_json().encode("utf-8"), force=True)
    return DemoResult(
        out / "build",
        out / "demo.png",
        out / "demo-off.png",
        scene.caption,
        results["demo"],
        results["demo-off"],
        out / "parity.json",
        report.table(),
        report.passed,
    )
