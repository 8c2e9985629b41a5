"""Error-controlled steps: embedded pairs as data, the controller, and the gradient modes that
pair with them, against exact solutions, analytic gradients and torchdiffeq."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from torch import nn

from torchode_adjoint import (
    ButcherTableau,
    Checkpoint,
    ContinuousAdjoint,
    NFECounter,
    ODEBlock,
    available_solvers,
    get_solver,
    odeint,
)
from torchode_adjoint.solvers.protocol import MethodBase

D = torch.float64
PAIRS = [n for n in available_solvers() if get_solver(n).adaptive]
_A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=D)


def _linear(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y @ _A


def _exact(y0: torch.Tensor, times: list[float]) -> torch.Tensor:
    return torch.stack([y0 @ torch.linalg.matrix_exp(_A * s) for s in times])


def test_the_built_in_pairs_are_registered() -> None:
    assert set(PAIRS) == {"adaptive_heun", "fehlberg2", "bosh3", "dopri5", "tsit5", "dopri8"}
    assert get_solver("dopri5").fsal and get_solver("tsit5").fsal and get_solver("bosh3").fsal
    assert not get_solver("fehlberg2").fsal


def test_embedded_weights_are_checked_against_their_order() -> None:
    heun = dict(c=[0.0, 1.0], a=[[0.0, 0.0], [1.0, 0.0]], b=[0.5, 0.5], order=2)
    ButcherTableau(**heun, b_embedded=[1.0, 0.0], embedded_order=1)  # Heun--Euler: valid
    with pytest.raises(ValueError, match="`embedded_order=1` is not what `b_embedded` gives"):
        ButcherTableau(**heun, b_embedded=[0.9, 0.0], embedded_order=1)
    with pytest.raises(ValueError, match="`embedded_order` must be an int from 1 to order - 1"):
        ButcherTableau(**heun, b_embedded=[1.0, 0.0], embedded_order=2)
    with pytest.raises(ValueError, match="needs `b_embedded`"):
        ButcherTableau(**heun, embedded_order=1)
    with pytest.raises(ValueError, match="`b_embedded` equals `b`"):
        ButcherTableau(**heun, b_embedded=[0.5, 0.5], embedded_order=1)
    with pytest.raises(ValueError, match="`b_embedded` must have one weight per stage"):
        ButcherTableau(**heun, b_embedded=[1.0], embedded_order=1)


@pytest.mark.parametrize("solver", PAIRS)
def test_the_error_falls_with_the_tolerance_at_every_output_time(solver: str) -> None:
    y0 = torch.tensor([[1.0, 0.5]], dtype=D)
    times = [0.0, 0.7, 2.5, 5.0]
    exact = _exact(y0, times)
    errors = []
    for tol in (1e-4, 1e-6, 1e-8):
        sol = odeint(
            _linear, y0, torch.tensor(times, dtype=D), solver=solver, rtol=tol, atol=tol, params=()
        )
        err = float((sol - exact).abs().max())
        # The local error per step is held below tol; the global error stays within a small
        # multiple of it (the problem neither grows nor is stiff).
        # (fehlberg2's weights differ by 1/512: its estimate, of the first-order solution's
        # error, is far below the propagated second-order solution's error.)
        assert err < (2000 if solver == "fehlberg2" else 50) * tol, (tol, err)
        errors.append(err)
    assert errors[2] < errors[1] < errors[0]


@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "tsit5"])
def test_evaluations_are_counted_as_steps_times_new_stages(solver: str) -> None:
    # First same as last: f(t0, y0) once, one evaluation of Hairer's first step, then
    # stages - 1 new evaluations per step tried (accepted or not).
    nfe = NFECounter()
    odeint(_linear, torch.ones(1, 2, dtype=D), torch.tensor([0.0, 3.0], dtype=D), solver=solver,
           rtol=1e-6, atol=1e-6, adjoint=False, nfe=nfe)  # fmt: skip
    stages = get_solver(solver).stages
    assert nfe.accepted > 5
    assert nfe.forward == 2 + (stages - 1) * (nfe.accepted + nfe.rejected)


def test_steps_end_on_every_output_time() -> None:
    seen: list[float] = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(float(t))
        return _linear(t, y)

    times = [0.0, 0.3, 1.7, 2.0]
    odeint(f, torch.ones(1, 2, dtype=D), torch.tensor(times, dtype=D), solver="dopri5",
           rtol=1e-5, atol=1e-5, adjoint=False, dense_output=False)  # fmt: skip
    for s in times[1:]:  # a step ends there: its last stage (c = 1) is evaluated at it
        assert s in seen, s
    seen.clear()
    odeint(f, torch.ones(1, 2, dtype=D), torch.tensor(times, dtype=D), solver="dopri5",
           rtol=1e-5, atol=1e-5, adjoint=False)  # fmt: skip
    assert 0.3 not in seen and 1.7 not in seen  # interpolated: no step ends there


@pytest.mark.parametrize(
    ("solver", "order"),
    [("dopri5", 4), ("tsit5", 4), ("bosh3", 3), ("fehlberg2", 2), ("adaptive_heun", 2)],
)
def test_each_pairs_interpolant_has_its_order_between_steps(solver: str, order: int) -> None:
    # One step of size h from 0, the solution read at theta = 0.37 of it: the interpolant's
    # error falls like h**(order + 1) (the local order of an interpolant of that order).
    tab = get_solver(solver)
    from torchode_adjoint.solvers.runge_kutta import RungeKutta

    method = RungeKutta(tab, estimate=True)
    y0 = torch.tensor([[1.0, 0.5]], dtype=D)
    errors = []
    for h in (0.4, 0.2):
        ts = tuple(torch.tensor([c * h for c in tab.c], dtype=D).unbind(0))
        carry = method.init(_linear, y0, ts[0])
        _, _, ks = method.step(_linear, carry, h, ts)
        y_mid = method.interpolate(carry, h, ks, 0.37)
        errors.append(float((y_mid - _exact(y0, [0.37 * h])[0]).abs().max()))
    assert math.log2(errors[0] / errors[1]) > order + 0.6, errors


def test_dense_output_takes_fewer_steps_with_many_output_times() -> None:
    times = torch.linspace(0.0, 5.0, 51, dtype=D)
    counts = []
    for dense in (True, False):
        nfe = NFECounter()
        sol = odeint(_linear, torch.ones(1, 2, dtype=D), times, solver="dopri5", rtol=1e-6,
                     atol=1e-6, adjoint=False, nfe=nfe, dense_output=dense)  # fmt: skip
        exact = _exact(torch.ones(1, 2, dtype=D), times.tolist())
        assert float((sol - exact).abs().max()) < 50e-6
        counts.append(nfe.accepted)
    assert counts[0] < counts[1] / 2, counts


def test_a_decreasing_time_grid_integrates_backwards() -> None:
    y0 = torch.tensor([[1.0, 0.5]], dtype=D)
    sol = odeint(_linear, y0, torch.tensor([2.0, 1.0, 0.0], dtype=D), solver="tsit5",
                 rtol=1e-9, atol=1e-9, params=())  # fmt: skip
    exact = _exact(y0, [0.0, -1.0, -2.0])
    assert float((sol - exact).abs().max()) < 1e-7


def _forced(a: torch.Tensor) -> object:
    """``dy/dt = y A + sin(2t) y J``: linear in ``A``, and time-dependent, so that stage times
    matter."""
    j = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=D)
    return lambda t, y: y @ a + torch.sin(2 * t) * (y @ j)


def _loss_and_grads(mode: object, **solve: object) -> tuple[torch.Tensor, ...]:
    """dL/dy0, dL/dA and dL/dt of L = sum of w . y at two output times, from one solve."""
    a = nn.Parameter(_A.clone())
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 1.5, 3.0], dtype=D, requires_grad=True)
    sol = odeint(_forced(a), y0, t, adjoint=mode, params=[a], **solve)  # type: ignore[arg-type]
    w = torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=D)
    loss = (sol[-1] * w).sum() + (sol[1] * w.flip(0)).sum()
    return torch.autograd.grad(loss, [y0, a, t])


@functools.lru_cache(maxsize=1)
def _reference_grads() -> tuple[torch.Tensor, ...]:
    """Backprop through 6,000 fixed rk4 steps (another code path; its own error is below 1e-12
    here); computed once."""
    return _loss_and_grads("backprop", solver="rk4", step=5e-4)


@pytest.mark.parametrize("mode", ["backprop", "adjoint", "checkpoint", "reversible"])
def test_gradients_approach_a_fine_fixed_step_reference_as_the_tolerance_shrinks(mode: str) -> None:
    # The reference: backprop through 6,000 fixed rk4 steps (another code path; its own error
    # is below 1e-12 here).
    reference = _reference_grads()
    errors = []
    for tol in (1e-4, 1e-6, 1e-8):
        grads = _loss_and_grads(mode, solver="dopri5", rtol=tol, atol=tol)
        err = max(float((g - r).abs().max()) for g, r in zip(grads, reference))
        assert err < 200 * tol, (tol, err)
        errors.append(err)
    assert errors[2] < errors[1] < errors[0], errors


def test_the_adjoint_controls_its_own_backward_steps_with_its_own_tolerances() -> None:
    f = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    y0 = torch.randn(8, 3, dtype=D, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 2.0], dtype=D)

    def backward_counts(adjoint: object) -> NFECounter:
        nfe = NFECounter()
        odeint(lambda s, y: f(y), y0, t, solver="dopri5", rtol=1e-6, atol=1e-6,
               adjoint=adjoint, nfe=nfe, params=list(f.parameters())).sum().backward()  # fmt: skip
        return nfe

    same = backward_counts("adjoint")
    assert same.backward_accepted > 0 and same.backward > 0
    looser = backward_counts(ContinuousAdjoint(rtol=1e-3, atol=1e-3))
    assert looser.backward_accepted < same.backward_accepted
    assert looser.accepted == same.accepted  # the forward pass is the same


def test_the_reversed_gradient_of_the_output_times_matches_the_exact_one() -> None:
    # dL/dT of L = sum(y(T)) is sum(f(T, y(T))); dL/dt0 = -a(t0) . f(t0, y0).
    y0 = torch.tensor([[1.0, 0.5]], dtype=D)
    for mode in ("backprop", "adjoint"):
        t = torch.tensor([0.0, 2.0], dtype=D, requires_grad=True)
        sol = odeint(_linear, y0, t, solver="dopri5", rtol=1e-9, atol=1e-9, adjoint=mode, params=())
        (g_t,) = torch.autograd.grad(sol[-1].sum(), [t])
        y_end = _exact(y0, [2.0])[0]
        expected_end = float(_linear(None, y_end).sum())  # type: ignore[arg-type]
        assert abs(float(g_t[1]) - expected_end) < 1e-6, mode
        a0 = torch.ones(1, 2, dtype=D) @ torch.linalg.matrix_exp(_A * 2.0).T
        expected_start = -float((a0 * _linear(None, y0)).sum())  # type: ignore[arg-type]
        assert abs(float(g_t[0]) - expected_start) < 1e-6, mode


def test_a_block_takes_tolerances_and_counts_its_steps() -> None:
    f = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))

    class Dyn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = f

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.f(y)

    block = ODEBlock(Dyn(), solver="dopri5", rtol=1e-4, atol=1e-5)
    out = block(torch.randn(4, 3))
    out.sum().backward()
    assert block.nfe_forward > 0 and block.nfe_backward > 0
    assert block.stats.accepted > 0 and block.stats.backward_accepted > 0
    assert block.stats.forward == block.nfe_forward
    assert all(p.grad is not None for p in f.parameters())


def test_a_structured_state_takes_tolerances() -> None:
    def f(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x, v = state
        return v, -x

    x0, v0 = torch.ones(3, dtype=D), torch.zeros(3, dtype=D)
    x, v = odeint(f, (x0, v0), torch.tensor([0.0, 1.0], dtype=D), solver="dopri5", rtol=1e-9,
                  atol=1e-9, params=())  # fmt: skip
    assert torch.allclose(x[-1], torch.full((3,), math.cos(1.0), dtype=D), atol=1e-7)
    assert torch.allclose(v[-1], torch.full((3,), -math.sin(1.0), dtype=D), atol=1e-7)


def test_the_norm_of_a_structured_state_is_the_largest_parts_rms() -> None:
    from torchode_adjoint.controllers.error import ErrorControl, error_ratio

    g = torch.Generator().manual_seed(1)
    e, y0, y1 = (torch.randn(4, 7, generator=g, dtype=D) for _ in range(3))
    parts = ((0, 5), (5, 2))
    control = ErrorControl(rtol=(1e-3, 1e-6), atol=(1e-4, 1e-8), parts=parts)
    # Written out: per part, sqrt(mean((e / (atol + rtol * max(|y0|, |y1|)))^2)); the largest.
    expected = 0.0
    for (o, n), r, a in zip(parts, (1e-3, 1e-6), (1e-4, 1e-8)):
        big = torch.maximum(y0[:, o : o + n].abs(), y1[:, o : o + n].abs())
        rms = math.sqrt(float(((e[:, o : o + n] / (a + r * big)) ** 2).mean()))
        expected = max(expected, rms)
    assert math.isclose(float(error_ratio([e], [y0], [y1], control)), expected, rel_tol=1e-12)


def _fast_corner(t: torch.Tensor, s: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A slow part of 400 elements beside a fast one of 1: a norm over all 401 elements would
    let the fast part's error through, diluted 400 to 1."""
    x, c = s
    return -0.1 * x, torch.cos(8.0 * t) * 8.0 * torch.ones_like(c)


