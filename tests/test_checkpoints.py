"""Single-file checkpoints: original-format files written by the test, converted, exported, compared."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from original_layout import (
    controlnet_to_original,
    open_clip_to_original,
    text_encoder_to_original,
    unet_to_original,
    vae_to_original,
)
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
from controlrt.families import family_of
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
    with pytest.raises(InputError, match=r"not a ControlNet checkpoint \(neither ControlNet 1\.x"):
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


@pytest.fixture(scope="module")
def sdxl_single_files(tmp_path_factory):
    """A small SDXL-shaped set (VAE factor 8) as an original SDXL checkpoint (CLIP in Hugging Face
    names, the second encoder in OpenCLIP's), its ControlNet and ControlNet-Union as single files in
    diffusers' names, and the diffusers folders they were made from."""
    from dataclasses import replace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from controlrt.builtin import TINY_XL

    root = tmp_path_factory.mktemp("single-xl")
    arch = replace(TINY_XL, vae_channels=(16, 16, 32, 32), sample_size=8, controlnets=("canny",))
    models = write_builtin_models(root / "models", arch, seed=4)
    unet = UNet2DConditionModel.from_pretrained(models.base / "unet")
    vae = AutoencoderKL.from_pretrained(models.base / "vae")
    text = CLIPTextModel.from_pretrained(models.base / "text_encoder")
    text_2 = CLIPTextModelWithProjection.from_pretrained(models.base / "text_encoder_2")
    state = {
        **unet_to_original(unet.state_dict(), dict(unet.config)),
        **vae_to_original(vae.state_dict(), dict(vae.config)),
        **text_encoder_to_original(text.state_dict(), "conditioner.embedders.0.transformer."),
        **open_clip_to_original({k: v for k, v in text_2.state_dict().items() if "position_ids" not in k}),
    }
    save_file({k: v.contiguous() for k, v in state.items()}, root / "sdxl.safetensors")
    files = {"root": root, "models": models, "sdxl": root / "sdxl.safetensors"}
    for name, folder in (("cn", models.controlnets[0]), ("union", models.unions[0])):
        weights = read_checkpoint(folder / "diffusion_pytorch_model.safetensors")
        save_file(weights, root / f"{name}.safetensors")
        files[name] = root / f"{name}.safetensors"
    return files


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sdxl_checkpoint_round_trip(sdxl_single_files, tmp_path):
    from diffusers import AutoencoderKL, ControlNetModel, ControlNetUnionModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from controlrt.export.build import export_build
    from controlrt.runtime.pipeline import Pipeline

    models = sdxl_single_files["models"]
    base = convert_sd_checkpoint(sdxl_single_files["sdxl"], tmp_path / "base", config=models.base)
    for name, cls in (
        ("unet", UNet2DConditionModel),
        ("vae", AutoencoderKL),
        ("text_encoder", CLIPTextModel),
        ("text_encoder_2", CLIPTextModelWithProjection),
    ):
        assert _same_weights(cls.from_pretrained(base / name), cls.from_pretrained(models.base / name)), name
    assert family_of(BaseModel.open(base).info()).name == "sdxl"
    # ControlNet and ControlNet-Union single files in diffusers' names, with their configs given
    cn = convert_controlnet_checkpoint(sdxl_single_files["cn"], tmp_path / "cn", config=models.controlnets[0])
    union = convert_controlnet_checkpoint(sdxl_single_files["union"], tmp_path / "union", config=models.unions[0])
    assert _same_weights(ControlNetModel.from_pretrained(cn), ControlNetModel.from_pretrained(models.controlnets[0]))
    assert _same_weights(
        ControlNetUnionModel.from_pretrained(union), ControlNetUnionModel.from_pretrained(models.unions[0])
    )
    export_build(base, [cn, union], tmp_path / "build")
    export_build(models.base, [*models.controlnets, *models.unions], tmp_path / "reference")
    settings = {
        "controls": sample_control_images(2, 64, 64),
        "control_types": [None, "depth"],
        "steps": 2,
        "seed": 5,
    }
    with Pipeline.load(tmp_path / "build") as got, Pipeline.load(tmp_path / "reference") as want:
        a, b = np.asarray(want("a red circle", **settings)), np.asarray(got("a red circle", **settings))
    assert a.std() > 0 and np.array_equal(a, b)


def test_sdxl_controlnet_configs_from_weights(sdxl_single_files):
    """The depth of each block, the middle block, the hint encoder and the union's control types
    come from the weights; the template only supplies what weights cannot say."""
    from diffusers import ControlNetModel, ControlNetUnionModel

    from controlrt.checkpoints import controlnet_config_from_weights

    models = sdxl_single_files["models"]
    for folder, cls in ((models.controlnets[0], ControlNetModel), (models.unions[0], ControlNetUnionModel)):
        want = dict(cls.load_config(folder))
        template = {**ControlNetModel.load_config(models.controlnets[0]), "transformer_layers_per_block": [3, 7]}
        template["conditioning_embedding_out_channels"] = [8]
        got = controlnet_config_from_weights(read_checkpoint(folder / "diffusion_pytorch_model.safetensors"), template)
        model = cls.from_config(got)
        model.load_state_dict(cls.from_pretrained(folder).state_dict())  # strict: every shape agrees
        for key in ("down_block_types", "conditioning_embedding_out_channels"):
            assert list(got[key]) == list(want[key]), key
        if cls is ControlNetUnionModel:
            assert got["num_control_type"] == want["num_control_type"] == 8


@pytest.mark.parametrize(
    ("depths", "down_types", "mid"),
    [
        ([1, 2, 10], ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "UNetMidBlock2DCrossAttn"),
        ([1, 1, 1], ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "UNetMidBlock2DCrossAttn"),
        ([1, 1, 1], ["DownBlock2D", "DownBlock2D", "DownBlock2D"], "UNetMidBlock2D"),
    ],
    ids=["full", "mid", "small"],
)
def test_shipped_sdxl_controlnet_config_reads_full_mid_and_small(depths, down_types, mid):
    """On meta tensors (shapes only, nothing allocated): SDXL ControlNets of every size."""
    from diffusers import ControlNetModel

    from controlrt.checkpoints import CONTROLNET_SDXL_CONFIG, controlnet_config_from_weights

    template = dict(ControlNetModel.load_config(CONTROLNET_SDXL_CONFIG))
    config = {**template, "transformer_layers_per_block": depths, "down_block_types": down_types}
    config["mid_block_type"] = mid
    with torch.device("meta"):
        state = ControlNetModel.from_config(config).state_dict()
        got = controlnet_config_from_weights(state, template)
        rebuilt = ControlNetModel.from_config(got).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}
    assert got["down_block_types"] == down_types and got["mid_block_type"] == mid


