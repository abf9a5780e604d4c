"""Engine building, caching, refit and the TensorRT session's control flow, on the CPU.

TensorRT is replaced by tests/engine/fake_tensorrt.py, a FAKE that runs the ONNX graph with
onnxruntime: these tests check controlrt's own logic (which engine may run, what it is keyed by,
the order of TensorRT calls, buffer binding, CUDA-graph capture per shape signature, refit
bookkeeping), not TensorRT. The real thing is tested in test_tensorrt_gpu.py where it exists.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import fake_tensorrt
import numpy as np
import pytest
import torch

from controlrt.builtin import TINY, sample_control_images, write_builtin_models
from controlrt.compare import compare_feeds, psnr, seeded_cases, tolerance_for
from controlrt.engine import builder
from controlrt.engine.cache import BuildOptions, EngineStore, Gpu, TimingCache
from controlrt.engine.profiles import ProfileSettings
from controlrt.engine.session import TensorRTSession, open_engine_session
from controlrt.errors import BackendError, BuildError, InputError
from controlrt.manifest import Build
from controlrt.ort_session import OrtSession
from controlrt.precision import Precision

FAKE_GPU = Gpu("Fake GPU", "9.0")


@pytest.fixture
def fake_trt(monkeypatch):
    """The fake in place of tensorrt (its builder included) and a fake GPU."""
    module = fake_tensorrt.install(monkeypatch)
    monkeypatch.setattr(Gpu, "current", classmethod(lambda cls, device=0: FAKE_GPU))
    monkeypatch.setattr(builder, "require_cuda", lambda: None)
    monkeypatch.setattr("controlrt.engine.trt.require_cuda", lambda: None)
    fake_tensorrt.FakeGraph.captured.clear()
    return module


@pytest.fixture
def build(tiny_build, tmp_path):
    """A private copy of the tiny build (engines and refits write into it)."""
    return shutil.copytree(tiny_build, tmp_path / "build")


def _session(build_dir, name, **kwargs) -> TensorRTSession:
    return open_engine_session(Build.open(build_dir), name, Precision.FP32, device="cpu", **kwargs)


def test_build_then_keep_current_engines(fake_trt, build):
    first = builder.build_engines(build, "fp32")
    assert {r.status for r in first} == {"built"}
    assert {r.graph for r in first} == set(Build.open(build).manifest.graphs)
    store = EngineStore(Build.open(build))
    record = json.loads(store.record_path("unet", Precision.FP32).read_text())
    assert record["key"]["tensorrt"] == fake_tensorrt.__version__
    assert record["key"]["gpu"] == {"name": "Fake GPU", "compute_capability": "9.0"}
    assert [name for name, _ in record["key"]["onnx"]] == ["graphs/unet.onnx"]

    assert {r.status for r in builder.build_engines(build, "fp32")} == {"current"}
    assert {r.status for r in builder.build_engines(build, "fp32", force=True)} == {"built"}
    # other profiles or options make another engine
    changed = builder.build_engines(build, "fp32", ProfileSettings(max_batch=2), graphs=["unet"])
    assert [r.status for r in changed] == ["built"]
    assert {r.status for r in builder.build_engines(build, "fp32", ProfileSettings(max_batch=2))} == {
        "built",
        "current",
    }
    refit = builder.build_engines(build, "fp32", ProfileSettings(max_batch=2), BuildOptions(refittable=True))
    rebuilt = {"controlnet_0", "controlnet_1", "unet", "text_encoder"}  # the VAE is never refittable
    assert {r.graph for r in refit if r.status == "built"} == rebuilt


def test_missing_precision_names_the_command(fake_trt, build):
    with pytest.raises(BuildError, match="controlrt convert"):
        builder.build_engines(build, "fp16")
    with pytest.raises(InputError, match="no graph"):
        builder.build_engines(build, "fp32", graphs=["nope"])


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("tensorrt", "built by TensorRT 10.1.0"),
        ("gpu", "built for Other GPU"),
        ("onnx", "ONNX graph changed"),
        ("truncate", "missing or truncated"),
        ("record", "has no fp32 TensorRT engine"),
    ],
)
def test_stale_or_foreign_engines_are_refused(fake_trt, build, damage, reason):
    builder.build_engines(build, "fp32", graphs=["controlnet_0"])
    store = EngineStore(Build.open(build))
    path = store.record_path("controlnet_0", Precision.FP32)
    record = store.record("controlnet_0", Precision.FP32)
    if damage == "truncate":
        plan = store.plan_path("controlnet_0", Precision.FP32)
        plan.write_bytes(plan.read_bytes()[:-3])
    elif damage == "record":
        path.unlink()
    else:
        key = {
            "tensorrt": replace(record.key, tensorrt="10.1.0"),
            "gpu": replace(record.key, gpu=Gpu("Other GPU", "8.6")),
            "onnx": replace(record.key, onnx=(("graphs/controlnet_0.onnx", "0" * 64),)),
        }[damage]
        path.write_text(replace(record, key=key).to_json())
    with pytest.raises(BuildError, match=reason) as info:
        _session(build, "controlnet_0")
    assert "controlrt build" in str(info.value)


def test_timing_cache_is_per_version(tmp_path):
    cache = TimingCache(tmp_path / "t.cache", "10.13.0")
    assert cache.load() is None
    cache.save(b"tactics")
    assert cache.load() == b"tactics"
    assert TimingCache(tmp_path / "t.cache", "11.4.0").load() is None  # another version's cache
    cache.path.write_bytes(b"other bytes")  # changed behind the sidecar's back: not trusted
    assert cache.load() is None
    TimingCache(tmp_path / "t.cache", "11.4.0").save(b"new")  # controlrt's own file: replaced
    assert json.loads((tmp_path / "t.cache.json").read_text())["tensorrt"] == "11.4.0"


def test_a_users_timing_cache_is_never_deleted_or_replaced(fake_trt, build, tmp_path):
    mine = tmp_path / "mine.cache"
    mine.write_bytes(b"a cache some other tool wrote")
    with pytest.raises(InputError, match="did not write it"):
        builder.build_engines(build, "fp32", timing_cache=mine, graphs=["vae_decoder"])
    assert mine.read_bytes() == b"a cache some other tool wrote"
    fresh = tmp_path / "fresh.cache"
    builder.build_engines(build, "fp32", timing_cache=fresh, graphs=["vae_decoder", "controlnet_0"])
    written = json.loads((tmp_path / "fresh.cache.json").read_text())
    assert written["tensorrt"] == fake_tensorrt.__version__
    assert json.loads(fresh.read_bytes())["entries"] == 2  # the second build started from the first's
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_builder_configuration(fake_trt, build):
    options = BuildOptions(refittable=True, optimization_level=5, workspace_gb=0.5)
    graphs = ["controlnet_0", "unet", "vae_decoder"]
    builder.build_engines(build, "fp32", ProfileSettings(max_batch=2), options, graphs=graphs)
    controlnet, unet, vae = fake_tensorrt.Builder.builds
    assert "TF32" not in controlnet["flags"] and "FP16" not in controlnet["flags"]  # precision is in the ONNX
    # ControlNets (refit) and the UNet (lora) take new weights; nothing changes the VAE's
    assert "REFIT" in controlnet["flags"] and "REFIT" in unet["flags"] and "REFIT" not in vae["flags"]
    assert controlnet["optimization_level"] == 5 and controlnet["pools"] == {"WORKSPACE": 1 << 29}
    spec = Build.open(build).manifest.spec("unet")
    (profile,) = unet["profiles"]
    assert set(profile) == set(spec.input_names)
    low, opt, high = profile["sample"]
    latent = spec.default_size[0] // Build.open(build).manifest.info.vae_scale_factor
    assert low[0] == 1 and opt[0] == 2 and high[0] == 4  # batch: 1 image uncond-free .. 2 images with CFG
    assert opt[2] == latent and low[2] == latent // 2 and high[2] == latent * 2
    builder.build_engines(build, "fp32", options=BuildOptions(weight_stripped=True), graphs=["vae_decoder"])
    assert {"STRIP_PLAN", "REFIT_IDENTICAL"} <= set(fake_tensorrt.Builder.builds[-1]["flags"])
    builder.build_engines(build, "fp32", ProfileSettings(static=True), graphs=["controlnet_1"])
    assert len(fake_tensorrt.Builder.builds[-1]["profiles"]) == 2  # batch 1 and 2, one profile each


def _ort_reference(build_dir, name, cases):
    spec = Build.open(build_dir).manifest.spec(name)
    with OrtSession(Build.open(build_dir).graph_path(name), spec) as ort:
        return [ort.infer(feeds) for _, feeds in cases]


def test_session_sets_profile_and_shapes_before_each_run(fake_trt, build):
    builder.build_engines(build, "fp32", ProfileSettings(opt_batch=1, static=True), graphs=["controlnet_0"])
    session = _session(build, "controlnet_0")
    spec = session.spec
    cases = seeded_cases(spec, [spec.sizes(2), spec.sizes(1), spec.sizes(2)])
    with OrtSession(Build.open(build).graph_path("controlnet_0"), spec) as ort:
        rows = compare_feeds(ort, session, cases, tolerance_for(Precision.FP32, spec.kind))
    assert rows and all(r.passed and r.ref_max_abs > 0 for r in rows)
    calls = session.context.calls
    runs = [i for i, c in enumerate(calls) if c[0] == "execute_async_v3"]
    assert len(runs) == 3
    # static engine: profile 1 is batch 2, profile 0 batch 1; switched only when the batch changes
    assert [c[1] for c in calls if c[0] == "set_optimization_profile_async"] == [1, 0, 1]
    start = 0
    for run in runs:  # every input shape and every tensor address is set before every run
        window = calls[start:run]
        assert {c[1] for c in window if c[0] == "set_input_shape"} == set(spec.input_names)
        assert {c[1] for c in window if c[0] == "set_tensor_address"} == set(spec.input_names + spec.output_names)
        start = run + 1


def test_shapes_outside_the_profile_are_refused(fake_trt, build):
    builder.build_engines(build, "fp32", ProfileSettings(static=True), graphs=["unet"])
    session = _session(build, "unet")
    feeds = session.spec.dummy_inputs(session.spec.sizes(3))
    with pytest.raises(InputError, match="outside the engine's profiles"):
        session.infer(feeds)


def test_cuda_graphs_are_captured_once_per_shape_signature(fake_trt, build):
    builder.build_engines(build, "fp32", graphs=["unet"])
    record = EngineStore(Build.open(build)).record("unet", Precision.FP32)
    spec = Build.open(build).manifest.spec("unet")
    session = TensorRTSession(
        EngineStore(Build.open(build)).read_plan(record),
        spec,
        record.key.profiles,
        cuda_graphs=True,
        device="cpu",
        graph_factory=fake_tensorrt.FakeGraph,
    )
    a, b = spec.sizes(2), spec.sizes(1, spec.default_size[0] + spec.size_multiple)
    cases = seeded_cases(spec, [a, a, b, a], seed=5)
    # new inputs at the same shapes must give new outputs, not the captured ones
    cases[1] = ("again", spec.dummy_inputs(a, seed=99))
    expected = _ort_reference(build, "unet", cases)
    for (_, feeds), want in zip(cases, expected, strict=True):
        got = session.infer(feeds)["noise_pred"]
        assert torch.allclose(got, want["noise_pred"], rtol=1e-5, atol=1e-6)
        assert got.abs().max() > 0
    assert session.captures == 2
    graphs = fake_tensorrt.FakeGraph.captured
    assert [g.replays for g in graphs] == [3, 1]
    # replaying A after B re-bound A's buffers (the context held B's)
    addresses = [c for c in session.context.calls if c[0] == "set_tensor_address" and c[1] == "sample"]
    assert len(addresses) == 3 and addresses[0][2] == addresses[2][2] != addresses[1][2]


def test_pipeline_on_engines_matches_onnxruntime(fake_trt, build, pipelines, monkeypatch):
    monkeypatch.setattr("controlrt.engine.session.CudaGraph", fake_tensorrt.FakeGraph)
    builder.build_engines(build, "fp32")
    from controlrt.runtime.pipeline import Pipeline

    images = sample_control_images(2, 64, 64)
    settings = {"controls": images, "steps": 4, "seed": 2, "control_mode": "cfg-rw"}
    with Pipeline.load(build, backend="tensorrt", device="cpu", cuda_graphs=True) as pipe:
        assert pipe.sessions["unet"].backend == "tensorrt"
        got = np.asarray(pipe("a red circle", **settings))
        assert pipe.sessions["unet"].captures == 1  # one signature: every step replays it
    expected = np.asarray(pipelines("tiny", "onnxruntime")("a red circle", **settings))
    assert expected.std() > 0
    assert psnr(expected, got) >= 60


def test_weight_stripped_plans_are_refitted_at_load(fake_trt, build):
    builder.build_engines(build, "fp32", options=BuildOptions(weight_stripped=True), graphs=["vae_decoder"])
    session = _session(build, "vae_decoder")
    assert session._engine.refits == 1
    feeds = session.spec.dummy_inputs(session.spec.sizes(1))
    assert session.infer(feeds)["image"].abs().max() > 0
    store = EngineStore(Build.open(build))
    record = store.record("vae_decoder", Precision.FP32)
    unrefitted = TensorRTSession(store.read_plan(record), session.spec, record.key.profiles, device="cpu")
    with pytest.raises(BackendError):  # the plan alone has no weights
        unrefitted.infer(feeds)


def test_weight_streaming_budget(fake_trt, build):
    builder.build_engines(build, "fp32", graphs=["unet"])
    with pytest.raises(Exception, match="not built for weight streaming"):
        _session(build, "unet", weight_streaming_budget=1000)
    builder.build_engines(build, "fp32", options=BuildOptions(weight_streaming=True), graphs=["unet"])
    assert _session(build, "unet", weight_streaming_budget=1000)._engine.weight_streaming_budget_v2 == 1000


def test_refit_swaps_a_controlnet(fake_trt, build, tmp_path, pipelines):
    from controlrt.engine.refit import refit_controlnet
    from controlrt.runtime.pipeline import Pipeline

    builder.build_engines(build, "fp32", options=BuildOptions(refittable=True))
    new = write_builtin_models(tmp_path / "other", TINY, seed=8).controlnets[0]  # same architecture
    images = sample_control_images(2, 64, 64)
    settings = {"controls": images, "steps": 3, "seed": 1}
    before = np.asarray(pipelines("tiny", "onnxruntime")("a house", **settings))

    assert refit_controlnet(build, "controlnet_0", new, device="cpu") == ["controlnet_0 fp32"]
    manifest = Build.open(build).manifest
    assert manifest.sources["controlnets"][0]["path"] == str(new)
    record = EngineStore(Build.open(build)).record("controlnet_0", Precision.FP32)
    assert record.refitted_from and record.key.onnx != record.refitted_from
    with Pipeline.load(build, backend="tensorrt", device="cpu") as pipe:
        refitted = np.asarray(pipe("a house", **settings))
    with Pipeline.load(build, backend="onnxruntime") as pipe:
        expected = np.asarray(pipe("a house", **settings))
    assert psnr(expected, refitted) >= 60  # the engine now computes the new ControlNet
    assert psnr(before, refitted) < 40  # and no longer the old one


def test_refit_refusals(fake_trt, build, builds):
    from controlrt.engine.refit import refit_controlnet

    with pytest.raises(BuildError, match="has no engine"):
        refit_controlnet(build, "controlnet_0", Build.open(build).graph_path("controlnet_1"), device="cpu")
    builder.build_engines(build, "fp32", graphs=["controlnet_0"])
    with pytest.raises(BuildError, match="--refittable"):
        refit_controlnet(build, "controlnet_0", Build.open(build).graph_path("controlnet_1"), device="cpu")
    builder.build_engines(build, "fp32", options=BuildOptions(refittable=True), graphs=["controlnet_0"])
    other_arch = Build.open(builds["other"]).graph_path("controlnet_0")
    with pytest.raises(InputError, match="architecture"):
        refit_controlnet(build, "controlnet_0", other_arch, device="cpu")
    with pytest.raises(InputError, match="no ControlNet"):
        refit_controlnet(build, "nope", other_arch, device="cpu")
    # an fp32 ONNX of the same architecture is accepted; the torch reference then needs a folder
    assert refit_controlnet(build, "edges", Build.open(build).graph_path("controlnet_1"), device="cpu") == [
        "controlnet_0 fp32"
    ]
    from controlrt.runtime.backends import open_sources

    with pytest.raises(BuildError, match="refitted from"):
        open_sources(Build.open(build).manifest)


def test_a_refit_that_does_not_take_is_caught_and_the_build_kept(fake_trt, build, tmp_path, monkeypatch):
    """The refitted engine is checked against its new graph before anything in the build changes."""
    from controlrt.engine.refit import refit_controlnet
    from controlrt.errors import ValidationError
    from controlrt.io import files_under

    builder.build_engines(build, "fp32", options=BuildOptions(refittable=True), graphs=["controlnet_0"])
    new = write_builtin_models(tmp_path / "other", TINY, seed=8).controlnets[0]
    before = {f: (build / f).read_bytes() for f in files_under(build)}
    monkeypatch.setattr(fake_tensorrt.Refitter, "refit_cuda_engine", lambda self: True)  # keeps the old weights
    with pytest.raises(ValidationError, match="refitted fp32 controlnet_0 engine does not reproduce"):
        refit_controlnet(build, "controlnet_0", new, device="cpu")
    after = {f: (build / f).read_bytes() for f in files_under(build)}
    assert after == before  # nothing written, nothing left behind


def test_refit_writes_new_files_and_deletes_the_old_after_the_manifest(fake_trt, build, tmp_path):
    from controlrt.engine.refit import refit_controlnet

    builder.build_engines(build, "fp32", options=BuildOptions(refittable=True), graphs=["controlnet_0"])
    old = Build.open(build).variant("controlnet_0").files
    new = write_builtin_models(tmp_path / "other", TINY, seed=8).controlnets[0]
    refit_controlnet(build, "controlnet_0", new, device="cpu")
    now = Build.open(build)  # every file matches its hash
    assert {f.path for f in now.variant("controlnet_0").files}.isdisjoint({f.path for f in old})
    assert not any((build / f.path).exists() for f in old)
    assert not [p for p in build.iterdir() if p.name.startswith(".refit-")]


@pytest.mark.parametrize("static", [False, True])
def test_parity_on_tensorrt_asks_only_for_shapes_the_engines_accept(fake_trt, build, monkeypatch, static):
    """The VAE's profile takes batch 1 and static engines one size: parity keeps to them, and passes."""
    from controlrt.parity import run_parity

    builder.build_engines(build, "fp32", ProfileSettings(static=static))
    report = run_parity(build, backend="tensorrt", device="cpu", steps=2)
    assert report.passed, report.table()
    assert all(r.ref_max_abs > 0 for r in report.graphs)
    assert {r.shape.split("x")[0] for r in report.graphs if r.graph == "vae_decoder"} == {"1"}
    unet_shapes = {r.shape for r in report.graphs if r.graph == "unet"}
    assert len(unet_shapes) == 2
    if static:  # one size, batch 1 and 2
        native = Build.open(build).manifest.info.default_size
        assert unet_shapes == {f"{b}x{native[0]}x{native[1]}" for b in (1, 2)}


