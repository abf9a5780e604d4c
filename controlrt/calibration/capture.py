"""Capturing the inputs each graph sees in the denoise loop, run by the torch reference.

Calibration wants the real distribution: the latents, timesteps, prompt embeddings, control
images and summed residuals of actual generations across the timesteps. Captures are cached in
``BUILD/calibration/captures-<key>/`` (one .npz per graph), keyed by the data, the settings and
the build's fp32 graph hashes, so a second run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from controlrt.calibration.data import CalibrationData
from controlrt.io import file_lock
from controlrt.manifest import Build
from controlrt.progress import progress_bar
from controlrt.session import Session

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


class RecordingSession(Session):
    """Wraps a session and keeps a CPU copy of every feed it is given."""

    def __init__(self, inner: Session, records: list[Feeds]) -> None:
        super().__init__(inner.spec)
        self.inner = inner
        self.records = records
        self.backend = inner.backend

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.records.append({k: v.detach().cpu().numpy().copy() for k, v in feeds.items()})
        return self.inner._run(feeds)


@dataclass(frozen=True)
class CaptureSettings:
    """How the reference generations run: uniform mode, CFG, every control active."""

    steps: int
    height: int
    width: int
    guidance: float = 7.5
    seed: int = 0

    def key(self, build: Build, data: CalibrationData) -> str:
        exported = build.manifest.exported  # the graphs export made from the models the captures run
        graphs = {n: g.variants[exported].files[0].sha256 for n, g in build.manifest.graphs.items()}
        text = json.dumps([asdict(self), data.digest, graphs], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def _load(folder: Path, names: list[str]) -> dict[str, list[Feeds]]:
    out = {}
    for name in names:
        with np.load(folder / f"{name}.npz") as arrays:
            stacked = {k: arrays[k] for k in arrays.files}
        count = len(next(iter(stacked.values())))
        out[name] = [{k: v[i] for k, v in stacked.items()} for i in range(count)]
    return out


def _batch(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


def capture(
    build: Build, data: CalibrationData, settings: CaptureSettings, progress: bool = False
) -> dict[str, list[Feeds]]:
    """Every graph's feeds over ``data``'s generations, from the cache when it has them.

    Returns graph name -> list of feeds (one per call, in call order).
    """
    from controlrt.runtime.img2img import preprocess_image
    from controlrt.runtime.pipeline import Pipeline
    from controlrt.runtime.request import GenerationRequest, sample_control_types

    names = list(build.manifest.graphs)
    folder = build.path / "calibration" / f"captures-{settings.key(build, data)}"
    if all((folder / f"{n}.npz").is_file() for n in names):
        logger.info("using cached captures %s", folder.name)
        return _load(folder, names)

    records: dict[str, list[Feeds]] = {n: [] for n in names}
    with Pipeline.from_build(build, backend="torch") as pipe:
        if "vae_encoder" in records:
            pipe.session("vae_encoder")  # opened now, to be recorded too
        pipe.sessions = {n: RecordingSession(s, records[n]) for n, s in pipe.sessions.items()}
        pipe.warn_truncated = False  # the data set's prompts, cut to the model's length as it reads them
        samples = progress_bar(data.samples, progress, "calibrate: capture", "generation")
        for i, sample in enumerate(samples):
            request = GenerationRequest(
                sample.prompt,
                sample.controls,
                control_types=sample_control_types(build.manifest.controlnet_specs),
                steps=settings.steps,
                guidance=settings.guidance,
                seed=settings.seed + i,
                height=settings.height,
                width=settings.width,
            )
            result = pipe.generate(request)
            if "vae_encoder" in pipe.sessions:  # img2img's input: a real image, the one just made
                f = build.manifest.info.vae_scale_factor
                image = preprocess_image(result.image, settings.height, settings.width, f)
                pipe.sessions["vae_encoder"].infer({"image": image})
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        for name, feeds in records.items():
            if len({tuple((k, v.shape) for k, v in f.items()) for f in feeds}) > 1:
                # calls at several batch sizes (SD3's VAE encoder: control images at the CFG batch,
                # then the generated image): kept as one-row calls
                feeds[:] = [{k: v[i : i + 1] for k, v in f.items()} for f in feeds for i in range(_batch(f))]
            stacked = {k: np.stack([f[k] for f in feeds]) for k in feeds[0]} if feeds else {}
            np.savez(staging / f"{name}.npz", **stacked)
        with file_lock(build.path):
            if all((folder / f"{n}.npz").is_file() for n in names):  # another run wrote the same captures
                shutil.rmtree(staging)
            else:
                shutil.rmtree(folder, ignore_errors=True)  # an incomplete set of ours
                os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return records
