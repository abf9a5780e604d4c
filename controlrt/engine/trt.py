"""Importing TensorRT, with one clear error where it (or a GPU) is missing."""

from __future__ import annotations

from types import ModuleType

from controlrt.errors import BackendError

INSTALL_HINT = (
    "TensorRT engines need an NVIDIA GPU and TensorRT 10 or 11: pip install tensorrt (with a CUDA build "
    "of torch), or use --backend onnxruntime"
)


def import_tensorrt() -> ModuleType:
    """The tensorrt module; BackendError saying what to install when it cannot load."""
    try:
        import tensorrt
    except ImportError as exc:  # the module, or its libnvinfer, is missing
        raise BackendError(f"TensorRT is not available here ({_first_line(exc)}). {INSTALL_HINT}") from None
    except OSError as exc:  # bindings present, shared libraries not
        raise BackendError(f"TensorRT cannot load its libraries ({_first_line(exc)}). {INSTALL_HINT}") from None
    return tensorrt


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise BackendError(f"no CUDA GPU is visible to torch (torch {torch.__version__}). {INSTALL_HINT}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
