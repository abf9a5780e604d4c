"""Shared fixtures: small seeded model sets of two architectures and their builds.

Everything is built in temporary folders once per test session.
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# weight hashes are cached per test session, not in the user's ~/.cache
if "CONTROLRT_CACHE_DIR" not in os.environ:
    os.environ["CONTROLRT_CACHE_DIR"] = tempfile.mkdtemp(prefix="controlrt-cache-")
    atexit.register(shutil.rmtree, os.environ["CONTROLRT_CACHE_DIR"], ignore_errors=True)

from controlrt.builtin import ALTERNATE, TINY, TINY_XL, BuiltinModels, write_builtin_models

ARCHITECTURES = {"tiny": TINY, "other": ALTERNATE}


def pytest_collection_finish(session) -> None:
    """Freeze the objects the imports made (torch, diffusers, transformers, onnx: about 450k) out of the
    garbage collector's reach. Export and comparison call gc.collect twice per graph, so that a
    full-size model's weights are gone before the next arrive; each call walks every tracked object,
    about 0.5 s here, hundreds of times over the suite. Frozen objects are still freed by reference
    counting; only cycles among them are never collected, and import-time objects live to the end."""
    import diffusers
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import transformers

    import controlrt.export.build
    import controlrt.runtime.pipeline  # noqa: F401

    # diffusers and transformers import their classes on first use: the pipelines and models the suite runs
    for name in ("StableDiffusionControlNetPipeline", "StableDiffusionXLControlNetPipeline", "FluxControlNetPipeline"):
        getattr(diffusers, name)
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"):
        getattr(transformers, name)
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, BuiltinModels]:
    root = tmp_path_factory.mktemp("models")
    return {name: write_builtin_models(root / name, arch, seed=7) for name, arch in ARCHITECTURES.items()}


@pytest.fixture(scope="session")
def builds(models, tmp_path_factory) -> dict[str, Path]:
    from controlrt.export.build import export_build

    root = tmp_path_factory.mktemp("builds")
    out = {}
    for name, m in models.items():
        export_build(m.base, m.controlnets, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def xl_models(tmp_path_factory) -> BuiltinModels:
    """A small SDXL-shaped set: two text encoders, text_time conditions, two ControlNets and a
    ControlNet-Union."""
    return write_builtin_models(tmp_path_factory.mktemp("xl") / "models", TINY_XL, seed=7)


@pytest.fixture(scope="session")
def xl_build(xl_models, tmp_path_factory) -> Path:
    from controlrt.export.build import export_build

    out = tmp_path_factory.mktemp("xl-build") / "build"
    export_build(xl_models.base, [*xl_models.controlnets, *xl_models.unions], out)  # two plain, one union
    return out


@pytest.fixture(scope="session")
def sd3(tmp_path_factory) -> Path:
    """A small SD3 set (tests/sd3_files.py) and three builds of it: root/multi with the two
    InstantX-style ControlNets, root/single with the one that takes the pooled projection,
    root/borrowed with the SD3.5-Large-style one (the transformer's position embedding, no text)."""
    from sd3_files import write_sd3

    from controlrt.export.build import export_build

    root = tmp_path_factory.mktemp("sd3")
    base, controlnets = write_sd3(root)
    export_build(base, controlnets[:2], root / "multi")
    # the others' graphs are checked end to end against diffusers (tests/runtime/test_sd3.py), their
    # text encoders and VAE are multi's: export's own check would repeat that
    export_build(base, controlnets[2:3], root / "single", validate=False)
    export_build(base, controlnets[3:], root / "borrowed", validate=False)
    return root


@pytest.fixture(scope="session")
def flux(tmp_path_factory) -> Path:
    """A small Flux set (tests/flux_files.py) and three builds of it: root/multi with the two ControlNets
    alike, root/single with the two that have no single-stream blocks and no guidance embedding (the
    second a ControlNet-Union), root/hinted with the XLabs-style one (an input hint block)."""
    from flux_files import write_flux

    from controlrt.export.build import export_build

    root = tmp_path_factory.mktemp("flux")
    base, controlnets = write_flux(root)
    export_build(base, controlnets[:2], root / "multi")
    # as for sd3 (tests/runtime/test_flux.py); here export's check runs at Flux's native 1024 px
    export_build(base, controlnets[2:4], root / "single", validate=False)
    export_build(base, controlnets[4:], root / "hinted", validate=False)
    return root


@pytest.fixture(scope="session")
def tiny_models(models) -> BuiltinModels:
    return models["tiny"]


@pytest.fixture(scope="session")
def tiny_build(builds) -> Path:
    return builds["tiny"]


FAST_CALIBRATION = {"samples": 2, "steps": 2}  # the calibration tests' settings


@pytest.fixture(scope="session")
def tiny_captured(tiny_build, tmp_path_factory) -> Path:
    """The tiny build with the generations that a calibration at FAST_CALIBRATION reads already
    captured (its cache, calibration/captures-*), so that the calibration tests quantize without
    running the reference generations again. Copy it before changing it."""
    from controlrt.calibration.calibrate import CalibrationSettings, capture_generations
    from controlrt.manifest import Build

    path = tmp_path_factory.mktemp("captured") / "build"
    shutil.copytree(tiny_build, path)
    capture_generations(Build.open(path), CalibrationSettings(**FAST_CALIBRATION))
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``controlrt demo --out controlrt-demo --steps 2`` run once: (its folder, the CLI result)."""
    from click.testing import CliRunner

    from controlrt.cli import cli

    folder = tmp_path_factory.mktemp("readme") / "controlrt-demo"
    return folder, CliRunner().invoke(cli, ["demo", "--out", str(folder), "--steps", "2"])


@pytest.fixture(scope="session")
def pipelines(builds):
    """Loaded pipelines per (architecture, backend), shared across tests."""
    from controlrt.runtime.pipeline import Pipeline

    cache: dict = {}

    def get(arch: str, backend: str):
        if (arch, backend) not in cache:
            cache[arch, backend] = Pipeline.load(builds[arch], backend=backend)
        return cache[arch, backend]

    yield get
    for pipe in cache.values():
        pipe.close()


# --- config-only model folders (no real weights) for checks that read configs alone -------------

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
}
SD15_CONTROLNET = {
    "_class_name": "ControlNetModel",
    "in_channels": 4,
    "conditioning_channels": 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "cross_attention_dim": 768,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
}


def write_config_folders(root: Path, unet=None, controlnet=None) -> tuple[Path, Path]:
    """An SD1.5-shaped base folder and ControlNet folder holding configs and empty weight files."""
    import json

    def put(path: Path, data: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))

    base = root / "base"
    put(
        base / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"],
        },
    )
    put(base / "unet" / "config.json", {**SD15_UNET, **(unet or {})})
    put(
        base / "vae" / "config.json",
        {
            "_class_name": "AutoencoderKL",
            "block_out_channels": [128, 256, 512, 512],
            "latent_channels": 4,
            "out_channels": 3,
            "scaling_factor": 0.18215,
        },
    )
    put(
        base / "text_encoder" / "config.json",
        {"hidden_size": 768, "max_position_embeddings": 77, "vocab_size": 49408},
    )
    put(base / "tokenizer" / "tokenizer_config.json", {"model_max_length": 77})
    put(
        base / "scheduler" / "scheduler_config.json",
        {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000},
    )
    cn = root / "controlnet"
    put(cn / "config.json", {**SD15_CONTROLNET, **(controlnet or {})})
    (cn / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return base, cn
