"""A FAKE of the triton_python_backend_utils calls controlrt's Triton model makes. Not Triton.

BLS requests to a model of the repository are answered by onnxruntime running that graph of the
build, so the Python model's own logic (its sessions, the loop it reuses, request parsing, error
responses) can run on the CPU. What Triton itself does is not tested here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

SESSIONS: dict = {}  # model name -> controlrt Session answering BLS calls
CALLS: list[str] = []


class Tensor:
    def __init__(self, name: str, value) -> None:
        self.name = name
        self.value = value

    @classmethod
    def from_dlpack(cls, name: str, capsule) -> Tensor:
        return cls(name, from_dlpack(capsule))

    def to_dlpack(self):
        return to_dlpack(self.value)

    def as_numpy(self):
        return np.asarray(self.value)


class TritonError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors, error: TritonError | None = None) -> None:
        self.output_tensors = {t.name: t for t in output_tensors}
        self.error_value = error

    def has_error(self) -> bool:
        return self.error_value is not None

    def error(self) -> TritonError | None:
        return self.error_value


class InferenceRequest:
    def __init__(self, model_name: str, requested_output_names, inputs) -> None:
        self.model_name = model_name
        self.outputs = list(requested_output_names)
        self.inputs = {t.name: t.value for t in inputs}

    def exec(self) -> InferenceResponse:
        CALLS.append(self.model_name)
        if self.model_name not in SESSIONS:
            return InferenceResponse([], TritonError(f"no model {self.model_name}"))
        out = SESSIONS[self.model_name].infer({k: torch.as_tensor(v) for k, v in self.inputs.items()})
        return InferenceResponse([Tensor(n, out[n].contiguous()) for n in self.outputs])


class Request:
    """What Triton hands execute(): named input tensors."""

    def __init__(self, **inputs) -> None:
        self.inputs = {name: Tensor(name, value) for name, value in inputs.items()}


def get_input_tensor_by_name(request: Request, name: str) -> Tensor:
    return request.inputs[name]


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor:
    return response.output_tensors[name]
