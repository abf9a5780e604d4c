"""Residual weights of every control mode, and the start/end windows."""

from __future__ import annotations

import pytest
import torch
from conftest import write_config_folders

from controlrt.control import ControlMode, block_weights, control_active, residual_divisors
from controlrt.errors import InputError
from controlrt.families import family_of
from controlrt.models import BaseModel


@pytest.fixture
def sd15_divisors(tmp_path):
    base, _ = write_config_folders(tmp_path)
    return residual_divisors(family_of(BaseModel.open(base).info()).unet_spec())


def test_sd15_residual_sizes_at_512(sd15_divisors):
    assert [512 // d for d in sd15_divisors] == [64] * 3 + [32] * 3 + [16] * 3 + [8] * 4


def test_uniform(sd15_divisors):
    assert block_weights(ControlMode.UNIFORM, sd15_divisors).tolist() == [1.0] * 13


def test_cfg_rw_is_64_over_h(sd15_divisors):
    """The paper: w_i = 64 / h_i with h_i the block's latent size at 512 px."""
    heights = [512 // d for d in sd15_divisors]
    expected = [64 / h for h in heights]
    assert block_weights(ControlMode.CFG_RW, sd15_divisors).tolist() == expected
    assert expected == [1.0] * 3 + [2.0] * 3 + [4.0] * 3 + [8.0] * 4


def test_cfg_rw_normalized(sd15_divisors):
    weights = block_weights(ControlMode.CFG_RW_NORMALIZED, sd15_divisors).tolist()
    assert weights == [0.125] * 3 + [0.25] * 3 + [0.5] * 3 + [1.0] * 4


def test_guess_is_diffusers_logspace_and_the_soft_injection_curve(sd15_divisors):
    weights = block_weights(ControlMode.GUESS, sd15_divisors)
    assert torch.equal(weights, torch.logspace(-1, 0, 13))
    assert weights[-1] == 1.0 and weights[0] == pytest.approx(0.1)
    soft = torch.tensor([0.825 ** (12 - i) for i in range(13)])
    assert torch.allclose(weights, soft, rtol=0.02)


def test_guess_weights_equal_diffusers_controlnet_guess_mode(tiny_models):
    """diffusers' ControlNetModel(guess_mode=True, conditioning_scale=s) scales exactly like ours."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(tiny_models.controlnets[0]).eval()
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g))
    cond = torch.rand(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        down, mid = net(*args, controlnet_cond=cond, conditioning_scale=0.7, guess_mode=True, return_dict=False)
        raw_down, raw_mid = net(*args, controlnet_cond=cond, return_dict=False)
    weights = block_weights(ControlMode.GUESS, range(len(down) + 1)) * 0.7
    for i, (scaled, raw) in enumerate(zip([*down, mid], [*raw_down, raw_mid], strict=True)):
        assert raw.abs().max() > 0
        torch.testing.assert_close(raw * weights[i], scaled, rtol=0, atol=0)


def diffusers_keep(i: int, n: int, start: float, end: float) -> float:
    """diffusers' controlnet_keep formula, written out independently."""
    return 1.0 - float(i / n < start or (i + 1) / n > end)


@pytest.mark.parametrize("n", [1, 4, 7, 20])
@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.25, 0.75), (0.5, 1.0), (0.0, 0.3), (0.1, 0.2)])
def test_window_matches_diffusers(n, start, end):
    for i in range(n):
        assert control_active(i, n, start, end) == bool(diffusers_keep(i, n, start, end))


def test_conditional_only_modes():
    assert not ControlMode.UNIFORM.conditional_only
    assert all(m.conditional_only for m in ControlMode if m is not ControlMode.UNIFORM)
    with pytest.raises(InputError, match="unknown control mode 'fancy'"):
        ControlMode.parse("fancy")
