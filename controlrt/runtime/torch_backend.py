"""The reference backend: the diffusers modules themselves, run by PyTorch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from controlrt.runtime.session import Session
from controlrt.specs import GraphSpec


class TorchSession(Session):
    """Runs a graph module (see controlrt.graphs) on a torch device."""

    backend = "torch"

    def __init__(self, module: nn.Module, spec: GraphSpec, device: str | torch.device = "cpu") -> None:
        super().__init__(spec)
        self._device = torch.device(device)
        self.module = module.to(self._device).eval()

    @property
    def device(self) -> torch.device:
        return self._device

    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [feeds[name].to(self._device) for name in self.spec.input_names]
        with torch.inference_mode():
            result = self.module(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        return dict(zip(self.spec.output_names, result, strict=True))

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
