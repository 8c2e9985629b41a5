"""torchdiffeq's ``ode_demo`` (the cubic spiral) ported to this library, timed side by side.

    python -m benchmarks.port_ode_demo

One training iteration (a batch of 20 windows of 10 output times, RMSprop) of the same MLP
dynamics with torchdiffeq's ``odeint`` and ``odeint_adjoint`` (rk4, its 3/8 rule, on the output
grid) and with this library's ``odeint`` (``solver="rk38"``, the same tableau, one step per
output interval: ``step=None``), backprop and adjoint. Medians of 50 iterations after 5 of
warm-up, one thread, one process; the ported call is printed beside torchdiffeq's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from torchode_adjoint import odeint
from torchode_adjoint.measure import add_threads_argument, use_threads


class ODEFunc(nn.Module):
    """ode_demo's dynamics: an MLP of the cubed state."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y**3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=50, help="timed iterations per variant")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.iterations < 1:
        print("error: --iterations must be at least 1", file=sys.stderr)
        return 2
    try:
        import torchdiffeq
    except ImportError:
        print("error: torchdiffeq is not installed (pip install '.[bench]')", file=sys.stderr)
        return 2
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    t = torch.linspace(0.0, 25.0, 1000)
    with torch.no_grad():
        true_y = torchdiffeq.odeint(
            lambda t, y: (y**3) @ a, torch.tensor([[2.0, 0.0]]), t, method="dopri5"
        )

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = torch.randint(0, 990, (20,))
        return true_y[s], t[:10], torch.stack([true_y[s + i] for i in range(10)], dim=0)

    Solve = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    variants: dict[str, tuple[str, Solve]] = {
        "torchdiffeq backprop": (
            'torchdiffeq.odeint(func, y0, t, method="rk4")',
            lambda f, y0, bt: torchdiffeq.odeint(f, y0, bt, method="rk4"),
        ),
        "ours backprop": (
            'odeint(func, y0, t, solver="rk38", step=None, adjoint=False)',
            lambda f, y0, bt: odeint(f, y0, bt, solver="rk38", step=None, adjoint=False),
        ),
        "torchdiffeq adjoint": (
            'torchdiffeq.odeint_adjoint(func, y0, t, method="rk4")',
            lambda f, y0, bt: torchdiffeq.odeint_adjoint(f, y0, bt, method="rk4"),
        ),
        "ours adjoint": (
            'odeint(func, y0, t, solver="rk38", step=None, adjoint=True)',
            lambda f, y0, bt: odeint(f, y0, bt, solver="rk38", step=None, adjoint=True),
        ),
    }
    medians = {}
    for name, (call, solve) in variants.items():
        torch.manual_seed(1)
        func = ODEFunc()
        opt = torch.optim.RMSprop(func.parameters(), lr=1e-3)
        times = []
        for i in range(5 + args.iterations):
            y0, bt, by = batch()
            start = time.perf_counter()
            loss = (solve(func, y0, bt) - by).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 5:
                times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
        print(f"{name:22s} {1e3 * medians[name]:7.2f} ms per iteration   {call}")
    for kind in ("backprop", "adjoint"):
        ratio = medians[f"ours {kind}"] / medians[f"torchdiffeq {kind}"]
        print(f"{kind}: ours / torchdiffeq = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
