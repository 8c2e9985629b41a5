"""Fixed steps at given times (``controller=StepTo(times)``) in every gradient mode.

The reference is an independent computation: the classical Runge--Kutta method written out here
over the step ends, each a fixed fraction of its output interval (``t[i] + m (t[i+1] - t[i])``,
the layout :class:`~torchode_adjoint.StepTo` promises), differentiated by autograd.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from problems import reversible_rk_on_steps
from test_gradient_traps import RecordedDropout
from torch import nn

from torchode_adjoint import (
    Checkpoint,
    NFECounter,
    ODEBlock,
    StepTo,
    check_gradients,
    get_solver,
    odeint,
)

EXACT_MODES = ["backprop", "checkpoint", "reversible"]
ALL_MODES = [*EXACT_MODES, "adjoint"]


class Field(nn.Module):
    """A small time-dependent MLP field."""

    def __init__(self, dim: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(0.5 * torch.randn(dim, 8, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(0.5 * torch.randn(8, dim, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.1 * torch.randn(8, generator=g, dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ self.w1 + self.b * torch.cos(t)) @ self.w2 - 0.3 * y


def _fractions(host: list[float], given: list[float]) -> list[list[float]]:
    """Per output interval, the step ends as fractions of it (the given times inside it)."""
    out = []
    for a, b in zip(host[:-1], host[1:]):
        inner = sorted((v for v in given if min(a, b) < v < max(a, b)), reverse=b < a)
        out.append([0.0, *((v - a) / (b - a) for v in inner), 1.0])
    return out


def _rk4_by_hand(f, y0: torch.Tensor, t: torch.Tensor, given: list[float]) -> torch.Tensor:
    """The classical RK4 over the step ends, written out (differentiable in y0, t and f's
    parameters); the states at every output time."""
    host = t.detach().tolist()
    states = [y0]
    y = y0
    for i, ms in enumerate(_fractions(host, given)):
        span = t[i + 1] - t[i]
        for m0, m1 in zip(ms[:-1], ms[1:]):
            t0, h = t[i] + m0 * span, (m1 - m0) * span
            k1 = f(t0, y)
            k2 = f(t0 + h / 2, y + h / 2 * k1)
            k3 = f(t0 + h / 2, y + h / 2 * k2)
            k4 = f(t0 + h, y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        states.append(y)
    return torch.stack(states)


def _reversible_by_hand(f, y0, t, given, couplings) -> torch.Tensor:
    """McCallum & Foster's reversible RK4 over the same step ends (tests/problems.py)."""
    steps = [list(zip(ms[:-1], ms[1:])) for ms in _fractions(t.detach().tolist(), given)]
    return reversible_rk_on_steps(f, get_solver("rk4"), y0, t, steps, list(couplings))


GIVEN = [0.0, 0.03, 0.1, 0.18, 0.3, 0.45, 0.62, 0.8, 1.0, 1.3]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_values_are_rk4_over_the_given_times(mode: str, reverse: bool) -> None:
    f = Field()
    y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.25, 0.7, 1.3], dtype=torch.float64)
    if reverse:
        t = t.flip(0)
    nfe = NFECounter()
    got = odeint(f, y0, t, solver="rk4", controller=StepTo(GIVEN), adjoint=mode, nfe=nfe)
    if mode == "reversible":  # McCallum & Foster's scheme, with the couplings it chose
        expected = _reversible_by_hand(f, y0, t, GIVEN, nfe.couplings)
    else:
        expected = _rk4_by_hand(f, y0, t, GIVEN)
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-13)


