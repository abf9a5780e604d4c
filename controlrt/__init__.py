"""controlrt: Stable Diffusion + ControlNet from diffusers to ONNX and fast engines, with parity.

The heavy dependencies load lazily: ``import controlrt`` is cheap, ``controlrt.Pipeline`` pulls
in torch and the runtime on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from controlrt.errors import (
    BackendError,
    BuildError,
    ControlrtError,
    ExportError,
    InputError,
    ModelError,
    ParityError,
    ValidationError,
)
from controlrt.version import __version__

if TYPE_CHECKING:
    from controlrt.runtime.pipeline import GenerationResult, Pipeline
    from controlrt.runtime.request import GenerationRequest

_LAZY = {
    "Pipeline": "controlrt.runtime.pipeline",
    "GenerationResult": "controlrt.runtime.pipeline",
    "GenerationRequest": "controlrt.runtime.request",
    "export_build": "controlrt.export.build",
    "run_parity": "controlrt.parity",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'controlrt' has no attribute {name!r}")


__all__ = [
    "BackendError",
    "BuildError",
    "ControlrtError",
    "ExportError",
    "GenerationRequest",
    "GenerationResult",
    "InputError",
    "ModelError",
    "ParityError",
    "Pipeline",
    "ValidationError",
    "__version__",
    "export_build",
    "run_parity",
]
