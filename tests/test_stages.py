"""A recording dynamics is called at t0 + c_i*h with the state the tableau implies."""

from __future__ import annotations

import pytest
import torch
from problems import TABLEAUS

from torchode_adjoint import get_solver, odeint


class Recorder:
    """f(t, y) = g(t, y) that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, torch.Tensor]] = []

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((float(t), y.detach().clone()))
        return torch.sin(y) + t


@pytest.mark.parametrize("solver", TABLEAUS)
@pytest.mark.parametrize("adjoint", [False, True])
def test_stage_times_and_states_follow_the_tableau(solver: str, adjoint: bool) -> None:
    tab = get_solver(solver)
    rec = Recorder()
    y0 = torch.tensor([0.3, -1.2], dtype=torch.float64)
    t0, t1, n = 0.2, 0.8, 3
    odeint(
        rec,
        y0,
        torch.tensor([t0, t1], dtype=torch.float64),
        solver=tab,
        step=(t1 - t0) / n,
        adjoint=adjoint,
        params=(),
    )
    assert len(rec.calls) == n * tab.stages
    # Recompute the expected sequence independently, straight from the textbook formulas.
    h = (t1 - t0) / n
    y = y0.clone()
    expected = []
    for k in range(n):
        ks = []
        for i in range(tab.stages):
            yi = y + h * sum((tab.a[i][j] * ks[j] for j in range(i)), torch.zeros_like(y))
            ti = t0 + k * h + tab.c[i] * h
            expected.append((ti, yi))
            ks.append(torch.sin(yi) + ti)
        y = y + h * sum(b * kk for b, kk in zip(tab.b, ks))
    for (t_got, y_got), (t_exp, y_exp) in zip(rec.calls, expected):
        assert t_got == pytest.approx(t_exp, abs=1e-14)
        torch.testing.assert_close(y_got, y_exp, rtol=1e-13, atol=1e-13)


def test_dynamics_receives_time_as_0dim_tensor_in_state_dtype_and_device() -> None:
    seen = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append((t.dim(), t.dtype, t.device))
        return -y

    y0 = torch.ones(2, dtype=torch.float32)
    odeint(f, y0, torch.tensor([0.0, 1.0], dtype=torch.float64), step=0.5, params=())
    assert seen and all(s == (0, torch.float32, y0.device) for s in seen)
