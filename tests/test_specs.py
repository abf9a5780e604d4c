"""Graph specs: derived shapes, axes, dummy inputs and input checks."""

from __future__ import annotations

import pytest
import torch
from conftest import write_config_folders

from controlrt.errors import InputError
from controlrt.families import family_of
from controlrt.models import BaseModel
from controlrt.specs import Axis, GraphSpec


@pytest.fixture
def info(tmp_path):
    base, _ = write_config_folders(tmp_path)
    return BaseModel.open(base).info()


def test_unet_inputs_are_the_residuals(info):
    spec = family_of(info).unet_spec()
    names = spec.input_names
    assert names[:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert names[3:] == [f"down_block_res_{i}" for i in range(12)] + ["mid_block_res"]
    shapes = spec.input_shapes(spec.sizes(2, 512, 768))
    assert shapes["sample"] == (2, 4, 64, 96)
    assert shapes["down_block_res_0"] == (2, 320, 64, 96)
    assert shapes["down_block_res_3"] == (2, 320, 32, 48)
    assert shapes["mid_block_res"] == (2, 1280, 8, 12)
    assert spec.output_shapes(spec.sizes(1))["noise_pred"] == (1, 4, 64, 64)


def test_controlnet_outputs_match_unet_residual_inputs(info):
    cn, unet = family_of(info).controlnet_spec(0, "canny", 3), family_of(info).unet_spec()
    assert cn.outputs == unet.inputs[3:]
    assert cn.tensor("controlnet_cond").concrete_shape(cn.sizes(1)) == (1, 3, 512, 512)
    assert (cn.index, cn.source_name, cn.union) == (0, "canny", False)


def test_per_graph_facts_keep_the_manifest_keys_of_earlier_builds(info):
    """Typed facts in memory, the same ``attributes`` entries on disk: a build exported before
    the facts were typed opens unchanged, and a new manifest reads the same."""
    cn = family_of(info).controlnet_spec(1, "depth", 3)
    assert cn.to_dict()["attributes"] == {"controlnet_index": 1, "controlnet_name": "depth"}
    assert GraphSpec.from_dict(cn.to_dict()) == cn
    text = family_of(info).text_encoder_spec()
    assert text.to_dict()["attributes"] == {"text_encoder_index": 0, "layer": "last"}
    assert GraphSpec.from_dict(text.to_dict()) == text
    union = {**cn.to_dict(), "attributes": {**cn.to_dict()["attributes"], "union": True, "num_control_type": 8}}
    read = GraphSpec.from_dict(union)
    assert read.union and read.control_types == 8 and read.source_name == "depth"
    assert GraphSpec.from_dict(family_of(info).unet_spec().to_dict()).to_dict()["attributes"] == {}


def test_dynamic_axes_come_from_the_spec(info):
    axes = family_of(info).unet_spec().dynamic_axes()
    assert axes["sample"] == {0: "batch", 2: "height/8", 3: "width/8"}
    assert axes["mid_block_res"] == {0: "batch", 2: "height/64", 3: "width/64"}
    assert family_of(info).text_encoder_spec().dynamic_axes() == {
        "input_ids": {0: "batch"},
        "last_hidden_state": {0: "batch"},
    }
    assert family_of(info).vae_decoder_spec().dynamic_axes()["image"] == {0: "batch", 2: "height", 3: "width"}


def test_round_trip(info):
    for spec in (
        family_of(info).text_encoder_spec(),
        family_of(info).controlnet_spec(1, "x", 3),
        family_of(info).unet_spec(),
        family_of(info).vae_decoder_spec(),
    ):
        assert GraphSpec.from_dict(spec.to_dict()) == spec
    assert Axis.parse("height/16") == Axis("height", 16)


def test_dummy_inputs_respect_ranges(info):
    spec = family_of(info).text_encoder_spec()
    ids = spec.dummy_inputs(spec.sizes(3), seed=1)["input_ids"]
    assert ids.dtype == torch.int64 and ids.shape == (3, 77)
    assert int(ids.min()) >= 0 and int(ids.max()) < info.vocab_size
    cn = family_of(info).controlnet_spec(0, "x", 3)
    feeds = cn.dummy_inputs(cn.sizes(1, 64, 64), seed=1)
    assert float(feeds["controlnet_cond"].min()) >= 0 and float(feeds["controlnet_cond"].max()) <= 1
    assert torch.equal(feeds["sample"], cn.dummy_inputs(cn.sizes(1, 64, 64), seed=1)["sample"])


def test_bind_checks_names_dtypes_and_shapes(info):
    spec = family_of(info).unet_spec()
    feeds = spec.dummy_inputs(spec.sizes(2, 128, 192))
    assert spec.bind(feeds) == {"batch": 2, "height": 128, "width": 192}
    with pytest.raises(InputError, match="missing mid_block_res"):
        spec.bind({k: v for k, v in feeds.items() if k != "mid_block_res"})
    with pytest.raises(InputError, match="unexpected extra"):
        spec.bind({**feeds, "extra": feeds["sample"]})
    with pytest.raises(InputError, match="dtype float16"):
        spec.bind({**feeds, "sample": feeds["sample"].half()})
    with pytest.raises(InputError, match="'down_block_res_4' has shape"):
        spec.bind({**feeds, "down_block_res_4": torch.zeros(2, 640, 4, 12)})
    with pytest.raises(InputError, match="'encoder_hidden_states' has shape"):
        spec.bind({**feeds, "encoder_hidden_states": torch.zeros(2, 77, 1024)})


def test_sizes_must_be_multiples(info):
    spec = family_of(info).unet_spec()
    with pytest.raises(InputError, match="multiple of 64"):
        spec.sizes(1, 500, 512)
