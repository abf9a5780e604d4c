"""Which layers' int8 error reaches a graph's output most: the ones ``calibrate --float-layers`` keeps float.

A layer's local int8 error is how its output moves when its input is quantized per tensor (range:
the mean over calls of the 99.99th percentile of |x|) and its weight per output channel, both
symmetric int8, as every controlrt quantizer does. What matters is how much of that reaches the
graph's output. To first order the output error of the all-int8 graph is e = sum_k J_k d_k (J_k:
the Jacobian of the output with respect to layer k's output, d_k: layer k's local error), so

    share_k = <e, J_k d_k> / |y|^2 = <J_k^T e, d_k> / |y|^2

splits the output's relative squared error |e|^2 / |y|^2 among the layers. One int8 forward pass
gives e, one float forward and one backward pass give J_k^T e for every layer at once: the cost of
about four forward passes per call instead of one pass per layer for leave-one-out. On the SD1.5
UNet the two agree on the top layers, and keeping the top 5 / 10 / 20 float cuts the output error
(relative L2) from 0.011 to 0.0061 / 0.0045 / 0.0026.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from controlrt.calibration.quantize import excluded

PERCENTILE = 99.99
MAX_CALLS = 4  # calls measured, spread over the captures (steps and samples)
_SAMPLE = 1 << 20  # elements per call the percentile is estimated from

Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class LayerShare:
    """One layer's part of the int8 graph's output error.

    Attributes:
        layer: Module path in the graph's torch module (also the scope of its ONNX node names).
        share: First-order part of the output's relative squared error |e|^2/|y|^2 due to this layer.
        gflop: Its multiply-adds x 2 per call, in GFLOP.
    """

    layer: str
    share: float
    gflop: float


def quantizable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The Conv2d and Linear layers the quantizers quantize (EXCLUDE_PATTERNS left out)."""
    return {
        name: layer
        for name, layer in module.named_modules()
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and not excluded(name)
    }


def _flat(output) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        return torch.cat([t.flatten() for t in output])
    return output.flatten()


def _fake_weight(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True).clamp_min(1e-12) / 127
    return torch.round(weight / scale) * scale


