"""Schedulers come from diffusers; this maps short names to its classes."""

from __future__ import annotations

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
