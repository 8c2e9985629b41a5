"""Events (``odeint_event``): where a condition crosses zero, and the event time's gradient.

The event times are checked against closed-form roots; their gradients against the closed-form
derivatives and against central finite differences of the whole search, in every gradient mode.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchode_adjoint import NFECounter, odeint, odeint_event

D = torch.float64
MODES = ("backprop", "adjoint", "checkpoint", "reversible")
LAYOUTS = {
    "rk4": {"solver": "rk4", "step": 1e-3},
    "dopri5": {"solver": "dopri5", "rtol": 1e-11, "atol": 1e-13},
}


def _f(x: object) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)  # type: ignore[arg-type]


def _decay(k: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda t, y: -k * y


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", MODES)
def test_exponential_decay_event_time_and_gradients_are_the_closed_form_ones(
    mode: str, layout: str
) -> None:
    # y' = -k y from y0 until y = c: t_e = log(y0 / c) / k, dt/dy0 = 1 / (k y0),
    # dt/dk = -t_e / k, dt/dc = -1 / (k c); the state there is c whatever the parameters.
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    c = torch.tensor(0.5, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.3], dtype=D, requires_grad=True)
    t_e, sol = odeint_event(
        _decay(k), y0, 0.0, event_fn=lambda t, y: y.sum() - c, adjoint=mode, params=(k,),
        **LAYOUTS[layout],
    )  # fmt: skip
    exact = math.log(1.3 / 0.5) / 0.7
    assert abs(_f(t_e) - exact) < 1e-9
    assert sol.shape == (2, 1) and torch.allclose(sol[0], y0)
    assert abs(_f(sol[1, 0]) - 0.5) < 1e-9
    g = torch.autograd.grad(t_e, [y0, k, c], retain_graph=True)
    expected = [1 / (0.7 * 1.3), -exact / 0.7, -1 / (0.7 * 0.5)]
    for got, want in zip(g, expected):
        assert abs(_f(got) - want) < 1e-7 * abs(want), (got, want)
    # The state at the event is c: no gradient to y0 or k, one to c.
    gs = torch.autograd.grad(sol[1].sum(), [y0, k, c], allow_unused=True)
    assert abs(_f(gs[0])) < 1e-7 and abs(_f(gs[1])) < 1e-7
    assert abs(_f(gs[2]) - 1.0) < 1e-7


def _ballistic(gravity: torch.Tensor, drag: torch.Tensor):  # type: ignore[no-untyped-def]
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, v = y.unbind(-1)
        return torch.stack([v, -gravity - drag * v * v.abs()], -1)

    return f


def _falling(  # type: ignore[no-untyped-def]
    mode: str,
    gravity: torch.Tensor,
    drag: torch.Tensor,
    y0: torch.Tensor,
    t0: torch.Tensor,
    ground: float = 0.0,
):
    # The ground at height ground * t: a condition that depends on the time too.
    return odeint_event(
        _ballistic(gravity, drag), y0, t0, event_fn=lambda t, y: y[..., 0] - ground * t,
        direction=-1, solver="rk4", step=0.01, adjoint=mode, params=(gravity, drag),
    )  # fmt: skip


def test_a_ball_without_drag_lands_at_the_closed_form_time() -> None:
    g = torch.tensor(9.81, dtype=D, requires_grad=True)
    v0 = torch.tensor(3.0, dtype=D, requires_grad=True)
    h0 = torch.tensor(2.0, dtype=D)
    y0 = torch.stack([h0, v0])
    t_e, sol = _falling("backprop", g, torch.tensor(0.0, dtype=D), y0, torch.tensor(0.0, dtype=D))
    disc = math.sqrt(9.0 + 2 * 9.81 * 2.0)
    exact = (3.0 + disc) / 9.81
    assert abs(_f(t_e) - exact) < 1e-12  # rk4 is exact on a quadratic
    dg, dv0 = torch.autograd.grad(t_e, [g, v0], retain_graph=True)
    assert abs(_f(dv0) - (1 + 3.0 / disc) / 9.81) < 1e-10
    assert abs(_f(dg) - ((2.0 / disc) / 9.81 - exact / 9.81)) < 1e-10
    # The impact speed v0 - g t_e: its derivative in v0 is 1 - g dt/dv0.
    (dv,) = torch.autograd.grad(sol[1, 1], [v0])
    assert abs(_f(dv) - (1 - 9.81 * (1 + 3.0 / disc) / 9.81)) < 1e-10


@pytest.mark.parametrize("mode", MODES)
def test_event_gradients_equal_finite_differences_of_the_search(mode: str) -> None:
    # With quadratic drag (no closed form) and a rising ground: the gradients of the event
    # time and of the impact velocity with respect to gravity, drag, the initial state and
    # t0, against central differences of odeint_event itself. The exact modes differentiate the same
    # discretisation; the continuous adjoint and the reversible scheme agree to their error.
    gravity = torch.tensor(9.81, dtype=D, requires_grad=True)
    drag = torch.tensor(0.3, dtype=D, requires_grad=True)
    y0 = torch.tensor([2.0, 3.0], dtype=D, requires_grad=True)
    t0 = torch.tensor(0.25, dtype=D, requires_grad=True)
    t_e, sol = _falling(mode, gravity, drag, y0, t0, 0.1)
    loss_of = lambda t_e, sol: t_e + 0.3 * sol[1, 1]  # noqa: E731
    grads = torch.autograd.grad(loss_of(t_e, sol), [gravity, drag, y0, t0])
    tol = 1e-7 if mode in ("backprop", "checkpoint") else 1e-5
    eps = 1e-6
    inputs = [gravity, drag, y0, t0]
    for which, (x, g) in enumerate(zip(inputs, grads)):
        for j in range(x.numel()):
            vals = []
            for s in (1.0, -1.0):
                moved = [v.detach().clone() for v in inputs]
                moved[which].view(-1)[j] += s * eps
                with torch.no_grad():
                    vals.append(_f(loss_of(*_falling("backprop", *moved, 0.1))))
            fd = (vals[0] - vals[1]) / (2 * eps)
            assert abs(_f(g.reshape(-1)[j]) - fd) < tol * max(1.0, abs(fd)), (which, j, g, fd)


def test_direction_selects_the_crossing_and_a_zero_at_t0_follows_torchdiffeq() -> None:
    # (sin t, cos t) from t0 = 0, where sin t = 0: downwards at pi, upwards at 2 pi.
    rot = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    y0 = torch.tensor([0.0, 1.0], dtype=D)
    kw = {"solver": "rk4", "step": 0.01, "params": ()}
    for direction, expected in ((-1, math.pi), (1, 2 * math.pi)):
        t_e, _ = odeint_event(rot, y0, 0.0, event_fn=lambda t, y: y[0], direction=direction, **kw)
        assert abs(_f(t_e) - expected) < 1e-8, (direction, t_e)
    # Either direction: torchdiffeq's rule, the zero at t0 is the event, the state y0.
    t0 = torch.tensor(0.0, dtype=D, requires_grad=True)
    t_e, sol = odeint_event(rot, y0, t0, event_fn=lambda t, y: y[0], **kw)
    assert _f(t_e) == 0.0 and torch.equal(sol.detach(), torch.stack([y0, y0]))
    assert _f(torch.autograd.grad(t_e, t0)[0]) == 1.0
    # From t0 = 0.5 either crossing counts: the first, downwards at pi.
    t_e, _ = odeint_event(rot, torch.stack([torch.sin(torch.tensor(0.5, dtype=D)),
                                            torch.cos(torch.tensor(0.5, dtype=D))]), 0.5,
                          event_fn=lambda t, y: y[0], **kw)  # fmt: skip
    assert abs(_f(t_e) - math.pi) < 1e-8


def test_the_earliest_of_several_conditions_crossing_in_one_step_is_the_event() -> None:
    # Both cross inside the first step (0.8 at t = 0.319, 0.75 at t = 0.411); the second
    # listed is the earlier.
    k = torch.tensor(0.7, dtype=D)
    y0 = torch.tensor([1.0], dtype=D)
    t_e, sol = odeint_event(
        _decay(k), y0, 0.0, event_fn=lambda t, y: torch.cat([y - 0.75, y - 0.8]),
        solver="rk4", step=0.5, params=(),
    )  # fmt: skip
    assert abs(_f(sol[1, 0]) - 0.8) < 1e-12  # the located root on the method's own step
    assert abs(_f(t_e) - math.log(1 / 0.8) / 0.7) < 1e-4


def test_reverse_time_integrates_towards_decreasing_t() -> None:
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=D)
    t_e, _ = odeint_event(
        _decay(k), y0, 1.0, event_fn=lambda t, y: y.sum() - 2.0, reverse_time=True,
        solver="dopri5", rtol=1e-11, atol=1e-13, params=(k,),
    )  # fmt: skip
    exact = 1.0 - math.log(2.0) / 0.7
    assert abs(_f(t_e) - exact) < 1e-9
    (dk,) = torch.autograd.grad(t_e, [k])
    assert abs(_f(dk) - math.log(2.0) / 0.49) < 1e-7


def test_a_module_event_function_gets_its_parameters_gradient() -> None:
    class Threshold(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Parameter(torch.tensor(0.5, dtype=D))

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return y.sum() - self.c

    event = Threshold()
    t_e, _ = odeint_event(
        _decay(torch.tensor(0.7, dtype=D)), torch.tensor([1.0], dtype=D), 0.0,
        event_fn=event, solver="rk4", step=1e-3, params=(),
    )  # fmt: skip
    t_e.backward()
    assert event.c.grad is not None
    assert abs(_f(event.c.grad) + 1 / (0.7 * 0.5)) < 1e-7


def test_counts_the_search_and_the_solve() -> None:
    nfe = NFECounter()
    odeint_event(
        _decay(torch.tensor(0.7, dtype=D)), torch.tensor([1.0], dtype=D), 0.0,
        event_fn=lambda t, y: y.sum() - 0.5, solver="rk4", step=0.1, params=(), nfe=nfe,
    )  # fmt: skip
    # The solve alone takes 10 steps of 4 evaluations (t_e = 0.99); the search as many and
    # more for the root.
    assert nfe.forward > 2 * 10 * 4


def test_bad_input_and_failures_are_named() -> None:
    k = torch.tensor(0.7, dtype=D)
    y0 = torch.tensor([1.0], dtype=D)
    kw = {"solver": "rk4", "step": 0.1, "params": ()}
    with pytest.raises(RuntimeError, match="max_steps"):
        odeint_event(_decay(k), y0, 0.0, event_fn=lambda t, y: y.sum() + 1.0, max_steps=50, **kw)
    with pytest.raises(ValueError, match="at least one condition"):
        odeint_event(_decay(k), y0, 0.0, event_fn=lambda t, y: y[:0], **kw)
    with pytest.raises(ValueError, match="non-finite value at t0"):
        odeint_event(_decay(k), y0, 0.0, event_fn=lambda t, y: y.sum() / 0.0, **kw)
    with pytest.raises(RuntimeError, match="not all finite"):
        later_nan = lambda t, y: torch.where(t < 0.5, 1.0, float("nan")) * y.sum()  # noqa: E731
        odeint_event(_decay(k), y0, 0.0, event_fn=later_nan, **kw)
    with pytest.raises(RuntimeError, match="same number"):
        odeint_event(_decay(k), y0, 0.0, event_fn=lambda t, y: y.repeat(1 + int(t > 0.2)), **kw)
    with pytest.raises(ValueError, match="direction"):
        odeint_event(_decay(k), y0, 0.0, event_fn=lambda t, y: y.sum(), direction=2, **kw)
    with pytest.raises(TypeError, match="floating-point tensor"):
        odeint_event(_decay(k), torch.ones(1, dtype=torch.int64), 0.0,
                     event_fn=lambda t, y: y.sum(), **kw)  # fmt: skip
    with pytest.raises(ValueError, match="embedded pair"):
        odeint_event(_decay(k), y0, 0.0, event_fn=lambda t, y: y.sum() - 0.5,
                     solver="rk4", rtol=1e-6, params=())  # fmt: skip
    # A condition that crosses zero with no rate there: (t - 1)^3 at t = 1; the event time has
    # no gradient (said where one is wanted), and without a gradient the event is found.
    k2 = torch.tensor(0.7, dtype=D, requires_grad=True)
    cubic = lambda t, y: (t - 1.0) ** 3 + 0.0 * y.sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="no time derivative"):
        odeint_event(_decay(k2), y0, 0.0, event_fn=cubic, solver="rk4", step=0.1, params=(k2,))
    with torch.no_grad():
        t_e, _ = odeint_event(
            _decay(k2), y0, 0.0, event_fn=cubic, solver="rk4", step=0.1, params=(k2,)
        )
    assert abs(_f(t_e) - 1.0) < 1e-4


def test_compiled_the_event_and_its_gradient_are_the_eager_ones() -> None:
    # compile=True compiles the second pass (the search is eager): same event time and
    # gradient as the eager solve to round-off.
    class Decay(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = nn.Parameter(torch.tensor(0.7, dtype=D))

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -self.k * y

    decay = Decay()
    out = []
    for compiled in (False, True):
        y0 = torch.tensor([1.3], dtype=D, requires_grad=True)
        t_e, _ = odeint_event(
            decay, y0, 0.0, event_fn=lambda t, y: y.sum() - 0.5, solver="rk4", step=1e-2,
            adjoint="adjoint", compile=compiled,
        )  # fmt: skip
        out.append((_f(t_e), *(_f(g) for g in torch.autograd.grad(t_e, [y0, decay.k]))))
    assert all(abs(a - b) < 1e-12 * abs(a) for a, b in zip(out[0], out[1])), out
    assert abs(out[0][1] - 1 / (0.7 * 1.3)) < 1e-7


def _rotation(w: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda t, y: torch.stack([w * y[1], -w * y[0]]) * (1.0 + 0.3 * torch.sin(t))


@pytest.mark.parametrize("mode", MODES)
def test_recorded_events_match_the_closed_form_and_finite_differences(mode: str) -> None:
    # terminal=False: every crossing up to t_end. Without the time factor, (sin, cos) crosses
    # zero at t0 + k pi / w; with it, the gradients of the events' times and states with
    # respect to w, t0 and y0 are checked against central differences of the whole search.
    w = torch.tensor(1.0, dtype=D, requires_grad=True)
    kw = {"solver": "rk4", "step": 0.01, "terminal": False, "t_end": 10.0}
    ts, sol = odeint_event(
        lambda t, y: torch.stack([w * y[1], -w * y[0]]), torch.tensor([0.0, 1.0], dtype=D),
        0.3, event_fn=lambda t, y: y[0], params=(w,), adjoint=mode, **kw,
    )  # fmt: skip
    # The zero at t0 is an event (torchdiffeq's rule), then k = 1, 2, 3.
    assert torch.allclose(ts.detach(), torch.tensor([0.3 + k * math.pi for k in range(4)], dtype=D))
    assert sol.shape == (6, 2) and float(sol[1:5, 0].detach().abs().max()) < 1e-9
    # The last row is the state at t_end: sin and cos of t_end - t0.
    assert torch.allclose(sol[5].detach(), torch.tensor([math.sin(9.7), math.cos(9.7)], dtype=D))
    (g,) = torch.autograd.grad(ts.sum(), w)
    assert abs(_f(g) + 6 * math.pi) < 1e-6

    # The exact modes at a coarse step (the gradient is that of the computed event times, each
    # a root of the discrete solution, and each event's steps start at the one before); the
    # continuous adjoint and the reversible scheme agree with it to their error, at a fine one.
    exact = mode in ("backprop", "checkpoint")
    coarse = {**kw, "step": 0.4 if exact else 0.01}

    def run(w: torch.Tensor, t0: torch.Tensor, y0: torch.Tensor, m: str):  # type: ignore[no-untyped-def]
        ts, sol = odeint_event(
            _rotation(w), y0, t0, event_fn=lambda t, y: y[0] - 0.2, params=(w,), adjoint=m,
            **coarse,
        )  # fmt: skip
        return ts.sum() + 0.5 * sol[1:, 1].sum()

    w = torch.tensor(1.3, dtype=D, requires_grad=True)
    t0 = torch.tensor(0.1, dtype=D, requires_grad=True)
    y0 = torch.tensor([0.5, 0.8], dtype=D, requires_grad=True)
    grads = torch.autograd.grad(run(w, t0, y0, mode), [w, t0, y0])
    tol = 1e-7 if exact else 1e-5
    inputs = [w, t0, y0]
    for which, (x, g) in enumerate(zip(inputs, grads)):
        for j in range(x.numel()):
            vals = []
            for s in (1.0, -1.0):
                moved = [v.detach().clone() for v in inputs]
                moved[which].view(-1)[j] += s * 1e-6
                with torch.no_grad():
                    vals.append(_f(run(*moved, "backprop")))
            fd = (vals[0] - vals[1]) / 2e-6
            assert abs(_f(g.reshape(-1)[j]) - fd) < tol * max(1.0, abs(fd)), (which, j, g, fd)


def test_recorded_events_respect_direction_and_may_be_none() -> None:
    rot = lambda t, y: torch.stack([y[1], -y[0]])  # noqa: E731
    y0 = torch.tensor([0.0, 1.0], dtype=D)
    kw = {"solver": "dopri5", "rtol": 1e-10, "atol": 1e-12, "params": (), "terminal": False}
    ts, sol = odeint_event(rot, y0, 0.0, event_fn=lambda t, y: y[0], direction=1, t_end=13.0, **kw)
    assert torch.allclose(ts, torch.tensor([2 * math.pi, 4 * math.pi], dtype=D), atol=1e-8)
    result = odeint_event(rot, y0, 0.0, event_fn=lambda t, y: y[0] - 2.0, t_end=13.0, **kw)
    ts, sol = result
    assert ts.shape == (0,) and sol.shape == (2, 2) and not result.fired
    assert torch.allclose(sol[1], torch.tensor([math.sin(13.0), math.cos(13.0)], dtype=D))
    with pytest.raises(ValueError, match="t_end"):
        odeint_event(rot, y0, 0.0, event_fn=lambda t, y: y[0], **kw)
    with pytest.raises(ValueError, match="t_end"):
        odeint_event(rot, y0, 0.0, event_fn=lambda t, y: y[0], t_end=-1.0, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_an_event_that_never_fires_ends_at_t_end_and_says_so(mode: str) -> None:
    # Terminal with t_end: the state at t_end and its gradient, odeint's over the same span in
    # the same mode.
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0], dtype=D, requires_grad=True)
    result = odeint_event(_decay(k), y0, 0.0, event_fn=lambda t, y: y.sum() + 1.0, t_end=2.0,
                          solver="rk4", step=0.1, params=(k,), adjoint=mode)  # fmt: skip
    t_e, sol = result
    assert not result.fired and _f(t_e) == 2.0
    ref = odeint(_decay(k), y0, torch.tensor([0.0, 2.0], dtype=D), solver="rk4", step=0.1,
                 params=(k,), adjoint=mode)  # fmt: skip
    assert torch.allclose(sol[1], ref[1], rtol=1e-12)
    g = torch.autograd.grad(sol[1].sum(), [y0, k])
    g_ref = torch.autograd.grad(ref[1].sum(), [y0, k])
    assert all(torch.allclose(a, b, rtol=1e-9) for a, b in zip(g, g_ref))
    fired = odeint_event(_decay(k), y0, 0.0, event_fn=lambda t, y: y.sum() - 0.5, t_end=2.0,
                         solver="rk4", step=0.1, params=(k,), adjoint=mode)  # fmt: skip
    assert fired.fired and abs(_f(fired[0]) - math.log(2.0) / 0.7) < 1e-6


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_without_a_gradient_the_search_alone_gives_the_same_event(layout: str) -> None:
    # Under no_grad there is no second pass: the search's own root and states, which the second
    # pass reproduces (to round-off) when a gradient is wanted; fewer evaluations.
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.3], dtype=D)
    kw = {"event_fn": lambda t, y: y.sum() - 0.5, "params": (k,), **LAYOUTS[layout]}
    counts = [NFECounter(), NFECounter()]
    t_g, sol_g = odeint_event(_decay(k), y0, 0.0, nfe=counts[0], **kw)
    with torch.no_grad():
        t_n, sol_n = odeint_event(_decay(k), y0, 0.0, nfe=counts[1], **kw)
        rec_n = odeint_event(_decay(k), y0, 0.0, terminal=False, t_end=3.0, **kw)
    rec_g = odeint_event(_decay(k), y0, 0.0, terminal=False, t_end=3.0, **kw)
    assert abs(_f(t_g) - _f(t_n)) < 1e-12 and torch.allclose(sol_g.detach(), sol_n, rtol=1e-11)
    assert torch.allclose(rec_g[1].detach(), rec_n[1], rtol=1e-11)
    assert counts[1].forward < counts[0].forward


@pytest.mark.parametrize("mode", MODES)
def test_an_event_that_never_fires_costs_one_pass(mode: str) -> None:
    # Fixed steps to t_end with a gradient: the steps are taken once, in the gradient mode,
    # the condition checked between them (20 steps of rk4: 80 evaluations, no search).
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    nfe = NFECounter()
    odeint_event(_decay(k), torch.tensor([1.0], dtype=D), 0.0, event_fn=lambda t, y: y.sum() + 1,
                 t_end=2.0, solver="rk4", step=0.1, params=(k,), adjoint=mode, nfe=nfe)  # fmt: skip
    stages = 4 * (2 if mode == "reversible" else 1)  # the coupled step evaluates twice
    assert nfe.forward == 20 * stages


def _bouncing_chain(mode: str, one_pass: bool, monkeypatch: pytest.MonkeyPatch) -> list:
    """Recorded crossings of a damped oscillator (and a terminal one with t_end), their
    gradients, with or without the one-pass start."""
    from torchode_adjoint import _events

    monkeypatch.setattr(_events.Segment, "one_pass", one_pass)
    w = torch.tensor(3.0, dtype=D, requires_grad=True)
    c = torch.tensor(0.2, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0, 0.0], dtype=D, requires_grad=True)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], -w * w * y[0] - 0.3 * y[1]])

    kw = {"solver": "rk4", "step": 0.05, "adjoint": mode, "params": (w,)}
    out = []
    # The first crossing (t = 0.569) early, in the last step (t_end = 0.58), and all of them.
    for terminal, t_end in ((True, 2.5), (True, 0.58), (False, 2.5)):
        t_e, sol = odeint_event(f, y0, 0.1, event_fn=lambda t, y: y[0] - c, terminal=terminal,
                                t_end=t_end, **kw)  # fmt: skip
        loss = t_e.sum() + sol[-1].square().sum()
        out += [t_e.detach(), sol.detach(), *torch.autograd.grad(loss, [w, c, y0])]
    return out


@pytest.mark.parametrize("mode", MODES)
def test_an_event_found_by_the_one_pass_start_is_the_searchs(mode, monkeypatch) -> None:
    # The one-pass start stops at the step the condition crossed in and the search goes on from
    # there: the same events, states and gradients as searching from the start. The root is
    # located from the mode's own state at that step: the reversible scheme's differs from the
    # plain method's by its truncation error (about 1e-8 here), and the gradient taken at the
    # root moves with it; the other modes' states are the plain method's.
    first = _bouncing_chain(mode, True, monkeypatch)
    search = _bouncing_chain(mode, False, monkeypatch)
    assert float(first[5]) == float(first[0]) < 0.58 and len(first[10]) == 2  # crossings
    rtol = 1e-6 if mode == "reversible" else 1e-10
    for a, b in zip(first, search):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)


def test_dynamics_with_step_callbacks_are_not_called_by_the_one_pass_start(monkeypatch) -> None:
    # The one-pass start is skipped where the dynamics have callbacks (they would be called for
    # the steps up to the event twice): the calls are those of searching first.
    from torchode_adjoint import _events

    seen: list[float] = []

    class F(nn.Module):
        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -0.7 * y

        def callback_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
            seen.append(round(float(t0.detach()), 9))

    y0 = torch.tensor([1.0], dtype=D, requires_grad=True)
    calls = []
    for one_pass in (True, False):
        monkeypatch.setattr(_events.Segment, "one_pass", one_pass)
        seen.clear()
        odeint_event(F(), y0, 0.0, event_fn=lambda t, y: y.sum() - 0.5, t_end=3.0,
                     solver="rk4", step=0.1)  # fmt: skip
        calls.append(list(seen))
    assert calls[0] == calls[1] and len(calls[0]) >= 10


@pytest.mark.parametrize(("window", "more"), [(1, 4), (8, 32)])
def test_where_the_event_fires_the_one_pass_start_costs_the_window_again(
    window: int, more: int, monkeypatch
) -> None:
    # x' = -0.7 x from 1 to 0.5 at t = 0.99 (rk4, step 0.1; the crossing in the tenth step).
    # Signs read after every step: the stopped pass takes the ten steps searching first would,
    # then the search takes the tenth again (4 evaluations more). Read every 8 steps: the pass
    # stops after 16 steps, the search goes on from the ninth step's start (steps 9 and 10
    # again): 64 + 8 - 40 = 32 more. The root is then located as it would have been.
    from torchode_adjoint import _events

    monkeypatch.setattr(_events._Watch, "WINDOW", window)
    counts = []
    for one_pass in (True, False):
        monkeypatch.setattr(_events.Segment, "one_pass", one_pass)
        nfe = NFECounter()
        k = torch.tensor(0.7, dtype=D, requires_grad=True)
        odeint_event(_decay(k), torch.tensor([1.0], dtype=D), 0.0, params=(k,), nfe=nfe,
                     event_fn=lambda t, y: y.sum() - 0.5, t_end=3.0, solver="rk4",
                     step=0.1)  # fmt: skip
        counts.append(nfe.forward)
    assert counts[0] == counts[1] + more


@pytest.mark.parametrize("step", [0.05, 0.1904])
@pytest.mark.parametrize("mode", MODES)
def test_the_one_pass_start_watches_a_condition_zero_at_t0_from_its_first_sign(
    mode, step, monkeypatch
) -> None:
    # sin t from t0 = 0 with direction -1: watched from its first nonzero sign (+), it fires
    # downwards at pi; the one-pass start finds it as the search does (with step 0.1904 in the
    # first step of a window of 8, where the search goes on with the signs there).
    from torchode_adjoint import _events

    w = torch.tensor(1.0, dtype=D, requires_grad=True)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([w * y[1], -w * y[0]])

    found = []
    for one_pass in (True, False):
        monkeypatch.setattr(_events.Segment, "one_pass", one_pass)
        t_e, _ = odeint_event(f, torch.tensor([0.0, 1.0], dtype=D), 0.0, params=(w,),
                              event_fn=lambda t, y: y[0], direction=-1, t_end=4.0,
                              solver="rk4", step=step, adjoint=mode)  # fmt: skip
        found.append((float(t_e.detach()), float(torch.autograd.grad(t_e, w)[0])))
    assert abs(found[0][0] - math.pi) < 1e-3 and abs(found[1][0] - math.pi) < 1e-3
    assert found[0] == pytest.approx(found[1], rel=1e-6 if mode == "reversible" else 1e-10)


def test_the_root_finder_closes_its_bracket_where_the_secant_lands_on_the_root() -> None:
    # v' = -9.81 from v = 1 under Euler: the condition v + 3 is linear along the partial step,
    # so the first secant lands on the root to rounding (t = 4 / 9.81 after t0); the next point
    # must fall on its other side and close the bracket, not bisect from there (which took 45
    # more evaluations).
    calls: list[float] = []

    def condition(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(float(t))
        return y[1] + 3.0

    with torch.no_grad():
        t_e, _ = odeint_event(lambda t, y: torch.stack([y[1], -9.81 + 0 * y[1]]),
                              torch.tensor([2.0, 1.0], dtype=D), 0.1, event_fn=condition,
                              solver="euler", step=0.05, adjoint=False)  # fmt: skip
    assert abs(_f(t_e) - (0.1 + 4 / 9.81)) < 1e-14
    steps = math.ceil((4 / 9.81) / 0.05)
    # t0, each step's end, the root finder's (both ends, the secant, one past it), the signs
    # after the event.
    assert len(calls) <= 1 + steps + 4 + 1, len(calls)


@pytest.mark.parametrize("mode", MODES)
def test_a_structured_state_is_solved_as_its_flat_vector(mode: str) -> None:
    # A ball as a dict {"x": height, "v": velocity (1,)}: the event time, the state and the
    # gradients are the closed form's and those of the same ball as one tensor.
    g = torch.tensor(9.81, dtype=D, requires_grad=True)
    x0 = torch.tensor(2.0, dtype=D, requires_grad=True)
    kw = {"solver": "rk4", "step": 0.01, "adjoint": mode, "params": (g,)}
    y0 = {"x": x0, "v": torch.tensor([1.0], dtype=D)}
    t_s, sol = odeint_event(lambda t, y: {"x": y["v"][0], "v": -g * torch.ones(1, dtype=D)}, y0,
                            0.0, event_fn=lambda t, y: y["x"], **kw)  # fmt: skip
    assert set(sol) == {"x", "v"} and sol["x"].shape == (2,) and sol["v"].shape == (2, 1)
    flat0 = torch.stack([x0, torch.tensor(1.0, dtype=D)])
    t_f, sol_f = odeint_event(lambda t, y: torch.stack([y[1], -g]), flat0, 0.0,
                              event_fn=lambda t, y: y[0], **kw)  # fmt: skip
    exact = (1 + math.sqrt(1 + 4 * 9.81)) / 9.81
    assert abs(_f(t_s) - exact) < 1e-12 and abs(_f(t_s) - _f(t_f)) < 1e-14
    grads = torch.autograd.grad(t_s + sol["v"][1, 0], [g, x0])
    grads_f = torch.autograd.grad(t_f + sol_f[1, 1], [g, x0], retain_graph=True)
    for a, b in zip(grads, grads_f):
        assert abs(_f(a) - _f(b)) < 1e-12
    assert abs(_f(torch.autograd.grad(t_f, x0)[0]) - 1 / (9.81 * exact - 1)) < 1e-10


def test_a_structured_state_names_what_is_wrong_and_needs_params_where_odeint_does() -> None:
    k = torch.tensor(0.5, dtype=D, requires_grad=True)
    with pytest.raises(TypeError, match=r"y0\[1\]"):
        odeint_event(lambda t, y: y, (torch.ones(1, dtype=D), 1.0), 0.0,
                     event_fn=lambda t, y: y[0])  # fmt: skip
    with pytest.raises(ValueError, match="`params` is required"):
        odeint_event(lambda t, y: (-k * y[0],), (torch.ones(1, dtype=D),), 0.0,
                     event_fn=lambda t, y: y[0] - 0.5, adjoint="adjoint")  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_an_error_controlled_event_that_never_fires_costs_odeints_solve(mode: str) -> None:
    # dopri5 to t_end with a condition that stays positive: odeint's own solve (its steps, its
    # evaluations, its values and gradients), the condition checked after each accepted step.
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0, -0.4], dtype=D, requires_grad=True)
    kw = {"solver": "dopri5", "rtol": 1e-8, "atol": 1e-10, "params": (k,), "adjoint": mode}
    counts = [NFECounter(), NFECounter()]
    result = odeint_event(_decay(k), y0, 0.0, event_fn=lambda t, y: y.sum() + 2.0, t_end=2.0,
                          nfe=counts[0], **kw)  # fmt: skip
    ref = odeint(_decay(k), y0, torch.tensor([0.0, 2.0], dtype=D), nfe=counts[1], **kw)
    assert not result.fired and counts[0].forward == counts[1].forward > 0
    torch.testing.assert_close(result[1][1], ref[1], rtol=1e-13, atol=1e-13)
    g = torch.autograd.grad(result[1][1].sum(), [y0, k])
    g_ref = torch.autograd.grad(ref[1].sum(), [y0, k])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_an_error_controlled_event_found_by_the_one_pass_start_is_the_searchs(
    mode, monkeypatch
) -> None:
    # The pass stops at the read after the crossing, and the search goes on from its window's
    # start with a first step of its own: the steps from there differ from searching first, so
    # the event agrees to the tolerance (rtol 1e-10), not to round-off.
    from torchode_adjoint import _events

    w = torch.tensor(3.0, dtype=D, requires_grad=True)
    c = torch.tensor(0.2, dtype=D, requires_grad=True)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], -w * w * y[0] - 0.3 * y[1]])

    found = []
    for one_pass in (True, False):
        monkeypatch.setattr(_events.Segment, "one_pass", one_pass)
        y0 = torch.tensor([1.0, 0.0], dtype=D, requires_grad=True)
        t_e, sol = odeint_event(f, y0, 0.1, event_fn=lambda t, y: y[0] - c, terminal=False,
                                t_end=2.5, solver="dopri5", rtol=1e-10, atol=1e-12,
                                adjoint=mode, params=(w,))  # fmt: skip
        loss = t_e.sum() + sol[-1].square().sum()
        found.append([t_e.detach(), sol.detach(), *torch.autograd.grad(loss, [w, c, y0])])
    assert len(found[0][0]) == 2
    for a, b in zip(*found):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8)


def test_an_error_controlled_event_is_differentiated_on_the_steps_the_pass_accepted(
    monkeypatch,
) -> None:
    # With a window of one step: the step ends handed to the pass that differentiates the event
    # are the accepted ends of odeint's own solve (a sharp forcing makes it reject steps too,
    # which must not count) up to the step the condition crossed in, then the search's.
    from torchode_adjoint import _events

    monkeypatch.setattr(_events._Watch, "WINDOW", 1)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        push = 30.0 * torch.tanh(40.0 * (t - 0.3))
        return torch.stack([y[1], -9.0 * y[0] - 0.3 * y[1] + push])

    class Recorded(nn.Module):
        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return f(t, y)

        def callback_accept_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: object) -> None:
            starts.append((float(t0.detach()), float(y0[0].detach())))

    starts: list[tuple[float, float]] = []
    kw = {"solver": "dopri5", "rtol": 1e-6, "atol": 1e-8, "params": ()}
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    nfe = NFECounter()
    odeint(Recorded(), y0, torch.tensor([0.0, 3.0], dtype=D), nfe=nfe, adjoint=False, **kw)
    assert nfe.rejected > 0
    level = 2.0
    crossing = next(i for i, (_, x) in enumerate(starts) if x > level) - 1  # the step it is in
    handed: list[list[float]] = []
    spied = _events._differentiable_event

    def spy(seg, y_cur, t_cur, t_start, ends, *rest):  # type: ignore[no-untyped-def]
        handed.append(list(ends))
        return spied(seg, y_cur, t_cur, t_start, ends, *rest)

    monkeypatch.setattr(_events, "_differentiable_event", spy)
    t_e, _ = odeint_event(f, y0.clone().requires_grad_(), 0.0, event_fn=lambda t, y: y[0] - level,
                          t_end=3.0, adjoint="backprop", **kw)  # fmt: skip
    accepted = [t for t, _ in starts[1 : crossing + 1]]
    assert handed[0][: len(accepted)] == accepted
    assert all(e > accepted[-1] for e in handed[0][len(accepted) :])
    assert starts[crossing][0] < float(t_e.detach()) <= starts[crossing + 1][0]
