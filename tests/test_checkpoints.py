"""Single-file checkpoints: original-format files written by the test, converted, exported, compared."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from original_layout import controlnet_to_original, text_encoder_to_original, unet_to_original, vae_to_original
from safetensors.torch import save_file

from controlrt.builtin import TINY, sample_control_images, write_builtin_models
from controlrt.checkpoints import (
    CONTROLNET_SD15_CONFIG,
    SD15_CONFIG,
    convert_controlnet_checkpoint,
    convert_sd_checkpoint,
    read_checkpoint,
)
from controlrt.errors import InputError, ModelError
from controlrt.models import BaseModel, ControlNetModelFolder


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """A small base model (VAE factor 8, as SD's) as an original SD checkpoint (.safetensors), a
    ControlNet with the standard 1.x conditioning encoder as an original .pth, and the diffusers
    folders they were made from."""
    from dataclasses import replace

    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("single")
    arch = replace(TINY, vae_channels=(16, 16, 32, 32), sample_size=8)
    base = write_builtin_models(root / "models", arch, seed=2).base
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    vae = AutoencoderKL.from_pretrained(base / "vae")
    text = CLIPTextModel.from_pretrained(base / "text_encoder")
    state = {
        **unet_to_original(unet.state_dict(), dict(unet.config)),
        **vae_to_original(vae.state_dict(), dict(vae.config)),
        **text_encoder_to_original(text.state_dict()),
    }
    save_file({k: v.contiguous() for k, v in state.items()}, root / "sd.safetensors")
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    with torch.no_grad():  # zero convolutions get weights, or the control path proves nothing
        for p in [*controlnet.controlnet_down_blocks.parameters(), *controlnet.controlnet_mid_block.parameters()]:
            p.normal_(0, 0.05)
        for p in controlnet.controlnet_cond_embedding.conv_out.parameters():
            p.normal_(0, 0.05)
    controlnet.save_pretrained(root / "cn-diffusers")
    cn_state = controlnet_to_original(controlnet.state_dict(), dict(controlnet.config))
    torch.save({"state_dict": cn_state}, root / "cn.pth")
    return {
        "root": root,
        "base": base,
        "sd": root / "sd.safetensors",
        "cn": root / "cn.pth",
        "cn_folder": root / "cn-diffusers",
    }


def test_round_trip_reproduces_the_models(single_files, tmp_path):
    from controlrt.export.build import export_build
    from controlrt.runtime.pipeline import Pipeline

    base = convert_sd_checkpoint(single_files["sd"], tmp_path / "base", config=single_files["base"])
    cn = convert_controlnet_checkpoint(single_files["cn"], tmp_path / "cn", config=single_files["cn_folder"])
    BaseModel.open(base)
    ControlNetModelFolder.open(cn)
    source = json.loads((cn / "controlrt_source.json").read_text())
    assert source["checkpoint"] == str(single_files["cn"])
    # exported and run, the converted models give the image the original folders give
    export_build(base, [cn], tmp_path / "build")
    export_build(single_files["base"], [single_files["cn_folder"]], tmp_path / "reference")
    settings = {"controls": sample_control_images(1, 64, 64), "steps": 3, "seed": 5}
    with Pipeline.load(tmp_path / "build") as got, Pipeline.load(tmp_path / "reference") as want:
        a, b = np.asarray(want("a red circle", **settings)), np.asarray(got("a red circle", **settings))
    assert a.std() > 0 and np.array_equal(a, b)


def test_unsafe_pickles_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": Payload()}}, f)
    with pytest.raises(InputError, match="was refused: it is a pickle"):
        read_checkpoint(path)


def test_bad_checkpoints(single_files, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not a readable safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="unknown checkpoint type"):
        read_checkpoint(single_files["root"] / "cn-diffusers" / "config.json")
    with pytest.raises(InputError, match="not an original-format Stable Diffusion"):
        convert_sd_checkpoint(single_files["cn"], tmp_path / "x", config=single_files["base"])
    with pytest.raises(InputError, match=r"not a ControlNet 1\.x"):
        convert_controlnet_checkpoint(single_files["sd"], tmp_path / "y", config=single_files["cn_folder"])
    # the SD1.5 configs that ship with controlrt do not describe the tiny checkpoint
    with pytest.raises(ModelError, match="does not match its config"):
        convert_controlnet_checkpoint(single_files["cn"], tmp_path / "z")
    with pytest.raises(InputError, match="tokenizer"):
        convert_sd_checkpoint(single_files["sd"], tmp_path / "w")
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z", "w"))


def test_shipped_configs_describe_sd15(tmp_path, tiny_models):
    import shutil

    from diffusers import ControlNetModel

    folder = shutil.copytree(SD15_CONFIG, tmp_path / "sd15")
    shutil.copytree(tiny_models.base / "tokenizer", folder / "tokenizer")  # the configs ship without one
    info = BaseModel.open(folder).info()
    assert info.default_size == (512, 512) and info.cross_attention_dim == 768 and info.vae_scale_factor == 8
    config = ControlNetModel.load_config(CONTROLNET_SD15_CONFIG)
    assert config["conditioning_embedding_out_channels"] == [16, 32, 96, 256]
    assert config["block_out_channels"] == [320, 640, 1280, 1280]


def test_convert_checkpoint_command(single_files, tmp_path):
    from click.testing import CliRunner

    from controlrt.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args])

    out = tmp_path / "cn"
    result = run(
        "convert-checkpoint", "controlnet", single_files["cn"], "--out", out, "--config", single_files["cn_folder"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out.resolve()) and (out / "config.json").is_file()
    again = run(
        "convert-checkpoint", "controlnet", single_files["cn"], "--out", out, "--config", single_files["cn_folder"]
    )
    assert again.exit_code == 2 and again.output.startswith("error: ") and "--force" in again.output
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x04garbage")
    result = run(
        "convert-checkpoint", "sd", bad, "--out", tmp_path / "sd", "--tokenizer", single_files["base"] / "tokenizer"
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
