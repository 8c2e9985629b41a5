"""Analytic ODEs with exact solutions, and small dynamics modules used across tests."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

DTYPE = torch.float64


@dataclass(frozen=True)
class Problem:
    """``dy/dt = f(t, y)`` with ``y(t) = exact(t, y0, t0)``."""

    name: str
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    exact: Callable[[float, torch.Tensor, float], torch.Tensor]
    y0: torch.Tensor


_A = torch.tensor([[-0.5, 1.0, 0.0], [-1.0, -0.3, 0.2], [0.1, 0.0, -0.8]], dtype=DTYPE)
_W = torch.tensor([[0.0, -2.0], [2.0, 0.0]], dtype=DTYPE)

PROBLEMS = [
    Problem(
        "decay",
        lambda t, y: -y,
        lambda t, y0, t0: y0 * torch.exp(torch.tensor(-(t - t0), dtype=DTYPE)),
        torch.tensor([1.0, -2.0], dtype=DTYPE),
    ),
    Problem(
        "linear",
        lambda t, y: y @ _A.T,
        lambda t, y0, t0: torch.linalg.matrix_exp(_A * (t - t0)) @ y0,
        torch.tensor([1.0, 0.5, -1.0], dtype=DTYPE),
    ),
    Problem(
        "rotation",
        lambda t, y: y @ _W.T,
        lambda t, y0, t0: torch.linalg.matrix_exp(_W * (t - t0)) @ y0,
        torch.tensor([1.0, 0.0], dtype=DTYPE),
    ),
    Problem(
        # Non-autonomous: y' = cos(t) y, y = y0 exp(sin t - sin t0); exercises the stage times.
        "time_dependent",
        lambda t, y: torch.cos(t) * y,
        lambda t, y0, t0: y0 * math.exp(math.sin(t) - math.sin(t0)),
        torch.tensor([1.0, 2.0], dtype=DTYPE),
    ),
]


class MLPDynamics(nn.Module):
    """A small time-dependent MLP: f(t, y) = W2 tanh(W1 y + t u + b1) + b2."""

    def __init__(self, dim: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, hidden)
        self.u = nn.Parameter(torch.randn(hidden) * 0.5)
        self.l2 = nn.Linear(hidden, dim)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(y) + t * self.u))


class ConvBNDynamics(nn.Module):
    """Conv + BatchNorm + ReLU with a time channel, like the CIFAR-10 ODENet dynamics."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        from torchode_adjoint import ConcatConv2d

        self.conv = ConcatConv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bn(self.conv(t, y)))


def reversible_heun_reference(f, y0, t, n_per_interval):
    """Plain autograd through reversible Heun, differentiable in t: an independent reference."""
    y, z = y0, y0
    f_k = f(t[0], y0)
    out = [y0]
    for i, n in enumerate(n_per_interval):
        h = (t[i + 1] - t[i]) / n
        for m in range(n):
            t_next = t[i] + (m + 1) * h
            z_new = 2 * y - z + h * f_k
            f_new = f(t_next, z_new)
            y = y + h / 2 * (f_k + f_new)
            z, f_k = z_new, f_new
        out.append(y)
    return torch.stack(out)


def rk_psi(f, tableau, t, x, h):
    """One step of an explicit RK method, written out from the tableau: an independent reference."""
    ks = []
    for i in range(len(tableau.b)):
        xi = x
        for j in range(i):
            if tableau.a[i][j] != 0.0:
                xi = xi + h * tableau.a[i][j] * ks[j]
        ks.append(f(t + tableau.c[i] * h, xi))
    out = x
    for b_i, k_i in zip(tableau.b, ks):
        out = out + h * b_i * k_i
    return out


def reversible_rk_reference(f, tableau, y0, t, n_per_interval, coupling):
    """McCallum & Foster's reversible scheme written as in their paper, with plain autograd
    through every step (differentiable in y0, the parameters and t): an independent reference."""
    steps = [[(m / n, (m + 1) / n) for m in range(n)] for n in n_per_interval]
    return reversible_rk_on_steps(f, tableau, y0, t, steps, coupling)


def reversible_rk_on_steps(f, tableau, y0, t, steps, coupling):
    """The same scheme on given steps: per output interval ``i``, the ``(m0, m1)`` of each step
    as fractions of ``[t[i], t[i+1]]`` (error-controlled steps, as the forward recorded them).
    ``coupling`` is one number, or one per step (as a chosen coupling recorded them)."""
    n_total = sum(len(interval) for interval in steps)
    lams = list(coupling) if isinstance(coupling, (list, tuple)) else [coupling] * n_total
    assert len(lams) == n_total, (len(lams), n_total)
    y, z = y0, y0
    out = [y0]
    g = 0
    for i, interval in enumerate(steps):
        span = t[i + 1] - t[i]
        for m0, m1 in interval:
            lam, g = lams[g], g + 1
            t_n, t_next, h = t[i] + m0 * span, t[i] + m1 * span, (m1 - m0) * span
            y_new = lam * y + (1 - lam) * z + rk_psi(f, tableau, t_n, z, h) - z
            z = z + y_new - rk_psi(f, tableau, t_next, y_new, -h)
            y = y_new
        out.append(y)
    return torch.stack(out)


def _tableau_names() -> list[str]:
    from torchode_adjoint import ButcherTableau, available_solvers, get_solver

    return [n for n in available_solvers() if isinstance(get_solver(n), ButcherTableau)]


TABLEAUS = _tableau_names()
"""The registered solvers that are Butcher tableaus (every mode integrates with those)."""

HEUN_MADE_REVERSIBLE = pytest.mark.filterwarnings(
    "ignore:`solver='heun'` with `adjoint='reversible'`:FutureWarning"
)
"""For a test over every tableau and mode: it means Heun's method made reversible by
``solver='heun', adjoint='reversible'``, and the FutureWarning about the name's old meaning is
for users (tests/test_warning_locations.py asserts it)."""


def count_steps(t: list[float], step: float | None, dtype: torch.dtype, **kw) -> int:
    """The number of steps odeint takes over ``t`` (Euler: one evaluation per step). An interval
    barely over a whole number of steps warns (tests/test_grid.py asserts that); not here."""
    import warnings

    from torchode_adjoint import NFECounter, StepRoundingWarning, odeint

    nfe = NFECounter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepRoundingWarning)
        odeint(
            lambda t, y: -y,
            torch.ones(1, dtype=dtype),
            torch.tensor(t, dtype=dtype),
            step=step,
            adjoint=False,
            nfe=nfe,
            **kw,
        )
    return nfe.forward


_RSS_SCRIPT = """
import sys, torch
from torchode_adjoint import odeint
torch.set_num_threads(1)
n, solver, adjoint, learnable = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
y0 = torch.ones(2, requires_grad=True)
k = torch.tensor(0.5, requires_grad=True)
t = torch.tensor([0.0, 1.0], requires_grad=learnable)
sol = odeint(lambda t, y: -k * y, y0, t, solver=solver, step=1.0 / n, adjoint=adjoint,
             params=[k])
sol[-1].sum().backward()
assert y0.grad is not None and k.grad is not None and (t.grad is not None or not learnable)
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def peak_rss_kib(n: int, solver: str, adjoint: str, learnable_times: bool = False) -> int:
    """Peak resident memory (KiB) of a fresh process that solves ``y' = -k y`` with ``n`` steps
    and back-propagates. It reads VmHWM, the process's own peak since exec: ``ru_maxrss`` would
    carry the parent's (pytest's) peak over the fork, and such a test could not fail."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(n), solver, adjoint, str(int(learnable_times))],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])
