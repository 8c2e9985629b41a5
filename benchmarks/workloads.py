"""The benchmark workloads: an overhead-bound MLP, the CIFAR-10 ODENet dynamics, an analytic ODE."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from torchode_adjoint.models.cifar10 import ConvDynamics


class MLPDynamics(nn.Module):
    """Workload 1: ``f(t, y) = W2 tanh(W1 y + b1) + b2``, state dim ``dim``, hidden 64."""

    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, hidden)
        self.l2 = nn.Linear(hidden, dim)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(y)))


class Counting(nn.Module):
    """Wraps a dynamics module and counts its calls (for libraries that report no NFE)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(t, y)


@dataclass(frozen=True)
class Workload:
    """A dynamics module and an initial state."""

    name: str
    title: str
    func: nn.Module
    y0: torch.Tensor


def mlp_workload(batch: int = 512, dim: int = 16, dtype: torch.dtype = torch.float32) -> Workload:
    torch.manual_seed(0)
    return Workload(
        "mlp",
        f"MLP dynamics (dim {dim}, hidden 64, batch {batch})",
        MLPDynamics(dim).to(dtype),
        torch.randn(batch, dim, dtype=dtype),
    )


def conv_workload(batch: int = 128, channels: int = 64, size: int = 8) -> Workload:
    """Workload 2: the ODENet dynamics of the CIFAR-10 example (thesis preset, train mode)."""
    torch.manual_seed(0)
    return Workload(
        f"conv{size}",
        f"ODENet conv dynamics ({channels} ch, {size}x{size}, batch {batch})",
        ConvDynamics(channels, shared=True),
        torch.randn(batch, channels, size, size),
    )


class Oscillator(nn.Module):
    """Workload 3: a damped oscillator ``y'' = -w^2 y - 2 z w y'`` as a first-order system.

    With ``w = 10`` and ``z = 0.05`` it oscillates fast over ``[0, 2]``: coarse steps lose
    accuracy or blow up, which is what the error-vs-step curves show.
    """

    def __init__(self, w: float = 10.0, zeta: float = 0.05) -> None:
        super().__init__()
        self.register_buffer("A", torch.tensor([[0.0, 1.0], [-w * w, -2 * zeta * w]]))
        self.w, self.zeta = w, zeta

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.A.T

    def exact(self, t: float, y0: tuple[float, float]) -> tuple[float, float]:
        """The closed-form solution at time ``t`` from ``y0 = (x0, v0)``."""
        w, z = self.w, self.zeta
        wd = w * math.sqrt(1 - z * z)
        x0, v0 = y0
        c1, c2 = x0, (v0 + z * w * x0) / wd
        e = math.exp(-z * w * t)
        x = e * (c1 * math.cos(wd * t) + c2 * math.sin(wd * t))
        dx = -z * w * x + e * (-c1 * wd * math.sin(wd * t) + c2 * wd * math.cos(wd * t))
        return x, dx