def test_each_part_of_a_structured_state_meets_the_tolerance() -> None:
    x0, c0 = torch.ones(400, dtype=D), torch.zeros(1, dtype=D)
    t = torch.tensor([0.0, 3.0], dtype=D)
    kw = dict(solver="dopri5", rtol=1e-5, atol=1e-5, params=())
    _, c = odeint(_fast_corner, (x0, c0), t, **kw)  # type: ignore[arg-type]
    err_parts = abs(float(c[-1, 0]) - math.sin(24.0))
    # The same system as one tensor: one RMS over all 401 elements.
    flat = odeint(lambda s, y: torch.cat(_fast_corner(s, (y[:400], y[400:]))),
                  torch.cat([x0, c0]), t, **kw)  # type: ignore[arg-type]  # fmt: skip
    err_flat = abs(float(flat[-1, 400]) - math.sin(24.0))
    assert err_parts < 1e-4, err_parts
    assert err_parts * 10 < err_flat, (err_parts, err_flat)


def test_tolerances_given_per_part_apply_to_their_part() -> None:
    x0, c0 = torch.ones(400, dtype=D), torch.zeros(1, dtype=D)
    t = torch.tensor([0.0, 3.0], dtype=D)

    def fast_error(rtol: object, atol: object) -> tuple[float, int]:
        nfe = NFECounter()
        x, c = odeint(_fast_corner, (x0, c0), t, solver="dopri5", rtol=rtol, atol=atol,
                      params=(), nfe=nfe)  # type: ignore[arg-type]  # fmt: skip
        return abs(float(c[-1, 0]) - math.sin(24.0)), nfe.accepted

    loose, loose_steps = fast_error(1e-3, 1e-3)
    tight, tight_steps = fast_error((1e-3, 1e-8), [1e-3, 1e-8])
    assert tight < loose / 100 and tight_steps > loose_steps, (tight, loose)
    # A dict state takes a dict of tolerances, by key.
    out = odeint(lambda s, y: dict(zip(("x", "c"), _fast_corner(s, (y["x"], y["c"])))),
                 {"c": c0, "x": x0}, t, solver="dopri5", rtol={"x": 1e-3, "c": 1e-8},
                 atol={"c": 1e-8, "x": 1e-3}, params=())  # fmt: skip
    assert abs(float(out["c"][-1, 0]) - math.sin(24.0)) <= 2 * tight


