"""Schedulers come from diffusers; this maps short names to its classes."""

from __future__ import annotations

import inspect
import json
from functools import lru_cache
from typing import Any

from controlrt.errors import InputError

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}


def make_scheduler(config: dict[str, Any], name: str | None = None):
    """A fresh scheduler from the model's config; ``name`` (short or class name) picks another class."""
    import diffusers

    if name is not None and not isinstance(name, str):
        raise InputError(f"scheduler must be a name, not {name!r}")
    class_name = config.get("_class_name") if name is None else SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not hasattr(cls, "from_config") or not class_name.endswith("Scheduler"):
        raise InputError(f"unknown scheduler {name or class_name!r}; choose one of {', '.join(SCHEDULERS)}")
    return cls.from_config(config)


def init_noise_sigma(scheduler) -> float:
    """What the initial noise is scaled by: the scheduler's init_noise_sigma (flow-matching
    schedulers have none: 1)."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def _takes(scheduler, steps: int, train_steps: int) -> bool:
    """Whether ``scheduler`` can run ``steps`` inference steps: set_timesteps accepts the count and
    every timestep it makes lies in the trained range [0, train_steps) (a flow-matching
    scheduler's are sigma x train_steps, so up to train_steps itself)."""
    # the count a scheduler takes does not depend on a dynamic shift (Flux's mu): any will do
    takes_mu = "mu" in inspect.signature(scheduler.set_timesteps).parameters
    dynamic = scheduler.config.get("use_dynamic_shifting") and takes_mu
    shift = {"mu": 0.0} if dynamic else {}
    try:
        scheduler.set_timesteps(steps, **shift)
    except (ValueError, IndexError, ZeroDivisionError):
        return False
    timesteps = scheduler.timesteps
    top = float(timesteps.max()) if len(timesteps) else 0.0
    in_range = top <= train_steps if not hasattr(scheduler, "alphas_cumprod") else top < train_steps
    return len(timesteps) > 0 and float(timesteps.min()) >= 0 and in_range


@lru_cache(maxsize=64)
def _max_steps(config_json: str, name: str | None) -> int:
    config = json.loads(config_json)
    scheduler = make_scheduler(config, name)
    train_steps = int(scheduler.config.get("num_train_timesteps", 1000))
    low, high = 0, train_steps  # the largest count it takes, by bisection over [1, train_steps]
    while low < high:
        middle = (low + high + 1) // 2
        if _takes(scheduler, middle, train_steps):
            low = middle
        else:
            high = middle - 1
    return low


def max_steps(config: dict[str, Any], name: str | None = None) -> int:
    """The most inference steps a scheduler (the model's own, or ``name``) can run, found by asking
    it: the largest count up to its training timesteps for which its timesteps stay in the trained
    range (DDIM and PNDM with ``steps_offset`` 1 stop at 999 of 1000). 0 if it takes none."""
    return _max_steps(json.dumps(config, sort_keys=True), name)


@lru_cache(maxsize=256)
def _runs(config_json: str, name: str | None, steps: int) -> str | None:
    """None if the scheduler runs ``steps`` steps, else its class name."""
    scheduler = make_scheduler(json.loads(config_json), name)
    train_steps = int(scheduler.config.get("num_train_timesteps", 1000))
    return None if _takes(scheduler, steps, train_steps) else type(scheduler).__name__


def check_steps(config: dict[str, Any], name: str | None, steps: int) -> None:
    """InputError unless the scheduler can run ``steps`` steps (see :func:`max_steps`); asked once
    per scheduler and count."""
    refused = _runs(json.dumps(config, sort_keys=True), name, steps)
    if refused is not None:
        raise InputError(
            f"steps must be a whole number from 1 to {max_steps(config, name)} with the {refused}, got {steps}"
        )
