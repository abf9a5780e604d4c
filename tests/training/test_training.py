"""The shapes data set, edge F1, the training stages (smoke runs) and the shipped trained model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from controlrt import builtin
from controlrt.errors import InputError, ModelError
from controlrt.runtime.preprocess import canny
from controlrt.training import shapes
from controlrt.training.fidelity import edge_f1
from controlrt.training.plot import convergence_step, fidelity_svg
from controlrt.training.train import TrainConfig, ship, train


def test_samples_are_deterministic_and_consistent():
    a, b = shapes.sample(11), shapes.sample(11)
    assert a.caption == b.caption
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.caption != shapes.sample(12).caption or not np.array_equal(
        np.asarray(a.image), np.asarray(shapes.sample(12).image)
    )
    assert np.array_equal(np.asarray(a.conditions["canny"]), np.asarray(canny(a.image)))
    assert np.asarray(a.conditions["canny"]).any() and np.asarray(a.conditions["seg"]).any()
    words = set(shapes.VOCABULARY.split())
    for seed in range(50):
        caption = shapes.sample(seed).caption
        assert set(caption.split()) <= words, caption
        assert any(shape in caption for shape in shapes.SHAPES)


def test_edge_f1():
    target = np.zeros((32, 32), bool)
    target[8:24, 8] = target[8:24, 23] = target[8, 8:24] = target[23, 8:24] = True
    assert edge_f1(target, target) == 1.0
    assert edge_f1(np.roll(target, 2, axis=1), target) == 1.0  # within the 2-pixel tolerance
    assert edge_f1(np.roll(target, 6, axis=1), target) < 0.5
    assert edge_f1(np.zeros_like(target), target) == 0.0
    with pytest.raises(ValueError, match="shape"):
        edge_f1(target[:8], target)


def test_convergence_marker():
    curve = [{"step": 0, "f1": 0.1}, {"step": 100, "f1": 0.12}, {"step": 200, "f1": 0.4}, {"step": 300, "f1": 0.42}]
    assert convergence_step(curve) == 200
    svg = fidelity_svg({"canny": curve}, "title")
    assert svg.startswith("<svg") and "step 200" in svg and "canny ControlNet" in svg


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    history = train(out, TrainConfig.smoke())
    return out, history


def test_smoke_training_writes_models_history_and_plot(smoke_run):
    out, history = smoke_run
    for folder in ("base/unet", "base/vae", "base/text_encoder", "canny", "seg"):
        assert any((out / "models" / folder).glob("*.safetensors")), folder
    saved = json.loads((out / "history.json").read_text())
    assert set(saved["fidelity"]) == {"canny", "seg"}
    assert [p["step"] for p in saved["fidelity"]["canny"]] == [0, 2, 4]
    assert len(saved["losses"]["base"]) == 3 and all(np.isfinite(saved["losses"]["base"]))
    assert saved["scaling_factor"] > 0
    assert (out / "fidelity.svg").read_text().startswith("<svg")
    vae = json.loads((out / "models/base/vae/config.json").read_text())
    assert vae["scaling_factor"] == pytest.approx(history.scaling_factor)


def test_smoke_training_is_deterministic(smoke_run, tmp_path):
    from safetensors.torch import load_file

    out, _ = smoke_run
    train(tmp_path / "again", TrainConfig.smoke())
    for name in ("base/unet/diffusion_pytorch_model.safetensors", "canny/diffusion_pytorch_model.safetensors"):
        first, second = load_file(out / "models" / name), load_file(tmp_path / "again/models" / name)
        assert first.keys() == second.keys()
        assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first), name


def test_controlnet_trains_only_its_copy(smoke_run):
    """The base stays frozen: the ControlNet's zero convolutions moved off zero, nothing else changed."""
    from safetensors.torch import load_file

    out, _ = smoke_run
    controlnet = load_file(out / "models/canny/diffusion_pytorch_model.safetensors")
    zero_convs = [k for k in controlnet if k.startswith(("controlnet_down_blocks", "controlnet_mid_block"))]
    assert zero_convs and any(controlnet[k].abs().sum() > 0 for k in zero_convs)


def test_ship_writes_fp16_models_and_plot(smoke_run, tmp_path):
    from safetensors.torch import load_file

    out, _ = smoke_run
    docs = tmp_path / "docs"
    docs.mkdir()
    dest = ship(out, dest=tmp_path / "trained", docs=docs)
    unet = load_file(dest / "base/unet/diffusion_pytorch_model.safetensors")
    assert {str(t.dtype) for t in unet.values() if t.is_floating_point()} == {"torch.float16"}
    assert (dest / "history.json").is_file() and (docs / "control-fidelity.svg").is_file()
    with pytest.raises(InputError, match="no finished training run"):
        ship(tmp_path / "nothing", dest=tmp_path / "trained2", docs=docs)
    assert not (tmp_path / "trained2").exists()


def test_missing_trained_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "TRAINED_DIR", tmp_path / "none")
    with pytest.raises(ModelError, match="controlrt train"):
        builtin.write_trained_models(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_command_smoke_and_bad_device(tmp_path):
    import torch
    from click.testing import CliRunner

    from controlrt.cli import cli

    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "run"), "--smoke", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "canny: edge F1" in result.output and (tmp_path / "run/models/seg/config.json").is_file()
    devices = ["nonsense"] + ([] if torch.cuda.is_available() else ["cuda:0"])
    for k, device in enumerate(devices):
        out = tmp_path / f"bad{k}"
        bad = CliRunner().invoke(cli, ["train", "--out", str(out), "--smoke", "--device", device])
        assert bad.exit_code != 0 and bad.output.startswith("error: "), bad.output
        assert len(bad.output.strip().splitlines()) == 1
        assert not out.exists()
