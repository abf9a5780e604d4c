"""The session interface every backend implements: named tensors in, named tensors out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from controlrt.errors import BackendError
from controlrt.specs import GraphSpec


class Session(ABC):
    """Runs one graph. ``infer`` checks its inputs against the graph spec before running.

    Usable as a context manager; ``close`` releases what the backend holds.
    """

    backend: str = ""

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec

    @property
    def device(self) -> torch.device:
        """Where the tensors ``infer`` returns live (inputs are moved there as needed)."""
        return torch.device("cpu")

    def admits(self, sizes: Mapping[str, int]) -> bool:
        """Whether the session accepts inputs at ``sizes`` (batch, height, width); most take any."""
        return True

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the graph.

        Args:
            feeds: One tensor per spec input, of the spec's dtype and shape.

        Returns:
            One tensor per spec output, in spec order.

        Raises:
            InputError: A feed is missing, unexpected, or of the wrong dtype or shape.
            BackendError: The backend failed or returned tensors that disagree with the spec.
        """
        sizes = self.spec.bind(feeds)
        outputs = self._run(feeds)
        for t in self.spec.outputs:
            expected = t.concrete_shape(sizes)
            got = tuple(outputs[t.name].shape)
            if got != expected:
                raise BackendError(
                    f"{self.backend} {self.spec.name}: output {t.name!r} has shape {got}, the spec says {expected}"
                )
        return outputs

    @abstractmethod
    def _run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def close(self) -> None:  # noqa: B027 (optional for backends that hold nothing)
        """Release the backend's resources (the session is unusable afterwards)."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