def test_onnxruntime_waits_for_torchs_stream_unless_it_shares_it():
    from controlrt.ort_session import order_after_torch, provider_entries

    class Stream:
        def __init__(self, handle):
            self.cuda_stream, self.waited = handle, 0

        def synchronize(self):
            self.waited += 1

    cuda = torch.device("cuda", 0)
    same = Stream(7)
    assert not order_after_torch(cuda, 7, lambda device: same) and same.waited == 0
    other = Stream(9)  # torch moved to another stream: its kernels may still be writing the inputs
    assert order_after_torch(cuda, 7, lambda device: other) and other.waited == 1
    assert not order_after_torch(torch.device("cpu"), None)
    entries = provider_entries(["CUDAExecutionProvider", "CPUExecutionProvider"], 7)
    assert entries == [("CUDAExecutionProvider", {"user_compute_stream": "7"}), "CPUExecutionProvider"]


def test_the_fake_replays_the_addresses_it_captured_as_a_gpu_does(fake_trt, build):
    """Rebinding other buffers after capture does not redirect a replay: the captured ones are used."""
    builder.build_engines(build, "fp32", graphs=["vae_decoder"])
    session = _session(build, "vae_decoder")
    spec = session.spec
    feeds = spec.dummy_inputs(spec.sizes(1), seed=3)
    shapes = {name: tuple(t.shape) for name, t in feeds.items()}
    session._set_shapes(shapes)
    captured = {"latent": feeds["latent"].clone(), **session._allocate_outputs()}
    captured["image"].zero_()
    session._bind(captured)
    graph = fake_tensorrt.FakeGraph(session._execute, torch.device("cpu"))
    assert captured["image"].abs().max() == 0  # capturing records the launch, it does not run it
    other = {"latent": torch.zeros_like(feeds["latent"]), "image": torch.zeros_like(captured["image"])}
    session._bind(other)
    graph.replay()
    assert other["image"].abs().max() == 0  # the newly bound buffer is untouched
    assert captured["image"].abs().max() > 0  # the captured one got the output


