"""Each scheduler's own step limit, found by asking it, and that limit really runs."""

from __future__ import annotations

import pytest
import torch

from controlrt.errors import InputError
from controlrt.runtime.loop import step_kwargs
from controlrt.runtime.schedulers import SCHEDULERS, check_steps, make_scheduler, max_steps

# SD1.5's own scheduler config (PNDM, leading spacing, steps_offset 1), the one that broke at 1000
SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


@pytest.mark.parametrize("name", [None, *SCHEDULERS])
def test_the_largest_step_count_runs_and_one_more_is_refused(name):
    most = max_steps(SD15, name)
    assert 1 <= most <= 1000
    scheduler = make_scheduler(SD15, name)
    scheduler.set_timesteps(most)
    latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    extra = step_kwargs(scheduler, torch.Generator().manual_seed(1))
    for t in scheduler.timesteps:  # every step of the largest schedule, on a tiny latent
        scheduler.scale_model_input(latents, t)
        latents = scheduler.step(torch.zeros_like(latents), t, latents, **extra, return_dict=False)[0]
    assert torch.isfinite(latents).all()
    check_steps(SD15, name, most)
    if most < 1000:
        with pytest.raises(InputError, match=f"from 1 to {most} with the "):
            check_steps(SD15, name, most + 1)


def test_limits_as_measured():
    # DDIM and PNDM with steps_offset 1 would index timestep 1000 of 1000 at 1000 steps
    assert max_steps(SD15) == 999
    assert max_steps(SD15, "ddim") == 999
    assert max_steps(SD15, "lcm") == 50  # LCMScheduler's original_inference_steps
