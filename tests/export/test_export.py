"""controlrt export: graphs, manifest, validation, atomic writes, settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch

import controlrt.export.build as export_module
from controlrt.errors import BuildError, InputError, ModelError, ValidationError
from controlrt.export.build import export_build
from controlrt.export.onnx_export import ExportSettings
from controlrt.io import sha256_file
from controlrt.manifest import Build


def test_manifest_records_everything(tiny_build, tiny_models):
    build = Build.open(tiny_build)
    m = build.manifest
    assert list(m.graphs) == ["text_encoder", "controlnet_0", "controlnet_1", "unet", "vae_decoder", "vae_encoder"]
    for graph in m.graphs.values():
        assert list(graph.variants) == ["fp32"]
        record = graph.variants["fp32"]
        for f in record.files:
            assert sha256_file(tiny_build / f.path) == f.sha256
        assert record.validation and all(r["passed"] for r in record.validation)
        assert {r["shape"] for r in record.validation} == {"1x64x64", "2x48x80"}
    assert m.sources["base"]["path"] == str(tiny_models.base)
    assert set(m.sources["base"]["config_sha256"]) == {
        "unet",
        "vae",
        "text_encoder",
        "scheduler",
        "tokenizer",
    }
    assert [s["path"] for s in m.sources["controlnets"]] == [str(p) for p in tiny_models.controlnets]
    assert m.settings["opset"] == 18
    assert {"torch", "onnx", "onnxruntime", "diffusers", "controlrt"} <= set(m.tools)
    assert [s.source_name for s in m.controlnet_specs] == ["edges", "depth"]
    raw = json.loads((tiny_build / "manifest.json").read_text())
    assert raw["graphs"]["unet"]["spec"]["inputs"][3]["name"] == "down_block_res_0"


def test_unet_graph_takes_residual_inputs_with_symbolic_axes(tiny_build):
    model = onnx.load(str(tiny_build / "graphs" / "unet.onnx"), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert list(inputs)[3:] == [f"down_block_res_{i}" for i in range(6)] + ["mid_block_res"]
    assert inputs["sample"] == ["batch", 4, "height/2", "width/2"]
    assert inputs["mid_block_res"] == ["batch", 64, "height/4", "width/4"]
    cn = onnx.load(str(tiny_build / "graphs" / "controlnet_0.onnx"), load_external_data=False)
    assert [o.name for o in cn.graph.output] == list(inputs)[3:]


def test_external_data_and_opset(tiny_models, tmp_path, pipelines):
    out = tmp_path / "ext"
    export_build(tiny_models.base, tiny_models.controlnets[:1], out, ExportSettings(opset=17, external_data=True))
    build = Build.open(out)
    files = [f.path for f in build.manifest.graphs["unet"].variants["fp32"].files]
    assert files == ["graphs/unet.onnx", "graphs/unet.onnx.data"]
    graph, data = (os.path.getsize(out / "graphs" / name) for name in ("unet.onnx", "unet.onnx.data"))
    assert graph < data / 4  # the weights live in the .data file
    model = onnx.load(str(out / "graphs" / "unet.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    from controlrt.builtin import sample_control_images
    from controlrt.runtime.pipeline import Pipeline

    images = sample_control_images(1, 64, 64)
    with Pipeline.load(out) as pipe:
        a = np.asarray(pipe("a", controls=images, steps=3, seed=1))
    b = np.asarray(pipelines("tiny", "onnxruntime")("a", controls=images, steps=3, seed=1))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    (out / "graphs" / "unet.onnx.data").write_bytes(b"\0" * 10)
    with pytest.raises(BuildError, match=r"unet.onnx.data is truncated"):
        Build.open(out)


def test_failed_export_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    real = export_module.export_onnx

    def dies_at_unet(module, spec, path, settings):
        if spec.name == "unet":
            raise RuntimeError("simulated crash")
        return real(module, spec, path, settings)

    monkeypatch.setattr(export_module, "export_onnx", dies_at_unet)
    out = tmp_path / "build"
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_build(tiny_models.base, tiny_models.controlnets[:1], out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_killed_export_is_never_accepted(tiny_models, tmp_path):
    out = tmp_path / "build"
    cmd = [
        sys.executable,
        "-m",
        "controlrt.cli",
        "export",
        str(tiny_models.base),
        "--controlnet",
        str(tiny_models.controlnets[0]),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".build.partial-*/graphs/*.onnx")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".build.partial-*")), "the export was killed before it wrote anything"
    with pytest.raises(BuildError, match="does not exist"):
        Build.open(out)
    for partial in tmp_path.glob(".build.partial-*"):
        with pytest.raises(BuildError, match="not a controlrt build"):
            Build.open(partial)


def test_validation_catches_a_graph_that_differs(tiny_models, tmp_path, monkeypatch):
    real = export_module.export_onnx

    def perturbed(module, spec, path, settings):
        if spec.name != "controlnet_0":
            return real(module, spec, path, settings)
        conv = module.controlnet.controlnet_mid_block
        with torch.no_grad():
            conv.bias.add_(1.0)
            try:
                return real(module, spec, path, settings)
            finally:
                conv.bias.sub_(1.0)

    monkeypatch.setattr(export_module, "export_onnx", perturbed)
    with pytest.raises(ValidationError, match=r"controlnet_0 does not reproduce PyTorch.*mid_block_res"):
        export_build(tiny_models.base, tiny_models.controlnets[:1], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_existing_output_needs_force(tiny_models, tiny_build, tmp_path):
    with pytest.raises(InputError, match="pass --force"):
        export_build(tiny_models.base, tiny_models.controlnets, tiny_build)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not written by controlrt"):
        export_build(tiny_models.base, tiny_models.controlnets, other, force=True)
    assert (other / "mine.txt").read_text() == "keep me"


def test_misfit_controlnet_refused_before_writing(models, tmp_path):
    with pytest.raises(ModelError, match="does not fit the base UNet"):
        export_build(models["tiny"].base, [models["other"].controlnets[0]], tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_force_replaces_a_build(tiny_models, tmp_path):
    out = tmp_path / "b"
    first = export_build(tiny_models.base, tiny_models.controlnets[:1], out, validate=False)
    second = export_build(tiny_models.base, tiny_models.controlnets[::-1], out, force=True, validate=False)
    assert len(first.graphs) == 5 and len(second.graphs) == 6
    assert Build.open(out).manifest.controlnet_specs[0].source_name == "depth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_two_exports_to_one_new_folder_never_lose_each_others_work(tiny_models, tmp_path):
    out = tmp_path / "b"
    command = [sys.executable, "-m", "controlrt.cli", "export", str(tiny_models.base), "--out", str(out)]
    jobs = [
        subprocess.Popen(
            [*command, "--controlnet", str(cn), "--no-validate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for cn in tiny_models.controlnets
    ]
    results = [(job.wait(300), job.stderr.read().decode()) for job in jobs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, err in results if code != 0)
    assert "already exists" in loser and "Traceback" not in loser
    manifest = Build.open(out, verify=True).manifest  # the winner's build, whole
    winner = tiny_models.controlnets[[code for code, _ in results].index(0)]
    assert manifest.controlnet_specs[0].source_name == winner.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_manifest_paths_must_stay_inside_the_build(tiny_build, tmp_path):
    build = shutil.copytree(tiny_build, tmp_path / "build")
    shutil.copy(build / "graphs" / "vae_decoder.onnx", tmp_path / "outside.onnx")
    data = json.loads((build / "manifest.json").read_text())
    data["graphs"]["vae_decoder"]["variants"]["fp32"]["files"][0]["path"] = "../outside.onnx"
    (build / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BuildError, match="outside the build"):
        Build.open(build)


def test_a_fine_tuned_source_is_a_changed_source(tiny_models, tmp_path):
    """Same architecture, same file size, other weights: the torch reference refuses it."""
    from safetensors.torch import load_file, save_file

    from controlrt.runtime.backends import open_sources

    models = shutil.copytree(tiny_models.base.parent, tmp_path / "models")
    build = tmp_path / "build"
    export_build(models / "base", [models / "edges"], build, validate=False)
    open_sources(Build.open(build).manifest)  # unchanged: fine
    weights = models / "edges" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == size
    with pytest.raises(BuildError, match="changed since it was exported"):
        open_sources(Build.open(build).manifest)


def test_weights_stored_one_file_each_are_streamed_into_one(tmp_path):
    """Over 2 GiB, the exporter writes one file per weight: they are copied one at a time into a
    single .data file (never all held in memory), and the graph computes what it computed."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from controlrt.export.onnx_export import _rewrite

    rng = np.random.default_rng(0)
    weight, bias = rng.standard_normal((64, 48)).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 48])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    raw = tmp_path / "raw" / "raw.onnx"
    raw.parent.mkdir()
    onnx.save_model(model, str(raw), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(raw.parent.iterdir())) == 3  # the graph and one file per weight
    files = _rewrite(raw, tmp_path / "out.onnx", external=None)
    assert [f.name for f in files] == ["out.onnx", "out.onnx.data"]
    assert [f.name for f in raw.parent.iterdir()] == ["raw.onnx"]  # each weight's file deleted once copied
    assert os.path.getsize(files[1]) == weight.nbytes + bias.nbytes
    stored = onnx.load(str(files[0]), load_external_data=False)
    locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    x = rng.standard_normal((2, 64)).astype(np.float32)
    got = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ weight + bias, rtol=1e-5, atol=1e-5)