def test_tolerances_per_part_must_match_the_state() -> None:
    y0 = (torch.ones(2, dtype=D), torch.zeros(1, dtype=D))
    with pytest.raises(ValueError, match=r"`rtol` must be a tuple of 2 parts.*got length 3"):
        odeint(_fast_corner, y0, [0.0, 1.0], solver="dopri5", rtol=(1e-3, 1e-3, 1e-3), params=())
    with pytest.raises(ValueError, match=r"`atol` is given per part .* `y0` is one tensor"):
        odeint(
            _linear, torch.ones(1, 2, dtype=D), [0.0, 1.0], solver="dopri5", atol=(1e-3,), params=()
        )
    with pytest.raises(ValueError, match=r"`atol\[1\]` must be a positive finite number"):
        odeint(_fast_corner, y0, [0.0, 1.0], solver="dopri5", atol=(1e-3, -1.0), params=())


def test_the_adjoints_full_norm_measures_the_gradients_errors_too() -> None:
    from torchode_adjoint.modes.adjoint import AugmentedMethod

    f = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    params = list(f.parameters())
    y0 = torch.randn(8, 3, dtype=D, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 2.0], dtype=D)

    def run(adjoint: object) -> tuple[NFECounter, list[torch.Tensor]]:
        nfe = NFECounter()
        y = odeint(lambda s, y: f(y), y0, t, solver="dopri5", rtol=1e-6, atol=1e-8,
                   adjoint=adjoint, nfe=nfe, params=params)  # fmt: skip
        return nfe, list(torch.autograd.grad(y[-1].square().sum(), params))

    semi, g_semi = run("adjoint")
    full, g_full = run(ContinuousAdjoint(norm="full"))
    assert full.accepted == semi.accepted and full.backward_accepted > semi.backward_accepted
    ref = odeint(lambda s, y: f(y), y0, t, solver="dopri5", rtol=1e-11, atol=1e-13,
                 adjoint=False, params=params)  # fmt: skip
    g_ref = torch.autograd.grad(ref[-1].square().sum(), params)
    for g in (g_semi, g_full):
        assert max(float((a - b).abs().max()) for a, b in zip(g, g_ref)) < 1e-5
    with pytest.raises(ValueError, match=r"`ContinuousAdjoint\(norm=...\)` must be 'seminorm'"):
        ContinuousAdjoint(norm="mixed")

    # The gradients' error estimate is the difference of the two weightings of one step: the
    # parameter increment with `b` less the one with `b_embedded` (each from its own method).
    from torchode_adjoint._dynamics import Dynamics
    from torchode_adjoint.modes.adjoint import AdjointProducts

    tab = get_solver("dopri5")
    low = ButcherTableau(a=tab.a, b=tab.b_embedded, c=tab.c, order=tab.embedded_order,
                         name="dopri5-embedded")  # fmt: skip
    timed = Dynamics(lambda s, y: f(y) * torch.cos(s))  # a time product that is not zero
    products = AdjointProducts(timed, tuple(params), True, None)
    y, a = y0.clone(), torch.randn(8, 3, dtype=D, generator=torch.Generator().manual_seed(2))

    def carry() -> tuple[torch.Tensor, ...]:  # a fresh one: steps accumulate in place
        return (y, a, torch.zeros((), dtype=D), *(torch.zeros_like(p) for p in params))

    ts = tuple(torch.tensor(2.0 - 0.3 * c, dtype=D) for c in tab.c)
    _, error, _ = AugmentedMethod(tab, True, True).step(products, carry(), 0.3, ts)
    high, _, _ = AugmentedMethod(tab).step(products, carry(), 0.3, ts)
    lower, _, _ = AugmentedMethod(low).step(products, carry(), 0.3, ts)
    assert len(error) == 2 + 1 + len(params)
    for e, hi, lo in zip(error[2:], high[2:], lower[2:]):
        assert torch.allclose(e, hi - lo, atol=1e-14), (e - (hi - lo)).abs().max()


