"""``controlrt demo``: the whole toolchain on the built-in trained model, in well under a minute."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from controlrt.builtin import write_trained_models
from controlrt.export.build import export_build
from controlrt.parity import run_parity
from controlrt.runtime.images import save_image
from controlrt.runtime.pipeline import Pipeline
from controlrt.runtime.request import GenerationRequest

logger = logging.getLogger(__name__)


# The held-out shapes scene the demo draws (never seen in training).
DEMO_SCENE = 3


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


def run_demo(out_dir: str | Path, steps: int = 20, seed: int = 0) -> DemoResult:
    """Write the trained built-in models, export them, generate with two controls, run parity.

    The controls are the canny edges and the segmentation map of a held-out shapes scene, the
    prompt its caption. The same request with the controls at scale 0 shows what the base model
    draws without them; the edge F1 of both against the scene says how closely the control was
    followed.

    Layout under ``out_dir``: models/ (diffusers folders), build/ (ONNX graphs + manifest),
    control_canny.png, control_seg.png, demo.png and demo-off.png (onnxruntime), parity.json.

    Raises ParityError if parity fails (the report is written first).
    """
    from controlrt.errors import ParityError
    from controlrt.training import shapes
    from controlrt.training.fidelity import edge_f1, image_edges, scene_edges

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    logger.info("writing the built-in models to %s", out / "models")
    models = write_trained_models(out / "models")
    logger.info("exporting to %s", out / "build")
    export_build(models.base, models.controlnets, out / "build", force=True)

    scene = shapes.sample(shapes.HELD_OUT + DEMO_SCENE)
    target = scene_edges(scene)
    with Pipeline.load(out / "build", backend="onnxruntime") as pipe:
        controls = [scene.conditions[name] for name in pipe.controlnet_names]
        for name, image in zip(pipe.controlnet_names, controls, strict=True):
            save_image(image, out / f"control_{name}.png")
        results = {}
        for label, scale in (("demo", 1.0), ("demo-off", 0.0)):
            request = GenerationRequest(
                prompt=scene.caption, controls=controls, scales=scale, steps=steps, guidance=4.0, seed=seed
            )
            result = pipe.generate(request)
            save_image(result.image, out / f"{label}.png", result.settings)
            results[label] = edge_f1(image_edges(result.image), target)

    report = run_parity(out / "build", backend="onnxruntime", steps=4, seed=seed)
    report.write_json(out / "parity.json")
    if not report.passed:
        raise ParityError(f"demo parity failed: {', '.join(report.failures)}; see {out / 'parity.json'}")
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
