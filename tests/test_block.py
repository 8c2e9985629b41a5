"""ODEBlock: a thin module over odeint; learnable times, NFE counters, hooks, repr."""

from __future__ import annotations

import pytest
import torch
from problems import HEUN_MADE_REVERSIBLE, TABLEAUS, MLPDynamics
from torch import nn

from torchode_adjoint import (
    GRADIENT_MODES,
    ODEBlock,
    get_solver,
    odeint,
)

pytestmark = HEUN_MADE_REVERSIBLE

D = torch.float64


def test_block_returns_the_state_at_t1_equal_to_odeint() -> None:
    f = MLPDynamics().double()
    block = ODEBlock(f, solver="rk4", step=0.1, t0=0.2, t1=0.9)
    y0 = torch.randn(5, 3, dtype=D)
    expected = odeint(f, y0, torch.tensor([0.2, 0.9], dtype=D), solver="rk4", step=0.1)[-1]
    torch.testing.assert_close(block(y0), expected, rtol=0, atol=0)


def test_block_inside_a_user_model_trains() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), ODEBlock(MLPDynamics(), step=0.25), nn.Linear(3, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 2)
    target = x[:, :1] * x[:, 1:]
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# Every mode with every solver it integrates with (reversible Heun: reversible and backprop).
PAIRS = [(solver, mode) for solver in TABLEAUS for mode in GRADIENT_MODES] + [
    ("reversible_heun", "reversible"),
    ("reversible_heun", "backprop"),
]


@pytest.mark.parametrize(("solver", "adjoint"), PAIRS)
def test_nfe_counters_are_steps_times_stages(solver: str, adjoint: str) -> None:
    calls = {"n": 0}

    class Counting(MLPDynamics):
        def forward(self, t, y):
            calls["n"] += 1
            return super().forward(t, y)

    block = ODEBlock(Counting(), solver=solver, step=0.25, adjoint=adjoint)
    out = block(torch.randn(2, 3))
    # 4 steps; reversible Heun evaluates once per step plus once at t0, each way; a tableau
    # made reversible takes two steps of the tableau per step.
    if solver == "reversible_heun":
        per_pass = 4 + 1
    else:
        per_pass = 4 * get_solver(solver).stages * (2 if adjoint == "reversible" else 1)
    assert block.nfe_forward == per_pass == calls["n"]
    assert block.nfe_backward == 0
    out.sum().backward()
    assert block.nfe_backward == (0 if adjoint == "backprop" else per_pass)
    assert calls["n"] == per_pass + block.nfe_backward
    assert isinstance(block.nfe_forward, int) and isinstance(block.nfe_backward, int)


def test_learnable_end_time_is_a_registered_parameter_and_gets_the_right_gradient() -> None:
    f = MLPDynamics().double()
    t1 = nn.Parameter(torch.tensor(0.8, dtype=D))
    block = ODEBlock(f, solver="rk4", step=0.05, t1=t1)
    assert any(p is t1 for p in block.parameters())
    y0 = torch.randn(4, 3, dtype=D)
    out = block(y0)
    out.sum().backward()
    # dL/dt1 = dL/dy(t1) . f(t1, y(t1)) with dL/dy = 1.
    expected = f(t1.detach(), out.detach()).sum()
    torch.testing.assert_close(t1.grad, expected.detach(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("adjoint", GRADIENT_MODES)
def test_post_accumulate_grad_hooks_fire_once_per_parameter_per_backward(adjoint) -> None:
    f = MLPDynamics()
    block = ODEBlock(f, solver="heun", step=0.2, adjoint=adjoint)
    fired: dict[str, int] = {}
    for name, p in f.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: fired.__setitem__(name, fired.get(name, 0) + 1)
        )
    block(torch.randn(3, 3)).sum().backward()
    assert fired == {name: 1 for name, _ in f.named_parameters()}


def test_extra_repr_shows_solver_step_mode_and_times() -> None:
    text = repr(ODEBlock(MLPDynamics(), solver="rk4", step=0.25, adjoint=False, t0=0.0, t1=2.0))
    for part in ("solver='rk4'", "step=0.25", "adjoint='backprop'", "t0=0", "t1=2"):
        assert part in text


def test_fixed_times_follow_the_state_dtype_and_are_not_parameters() -> None:
    block = ODEBlock(MLPDynamics(), t0=0.2, t1=0.9).double()
    assert not any(p.dim() == 0 for p in block.parameters())
    calls = []
    block.dynamics.register_forward_pre_hook(lambda m, args: calls.append(args[0]))
    assert block(torch.randn(2, 3, dtype=D)).dtype == D
    assert calls[0].dtype == D and float(calls[0]) == 0.2


def test_exceptions_inside_the_dynamics_propagate_unchanged() -> None:
    class Boom(nn.Module):
        def forward(self, t, y):
            raise KeyError("from the user's dynamics")

    with pytest.raises(KeyError, match="from the user's dynamics"):
        ODEBlock(Boom())(torch.randn(2, 2))
