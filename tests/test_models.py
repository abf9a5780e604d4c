"""Reading model folders: everything derived from configs, misfits refused with clear messages."""

from __future__ import annotations

import pytest
from conftest import write_config_folders

from controlrt.errors import ModelError
from controlrt.models import BaseModel, ControlNetModelFolder, residual_layout


def test_sd15_configs_give_13_residuals(tmp_path):
    base, cn = write_config_folders(tmp_path)
    info = BaseModel.open(base).info()
    assert len(info.residuals) == 13
    assert [r.channels for r in info.residuals] == [320] * 4 + [640] * 3 + [1280] * 6
    assert [r.level for r in info.residuals] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    assert info.vae_scale_factor == 8
    assert info.default_size == (512, 512)
    assert info.size_multiple == 64
    assert info.cross_attention_dim == 768
    ControlNetModelFolder.open(cn).check_fits(info)


def test_layout_follows_per_block_layers():
    config = {"block_out_channels": [8, 16, 24], "layers_per_block": [1, 2, 3], "down_block_types": ["x"] * 3}
    layout = residual_layout(config, "test")
    assert [(r.channels, r.level) for r in layout] == [
        (8, 0),
        (8, 0),
        (8, 1),
        (16, 1),
        (16, 1),
        (16, 2),
        (24, 2),
        (24, 2),
        (24, 2),
        (24, 2),
    ]


@pytest.mark.parametrize(
    ("controlnet", "message"),
    [
        ({"cross_attention_dim": 1024}, "cross_attention_dim 1024"),
        ({"block_out_channels": [320, 640, 1280]}, "disagree in length"),
        ({"layers_per_block": 1}, "yields 9 residuals"),
        ({"block_out_channels": [320, 640, 640, 1280]}, "residuals"),
        ({"in_channels": 9}, "latent channels"),
        ({"conditioning_embedding_out_channels": [16, 32]}, "downsamples control images 2x"),
        ({"global_pool_conditions": True}, "not supported"),
        ({"_class_name": "UNet2DConditionModel"}, "not a ControlNet folder"),
    ],
)
def test_misfit_controlnet_is_refused(tmp_path, controlnet, message):
    base, cn = write_config_folders(tmp_path, controlnet=controlnet)
    info = BaseModel.open(base).info()
    with pytest.raises(ModelError, match=message):
        ControlNetModelFolder.open(cn).check_fits(info)


@pytest.mark.parametrize(
    ("unet", "message"),
    [
        ({"addition_embed_type": "text_time"}, "lists no text_encoder_2"),
        ({"cross_attention_dim": 1024}, r"hidden sizes \[768\] do not add up"),
        ({"in_channels": 8}, r"so it must take 4 \(or 9: an inpainting UNet\)"),
        ({"_class_name": "UNet2DModel"}, "expected UNet2DConditionModel"),
    ],
)
def test_unsupported_base_is_refused(tmp_path, unet, message):
    base, _ = write_config_folders(tmp_path, unet=unet)
    with pytest.raises(ModelError, match=message):
        BaseModel.open(base)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        BaseModel.open(tmp_path / "nowhere")
    with pytest.raises(ModelError, match=r"no model_index\.json"):
        BaseModel.open(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read"):
        BaseModel.open(tmp_path)


def test_missing_controlnet_weights(tmp_path):
    _, cn = write_config_folders(tmp_path)
    (cn / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="has no weights"):
        ControlNetModelFolder.open(cn)
