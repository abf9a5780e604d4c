"""The reference backend: the diffusers modules themselves, run by PyTorch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from controlrt.graphs import cast_inputs
from controlrt.session import Session
from controlrt.specs import GraphSpec


class TorchSession(Session):
    """Runs a graph module (see controlrt.graphs) on a torch device.

    With ``dtype`` bfloat16 the module computes in bf16 (as diffusers does with
    ``torch_dtype=torch.bfloat16``): floating inputs but the timesteps are cast to it, outputs back
    to float32.
    """

    backend = "torch"

    def __init__(
        self, module: nn.Module, spec: GraphSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(spec)
        self._device = torch.device(device)
        self._dtype = dtype
        self.module = module.to(self._device, dtype).eval()

    @property
    def device(self) -> torch.device:
        return self._device

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [feeds[name].to(self._device) for name in self.spec.input_names]
        args = cast_inputs(self.spec.input_names, args, self._dtype)
        with torch.inference_mode():
            result = self.module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        return {name: r.float() for name, r in zip(self.spec.output_names, result, strict=True)}

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
