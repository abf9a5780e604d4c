"""The built-in model set: deterministic, loadable as ordinary diffusers folders, non-vacuous."""

from __future__ import annotations

import torch

from controlrt.builtin import Architecture, bytes_to_unicode, train_bpe, write_builtin_models
from controlrt.io import sha256_file
from controlrt.models import BaseModel, ControlNetModelFolder


def test_same_seed_same_weights(tiny_models, tmp_path):
    again = write_builtin_models(tmp_path / "again", seed=7)
    for a, b in [
        (tiny_models.base / "unet", again.base / "unet"),
        (tiny_models.controlnets[0], again.controlnets[0]),
    ]:
        assert sha256_file(a / "diffusion_pytorch_model.safetensors") == sha256_file(
            b / "diffusion_pytorch_model.safetensors"
        )
    other = write_builtin_models(tmp_path / "other", Architecture(controlnets=("a",)), seed=8)
    assert sha256_file(other.base / "unet" / "diffusion_pytorch_model.safetensors") != sha256_file(
        again.base / "unet" / "diffusion_pytorch_model.safetensors"
    )


def test_tokenizer_is_a_working_clip_bpe(tiny_models):
    tokenizer = BaseModel.open(tiny_models.base).load_tokenizer()
    pieces = tokenizer.tokenize("a red circle and a zebra")
    assert pieces[:3] == ["a</w>", "red</w>", "circle</w>"]  # learned merges
    assert "z" in pieces  # unseen words fall back to bytes
    ids = tokenizer("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_bpe_merges_are_deterministic():
    words = ["circle", "circles", "red", "reds"]
    assert train_bpe(words, 10) == train_bpe(list(reversed(words)), 10)
    assert len(bytes_to_unicode()) == 256


def test_zero_convolutions_have_weights(tiny_models):
    net = ControlNetModelFolder.open(tiny_models.controlnets[0]).load()
    for conv in [
        *net.controlnet_down_blocks,
        net.controlnet_mid_block,
        net.controlnet_cond_embedding.conv_out,
    ]:
        assert conv.weight.abs().max() > 0 and conv.bias.abs().max() > 0
    unet = BaseModel.open(tiny_models.base).load_unet()
    assert not torch.equal(net.controlnet_mid_block.weight.flatten()[:8], torch.zeros(8))
    assert unet.config.block_out_channels == net.config.block_out_channels