def test_lora_change_refits_the_engines_from_the_new_graphs(fake_trt, build, tiny_models, tmp_path):
    """controlrt lora refits refittable engines with base + new LoRA weights, checked, never blended."""
    from lora_files import write_diffusers_lora

    from controlrt.export.loras import set_loras
    from controlrt.lora import Lora
    from controlrt.runtime.pipeline import Pipeline

    builder.build_engines(build, "fp32", options=BuildOptions(refittable=True))
    lora = write_diffusers_lora(tiny_models.base, tmp_path / "lora", seed=2)
    change = set_loras(build, [Lora(lora, 0.7)], device="cpu")
    assert set(change.refitted) == {"unet fp32", "text_encoder fp32"} and not change.stale, change
    record = EngineStore(Build.open(build)).record("unet", Precision.FP32)
    assert record.refitted_from and record.key.onnx != record.refitted_from
    settings = {"controls": sample_control_images(2, 64, 64), "steps": 3, "seed": 1}
    with Pipeline.load(build, backend="tensorrt", device="cpu") as pipe:
        refitted = np.asarray(pipe("a house", **settings))
    with Pipeline.load(build, backend="onnxruntime") as pipe:
        expected = np.asarray(pipe("a house", **settings))
    assert psnr(expected, refitted) >= 60
    # a second change refits from the base weights plus the new LoRA, not on top of the first
    set_loras(build, [], device="cpu")
    with Pipeline.load(build, backend="tensorrt", device="cpu") as pipe, Pipeline.load(build) as reference:
        assert psnr(np.asarray(reference("a house", **settings)), np.asarray(pipe("a house", **settings))) >= 60


