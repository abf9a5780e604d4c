"""Optimization profiles derived from the graph specs (no TensorRT needed)."""

from __future__ import annotations

import pytest

from controlrt.engine.profiles import (
    ProfileSettings,
    ShapeRange,
    derive_profiles,
    profiles_from_json,
    profiles_to_json,
    select_profile,
)
from controlrt.errors import InputError
from controlrt.manifest import Build


@pytest.fixture(scope="module")
def manifest(tiny_build):
    return Build.open(tiny_build, verify=False).manifest


def test_dynamic_profile_spans_batches_and_sizes(manifest):
    spec = manifest.spec("unet")
    m = spec.size_multiple
    h, w = spec.default_size
    settings = ProfileSettings(min_batch=1, opt_batch=2, max_batch=3)
    (profile,) = derive_profiles(spec, settings)
    assert list(profile) == spec.input_names
    sample = profile["sample"]
    f = manifest.info.vae_scale_factor
    # batch: one image without CFG up to max_batch images with CFG (two branches)
    assert sample.min[0] == 1 and sample.opt[0] == 4 and sample.max[0] == 6
    assert sample.min[2:] == (max(m, h // 2 // m * m) // f, max(m, w // 2 // m * m) // f)
    assert sample.opt[2:] == (h // f, w // f)
    assert sample.max[2:] == (2 * h // f, 2 * w // f)
    # every residual input follows the same sizes through its own divisor
    for t in spec.inputs[3:]:
        r = profile[t.name]
        assert r.opt == t.concrete_shape(spec.sizes(4, h, w))
        assert r.max == t.concrete_shape(spec.sizes(6, 2 * h, 2 * w))


def test_static_profiles_one_per_branch_count(manifest):
    settings = ProfileSettings(opt_size=(64, 96), opt_batch=2, static=True)
    cn = derive_profiles(manifest.controlnet_specs[0], settings)
    vae = derive_profiles(manifest.spec("vae_decoder"), settings)
    assert len(cn) == 2 and len(vae) == 1  # ControlNets: conditional-only (B) and both branches (2B)
    assert [p["sample"].min[0] for p in cn] == [2, 4]
    assert all(r.static for p in cn + vae for r in p.values())
    assert vae[0]["latent"].min[2:] == (64 // manifest.info.vae_scale_factor, 96 // manifest.info.vae_scale_factor)


def test_select_profile_and_its_error(manifest):
    spec = manifest.controlnet_specs[0]
    profiles = derive_profiles(spec, ProfileSettings(opt_batch=1, static=True))
    shapes = spec.input_shapes(spec.sizes(2))
    assert select_profile(profiles, shapes) == 1
    assert select_profile(profiles, spec.input_shapes(spec.sizes(1))) == 0
    with pytest.raises(InputError, match="outside the engine's profiles"):
        select_profile(profiles, spec.input_shapes(spec.sizes(3)))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (ProfileSettings(opt_size=(62, 64)), "multiple of"),
        (ProfileSettings(min_size=(128, 128), opt_size=(64, 64)), "min <= opt <= max"),
        (ProfileSettings(min_batch=2, opt_batch=1, max_batch=1), "1 <= min <= opt <= max"),
    ],
)
def test_bad_settings_are_refused(manifest, settings, message):
    with pytest.raises(InputError, match=message):
        derive_profiles(manifest.spec("unet"), settings)


def test_profiles_round_trip_through_json(manifest):
    profiles = derive_profiles(manifest.spec("unet"), ProfileSettings(max_batch=2))
    assert profiles_from_json(profiles_to_json(profiles)) == profiles
    assert ShapeRange((1, 2), (1, 3), (2, 4)).contains((2, 4))
    assert not ShapeRange((1, 2), (1, 3), (2, 4)).contains((3, 4))
