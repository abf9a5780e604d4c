"""``controlrt demo``: the whole toolchain on the built-in small model, in well under a minute."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from controlrt.builtin import sample_control_images, write_builtin_models
from controlrt.export.build import export_build
from controlrt.parity import run_parity
from controlrt.runtime.images import save_image
from controlrt.runtime.pipeline import Pipeline
from controlrt.runtime.request import GenerationRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    build: Path
    image: Path
    parity_json: Path
    parity_table: str
    passed: bool


def run_demo(out_dir: str | Path, steps: int = 20, seed: int = 0) -> DemoResult:
    """Write the built-in models, export them, generate with two controls, run parity.

    Layout under ``out_dir``: models/ (diffusers folders), build/ (ONNX graphs + manifest),
    control_0.png, control_1.png, demo.png (onnxruntime), parity.json.

    Raises ParityError if parity fails (the report is written first).
    """
    from controlrt.errors import ParityError

    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    logger.info("writing the built-in models to %s", out / "models")
    models = write_builtin_models(out / "models")
    logger.info("exporting to %s", out / "build")
    export_build(models.base, models.controlnets, out / "build", force=True)

    with Pipeline.load(out / "build", backend="onnxruntime") as pipe:
        height, width = pipe.info.default_size
        controls = sample_control_images(len(models.controlnets), height, width)
        for k, image in enumerate(controls):
            save_image(image, out / f"control_{k}.png")
        request = GenerationRequest(
            prompt="a red circle and a blue square",
            negative_prompt="blurry",
            controls=controls,
            scales=[1.0, 0.7],
            control_mode="cfg-rw-normalized",
            steps=steps,
            seed=seed,
        )
        result = pipe.generate(request)
    image_path = out / "demo.png"
    save_image(result.image, image_path, result.settings)

    report = run_parity(out / "build", backend="onnxruntime", steps=4, seed=seed)
    report.write_json(out / "parity.json")
    if not report.passed:
        raise ParityError(f"demo parity failed: {', '.join(report.failures)}; see {out / 'parity.json'}")
    return DemoResult(out / "build", image_path, out / "parity.json", report.table(), report.passed)