def _fake_input(x: torch.Tensor, amax: float) -> torch.Tensor:
    scale = max(amax, 1e-12) / 127
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def abs_percentile(x: torch.Tensor) -> float:
    """The PERCENTILE-th percentile of |x|, estimated from at most 2^20 evenly strided elements."""
    flat = x.detach().abs().flatten().float()
    if flat.numel() > _SAMPLE:
        flat = flat[:: flat.numel() // _SAMPLE + 1]
    return float(torch.quantile(flat, PERCENTILE / 100))


def _spread(items: Sequence, count: int) -> list:
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


class Int8Simulation:
    """A graph's torch module with its quantizable layers computed in simulated int8.

    Activation ranges come from the measured calls (see the module's docstring). Use as a context
    manager: the module's layers are restored on exit.

    Args:
        module: The graph's torch module (float32, eval mode).
        input_names: The graph's inputs, in the order ``module`` takes them.
        calls: Captured feeds; ``max_calls`` of them, spread evenly, are measured.
    """

    def __init__(
        self, module: nn.Module, input_names: Sequence[str], calls: Sequence[Feeds], max_calls: int = MAX_CALLS
    ) -> None:
        self.module = module
        self.layers = quantizable_layers(module)
        self.feeds = [[torch.from_numpy(np.asarray(f[n])) for n in input_names] for f in _spread(calls, max_calls)]
        self.weights = {k: _fake_weight(layer.weight.detach()) for k, layer in self.layers.items()}
        self.ranges: dict[str, float] = {}
        self.gflop: dict[str, float] = {}
        self._mode = "float"
        self._int8: set[str] = set()
        self._outputs: dict[str, torch.Tensor] = {}
        self._errors: dict[str, torch.Tensor] = {}
        self._percentiles: dict[str, list[float]] = {k: [] for k in self.layers}
        self._originals = {k: layer.forward for k, layer in self.layers.items()}

    def __enter__(self) -> Int8Simulation:
        for p in self.module.parameters():
            p.requires_grad_(False)
        for name, layer in self.layers.items():
            layer.forward = self._wrapped(name, layer)
        self._run("ranges")
        self.ranges = {k: float(np.mean(v)) for k, v in self._percentiles.items() if v}
        self.layers = {k: v for k, v in self.layers.items() if k in self.ranges}  # the ones the graph runs
        return self

    def __exit__(self, *exc) -> None:
        for name, forward in self._originals.items():
            self.module.get_submodule(name).forward = forward

    def _int8_forward(self, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        xq = _fake_input(x, self.ranges.get(name, 0.0))
        if isinstance(layer, nn.Conv2d):
            return F.conv2d(
                xq, self.weights[name], layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
            )
        return F.linear(xq, self.weights[name], layer.bias)

    def _wrapped(self, name: str, layer: nn.Module) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if self._mode == "int8" and name in self._int8:
                return self._int8_forward(name, layer, x)
            y = self._originals[name](x)
            if self._mode == "ranges":
                self._percentiles[name].append(abs_percentile(x))
                self.gflop[name] = 2 * y.numel() * layer.weight[0].numel() / 1e9
            elif self._mode == "shares":
                with torch.no_grad():
                    self._errors[name] = self._int8_forward(name, layer, x.detach()) - y.detach()
                self._outputs[name] = y
            return y

        return forward

    def _run(self, mode: str, feeds=None, int8: Iterable[str] = ()) -> list[torch.Tensor]:
        self._mode, self._int8 = mode, set(int8)
        try:
            with torch.no_grad():
                return [_flat(self.module(*f)) for f in (feeds or self.feeds)]
        finally:
            self._mode, self._int8 = "float", set()

    def error(self, float_layers: Iterable[str] = ()) -> float:
        """Mean relative L2 error of the output with every quantizable layer but ``float_layers`` in int8."""
        int8 = set(self.layers) - set(float_layers)
        references = self._run("float")
        outputs = self._run("int8", int8=int8)
        return float(np.mean([float((o - r).norm() / r.norm().clamp_min(1e-12)) for o, r in zip(outputs, references)]))

    def shares(self) -> list[LayerShare]:
        """Every quantizable layer's share of the int8 output error, largest first."""
        shares = dict.fromkeys(self.layers, 0.0)
        for f in self.feeds:
            reference = self._run("float", [f])[0]
            error = self._run("int8", [f], self.layers)[0] - reference
            self._mode = "shares"
            try:
                with torch.enable_grad():
                    inputs = [x.clone().requires_grad_(x.is_floating_point()) for x in f]
                    output = _flat(self.module(*inputs))
                    names = list(self._outputs)
                    grads = torch.autograd.grad(output, [self._outputs[k] for k in names], grad_outputs=error)
            finally:
                self._mode = "float"
            norm = float(reference.double().square().sum()) or 1.0
            for name, grad in zip(names, grads):
                shares[name] += float((grad.double() * self._errors[name].double()).sum()) / norm / len(self.feeds)
            self._outputs.clear()
            self._errors.clear()
        result = [LayerShare(k, v, self.gflop.get(k, 0.0)) for k, v in shares.items()]
        return sorted(result, key=lambda s: -s.share)


def error_shares(
    module: nn.Module, input_names: Sequence[str], calls: Sequence[Feeds], max_calls: int = MAX_CALLS
) -> list[LayerShare]:
    """Every quantizable layer's share of the int8 output error, largest first (see Int8Simulation)."""
    with Int8Simulation(module, input_names, calls, max_calls) as simulation:
        return simulation.shares()


def choose_float_layers(shares: Sequence[LayerShare], count: int | None, budget: float | None) -> list[LayerShare]:
    """The layers to keep float, from ``shares`` (largest first).

    Args:
        count: At most this many layers.
        budget: At most this percentage of the quantizable layers' GFLOP in float; then layers are
            taken by share per GFLOP (most error removed per unit of float compute), skipping those
            that do not fit. Without it, by share.
    """
    positive = [s for s in shares if s.share > 0]
    limit = len(positive) if count is None else count
    if budget is None:
        return positive[:limit]
    allowed = budget / 100 * sum(s.gflop for s in shares)
    chosen, used = [], 0.0
    for s in sorted(positive, key=lambda s: -s.share / max(s.gflop, 1e-9)):
        if len(chosen) < limit and used + s.gflop <= allowed:
            chosen.append(s)
            used += s.gflop
    return chosen
