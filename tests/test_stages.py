"""A recording dynamics is called at t0 + c_i*h with the state the tableau implies."""

from __future__ import annotations

import pytest
import torch
from problems import HEUN_MADE_REVERSIBLE, TABLEAUS

from torchode_adjoint import get_solver, odeint

pytestmark = HEUN_MADE_REVERSIBLE


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


def _expected_stage_times(
    t: list[float], n_steps: list[int], c: tuple[float, ...], reverse: bool
) -> list[float]:
    """Every stage time in visiting order, from the textbook formula ``t_i + (k + c_j) h_i``."""
    steps = [(i, k) for i, n in enumerate(n_steps) for k in range(n)]
    if reverse:
        steps.reverse()
    out = []
    for i, k in steps:
        h = (t[i + 1] - t[i]) / n_steps[i]
        for cj in c:
            out.append(t[i] + ((k + 1 - cj) if reverse else (k + cj)) * h)
    return out


@pytest.mark.parametrize("t_requires_grad", [False, True])
@pytest.mark.parametrize("adjoint", [False, True])
def test_stage_times_past_the_first_chunk_follow_the_grid(
    t_requires_grad: bool, adjoint: bool
) -> None:
    # Stage times are built a chunk of 2048 evaluations at a time; 1280 rk4 steps over two
    # intervals are 5120 evaluations: two full chunks and a partial one, in both directions.
    tab = get_solver("rk4")
    times = [0.0, 0.375, 1.25]
    n_steps = [384, 896]  # step 1/1024 divides both intervals exactly
    seen: list[float] = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(t.detach().item())
        return torch.sin(y) + t

    y0 = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    t = torch.tensor(times, dtype=torch.float64, requires_grad=t_requires_grad)
    sol = odeint(f, y0, t, solver=tab, step=1 / 1024, adjoint=adjoint, params=())
    forward = _expected_stage_times(times, n_steps, tab.c, reverse=False)
    assert len(seen) == len(forward) == 5120
    assert seen == pytest.approx(forward, abs=1e-14)
    if adjoint:
        seen.clear()
        sol[-1].sum().backward()
        backward = _expected_stage_times(times, n_steps, tab.c, reverse=True)
        assert len(seen) == len(backward)
        assert seen == pytest.approx(backward, abs=1e-14)


@pytest.mark.parametrize("adjoint", [False, True])
def test_stage_times_are_built_once_per_chunk(
    adjoint: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 5120 evaluations are three chunks of at most 2048 stage times each way; a chunk rebuilt
    # at every evaluation would give the same times at thousands of times the cost.
    from torchode_adjoint.controllers import fixed as _grid

    built: list[int] = []
    fractions = _grid._fractions

    def counting(*args: object) -> tuple[list[int], list[float]]:
        index, frac = fractions(*args)  # type: ignore[arg-type]
        built.append(len(index))
        return index, frac

    monkeypatch.setattr(_grid, "_fractions", counting)
    y0 = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.375, 1.25], dtype=torch.float64, requires_grad=True)
    sol = odeint(
        lambda t, y: torch.sin(y) + t,
        y0,
        t,
        solver="rk4",
        step=1 / 1024,
        adjoint=adjoint,
        params=(),
    )
    assert built == [2048, 2048, 1024]
    if adjoint:
        built.clear()
        sol[-1].sum().backward()
        assert built == [2048, 2048, 1024]