def test_steps_and_evaluations_are_the_given_times() -> None:
    """Output times 0, 0.25, 0.7, 1.3 split by the 8 given times inside: 11 steps of 4 stages."""
    counter = NFECounter()
    t = torch.tensor([0.0, 0.25, 0.7, 1.3], dtype=torch.float64)
    odeint(Field(), torch.ones(2, 3, dtype=torch.float64), t, solver="rk4",
           controller=StepTo(GIVEN), nfe=counter, adjoint="backprop")  # fmt: skip
    inner = [v for v in GIVEN if 0.0 < v < 1.3 and v not in (0.25, 0.7)]
    assert counter.forward == 4 * (3 + len(inner))


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_exact_modes_give_autograd_through_the_steps(mode: str) -> None:
    """y0, t and parameter gradients against autograd through the hand-written steps."""
    torch.manual_seed(0)
    f = Field()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.25, 0.7, 1.3], dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, 3, dtype=torch.float64)
    params = list(f.parameters())
    nfe = NFECounter()
    got_sol = odeint(f, y0, t, solver="rk4", controller=StepTo(GIVEN), adjoint=mode, nfe=nfe)
    got = torch.autograd.grad((w * got_sol).sum(), [y0, t, *params])
    if mode == "reversible":
        ref = _reversible_by_hand(f, y0, t, GIVEN, nfe.couplings)
    else:
        ref = _rk4_by_hand(f, y0, t, GIVEN)
    expected = torch.autograd.grad((w * ref).sum(), [y0, t, *params])
    for name, g, e in zip(["y0", "t", "w1", "w2", "b"], got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_check_gradients_passes_with_given_times(mode: str) -> None:
    """Against finite differences of the mode's own forward pass (and, for the continuous
    adjoint, within its measured discretisation error)."""
    report = check_gradients(
        Field(), torch.randn(3, 3), torch.tensor([0.0, 0.4, 1.0]), solver="rk4",
        controller=StepTo([0.1, 0.2, 0.6, 0.75]), adjoint=mode,
    )  # fmt: skip
    assert report.verdict == "pass", str(report)
    assert "StepTo([0.1, 0.2, 0.6, 0.75])" in str(report)


def test_the_continuous_adjoint_approaches_the_exact_gradient_as_steps_are_added() -> None:
    torch.manual_seed(3)
    f = Field()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    errors = []
    for n in (5, 10, 20):
        times = (torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64) ** 2).tolist()
        grads = []
        for mode in ("adjoint", "backprop"):
            sol = odeint(f, y0, t, solver="rk4", controller=StepTo(times), adjoint=mode)
            grads.append(torch.autograd.grad(sol[-1].sum(), [y0, *f.parameters()]))
        errors.append(max(float((a - b).norm() / b.norm()) for a, b in zip(*grads)))
    # Fourth order: each halving of the steps divides the difference by about 16.
    assert errors[1] < errors[0] / 8 and errors[2] < errors[1] / 8, errors


def test_fourth_order_on_a_graded_layout() -> None:
    """y' = -y (1 + t) on steps graded towards t = 0: the error falls 16x per halving."""
    f = lambda t, y: -y * (1 + t)  # noqa: E731
    y0 = torch.ones(1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    exact = math.exp(-1.5)
    errors = []
    for n in (8, 16, 32):
        times = (torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64) ** 2).tolist()
        y = odeint(f, y0, t, solver="rk4", controller=StepTo(times), params=())
        errors.append(abs(float(y[-1, 0]) - exact))
    assert 12 < errors[0] / errors[1] < 20 and 12 < errors[1] / errors[2] < 20, errors


@pytest.mark.parametrize("every", [1, 2, 5])
def test_checkpoint_segments_over_uneven_steps(every: int) -> None:
    torch.manual_seed(4)
    f = Field()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.7, 1.3], dtype=torch.float64)
    kwargs = dict(solver="dopri5", controller=StepTo(GIVEN))
    inputs = [y0, *f.parameters()]
    got = torch.autograd.grad(
        odeint(f, y0, t, adjoint=Checkpoint(every=every), **kwargs).sum(), inputs
    )
    expected = torch.autograd.grad(odeint(f, y0, t, adjoint="backprop", **kwargs).sum(), inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("mode", ["checkpoint", "reversible"])
def test_random_draws_are_replayed_over_uneven_steps(mode: str) -> None:
    """Dropout in the dynamics: the gradient is autograd's through the steps with the masks
    the forward pass drew (recorded, then replayed into the hand-written steps)."""
    f = RecordedDropout().double()
    y0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0.0, 0.7, 1.3], dtype=torch.float64)
    y = y0.clone().requires_grad_()
    nfe = NFECounter()
    f.record = True
    sol = odeint(f, y, t, solver="rk4", controller=StepTo(GIVEN), adjoint=mode, nfe=nfe)
    f.record = False
    got = torch.autograd.grad(sol.square().sum(), [y, *f.parameters()])
    masks = list(f.masks)
    assert len({float(m.sum()) for m in masks}) > 1  # the dynamics did draw
    f.replay = masks
    yr = y0.clone().requires_grad_()
    if mode == "reversible":
        ref = _reversible_by_hand(f, yr, t, GIVEN, nfe.couplings)
    else:
        ref = _rk4_by_hand(f, yr, t, GIVEN)
    assert f.replay == []  # every recorded mask, in order
    f.replay = None
    torch.testing.assert_close(sol.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
    expected = torch.autograd.grad(ref.square().sum(), [yr, *f.parameters()])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_a_tuple_state_with_given_times() -> None:
    f = lambda t, s: (s[1], -s[0])  # noqa: E731
    y0 = (torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    t = torch.tensor([0.0, math.pi / 2], dtype=torch.float64)
    times = torch.linspace(0.0, math.pi / 2, 40, dtype=torch.float64)
    x, v = odeint(f, y0, t, solver="rk4", controller=StepTo(times), params=())
    assert abs(float(x[-1, 0])) < 1e-7 and abs(float(v[-1, 0]) + 1.0) < 1e-7


def test_float32_step_times_on_output_times_take_no_sliver_step() -> None:
    """Step times are rounded to the state's dtype like ``t``: 0.1 as a step time and as an
    output time in float32 are one time, not a step of one ulp."""
    counter = NFECounter()
    t = torch.tensor([0.0, 0.1, 0.3], dtype=torch.float32)
    odeint(lambda t, y: -y, torch.ones(2), t, solver="euler",
           controller=StepTo([0.1, 0.2]), nfe=counter, params=())  # fmt: skip
    assert counter.forward == 3


def test_compiled_steps_equal_eager() -> None:
    pytest.importorskip("torch._dynamo")
    f = Field()
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 0.7, 1.3], dtype=torch.float64)
    kwargs = dict(solver="rk4", controller=StepTo(GIVEN), adjoint="checkpoint")
    eager = odeint(f, y0, t, **kwargs)
    compiled = odeint(f, y0, t, compile=True, **kwargs)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    g_e = torch.autograd.grad(eager.sum(), y0)[0]
    g_c = torch.autograd.grad(compiled.sum(), y0)[0]
    torch.testing.assert_close(g_c, g_e, rtol=1e-12, atol=1e-12)


