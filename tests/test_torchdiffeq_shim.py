"""The torchdiffeq shim (benchmarks/torchdiffeq_shim.py): each argument maps to this library's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks import torchdiffeq_shim as tdq
from torchode_adjoint import odeint

D = torch.float64


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=D))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.a


def test_odeint_is_dopri5_at_torchdiffeqs_tolerances_by_default() -> None:
    f, y0, t = _Linear(), torch.ones(2, dtype=D), torch.linspace(0, 2, 5, dtype=D)
    ours = odeint(f, y0, t, solver="dopri5", rtol=1e-7, atol=1e-9, adjoint=False)
    assert torch.equal(tdq.odeint(f, y0, t), ours)


def test_a_fixed_step_method_takes_step_size_and_rk4_is_the_three_eighths_rule() -> None:
    f, y0, t = _Linear(), torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    ours = odeint(f, y0, t, solver="rk38", step=0.25, adjoint=False)
    assert torch.equal(tdq.odeint(f, y0, t, method="rk4", options={"step_size": 0.25}), ours)
    assert tdq.SOLVER_NAMES["heun2"] == "heun"


def test_odeint_adjoint_maps_its_options_to_the_continuous_adjoint(monkeypatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(tdq, "_odeint", lambda *args, **kwargs: seen.update(kwargs))
    f, y0, t = _Linear(), torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    tdq.odeint_adjoint(f, y0, t, rtol=1e-5, atol=1e-6, adjoint_rtol=1e-3)
    mode = seen["adjoint"]
    assert (mode.name, mode.norm, mode.rtol, mode.atol) == ("adjoint", "full", 1e-3, None)
    assert (seen["solver"], seen["rtol"], seen["atol"]) == ("dopri5", 1e-5, 1e-6)
    assert seen["params"] == list(f.parameters())
    tdq.odeint_adjoint(f, y0, t, adjoint_options={"norm": "seminorm"}, adjoint_params=())
    assert seen["adjoint"].norm == "seminorm" and seen["params"] == []
    tdq.odeint(f, y0, t, options={"jump_t": [0.5], "step_t": [0.2]})
    assert seen["adjoint"] is False and seen["jump_t"] == [0.5] and seen["step_t"] == [0.2]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f, y, t: tdq.odeint(f, y, t, method="explicit_adams"), "'explicit_adams' has no"),
        (
            lambda f, y, t: tdq.odeint(
                f,
                y,
                t,
                event_fn=lambda t, y: y.sum(),
                method="euler",
                options={"grid_constructor": lambda f, y, t: t},
            ),
            "grid_constructor` with events",
        ),
        (
            lambda f, y, t: tdq.odeint_adjoint(
                f, y, t, adjoint_options={"norm": abs}, event_fn=lambda t, y: y.sum()
            ),
            "adjoint `norm` with events",
        ),
    ],
)
def test_what_has_no_counterpart_raises_naming_it(call: object, message: str) -> None:
    with pytest.raises(NotImplementedError, match=message):
        call(_Linear(), torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D))  # type: ignore[operator]


def test_a_callable_norm_gets_torchdiffeqs_arguments_forward_and_backward() -> None:
    """torchdiffeq's norm gets the scaled error shaped like the state; its adjoint norm gets
    ``(t, y, adj_y, *adj_params)`` with a tuple state's parts in place of ``y`` and ``adj_y``,
    and only the parameters that require grad."""
    forward: list = []
    backward: list = []

    def norm(scaled):
        forward.append(tuple(s.shape for s in scaled))
        return max(s.abs().max() for s in scaled)

    def adjoint_norm(scaled):
        backward.append(tuple(s.shape for s in scaled))
        return max(s.abs().max() for s in scaled)

    w = torch.tensor([0.5, 0.2], dtype=D, requires_grad=True)
    frozen = torch.tensor(3.0, dtype=D)
    y0 = (torch.tensor(1.0, dtype=D), torch.ones(2, 3, dtype=D))

    def f(t, y):
        return (-w[0] * y[0], -w[1] * frozen * y[1])

    ys = tdq.odeint_adjoint(
        f,
        y0,
        torch.tensor([0.0, 1.0], dtype=D),
        options={"norm": norm},
        adjoint_params=(w, frozen),
        adjoint_options={"norm": adjoint_norm},
    )
    assert set(forward) == {((), (2, 3))}
    (ys[0][-1] + ys[1][-1].sum()).backward()
    assert set(backward) == {((), (), (2, 3), (), (2, 3), (2,))}
    assert w.grad is not None


@pytest.mark.parametrize("adjoint", [False, True])
def test_grid_constructor_steps_on_the_grid_it_returns(adjoint: bool) -> None:
    """torchdiffeq's own check: Euler on x' = x over [0, 1] with the grid 0, 0.1, ..., 1 gives
    1.1**10, and so does its gradient; the constructor sees ``(func, y0, t)``."""
    seen: list[tuple] = []

    def grid(func, y0, t):
        seen.append((func, y0, t))
        return torch.linspace(0.0, 1.0, 11, dtype=D)

    f = lambda t, x: x  # noqa: E731
    x0 = torch.tensor(1.0, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    call = tdq.odeint_adjoint if adjoint else tdq.odeint
    kwargs = {"adjoint_params": ()} if adjoint else {}
    xs = call(f, x0, t, method="euler", options={"grid_constructor": grid}, **kwargs)
    assert abs(float(xs[1].detach()) - 1.1**10) < 1e-12
    (g,) = torch.autograd.grad(xs[1], x0)
    assert abs(float(g) - 1.1**10) < 1e-12  # the adjoint: Euler backwards, the same factor
    assert len(seen) == 1 and seen[0][0] is f and seen[0][2] is t


def test_grid_constructor_and_step_size_are_exclusive() -> None:
    with pytest.raises(ValueError, match="mutually exclusive"):
        tdq.odeint(lambda t, x: x, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                   method="euler", options={"grid_constructor": lambda f, y, t: t,
                                            "step_size": 0.1})  # fmt: skip


@pytest.mark.parametrize("adjoint", [False, True])
def test_event_handling_mode_maps_to_odeint_event(adjoint: bool) -> None:
    # x' = -x from 1 until x = c: t = log(1 / c), through torchdiffeq's odeint (t of length 2)
    # and odeint_event; the threshold the condition closes over gets its gradient here
    # (torchdiffeq gives it none).
    c = torch.tensor(0.25, dtype=D, requires_grad=True)
    call = tdq.odeint_adjoint if adjoint else tdq.odeint
    t, sol = call(lambda t, y: -y, torch.ones(1, dtype=D), torch.tensor([0.0, 1.0], dtype=D),
                  event_fn=lambda t, y: y.sum() - c, rtol=1e-10, atol=1e-12)  # fmt: skip
    assert abs(float(t.detach()) - math.log(4.0)) < 1e-8 and sol.shape == (2, 1)
    (dc,) = torch.autograd.grad(t, c)
    assert abs(float(dc) + 1 / 0.25) < 1e-6
    t2, _ = tdq.odeint_event(lambda t, y: y, torch.ones(1, dtype=D), torch.tensor(0.0, dtype=D),
                             event_fn=lambda t, y: y.sum() - 0.25, reverse_time=True,
                             odeint_interface=call, rtol=1e-10, atol=1e-12)  # fmt: skip
    assert abs(float(t2) + math.log(4.0)) < 1e-8
