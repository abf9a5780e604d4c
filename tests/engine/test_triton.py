"""The Triton model repository: configs validated as Triton's ModelConfig protobuf, and the
Python-backend model's loop run on the CPU against a FAKE of Triton's Python utilities."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys

import fake_tensorrt
import fake_triton_utils
import numpy as np
import pytest
from PIL import Image

from controlrt.builtin import sample_control_images
from controlrt.engine import builder
from controlrt.engine.cache import BuildOptions, Gpu
from controlrt.errors import BuildError
from controlrt.manifest import Build
from controlrt.serving.protocol import encode_control
from controlrt.serving.triton import write_triton_repo

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]")


@pytest.fixture
def engines(tiny_build, tmp_path, monkeypatch):
    """A copy of the tiny build with (fake) fp32 engines."""
    fake_tensorrt.install(monkeypatch)
    monkeypatch.setattr(Gpu, "current", classmethod(lambda cls, device=0: Gpu("Fake GPU", "9.0")))
    monkeypatch.setattr(builder, "require_cuda", lambda: None)
    build = shutil.copytree(tiny_build, tmp_path / "build")
    builder.build_engines(build, "fp32")
    return build


def _parse(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_repository_configs_are_valid_model_configs(engines, tmp_path):
    repo = write_triton_repo(engines, tmp_path / "repo", "fp32", instances=2)
    manifest = Build.open(engines).manifest
    assert {p.name for p in repo.iterdir() if p.is_dir()} == {*manifest.graphs, "controlrt"}
    for name, record in manifest.graphs.items():
        config = _parse(repo / name / "config.pbtxt")
        assert config.platform == "tensorrt_plan" and config.name == name
        assert [i.name for i in config.input] == record.spec.input_names
        assert [o.name for o in config.output] == record.spec.output_names
        sample = record.spec.inputs[0]
        assert list(config.input[0].dims) == [-1 if not isinstance(d, int) else d for d in sample.shape]
        assert config.instance_group[0].count == 2
        assert (repo / name / "1" / "model.plan").read_bytes() == (
            engines / "engines" / f"{name}.fp32.plan"
        ).read_bytes()
    pipeline = _parse(repo / "controlrt" / "config.pbtxt")
    assert pipeline.backend == "python" and pipeline.parameters["build"].string_value == str(engines)
    assert pipeline.input[0].data_type == model_config_pb2.TYPE_STRING


def test_repository_refuses_missing_or_stale_engines(engines, tmp_path):
    with pytest.raises(BuildError, match="controlrt build"):
        write_triton_repo(engines, tmp_path / "a", "fp16")  # no fp16 engines (nor graphs)
    builder.build_engines(engines, "fp32", options=BuildOptions(weight_stripped=True), graphs=["unet"])
    with pytest.raises(BuildError, match="weight-stripped"):
        write_triton_repo(engines, tmp_path / "b", "fp32")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_python_model_runs_the_loop_through_bls(engines, tmp_path, monkeypatch, pipelines):
    from controlrt.ort_session import OrtSession

    repo = write_triton_repo(engines, tmp_path / "repo", "fp32")
    build = Build.open(engines)
    fake_triton_utils.SESSIONS.clear()
    fake_triton_utils.CALLS.clear()
    for name in build.manifest.graphs:
        fake_triton_utils.SESSIONS[name] = OrtSession(build.graph_path(name), build.manifest.spec(name))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_triton_utils)
    spec = importlib.util.spec_from_file_location("controlrt_triton_model", repo / "controlrt" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = json.dumps(
        {"parameters": {"build": {"string_value": str(engines)}, "precision": {"string_value": "fp32"}}}
    )
    model.initialize({"model_config": config})

    controls = sample_control_images(2, 64, 64)
    body = {"prompt": "a red circle", "controls": [encode_control(c) for c in controls], "steps": 3, "seed": 4}
    good = fake_triton_utils.Request(request=np.array([json.dumps(body).encode()], dtype=object))
    bad = fake_triton_utils.Request(request=np.array([b'{"steps": 3}'], dtype=object))
    ok, refused = model.execute([good, bad])
    image = Image.open(io.BytesIO(ok.output_tensors["image"].as_numpy().tobytes())).convert("RGB")
    expected = pipelines("tiny", "onnxruntime")("a red circle", controls=controls, steps=3, seed=4)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert fake_triton_utils.CALLS.count("unet") == 3 and fake_triton_utils.CALLS.count("vae_decoder") == 1
    assert refused.has_error() and "prompt" in refused.error().message()
