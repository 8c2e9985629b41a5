"""The exact low-memory modes: checkpointed and reversible gradients equal their references."""

from __future__ import annotations

import math

import pytest
import torch
from problems import PROBLEMS, MLPDynamics, Problem, reversible_heun_reference

from torchode_adjoint import Checkpoint, available_solvers, odeint
from torchode_adjoint._reversible import reversible_heun_forward, reversible_heun_reverse

D = torch.float64
T = torch.tensor([0.0, 0.4371, 1.0713], dtype=D)


def _grads(f, y0, t, w, **kw):
    y0 = y0.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    sol = odeint(f, y0, t, **kw)
    return torch.autograd.grad((w * sol).sum(), [y0, t, *f.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("solver", available_solvers())
@pytest.mark.parametrize("every", [1, 2, 3, 7])
def test_checkpoint_gradients_equal_backprop_to_round_off(solver: str, every: int, gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    w = torch.randn(len(T), 4, 3, dtype=D, generator=gen)
    g_ck = _grads(f, y0, T, w, solver=solver, step=0.1, adjoint=Checkpoint(every=every))
    g_bp = _grads(f, y0, T, w, solver=solver, step=0.1, adjoint=False)
    for a, b in zip(g_ck, g_bp):
        assert _rel(a, b) < 1e-10


def test_checkpoint_on_a_decreasing_grid_with_a_loss_on_one_time(gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    t = torch.tensor([1.3, 0.7, -0.2], dtype=D)
    w = torch.zeros(3, 4, 3, dtype=D)
    w[1] = 1.0
    g_ck = _grads(f, y0, t, w, solver="rk4", step=0.1, adjoint=Checkpoint(every=4))
    g_bp = _grads(f, y0, t, w, solver="rk4", step=0.1, adjoint=False)
    for a, b in zip(g_ck, g_bp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_reversible_gradients_equal_backprop_through_reversible_heun(gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    w = torch.randn(len(T), 4, 3, dtype=D, generator=gen)
    g = _grads(f, y0, T, w, solver="heun", step=0.1, adjoint="reversible")
    yr = y0.clone().requires_grad_()
    tr = T.clone().requires_grad_()
    sol = reversible_heun_reference(f, yr, tr, [5, 7])  # ceil(0.4371/0.1), ceil(0.6342/0.1)
    ref = torch.autograd.grad((w * sol).sum(), [yr, tr, *f.parameters()])
    with torch.no_grad():
        ours = odeint(f, y0, T, solver="heun", step=0.1, adjoint="reversible")
    torch.testing.assert_close(ours, sol.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(g, ref):
        assert _rel(a, b) < 1e-9


def test_reversible_gradient_matches_finite_differences(gen) -> None:
    k = torch.tensor(0.9, dtype=D, requires_grad=True)
    y0 = torch.randn(3, dtype=D, generator=gen)

    def f(t, y):
        return torch.sin(k * y) + t

    def loss(kv: float) -> float:
        with torch.no_grad():
            k.fill_(kv)
            return float(
                odeint(f, y0, T, solver="heun", step=0.1, adjoint="reversible", params=[k]).sum()
            )

    sol = odeint(f, y0, T, solver="heun", step=0.1, adjoint="reversible", params=[k])
    (g,) = torch.autograd.grad(sol.sum(), [k])
    eps = 1e-6
    fd = (loss(0.9 + eps) - loss(0.9 - eps)) / (2 * eps)
    assert float(g) == pytest.approx(fd, rel=1e-7)


def test_reversible_step_reconstructs_the_previous_state_to_round_off(gen) -> None:
    f = MLPDynamics().double()
    y = torch.randn(8, 3, dtype=D, generator=gen)
    z = y + 0.01 * torch.randn(8, 3, dtype=D, generator=gen)
    t = torch.tensor(0.3, dtype=D)
    f_k = f(t, z)
    states = [(y, z, f_k)]
    h = 0.05
    with torch.no_grad():
        for m in range(50):
            states.append(reversible_heun_forward(f, *states[-1], h, t + (m + 1) * h))
        y_back, z_back, f_back = states[-1]
        for m in range(49, -1, -1):
            z_prev = reversible_heun_reverse(y_back, z_back, f_back, h)
            f_prev = f(t + m * h, z_prev)
            y_prev = y_back - h / 2 * (f_prev + f_back)
            y_back, z_back, f_back = y_prev, z_prev, f_prev
    torch.testing.assert_close(y_back, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.name for p in PROBLEMS])
def test_reversible_heun_converges_at_order_two(problem: Problem) -> None:
    errors = []
    for n in (40, 80):
        sol = odeint(
            problem.f,
            problem.y0,
            torch.tensor([0.1, 1.1], dtype=D),
            solver="heun",
            step=1.0 / n,
            adjoint="reversible",
            params=(),
        )
        errors.append(float((sol[-1] - problem.exact(1.1, problem.y0, 0.1)).abs().max()))
    assert math.log2(errors[0] / errors[1]) == pytest.approx(2.0, abs=0.3)
