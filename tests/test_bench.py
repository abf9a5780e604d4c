"""controlrt bench: counts and shares that must hold whatever the machine's speed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from controlrt.bench import run_bench
from controlrt.cli import cli


def test_bench_counts_calls_and_flops(tiny_build):
    uniform = run_bench(tiny_build, steps=3, runs=2, warmup=0)
    assert uniform.graphs_ms["unet"]["calls"] == 3 and uniform.graphs_ms["controlnet_1"]["calls"] == 3
    assert uniform.graphs_ms["text_encoder"]["calls"] == 1 and uniform.graphs_ms["vae_decoder"]["calls"] == 1
    assert len(uniform.step_s) == 2 and all(0.0 <= s < 1.0 for s in uniform.loop_overhead)
    one = run_bench(tiny_build, steps=3, runs=1, warmup=0, controls=1, control_mode="cfg-rw")
    assert "controlnet_1" not in one.graphs_ms  # a ControlNet without a control is not run
    # FLOPs: the UNet at batch 2 plus each ControlNet at batch 2 (uniform) or 1 (conditional only)
    assert uniform.step_gflop > one.step_gflop > 0


def test_bench_times_the_vae_encoder_of_image_tasks(tiny_build):
    """img2img (strength 0.8 of 5 steps: 4 run) and inpaint (a 4-channel UNet: only the init image
    encoded, the masked image's latents being read by inpainting UNets alone)."""
    img2img = run_bench(tiny_build, steps=5, runs=1, warmup=0, task="img2img")
    assert img2img.graphs_ms["vae_encoder"]["calls"] == 1 and img2img.graphs_ms["unet"]["calls"] == 4
    assert img2img.graphs_ms["vae_encoder"]["gflop"] > 0 and img2img.settings["task"] == "img2img"
    inpaint = run_bench(tiny_build, steps=3, runs=1, warmup=0, task="inpaint")
    assert inpaint.graphs_ms["vae_encoder"]["calls"] == 1 and inpaint.graphs_ms["unet"]["calls"] == 3
    assert "vae_encoder" not in run_bench(tiny_build, steps=1, runs=1, warmup=0).graphs_ms


def test_bench_command_writes_json(tiny_build, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", str(tiny_build), "--runs", "1", "--steps", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "per step:" in result.output and "GFLOP/s" in result.output
    data = json.loads(out.read_text())
    assert data["step"]["median"] > 0 and data["gflops_per_s"] > 0
    bad = CliRunner().invoke(cli, ["bench", str(tiny_build), "--controls", "5"])
    assert bad.exit_code == 2 and bad.output.startswith("error: ")
    for option in (["--runs", "0"], ["--runs", "1000000"], ["--warmup", "-1"]):
        bad = CliRunner().invoke(cli, ["bench", str(tiny_build), *option])
        assert bad.exit_code == 2 and bad.output.startswith("error: ") and len(bad.output.splitlines()) == 1


def test_bench_reports_the_cpu_its_peaks_and_each_graphs_share_of_them(tiny_build):
    from controlrt import cpu

    report = run_bench(tiny_build, backend="openvino", steps=2, runs=1, warmup=0)
    assert report.cpu["name"] == cpu.cpu_name() and report.cpu["features"] == list(cpu.cpu_features())
    assert report.matmul_peaks["fp32"] > 0
    # no int8 peak where the engines run no int8 kernels (x86 without VNNI: int8 graphs compute in f32)
    assert (report.matmul_peaks["int8"] is None) == cpu.int8_sums_saturate()
    unet = report.graphs_ms["unet"]
    assert unet["computes"] == "fp32" and unet["gflop"] > 0
    assert unet["peak_share"] == unet["gflops_per_s"] / report.matmul_peaks["fp32"]
    table = report.table()
    assert "CPU: " in table and "of peak" in table and "matrix-multiply peak" in table


def test_bench_keeps_the_best_peak_measured_between_the_runs(tiny_build, monkeypatch):
    from controlrt import cpu

    measured = iter([100.0, 300.0, 200.0])  # before the runs, after the first, after the second
    monkeypatch.setattr(cpu, "matmul_peaks", lambda threads=None: {"fp32": next(measured), "bf16": None, "int8": 900.0})
    report = run_bench(tiny_build, backend="onnxruntime", steps=2, runs=2, warmup=0)
    assert report.matmul_peaks == {"fp32": 300.0, "bf16": None, "int8": 900.0}
    assert next(measured, None) is None
    unet = report.graphs_ms["unet"]
    assert unet["peak_share"] == unet["gflops_per_s"] / 300.0


def test_openvino_profile_accounts_for_the_graph_time(tiny_build, capsys):
    """benchmarks/ov_profile.py: per-node counters that add up to about the graph's wall time."""
    import importlib.util
    from pathlib import Path

    import pytest

    pytest.importorskip("openvino", reason="needs OpenVINO: pip install openvino")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ov_profile.py"
    module_spec = importlib.util.spec_from_file_location("ov_profile", path)
    ov_profile = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(ov_profile)
    walls, rows = ov_profile.profile(str(tiny_build), "unet", "fp32", "f32", 64, 64, runs=3)
    assert len(walls) == 3 and len(rows) > 10
    assert {"Convolution", "MatMul"} <= {r[1] for r in rows} or any("Conv" in r[1] for r in rows)
    assert 0 < sum(r[3] for r in rows) <= 1.5 * max(walls)
    ov_profile.report(walls, rows, top=5)
    assert "share" in capsys.readouterr().out


@pytest.mark.parametrize("saturates", [True, False])
def test_no_int8_peak_where_the_engines_run_no_int8_kernels(monkeypatch, saturates):
    from controlrt import cpu

    monkeypatch.setattr(cpu, "int8_sums_saturate", lambda: saturates)
    peaks = cpu.matmul_peaks(size=128, repeats=1)
    assert peaks["fp32"] > 0
    assert (peaks["int8"] is None) == saturates


def test_full_size_transformer_graphs_are_counted_on_the_meta_device(tmp_path):
    """benchmarks/transformer_sizes.py: full-size SD3.5 and Flux graphs made from their configs with
    no weights, through the family's module factories; the counts are the published models' sizes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "transformer_sizes.py"
    module_spec = importlib.util.spec_from_file_location("transformer_sizes", path)
    sizes = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(sizes)
    flux = {r["graph"]: r["params"] for r in sizes.graph_sizes("flux.1-dev", tmp_path)}
    assert 11.8e9 < flux["transformer"] < 12.0e9  # FLUX.1-dev: 12 B
    assert 4.7e9 < flux["text_encoder_2"] < 4.8e9  # T5-XXL's encoder
    large = {r["graph"]: r["params"] for r in sizes.graph_sizes("sd3.5-large", tmp_path)}
    assert 8.0e9 < large["transformer"] < 8.3e9  # SD3.5-Large: 8.1 B
    assert large["controlnet_0"] > 1e9  # with the transformer's position embedding inside