def test_auto_on_tensorrt_times_the_engines_built_against_the_fp32_graph(fake_trt, build, monkeypatch):
    """TensorRT's candidates are the UNet engines the build has; each is judged against the fp32
    graph on onnxruntime, so no fp32 engine is needed, and none at all is one clear line."""
    from controlrt.export.fp16 import convert_build
    from controlrt.runtime.autoprecision import choose_precision

    with pytest.raises(BuildError, match="no TensorRT engine of its UNet: run controlrt build"):
        choose_precision(Build.open(build), "tensorrt", device="cpu")
    convert_build(build, "fp16")
    builder.build_engines(build, "fp16", graphs=["unet"])
    only = choose_precision(Build.open(build), "tensorrt", device="cpu")
    assert only.precision is Precision.FP16 and only.source == "only candidate"
    builder.build_engines(build, "fp32", graphs=["unet"])

    def timer(candidate, call):
        call()
        return {Precision.FP32: 2.0, Precision.FP16: 1.0}[candidate.precision]

    choice = choose_precision(Build.open(build), "tensorrt", device="cpu", timer=timer, use_cache=False)
    assert choice.precision is Precision.FP16 and choice.source == "measured"
    rows = {r.label: r for r in choice.rows}
    assert set(rows) == {"fp32", "fp16"} and all(r.passed for r in rows.values())
    # both judged against the onnxruntime reference: the fp32 engine (the same graph) matches it
    # closely, the fp16 one within fp16's gate but not exactly
    assert rows["fp32"].rel_l2 < 1e-5 < rows["fp16"].rel_l2 < rows["fp16"].tolerance["rel_l2"]
    # engines that all fail their gates: one line naming them, nothing chosen
    from controlrt.compare import Tolerance
    from controlrt.families import StableDiffusion

    monkeypatch.setattr(StableDiffusion, "tolerance", lambda *a, **k: Tolerance(-1.0, -1.0))  # nothing passes
    with pytest.raises(BuildError, match="no tensorrt UNet of this build reproduces the fp32 graph here"):
        choose_precision(Build.open(build), "tensorrt", device="cpu", timer=timer, use_cache=False)


