"""Gradients: gradcheck for backprop; the adjoint against backprop and finite differences.

Every reference here is independent of the code under test's gradient path: autograd through
the recorded solver operations, central finite differences of the forward pass, or a much finer
backprop solve for the continuous gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from problems import HEUN_MADE_REVERSIBLE, TABLEAUS, MLPDynamics

from torchode_adjoint import GRADIENT_MODES, get_solver, odeint

pytestmark = HEUN_MADE_REVERSIBLE

D = torch.float64
# Output times chosen so that a finite-difference nudge never changes a step count.
T = torch.tensor([0.0, 0.4371, 1.0713], dtype=D)


def _f_functional(t: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(y @ w.T + t) - 0.3 * y


def _step_for(order: int) -> float:
    return {1: 0.002, 2: 0.02, 3: 0.05, 4: 0.1, 5: 0.2, 8: 0.3}[order]


@pytest.mark.parametrize("solver", TABLEAUS)
def test_backprop_passes_gradcheck_for_y0_times_and_parameters(solver: str, gen) -> None:
    y0 = torch.randn(2, 3, dtype=D, generator=gen, requires_grad=True)
    w = (0.5 * torch.randn(3, 3, dtype=D, generator=gen)).requires_grad_()
    t = T.clone().requires_grad_()

    def run(y0: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return odeint(
            lambda tt, y: _f_functional(tt, y, w), y0, t, solver=solver, step=0.2, adjoint=False
        )

    assert torch.autograd.gradcheck(run, (y0, t, w), eps=1e-6, atol=1e-8, rtol=1e-6)


def _grads(module, y0, t, w_out, **kw):
    y0 = y0.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    params = list(module.parameters())
    sol = odeint(module, y0, t, **kw)
    loss = (w_out * sol).sum()
    return torch.autograd.grad(loss, [y0, t, *params])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("solver", TABLEAUS)
def test_adjoint_matches_backprop_within_the_discretisation_error(solver: str, gen) -> None:
    tab = get_solver(solver)
    step = _step_for(tab.order)
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    w_out = torch.randn(len(T), 4, 3, dtype=D, generator=gen)
    g_adj = _grads(f, y0, T, w_out, solver=solver, step=step, adjoint=True)
    g_bp = _grads(f, y0, T, w_out, solver=solver, step=step, adjoint=False)
    for name, a, b in zip(["y0", "t", "l1.w", "l1.b", "u", "l2.w", "l2.b"], g_adj, g_bp):
        assert _rel(a, b) < 20 * step**tab.order, (name, _rel(a, b))


def _central_fd(loss, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(x)
    flat, gflat = x.view(-1), out.view(-1)
    for i in range(flat.numel()):
        orig = float(flat[i])
        flat[i] = orig + eps
        up = loss()
        flat[i] = orig - eps
        down = loss()
        flat[i] = orig
        gflat[i] = (up - down) / (2 * eps)
    return out


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_adjoint_matches_central_finite_differences_of_the_discrete_forward(solver, gen) -> None:
    tab = get_solver(solver)
    step = _step_for(tab.order)
    f = MLPDynamics(dim=2, hidden=4).double()
    y0 = torch.randn(3, 2, dtype=D, generator=gen)
    t = T.clone()
    w_out = torch.randn(len(T), 3, 2, dtype=D, generator=gen)
    g = _grads(f, y0, t, w_out, solver=solver, step=step, adjoint=True)

    def loss() -> float:
        with torch.no_grad():
            return float((w_out * odeint(f, y0, t, solver=solver, step=step)).sum())

    with torch.no_grad():
        refs = [_central_fd(loss, x) for x in [y0, t, *f.parameters()]]
    for a, b in zip(g, refs):
        assert _rel(a, b) < 20 * step**tab.order + 1e-6


@pytest.mark.parametrize("solver", TABLEAUS)
def test_adjoint_error_against_the_exact_gradient_shrinks_at_the_solver_order(solver, gen):
    tab = get_solver(solver)
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    t = torch.tensor([0.0, 1.0], dtype=D)
    w_out = torch.randn(2, 4, 3, dtype=D, generator=gen)
    exact = _grads(f, y0, t, w_out, solver="rk4", step=0.002, adjoint=False)
    h = {1: 0.02, 2: 0.1, 3: 0.2, 4: 0.25, 5: 0.5, 8: 1.0}[tab.order]
    errors = []
    for step in (h, h / 2):
        g = _grads(f, y0, t, w_out, solver=solver, step=step, adjoint=True)
        errors.append(max(_rel(a, b) for a, b in zip(g, exact)))
    measured = math.log2(errors[0] / errors[1])
    assert measured > tab.order - 0.4, errors


def test_gradients_on_decreasing_time_grids_match_backprop(gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    t = torch.tensor([1.2, 0.61, -0.3], dtype=D)
    w_out = torch.randn(3, 4, 3, dtype=D, generator=gen)
    g_adj = _grads(f, y0, t, w_out, solver="rk4", step=0.05, adjoint=True)
    g_bp = _grads(f, y0, t, w_out, solver="rk4", step=0.05, adjoint=False)
    for a, b in zip(g_adj, g_bp):
        assert _rel(a, b) < 1e-5


def test_loss_on_one_intermediate_time_only_gives_zero_gradient_to_later_times(gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen).requires_grad_()
    t = T.clone().requires_grad_()
    sol = odeint(f, y0, t, solver="rk4", step=0.05)
    (gt,) = torch.autograd.grad(sol[1].pow(2).sum(), [t])
    assert gt[2] == 0.0
    assert gt[0] != 0.0 and gt[1] != 0.0
    # dL/dt_1 = dL/dy(t_1) . f(t_1, y(t_1)) exactly.
    expected = (2 * sol[1] * f(t[1], sol[1])).sum()
    torch.testing.assert_close(gt[1], expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adjoint", GRADIENT_MODES)
def test_float64_times_with_float32_state_get_a_float64_gradient(adjoint: str) -> None:
    f = MLPDynamics()
    y0 = torch.randn(4, 3)
    t = torch.tensor([0.0, 1.0], dtype=D, requires_grad=True)
    solver = "euler"
    sol = odeint(f, y0, t, solver=solver, step=0.1, adjoint=adjoint)
    assert sol.dtype == torch.float32
    sol[-1].sum().backward()
    assert t.grad is not None and t.grad.dtype == D
    assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("adjoint", GRADIENT_MODES)
def test_a_zero_dim_state_gets_its_analytic_gradient(adjoint: str) -> None:
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    y0 = torch.tensor(2.0, dtype=D, requires_grad=True)
    sol = odeint(
        lambda t, y: -k * y,
        y0,
        torch.tensor([0.0, 1.0], dtype=D),
        solver="rk4",
        step=0.01 if adjoint != "reversible" else 0.001,
        adjoint=adjoint,
        params=[k],
    )
    assert sol.shape == (2,)
    sol[-1].backward()
    # y(1) = y0 exp(-k): dy/dy0 = exp(-k), dy/dk = -y0 exp(-k).
    rel = 1e-8 if adjoint != "reversible" else 1e-6  # reversible Heun is second order
    assert float(y0.grad) == pytest.approx(math.exp(-0.7), rel=rel)
    assert float(k.grad) == pytest.approx(-2.0 * math.exp(-0.7), rel=rel)


def test_function_dynamics_with_explicit_params_gets_parameter_gradients(gen) -> None:
    lin = torch.nn.Linear(3, 3).double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)

    def run(adjoint: bool) -> list[torch.Tensor]:
        sol = odeint(
            lambda t, y: torch.tanh(lin(y)),
            y0,
            torch.tensor([0.0, 1.0], dtype=D),
            solver="rk4",
            step=0.05,
            adjoint=adjoint,
            params=lin.parameters(),
        )
        return list(torch.autograd.grad(sol[-1].sum(), list(lin.parameters())))

    for a, b in zip(run(True), run(False)):
        assert _rel(a, b) < 1e-6


def test_unused_parameter_gets_no_or_zero_gradient_and_no_error() -> None:
    f = MLPDynamics().double()
    f.unused = torch.nn.Parameter(torch.ones(3, dtype=D))
    y0 = torch.randn(2, 3, dtype=D)
    odeint(f, y0, torch.tensor([0.0, 1.0], dtype=D), step=0.5)[-1].sum().backward()
    assert f.unused.grad is None or torch.all(f.unused.grad == 0)
    assert f.l1.weight.grad is not None


@given(
    batch=st.integers(1, 4),
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    step=st.floats(0.05, 0.6),
    n_times=st.integers(2, 4),
)
def test_adjoint_matches_backprop_for_any_state_shape_and_grid(batch, shape, step, n_times):
    torch.manual_seed(1)
    w = torch.tensor(0.8, dtype=D, requires_grad=True)
    y0 = torch.randn(batch, *shape, dtype=D)
    t = torch.linspace(0.0, 1.0, n_times, dtype=D) ** 1.3

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sin(w * y) + t

    grads = []
    for adjoint in (True, False):
        sol = odeint(f, y0, t, solver="rk4", step=step, adjoint=adjoint, params=[w])
        assert sol.shape == (n_times, batch, *shape)
        grads.append(torch.autograd.grad(sol.sum(), [w])[0])
    assert float(abs(grads[0] - grads[1])) <= 1e-3 * max(1.0, float(abs(grads[1])))