def test_shipped_configs_describe_sdxl(tmp_path, xl_models):
    import shutil

    from controlrt.checkpoints import CONTROLNET_SDXL_CONFIG, SDXL_CONFIG

    folder = shutil.copytree(SDXL_CONFIG, tmp_path / "sdxl")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(xl_models.base / name, folder / name)
    info = BaseModel.open(folder).info()
    assert family_of(info).name == "sdxl" and info.default_size == (1024, 1024) and info.cross_attention_dim == 2048
    assert info.text_hidden_sizes == (768, 1280) and info.pooled_dim == 1280 and info.vae_force_upcast
    config = json.loads((CONTROLNET_SDXL_CONFIG / "config.json").read_text())
    ControlNetModelFolder(tmp_path / "cn", config).check_fits(info)  # the config alone, no weights


def test_sdxl_checkpoint_errors(sdxl_single_files, single_files, tmp_path):
    models = sdxl_single_files["models"]
    # an SDXL checkpoint against SD1.5 configs, and the other way round
    with pytest.raises(InputError, match=r"describe SD 1\.x/2\.x, but .* is SDXL"):
        convert_sd_checkpoint(sdxl_single_files["sdxl"], tmp_path / "a", config=single_files["base"])
    with pytest.raises(InputError, match=r"describe SDXL, but .* is SD 1\.x/2\.x"):
        convert_sd_checkpoint(single_files["sd"], tmp_path / "b", config=models.base)
    # the shipped SDXL configs need both tokenizers, which no checkpoint carries
    with pytest.raises(InputError, match="--tokenizer DIR"):
        convert_sd_checkpoint(sdxl_single_files["sdxl"], tmp_path / "c")
    with pytest.raises(InputError, match="--tokenizer-2 DIR"):
        convert_sd_checkpoint(sdxl_single_files["sdxl"], tmp_path / "d", tokenizer=models.base / "tokenizer")
    # the tiny ControlNet is not SDXL-wide: the shipped config cannot describe it
    with pytest.raises(InputError, match="not SDXL's"):
        convert_controlnet_checkpoint(sdxl_single_files["cn"], tmp_path / "e")
    with pytest.raises(InputError, match="is a ControlNet-Union but the config"):
        convert_controlnet_checkpoint(sdxl_single_files["union"], tmp_path / "f", config=models.controlnets[0])
    assert not any((tmp_path / n).exists() for n in "abcdef")