def _kink_at_one(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dy/dt = max(t - 1, 0): y(2) = y(0) + 1/2, a polynomial on each side of t = 1."""
    return torch.clamp(t - 1.0, min=0.0) * torch.ones_like(y)


def _jump_at_one(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dy/dt = 1 after t = 1, 0 before and at it: y(2) = y(0) + 1."""
    return torch.where(t > 1.0, torch.ones_like(y), torch.zeros_like(y))


def _solve_counting(
    func: object, exact: float, dense: bool, **extra: object
) -> tuple[float, int, list[float]]:
    """The end error, the steps tried, and the times the dynamics were evaluated at."""
    seen: list[float] = []

    def wrapped(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(float(t))
        return func(t, y)  # type: ignore[operator]

    nfe = NFECounter()
    y = odeint(wrapped, torch.zeros(1, dtype=D), torch.tensor([0.0, 0.7, 2.0], dtype=D),
               solver="dopri5", rtol=1e-8, atol=1e-8, adjoint=False, dense_output=dense,
               nfe=nfe, params=(), **extra)  # type: ignore[arg-type]  # fmt: skip
    assert y.shape == (3, 1)  # a stop time is not an output
    return abs(float(y[-1, 0]) - exact), nfe.accepted + nfe.rejected, seen


@pytest.mark.parametrize("dense", [True, False])
def test_steps_end_on_step_t(dense: bool) -> None:
    err_none, tried_none, seen_none = _solve_counting(_kink_at_one, 0.5, dense)
    err, tried, seen = _solve_counting(_kink_at_one, 0.5, dense, step_t=[1.0])
    assert 1.0 in seen and 1.0 not in seen_none  # a step ended there: its last stage is at 1.0
    # dopri5 integrates each polynomial piece exactly: stepping to the kink leaves round-off.
    assert err < 1e-13 and tried < tried_none, (err, tried, err_none, tried_none)


def _jump_at_one_from_the_right(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dy/dt = 1 at and after t = 1, 0 before: y(2) = y(0) + 1."""
    return torch.where(t >= 1.0, torch.ones_like(y), torch.zeros_like(y))


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("func", [_jump_at_one, _jump_at_one_from_the_right])
def test_jump_t_evaluates_each_side_of_a_jump_on_its_own_side(dense: bool, func: object) -> None:
    err_step, tried_step, seen_step = _solve_counting(func, 1.0, dense, step_t=[1.0])
    err, tried, seen = _solve_counting(func, 1.0, dense, jump_t=[1.0])
    one, two, zero = (torch.tensor(v, dtype=D) for v in (1.0, 2.0, 0.0))
    after, before = float(torch.nextafter(one, two)), float(torch.nextafter(one, zero))
    # The step ending on the jump evaluates its last stage just before it, the next step
    # (and a first-same-as-last pair's carried derivative) just after it; never at 1.0.
    assert after in seen and before in seen and 1.0 not in seen
    assert 1.0 in seen_step
    # With step_t alone one stage of a step sees the other side's dynamics: an error the
    # controller must shrink steps to contain.
    assert err < 1e-13 and tried < tried_step and err < err_step, (err, tried, err_step, tried_step)


def test_the_adjoints_backward_pass_takes_the_jumps_too() -> None:
    y0 = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    counts = []
    for extra in ({"step_t": [0.5]}, {"jump_t": [0.5]}):
        nfe = NFECounter()
        ys = odeint(lambda t, x: -0.5 * x if t < 0.5 else x**2, y0, [0.0, 1.0], solver="dopri5",
                    rtol=1e-8, atol=1e-8, nfe=nfe, params=(), **extra)  # type: ignore[arg-type]  # fmt: skip
        (g,) = torch.autograd.grad(ys[-1].sum(), [y0])
        counts.append((nfe.forward, nfe.backward, g))
    assert counts[1][0] < counts[0][0] and counts[1][1] < counts[0][1], counts
    # dL/dy0 exactly: y(1) = 1 / (1/y(0.5) - 0.5), y(0.5) = y0 exp(-1/4).
    y_half = y0.detach() * math.exp(-0.25)
    exact = math.exp(-0.25) / (1 - 0.5 * y_half) ** 2
    assert torch.allclose(counts[1][2], exact, rtol=1e-6), (counts[1][2], exact)


@pytest.mark.parametrize("mode", ["backprop", "adjoint", "checkpoint", "reversible"])
def test_gradients_with_step_t_match_a_fine_reference(mode: str) -> None:
    reference = _reference_grads()
    grads = _loss_and_grads(mode, solver="dopri5", rtol=1e-8, atol=1e-8, step_t=[0.4, 2.2])
    assert grads[2].shape == (3,)  # dL/dt of the output times only
    err = max(float((g - r).abs().max()) for g, r in zip(grads, reference))
    assert err < 1e-5, err


def test_a_block_takes_step_t() -> None:
    class Dyn(nn.Module):
        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return _kink_at_one(t * 2.0, y)

    block = ODEBlock(Dyn(), solver="bosh3", rtol=1e-6, step_t=[0.5])
    out = block(torch.ones(3, 2, dtype=D))
    assert out.shape == (3, 2) and block.stats.accepted > 0


def test_stop_times_are_refused_where_they_cannot_be_kept() -> None:
    y0 = torch.ones(1, dtype=D)
    with pytest.raises(ValueError, match=r"`step_t`/`jump_t` are times error-controlled steps"):
        odeint(_linear, y0, [0.0, 1.0], solver="rk4", step_t=[0.5], params=())
    with pytest.raises(
        ValueError, match=r"`jump_t` .* `adjoint='checkpoint'` cannot replay.*step_t"
    ):
        odeint(_linear, y0, [0.0, 1.0], solver="dopri5", rtol=1e-6, jump_t=[0.5],
               adjoint="checkpoint", params=())  # fmt: skip
    with pytest.raises(ValueError, match=r"`step_t` must hold finite real times"):
        odeint(_linear, y0, [0.0, 1.0], solver="dopri5", rtol=1e-6, step_t=[float("nan")],
               params=())  # fmt: skip
    with pytest.raises(TypeError, match=r"`jump_t` must be a list or 1-D tensor"):
        odeint(_linear, y0, [0.0, 1.0], solver="dopri5", rtol=1e-6, jump_t=0.5, params=())


# --- errors naming the argument, the time and the cause ---------------------------------------


def test_tolerances_with_a_solver_without_an_error_estimate_are_refused() -> None:
    with pytest.raises(ValueError, match=r"`rtol`/`atol` ask for error-controlled steps.*'rk4'"):
        odeint(_linear, torch.ones(1, 2, dtype=D), [0.0, 1.0], solver="rk4", rtol=1e-5)


@pytest.mark.parametrize("rtol", [0.0, -1e-3, float("nan")])
def test_a_bad_tolerance_is_named(rtol: float) -> None:
    with pytest.raises(ValueError, match="`rtol` must be a positive finite number"):
        odeint(_linear, torch.ones(1, 2, dtype=D), [0.0, 1.0], solver="dopri5", rtol=rtol)


def test_a_blow_up_stops_with_the_time_and_the_likely_causes() -> None:
    # dy/dt = y^2 from y(0) = 1 leaves every bound at t = 1.
    with pytest.raises(
        RuntimeError, match=r"step size fell to .* at t = (0\.99|1\b).*stiff.*discontinuity"
    ):
        odeint(lambda t, y: y * y, torch.ones(1, dtype=D), [0.0, 2.0], solver="dopri5",
               rtol=1e-6, atol=1e-6, params=())  # fmt: skip


@pytest.mark.parametrize("dense", [True, False])
def test_a_step_just_short_of_an_end_takes_the_sliver_with_it(dense: bool) -> None:
    # The largest step 0.9999 leaves 1e-4 of each unit interval: in float32 at t = 1000 that is
    # below what the times resolve (about 5e-4), so it cannot be a step of its own.
    nfe = NFECounter()
    y = odeint(lambda t, y: torch.ones_like(y), torch.ones(1), [1000.0, 1001.0, 1002.0],
               solver="dopri5", rtol=1e-3, atol=1e-3, step=0.9999, params=(), nfe=nfe,
               dense_output=dense)  # fmt: skip
    assert torch.allclose(y[:, 0], torch.tensor([1.0, 2.0, 3.0]))
    # Hairer's first step (0.115 here), then one step to 1001; one step (0.9999 and the
    # sliver) to 1002.
    assert nfe.accepted == 3 and nfe.rejected == 0


def test_a_non_finite_error_estimate_is_named_as_such() -> None:
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(t > 0.5, torch.full_like(y, float("inf")), -y)

    with pytest.raises(
        RuntimeError, match=r"at t = 0\.5\b.*was not finite.*overflowed or became NaN"
    ):
        odeint(f, torch.ones(1, dtype=D), [0.0, 1.0], solver="dopri5", rtol=1e-6, params=())


def test_a_failing_adjoint_backward_pass_says_where_and_what_to_use_instead() -> None:
    class Dyn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor(-1.0, dtype=D))
            self.broken = False  # turned on between the solve and its backward pass

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return y * (self.w * float("inf") if self.broken else self.w)

    dyn = Dyn()
    y = odeint(dyn, torch.ones(2, dtype=D), [0.0, 1.0], solver="dopri5", rtol=1e-6, adjoint=True)
    dyn.broken = True
    with pytest.raises(
        RuntimeError,
        match=r"adjoint.s backward pass.*adjoint=.checkpoint.*derivative at t = 1,.*not finite",
    ):
        y.sum().backward()


def test_a_stiff_problem_stops_at_max_steps_naming_stiffness() -> None:
    mu = 1000.0

    def van_der_pol(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, mu * (1 - x * x) * v - x], dim=-1)

    with pytest.raises(RuntimeError, match=r"more than `max_steps=2,000` steps.*stiffness"):
        odeint(van_der_pol, torch.tensor([2.0, 0.0], dtype=D), [0.0, 3000.0],
               solver="dopri5", rtol=1e-6, atol=1e-6, max_steps=2000, params=())  # fmt: skip


@pytest.mark.parametrize("mode", ["checkpoint", "reversible"])
def test_random_dynamics_under_error_control_raise_in_the_replaying_modes(mode: str) -> None:
    # Rejected trials drew numbers that a replay of the accepted steps cannot draw again.
    drop = nn.Dropout(0.5)
    y0 = torch.ones(4, 2, dtype=D, requires_grad=True)
    sol = odeint(lambda t, y: drop(y) @ _A, y0, [0.0, 1.0], solver="dopri5", rtol=1e-4,
                 atol=1e-4, adjoint=mode, params=())  # fmt: skip
    with pytest.raises(RuntimeError, match="error-controlled forward pass.*fixed steps"):
        sol.sum().backward()


@pytest.mark.parametrize("every", [1, 3])
def test_checkpoint_replays_the_accepted_steps_to_backprops_gradient(every: int) -> None:
    from torchode_adjoint import Checkpoint

    backprop = _loss_and_grads("backprop", solver="dopri5", rtol=1e-6, atol=1e-6)
    replayed = _loss_and_grads(Checkpoint(every=every), solver="dopri5", rtol=1e-6, atol=1e-6)
    for b, c in zip(backprop, replayed):
        assert float((b - c).abs().max()) <= 1e-10 * float(b.abs().max())


@pytest.mark.parametrize("solver", ["dopri5", "bosh3"])
def test_reversible_is_exact_for_its_scheme_on_the_steps_the_forward_chose(
    solver: str, monkeypatch
) -> None:
    from problems import reversible_rk_on_steps

    import torchode_adjoint.modes.base as mode_module  # the replaying modes' recorded solve

    recorded: list = []
    inner = mode_module.integrate_adaptive

    def spy(*args: object, **kwargs: object) -> object:
        out = inner(*args, **kwargs)
        recorded.extend(kwargs["record"])  # type: ignore[arg-type]
        return out

    monkeypatch.setattr(mode_module, "integrate_adaptive", spy)
    a = nn.Parameter(_A.clone())
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.7, 2.0], dtype=D, requires_grad=True)
    f = _forced(a)
    nfe = NFECounter()
    sol = odeint(
        f, y0, t, solver=solver, rtol=1e-5, atol=1e-5, adjoint="reversible", params=[a], nfe=nfe
    )
    grads = torch.autograd.grad((sol * sol).sum(), [y0, a, t])
    (steps,) = recorded
    assert sum(steps.n_steps) > 4  # several error-controlled steps per interval
    # The couplings the forward chose, one per accepted step.
    assert len(nfe.couplings) == sum(steps.n_steps)
    ref = reversible_rk_on_steps(f, get_solver(solver), y0, t, steps.steps, nfe.couplings)
    assert torch.allclose(sol, ref, atol=1e-12)
    expected = torch.autograd.grad((ref * ref).sum(), [y0, a, t])
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, atol=1e-10), (g - e).abs().max()


def test_a_training_temporal_batchnorm_refuses_error_control_by_name() -> None:
    from torchode_adjoint import TemporalBatchNorm1d

    class Dyn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = TemporalBatchNorm1d(2, max_times=8)

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.norm(t, y)

    with pytest.raises(ValueError, match="TemporalBatchNorm in training mode.*`step=`"):
        odeint(Dyn(), torch.randn(4, 2), [0.0, 1.0], solver="dopri5", rtol=1e-3)


# --- against torchdiffeq ---------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "dopri8"])
@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
def test_steps_and_errors_match_torchdiffeq_on_one_interval(solver: str, tol: float) -> None:
    torchdiffeq = pytest.importorskip("torchdiffeq", reason="torchdiffeq is in the bench extra")
    y0 = torch.tensor([[1.0, 0.5]], dtype=D)
    t = torch.tensor([0.0, 5.0], dtype=D)
    exact = _exact(y0, [0.0, 5.0])
    count = [0]

    def counted(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return _linear(s, y)

    theirs = torchdiffeq.odeint(counted, y0, t, method=solver, rtol=tol, atol=tol)
    nfe = NFECounter()
    ours = odeint(_linear, y0, t, solver=solver, rtol=tol, atol=tol, adjoint=False, nfe=nfe)
    assert nfe.forward <= 1.1 * count[0], (nfe.forward, count[0])
    assert float((ours - exact).abs().max()) <= float((theirs - exact).abs().max())


def test_error_controlled_steps_run_compiled_to_the_eager_values() -> None:
    from torchode_adjoint import Compile

    runs = [0]

    def counted(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args: object) -> object:
            runs[0] += 1
            return compiled(*args)

        return run

    f = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    class Dyn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = f

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.f(y)

    dyn = Dyn()
    y0 = torch.randn(3, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.5, 2.0], dtype=D)
    results = []
    for compile in (False, Compile(backend=counted)):
        sol = odeint(dyn, y0, t, solver="dopri5", rtol=1e-7, atol=1e-7, compile=compile)
        forward_runs = runs[0]
        grads = torch.autograd.grad(sol.square().sum(), list(f.parameters()))
        results.append((sol.detach(), grads))
    # Both passes ran graphs (each pass's first step is eager).
    assert forward_runs > 0 and runs[0] > forward_runs, (forward_runs, runs[0])
    (sol_e, g_e), (sol_c, g_c) = results
    assert torch.allclose(sol_c, sol_e, rtol=0, atol=1e-9)
    for a, b in zip(g_c, g_e):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_torch_func_grad_runs_and_vmap_is_refused_by_name() -> None:
    def loss(y0: torch.Tensor) -> torch.Tensor:
        sol = odeint(_linear, y0, torch.tensor([0.0, 1.0], dtype=D), solver="dopri5",
                     rtol=1e-8, atol=1e-10, adjoint=False, params=())  # fmt: skip
        return sol[-1].sum()

    y0 = torch.ones(1, 2, dtype=D)
    g = torch.func.grad(loss)(y0)
    expected = torch.ones(1, 2, dtype=D) @ torch.linalg.matrix_exp(_A).T
    assert torch.allclose(g, expected, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"which `torch.func.vmap` cannot do.*`step=`"):
        torch.func.vmap(loss)(torch.ones(3, 1, 2, dtype=D))


@pytest.mark.parametrize("mode", ["checkpoint", "reversible", "adjoint"])
def test_inference_takes_the_steps_a_training_pass_takes(mode: str) -> None:
    # Without a gradient a mode integrates as its passes with one do: the replaying modes end
    # a step on every output time then too, so eval and training outputs agree.
    times = torch.linspace(0.0, 2.0, 9, dtype=D)
    y0 = torch.ones(1, 2, dtype=D)
    kw = dict(solver="dopri5", rtol=1e-5, atol=1e-5, adjoint=mode, params=())
    with torch.no_grad():
        inference = odeint(_linear, y0, times, **kw)
    training = odeint(_linear, y0.clone().requires_grad_(), times, **kw)
    assert torch.equal(inference, training.detach())


# --- the controller after a step cut short to end on a time ---------------------------------


class _PowerErrorMethod(MethodBase):
    """A method whose error estimate is (h / 0.01)**5 (a fifth-order local error): steps above
    0.01 are rejected. Records the sizes it is asked to take."""

    nodes = (0.0, 1.0)
    error_order = 4  # type: ignore[assignment]

    def __init__(self) -> None:
        self.sizes: list[float] = []

    def step(self, f: object, carry: torch.Tensor, h: float, ts: object) -> tuple[object, ...]:
        self.sizes.append(round(abs(h), 12))
        return carry, (torch.ones(1, dtype=D) * (abs(h) / 0.01) ** 5,), None

    def output(self, carry: torch.Tensor) -> torch.Tensor:
        return carry


def test_a_rejected_step_cut_short_to_an_end_shrinks_from_its_own_size() -> None:
    from torchode_adjoint._executor import Executor, adaptive_interval
    from torchode_adjoint.controllers.error import ErrorControl, StepSizeController

    method = _PowerErrorMethod()
    control = ErrorControl(rtol=1.0, atol=1.0)
    y = torch.zeros(1, dtype=D)

    def parts(before: object, after: object, error: object) -> tuple[object, ...]:
        return error, [y], [y]

    sizer = StepSizeController(dataclasses.replace(control, max_steps=100), 4, D)
    adaptive_interval(Executor(method, None), None, y, 0.0, 0.1, 0.5, sizer, parts,  # type: ignore[arg-type]
                      like=y)  # fmt: skip
    # The proposal 0.5 is cut to the interval's 0.1 and rejected (ratio 1e5): the next try is
    # 0.1 * 0.2 (the smallest factor), not 0.5 * 0.2 = 0.1 again.
    assert method.sizes[:2] == [0.1, 0.02], method.sizes
    rejected = [(a, b) for a, b in zip(method.sizes, method.sizes[1:]) if a > 0.01]
    assert all(b < a for a, b in rejected), method.sizes


# --- the step-size controller's options --------------------------------------------------


def test_the_controller_takes_a_first_step_and_pi_coefficients() -> None:
    from torchode_adjoint import PIController

    y0 = torch.tensor([[1.0, 0.5]], dtype=D)
    t = torch.tensor([0.0, 10.0], dtype=D)

    def solve(controller: object) -> tuple[NFECounter, list[float], torch.Tensor]:
        seen: list[float] = []

        def f(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            seen.append(float(s))
            return _linear(s, y)

        nfe = NFECounter()
        y = odeint(f, y0, t, solver="dopri5", rtol=1e-8, atol=1e-8, params=(), nfe=nfe,
                   controller=controller, dense_output=False)  # type: ignore[arg-type]  # fmt: skip
        return nfe, seen, y[-1]

    plain, seen_plain, y_plain = solve(None)
    _, seen_first, y_first = solve(PIController(first_step=0.01))
    # No evaluation for Hairer's guess: f(0, y0), then the first step's second stage at 0.2 h.
    assert seen_first[:2] == [0.0, pytest.approx(0.002)]
    assert seen_plain[1] != pytest.approx(0.002)
    pi, _, y_pi = solve(PIController(beta1=0.7, beta2=0.4))
    assert pi.accepted != plain.accepted  # the coefficients act
    exact = _exact(y0, [10.0])[0]
    for y in (y_plain, y_first, y_pi):
        assert float((y - exact).abs().max()) < 1e-6


def test_the_controllers_smallest_step_stops_a_stiff_solve_by_name() -> None:
    from torchode_adjoint import PIController

    def stiff(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -1e4 * (y - torch.cos(t))

    with pytest.raises(RuntimeError, match=r"step size fell to .*`min_step`"):
        odeint(stiff, torch.zeros(1, dtype=D), [0.0, 1.0], solver="dopri5", rtol=1e-6,
               controller=PIController(min_step=1e-3), params=())  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factor_min": 1.5}, "factor_min < 1 < factor_max"),
        ({"beta1": 0.0}, r"PIController\(beta1=...\)"),
        ({"beta2": -0.1}, r"PIController\(beta2=...\)"),
        ({"first_step": -1.0}, r"PIController\(first_step=...\)"),
        ({"min_step": float("nan")}, r"PIController\(min_step=...\)"),
    ],
)
def test_a_bad_controller_setting_is_named(kwargs: dict, message: str) -> None:
    from torchode_adjoint import PIController

    with pytest.raises(ValueError, match=message):
        PIController(**kwargs)


def test_a_controller_needs_error_control() -> None:
    from torchode_adjoint import PIController

    with pytest.raises(ValueError, match=r"`controller` sets how error-controlled steps"):
        odeint(_linear, torch.ones(1, 2, dtype=D), [0.0, 1.0], solver="rk4",
               controller=PIController(), params=())  # fmt: skip
    with pytest.raises(TypeError, match=r"`controller` must be a `torchode_adjoint.PIController`"):
        odeint(_linear, torch.ones(1, 2, dtype=D), [0.0, 1.0], solver="dopri5", rtol=1e-3,
               controller={"beta1": 0.7}, params=())  # type: ignore[arg-type]  # fmt: skip


# --- an embedded pair named without step, rtol or atol ----------------------------------------


@pytest.mark.parametrize(
    ("dtype", "rtol", "atol"), [(torch.float64, 1e-7, 1e-9), (torch.float32, 1e-6, 1e-8)]
)
def test_a_pair_named_alone_controls_its_error_at_the_stated_defaults(dtype, rtol, atol) -> None:
    # torchdiffeq's 1e-7 / 1e-9 in float64; float32 cannot reach 1e-7, so 1e-6 / 1e-8 (and no
    # ToleranceWarning, which the suite turns into an error).
    y0 = torch.tensor([[1.0, 0.5]], dtype=dtype)
    t = torch.tensor([0.0, 5.0], dtype=dtype)
    named, explicit = NFECounter(), NFECounter()
    a = _A.to(dtype)
    sol = odeint(lambda s, y: y @ a, y0, t, solver="dopri5", adjoint=False, nfe=named)
    ref = odeint(lambda s, y: y @ a, y0, t, solver="dopri5", rtol=rtol, atol=atol,
                 adjoint=False, nfe=explicit)  # fmt: skip
    assert named.accepted > 0 and named.accepted == explicit.accepted
    assert torch.equal(sol, ref)


def test_fixed_steps_of_a_pair_need_step_and_other_solvers_keep_their_fixed_default() -> None:
    y0 = torch.tensor([[1.0, 0.5]], dtype=D)
    nfe = NFECounter()
    odeint(_linear, y0, [0.0, 1.0], solver="dopri5", step=0.1, adjoint=False, nfe=nfe)
    assert nfe.accepted == 0 and nfe.forward == 7 * 10
    odeint(_linear, y0, [0.0, 1.0], solver="rk4", adjoint=False, nfe=nfe)
    assert nfe.accepted == 0 and nfe.forward == 4 * 10  # step=0.1, the mission's default


def test_an_ode_block_with_a_pair_alone_is_error_controlled_and_says_so() -> None:
    from torchode_adjoint import ODEBlock

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2).double()

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.lin(y)

    block = ODEBlock(Linear(), solver="dopri5")
    assert "rtol=1e-07, atol=1e-09 (defaults, fitted to the state's dtype)" in repr(block)
    block(torch.ones(3, 2, dtype=D))
    assert block.stats.accepted > 0


# --- the checkpointed mode steps past output times, as backprop --------------------------------


def _pairs_with_interpolants() -> list[str]:
    from torchode_adjoint import available_solvers, get_solver

    pairs = [get_solver(n) for n in available_solvers()]
    return [p.name for p in pairs if getattr(p, "adaptive", False) and p.b_dense is not None]


@pytest.mark.parametrize("solver", _pairs_with_interpolants())
@pytest.mark.parametrize("every", [1, 3])
def test_checkpoint_takes_backprops_steps_and_interpolates_its_outputs(solver, every) -> None:
    # Many output times between few steps: the checkpointed mode used to end a step on each.
    # Now the same accepted steps, the same values, and backprop's gradient to round-off
    # (through the interpolant of each re-run step).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()

    def f(t, y):
        return net(y) * torch.cos(t)

    y0 = torch.randn(5, 3, dtype=D)
    t = torch.linspace(0.0, 3.0, 17, dtype=D)
    w = torch.randn(17, 5, 3, dtype=D)
    out = []
    for mode in ("backprop", Checkpoint(every=every)):
        y = y0.clone().requires_grad_()
        nfe = NFECounter()
        sol = odeint(f, y, t, solver=solver, rtol=1e-6, atol=1e-8, adjoint=mode,
                     params=net.parameters(), nfe=nfe)  # fmt: skip
        grads = torch.autograd.grad((w * sol).sum(), [y, *net.parameters()])
        out.append((sol.detach(), grads, nfe.forward, nfe.accepted))
    (s_bp, g_bp, f_bp, n_bp), (s_ck, g_ck, f_ck, n_ck) = out
    ended = NFECounter()
    odeint(f, y0, t, solver=solver, rtol=1e-6, atol=1e-8, adjoint=False, dense_output=False,
           params=net.parameters(), nfe=ended)  # fmt: skip
    assert n_ck == n_bp < ended.accepted and f_ck == f_bp  # dense: fewer steps than ending
    assert torch.equal(s_ck, s_bp)
    for a, b in zip(g_ck, g_bp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Without a gradient the solve takes the same steps and gives the same values.
    with torch.no_grad():
        again = odeint(f, y0, t, solver=solver, rtol=1e-6, atol=1e-8,
                       adjoint=Checkpoint(every=every), params=net.parameters())  # fmt: skip
    assert torch.equal(again, s_bp)


def test_checkpoint_with_learnable_times_ends_a_step_on_each_and_equals_backprop() -> None:
    a = nn.Parameter(_A.clone())
    y0 = torch.tensor([[1.0, 0.5]], dtype=D, requires_grad=True)
    grads = []
    for mode in ("backprop", "checkpoint"):
        t = torch.linspace(0.0, 2.0, 9, dtype=D).requires_grad_()
        nfe = NFECounter()
        sol = odeint(_forced(a), y0, t, solver="dopri5", rtol=1e-7, atol=1e-9, adjoint=mode,
                     params=[a], nfe=nfe)  # fmt: skip
        assert nfe.accepted >= 8  # a step ends on each of the 8 output times
        grads.append(torch.autograd.grad(sol.square().sum(), [y0, a, t]))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
