"""The session interface: inputs checked against the spec, outputs checked after the run."""

from __future__ import annotations

import pytest
import torch

from controlrt.errors import BackendError, BuildError, InputError
from controlrt.manifest import Build
from controlrt.session import Session


class Fake(Session):
    backend = "fake"

    def __init__(self, spec, wrong=False):
        super().__init__(spec)
        self.wrong = wrong
        self.calls = 0

    def _run(self, feeds):
        self.calls += 1
        batch = feeds["sample"].shape[0] + (1 if self.wrong else 0)
        return {"noise_pred": torch.zeros(batch, *feeds["sample"].shape[1:])}


@pytest.fixture(scope="module")
def unet(tiny_build):
    return Build.open(tiny_build).manifest.spec("unet")


def test_valid_feeds_run(unet):
    session = Fake(unet)
    out = session.infer(unet.dummy_inputs(unet.sizes(2)))
    assert out["noise_pred"].shape == (2, 4, 32, 32) and session.calls == 1


def test_bad_feeds_never_reach_the_backend(unet):
    session = Fake(unet)
    feeds = unet.dummy_inputs(unet.sizes(1))
    with pytest.raises(InputError):
        session.infer({**feeds, "timestep": feeds["timestep"].long()})
    with pytest.raises(InputError):
        session.infer({**feeds, "sample": torch.zeros(1, 4, 30, 32)})
    assert session.calls == 0


def test_wrong_outputs_are_caught(unet):
    with pytest.raises(BackendError, match="output 'noise_pred' has shape"):
        Fake(unet, wrong=True).infer(unet.dummy_inputs(unet.sizes(1)))


def test_onnxruntime_providers(tiny_build):
    from controlrt.ort_session import OrtSession, resolve_providers

    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    build = Build.open(tiny_build)
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        OrtSession(build.graph_path("unet"), build.manifest.spec("unet"), providers=["NoSuchExecutionProvider"])
    with pytest.raises(BuildError, match="does not match its spec"):
        OrtSession(build.graph_path("vae_decoder"), build.manifest.spec("unet"))


def test_torch_and_onnxruntime_agree_per_graph_at_two_shapes(builds):
    """Per-graph parity, both architectures, every graph, two shapes each."""
    from controlrt.compare import compare_graph
    from controlrt.runtime.backends import BackendOptions, open_sessions

    for path in builds.values():
        build = Build.open(path)
        torch_sessions = open_sessions(build, BackendOptions("torch"))
        ort_sessions = open_sessions(build, BackendOptions("onnxruntime"))
        for name in build.manifest.graphs:
            rows = compare_graph(torch_sessions[name], ort_sessions[name])
            assert len({r.shape for r in rows}) == 2
            for r in rows:
                assert r.passed, r
                assert r.ref_max_abs > 1e-3, f"{name} {r.output} is trivially small"


def test_io_binding_path_matches_plain_runs(tiny_build):
    """The IOBinding path (the one GPU providers use) on the CPU: same outputs as plain runs."""
    from controlrt.manifest import Build
    from controlrt.ort_session import OrtSession

    build = Build.open(tiny_build)
    for name in ("text_encoder", "controlnet_0", "unet"):
        spec = build.manifest.spec(name)
        feeds = spec.dummy_inputs(spec.sizes(2), seed=4)
        with (
            OrtSession(build.graph_path(name), spec) as plain,
            OrtSession(build.graph_path(name), spec, io_binding=True) as bound,
        ):
            want, got = plain.infer(feeds), bound.infer(feeds)
        for out in spec.output_names:
            assert want[out].abs().max() > 0
            assert torch.equal(want[out], got[out]), (name, out)


@pytest.mark.parametrize("saturates", [True, False])
def test_int8_graphs_run_unfused_where_the_cpus_int8_kernels_saturate(monkeypatch, saturates):
    """x86 without VNNI: onnxruntime's fused int8 kernels clip 16-bit sums, so the CPU provider runs
    Q/DQ graphs dequantized (their stated math); elsewhere, and on GPU providers, it fuses them."""
    from controlrt import ort_session
    from controlrt.ort_session import DISABLE_QDQ_FUSION, session_options

    monkeypatch.setattr(ort_session, "int8_sums_saturate", lambda: saturates)
    cpu_options = session_options(["CPUExecutionProvider"], threads=2)
    gpu_options = session_options(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cpu_options.intra_op_num_threads == 2

    def entry(options):
        try:
            return options.get_session_config_entry(DISABLE_QDQ_FUSION)
        except RuntimeError:  # onnxruntime: "does not have configuration with key"
            return None

    assert entry(cpu_options) == ("1" if saturates else None)
    assert entry(gpu_options) is None


def test_int8_sums_saturate_on_x86_without_vnni(monkeypatch):
    from controlrt import cpu

    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "cpu_features", lambda: ("avx2", "avx512f"))
    assert cpu.int8_sums_saturate()
    monkeypatch.setattr(cpu, "cpu_features", lambda: ("avx_vnni", "avx2"))
    assert not cpu.int8_sums_saturate()
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu, "cpu_features", lambda: ())
    assert not cpu.int8_sums_saturate()