def test_sd3_builds_run_on_engines(fake_trt, sd3, tmp_path):
    """An SD3 build's graphs (three text encoders, ControlNets with block residuals, the transformer)
    get engines with profiles from their specs, and the pipeline on them matches onnxruntime."""
    from controlrt.runtime.pipeline import Pipeline

    build = shutil.copytree(sd3 / "multi", tmp_path / "build")
    built = builder.build_engines(build, "fp32")
    assert {r.graph for r in built} == set(Build.open(build).manifest.graphs)
    settings = {"controls": sample_control_images(2, 64, 64), "steps": 3, "seed": 2, "guidance": 5.0}
    with Pipeline.load(build, backend="tensorrt", device="cpu") as pipe:
        assert pipe.sessions["transformer"].backend == "tensorrt"
        got = np.asarray(pipe("a red house", **settings))
    with Pipeline.load(build, backend="onnxruntime") as pipe:
        expected = np.asarray(pipe("a red house", **settings))
    assert expected.std() > 5
    assert psnr(expected, got) >= 60


def test_flux_builds_run_on_engines(fake_trt, flux, tmp_path):
    """A Flux build's graphs (CLIP and T5, ControlNets with double- and single-block residuals, the
    transformer with its guidance input) get engines with batch-1 profiles (no CFG batch), and the
    pipeline on them matches onnxruntime."""
    from controlrt.engine.profiles import ProfileSettings
    from controlrt.runtime.pipeline import Pipeline

    build = shutil.copytree(flux / "multi", tmp_path / "build")
    built = builder.build_engines(build, "fp32", ProfileSettings(min_size=(64, 64), opt_size=(64, 64)))
    assert {r.graph for r in built} == set(Build.open(build).manifest.graphs)
    settings = {"controls": sample_control_images(2, 64, 64), "steps": 3, "seed": 2, "guidance": 3.5}
    size = {"height": 64, "width": 64}
    with Pipeline.load(build, backend="tensorrt", device="cpu") as pipe:
        assert pipe.sessions["transformer"].backend == "tensorrt"
        got = np.asarray(pipe("a red house", **settings, **size))
    with Pipeline.load(build, backend="onnxruntime") as pipe:
        expected = np.asarray(pipe("a red house", **settings, **size))
    assert expected.std() > 5
    assert psnr(expected, got) >= 60