def test_block_with_given_times() -> None:
    block = ODEBlock(Field(), solver="rk4", controller=StepTo([0.0, 0.1, 0.5, 1.0]))
    assert "StepTo([0, 0.1, 0.5, 1])" in repr(block)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    out = block(y0)
    ref = odeint(Field(), y0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                 solver="rk4", controller=StepTo([0.1, 0.5]))[-1]  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(block))
    torch.testing.assert_close(again(y0), out, rtol=0, atol=0)


def test_non_finite_message_names_the_given_times() -> None:
    f = lambda t, y: y * torch.log(1.0 - t)  # noqa: E731 (NaN from t = 1 on)
    expected = r"at t = 2 \(step 6 of 6 in \[0, 2\]\).*StepTo\(\[0\.5, 0\.9, 0\.99.*add step times"
    with pytest.raises(RuntimeError, match=expected):
        odeint(f, torch.ones(1, dtype=torch.float64), torch.tensor([0.0, 2.0]),
               solver="euler", controller=StepTo([0.5, 0.9, 0.99, 0.999, 1.5]),
               params=())  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(rtol=1e-6), ValueError, r"`rtol`/`atol` ask for error-controlled steps"),
        (dict(step=0.1), ValueError, r"`step=0\.1` asks for equal steps"),
        (dict(controller=StepTo([0.5, 2.0])), ValueError, r"holds 2, outside the span"),
        (dict(controller=StepTo([-0.5])), ValueError, r"holds -0\.5, outside the span"),
        (dict(max_steps=3, controller=StepTo([0.1, 0.2, 0.3, 0.4])), ValueError,
         r"takes 5 steps, more than `max_steps=3`"),
    ],
)  # fmt: skip
def test_conflicting_or_bad_settings_are_named(kwargs: dict, error: type, match: str) -> None:
    kwargs = {"controller": StepTo([0.5]), "solver": "dopri5", "params": (), **kwargs}
    with pytest.raises(error, match=match):
        odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]), **kwargs)


@pytest.mark.parametrize(
    ("times", "error", "match"),
    [
        ([], ValueError, r"`StepTo\(times=\.\.\.\)` is empty"),
        ([0.1, float("nan")], ValueError, r"must hold finite real times, got nan"),
        ([0.1, True], ValueError, r"must hold finite real times, got True"),
        (torch.zeros(2, 2), ValueError, r"must be a 1-D real floating tensor"),
        (torch.arange(3), ValueError, r"must be a 1-D real floating tensor"),
        (0.5, TypeError, r"must be a list or 1-D tensor of times, got float"),
        ("0.5", TypeError, r"must be a list or 1-D tensor of times, got str"),
    ],
)
def test_bad_step_times_are_named(times: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        StepTo(times)  # type: ignore[arg-type]


def test_unsorted_and_repeated_times_are_one_layout() -> None:
    same = StepTo(torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64))
    assert StepTo([0.5, 0.1, 0.5, 0.3]) == same
