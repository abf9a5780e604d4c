"""The OpenVINO backend on the CPU: parity with torch in fp32, bf16 and int8; compiled-blob caching."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from controlrt.builtin import sample_control_images
from controlrt.compare import end_to_end_gate, psnr
from controlrt.cpu import int8_sums_saturate
from controlrt.errors import InputError
from controlrt.parity import run_parity

pytest.importorskip("openvino", reason="needs OpenVINO: pip install openvino")


def _bf16_here() -> bool:
    from controlrt.runtime.ov_backend import supports_bf16

    return supports_bf16()


@pytest.fixture
def build(tiny_build, tmp_path):
    """A copy of the tiny build without the compiled blobs other tests left in it."""
    return shutil.copytree(tiny_build, tmp_path / "build", ignore=shutil.ignore_patterns("openvino"))


def test_fp32_parity_with_torch(build):
    report = run_parity(build, backend="openvino", steps=3)
    assert report.passed, report.table()
    assert all(r.ref_max_abs > 0 for r in report.graphs)


@pytest.mark.skipif(not _bf16_here(), reason="this CPU has no bf16 instructions (AVX-512 BF16 or AMX)")
def test_bf16_parity_with_torch(build):
    report = run_parity(build, backend="openvino", precision="bf16", steps=3)
    assert report.passed, report.table()
    assert report.end_to_end.psnr_db >= end_to_end_gate("bf16")
    # bf16 really computes in bf16: not the fp32 image
    assert report.end_to_end.psnr_db < 75


def test_torch_bf16_is_diffusers_in_bf16(pipelines, builds):
    """The torch backend's bf16 is the modules in bf16, as diffusers' torch_dtype=torch.bfloat16."""
    from controlrt.runtime.pipeline import Pipeline

    images = sample_control_images(2, 64, 64)
    fp32 = np.asarray(pipelines("tiny", "torch")("a cat", controls=images, steps=3, seed=4))
    with Pipeline.load(builds["tiny"], backend="torch", precision="bf16") as pipe:
        bf16 = np.asarray(pipe("a cat", controls=images, steps=3, seed=4))
    assert end_to_end_gate("bf16") <= psnr(fp32, bf16) < 75


def test_compiled_graphs_are_cached_per_graph_and_never_stale(build):
    from controlrt.export.fp16 import convert_build
    from controlrt.runtime.pipeline import Pipeline

    with Pipeline.load(build, backend="openvino") as pipe:
        first = np.asarray(pipe("a cat", steps=2, seed=1))
    keys = {p.name for p in (build / "openvino").iterdir()}
    # the graphs text-to-image runs (the VAE encoder opens at the first image request)
    assert len(keys) == 5 and all(any((build / "openvino" / k).iterdir()) for k in keys)
    with Pipeline.load(build, backend="openvino") as pipe:  # from the cache
        assert np.array_equal(np.asarray(pipe("a cat", steps=2, seed=1)), first)
    assert {p.name for p in (build / "openvino").iterdir()} == keys
    convert_build(build, "fp16")  # other graphs: other keys, the fp32 ones untouched
    with Pipeline.load(build, backend="openvino", precision="fp16") as pipe:
        pipe("a cat", steps=1, seed=1)
    assert keys < {p.name for p in (build / "openvino").iterdir()}


def test_precisions_a_backend_cannot_compute_are_one_line(build, monkeypatch):
    from controlrt.runtime import ov_backend
    from controlrt.runtime.pipeline import Pipeline

    with pytest.raises(InputError, match="onnxruntime backend does not compute in bf16"):
        Pipeline.load(build, backend="onnxruntime", precision="bf16")
    monkeypatch.setattr(ov_backend, "supports_bf16", lambda: False)
    with pytest.raises(InputError, match="has no bf16 instructions"):
        Pipeline.load(build, backend="openvino", precision="bf16")


def test_int8_graphs_run_on_openvino(tiny_captured, tmp_path):
    from conftest import FAST_CALIBRATION

    from controlrt.calibration.calibrate import CalibrationSettings, calibrate_build

    build = shutil.copytree(tiny_captured, tmp_path / "int8")
    calibrate_build(build, settings=CalibrationSettings("onnxruntime", **FAST_CALIBRATION))
    report = run_parity(build, backend="openvino", precision="int8", steps=3)
    assert report.passed, report.table()
    from controlrt.runtime.pipeline import Pipeline

    with Pipeline.load(build, backend="openvino", precision="int8") as pipe:
        counts = pipe.sessions["unet"].kernel_precisions()
        fp32_counts = pipe.sessions["text_encoder"].kernel_precisions()
    if int8_sums_saturate():  # x86 without VNNI: the Q/DQ layers compute in float (their exact math)
        assert "int8" not in counts, counts
    else:
        assert counts.get("int8", 0) > sum(counts.values()) / 2, counts  # Q/DQ layers run as int8 kernels
    assert "int8" not in fp32_counts


def _saturating_qdq_matmul(path):
    """A Q/DQ int8 matrix multiply whose inputs line up with one weight column, so that u8 x s8
    pairs summed in 16 bits (x86 without VNNI) clip; and its exact fake-quantized result."""
    import onnx
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    weight = rng.uniform(-1, 1, (512, 64)).astype(np.float32)
    x = rng.uniform(-1, 1, (64, 512)).astype(np.float32)
    x[:32] = 0.99 * np.sign(weight[:, 0])
    scale = np.float32(1 / 127)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"]),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    inits = [nh.from_array(weight, "w"), nh.from_array(np.array(scale), "s"), nh.from_array(np.array(0, np.int8), "z")]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    def fake_quant(a):
        return np.clip(np.round(a / scale), -127, 127) * scale

    return x, fake_quant(x) @ fake_quant(weight)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_graphs_compute_their_own_math_where_int8_kernels_saturate(tmp_path, monkeypatch, backend):
    """Where controlrt.cpu.int8_sums_saturate (x86 without VNNI), both CPU engines keep Q/DQ layers
    in float: the int8 graph's exact math. Said to saturate here, so the setting is taken on any CPU."""
    import onnxruntime as ort

    from controlrt import ort_session
    from controlrt.runtime import ov_backend

    monkeypatch.setattr(ort_session, "int8_sums_saturate", lambda: True)
    monkeypatch.setattr(ov_backend, "int8_sums_saturate", lambda: True)
    path = tmp_path / "qdq.onnx"
    x, expected = _saturating_qdq_matmul(path)
    if backend == "onnxruntime":
        options = ort_session.session_options(["CPUExecutionProvider"])
        got = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    else:
        config = ov_backend.compile_config()
        assert config[ov_backend.LOW_PRECISION_TRANSFORMS] == "NO"
        got = ov_backend.core().compile_model(str(path), "CPU", config)({"x": x})[0]
    assert np.abs(expected).max() > 100  # the aligned rows' sums are large
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_int8_fusion_stays_on_where_int8_kernels_do_not_saturate(monkeypatch):
    from controlrt.runtime import ov_backend

    monkeypatch.setattr(ov_backend, "int8_sums_saturate", lambda: False)
    assert ov_backend.LOW_PRECISION_TRANSFORMS not in ov_backend.compile_config()
