"""check_gradients reports small errors for a correct mode and large ones for a wrong one."""

from __future__ import annotations

import math

import pytest
import torch
from problems import MLPDynamics
from torch import nn

from torchode_adjoint import GradientReport, NFECounter, ODEBlock, check_gradients, odeint


def test_report_for_a_block_has_one_row_per_input_and_small_errors() -> None:
    block = ODEBlock(MLPDynamics(), solver="rk4", step=0.05)
    report = check_gradients(block, torch.randn(4, 3))
    assert isinstance(report, GradientReport)
    assert [c.name for c in report.checks] == ["y0", "t"] + [
        n for n, _ in block.dynamics.named_parameters()
    ]
    assert report.mode == "adjoint" and report.solver == "rk4"
    assert report.max_rel_err_backprop < 1e-5
    assert report.max_rel_err_fd < 1e-4
    text = str(report)
    assert "vs reference" in text and "l1.weight" in text
    assert report.verdict == "pass" and text.endswith("verdict: pass")


def test_backprop_mode_agrees_with_finite_differences_to_high_precision() -> None:
    report = check_gradients(
        MLPDynamics(),
        torch.randn(4, 3),
        torch.tensor([0.0, 0.5, 1.0]),
        solver="midpoint",
        step=0.1,
        adjoint=False,
    )
    # Its reference is the checkpointed mode, another computation of the same exact gradient.
    assert "checkpointed" in report.reference
    assert 0.0 < report.max_rel_err_backprop < 1e-12
    assert report.max_rel_err_fd < 1e-6


def test_coarse_euler_adjoint_shows_its_discretisation_error() -> None:
    report = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="euler", step=0.5)
    assert report.max_rel_err_backprop > 1e-3


def test_the_checked_module_is_left_untouched() -> None:
    f = MLPDynamics()
    before = {k: v.clone() for k, v in f.state_dict().items()}
    check_gradients(f, torch.randn(2, 3), step=0.25)
    for k, v in f.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("solver", "method"),
    [
        ("rk4", "rk4 made reversible (coupling chosen per step)"),
        ("reversible_heun", "reversible_heun"),
    ],
)
def test_reversible_mode_is_checked_against_finite_differences_of_its_own_forward_pass(
    solver: str, method: str
) -> None:
    report = check_gradients(
        MLPDynamics(),
        torch.randn(4, 3),
        torch.tensor([0.0, 0.55, 1.03]),
        solver=solver,
        step=0.1,
        adjoint="reversible",
    )
    assert report.max_rel_err_fd < 1e-5
    # The reference is backprop through the reversible method itself: equal to round-off.
    assert report.max_rel_err_backprop < 1e-9
    assert report.verdict == "pass" and report.reference == f"backprop through {method}"


def test_a_gradient_that_is_zero_up_to_round_off_does_not_explode() -> None:
    from problems import ConvBNDynamics

    f = ConvBNDynamics()  # the conv bias has a zero gradient under the BatchNorm
    report = check_gradients(f, torch.randn(4, 3, 5, 5), step=0.25, adjoint="checkpoint")
    bias = next(c for c in report.checks if c.name == "conv.conv.bias")
    assert bias.rel_err_backprop < 1e-6 and bias.rel_err_fd < 1e-2
    assert report.verdict == "pass", str(report)


def test_the_adjoint_tolerance_is_its_measured_discretisation_error() -> None:
    fine = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="rk4", step=0.05)
    coarse = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="euler", step=0.5)
    assert fine.verdict == coarse.verdict == "pass"
    assert max(c.tolerance for c in coarse.checks) > 100 * max(c.tolerance for c in fine.checks)


def test_a_wrong_gradient_fails_the_check(monkeypatch) -> None:
    from torchode_adjoint.modes import adjoint as _adjoint

    original = _adjoint.accumulate_

    def halved(accs, grads, alpha=1.0):  # a broken parameter gradient: half of each term
        original(accs, grads, alpha=0.5 * alpha)

    monkeypatch.setattr(_adjoint, "accumulate_", halved)
    report = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="rk4", step=0.05)
    assert report.verdict == "fail"
    assert {c.name for c in report.checks if c.verdict == "fail"} >= {"l1.weight", "l2.bias"}


def test_an_error_in_the_dynamics_mid_check_leaves_the_users_tensors_bit_identical() -> None:
    # A function's tensors are the user's own (the function closes over them): the finite
    # differences perturb them in place and must put them back whatever happens.
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    before = w.detach().clone()
    calls = {"n": 0, "limit": None}

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["limit"] is not None and calls["n"] > calls["limit"]:
            raise RuntimeError("the dynamics failed")
        return torch.tanh(y @ w.T)

    kwargs = dict(solver="rk4", step=0.25, adjoint="checkpoint", params=[w])
    check_gradients(f, torch.randn(2, 3), **kwargs)
    total, calls["n"] = calls["n"], 0
    assert torch.equal(w.detach(), before)
    calls["limit"] = int(0.9 * total)  # fails inside the parameter's finite differences
    with pytest.raises(RuntimeError, match="the dynamics failed"):
        check_gradients(f, torch.randn(2, 3), **kwargs)
    assert torch.equal(w.detach(), before)


def test_a_float32_function_is_refused_with_the_reason() -> None:
    w = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"float64.*params\[0\]"):
        check_gradients(lambda t, y: y @ w.T, torch.randn(2, 3), params=[w], adjoint="checkpoint")


def test_the_adjoint_verdict_says_what_it_measured() -> None:
    report = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="euler", step=0.5)
    assert report.discretisation_error is not None and report.discretisation_error > 1e-3
    text = str(report)
    assert "halving the step changes the exact gradient by" in text
    assert f"{100 * report.discretisation_error:.2g} %" in text
    # A 'pass' beside a visible difference says the difference is the mode's approximation.
    assert "which is this mode's expected approximation" in text
    exact = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="euler", adjoint=False)
    assert exact.discretisation_error is None and "exact mode" in str(exact)


def test_under_error_control_the_yardstick_is_tighter_tolerances() -> None:
    # The change of the exact gradient when rtol and atol are 1,000 times tighter: larger at a
    # loose tolerance than at a tight one, and named with the knob that shrinks it.
    torch.manual_seed(0)
    y0, f = torch.randn(4, 3), MLPDynamics()
    loose = check_gradients(f, y0, solver="bosh3", rtol=1e-3, atol=1e-3)
    tight = check_gradients(f, y0, solver="bosh3", rtol=1e-7, atol=1e-7)
    assert loose.discretisation_error is not None and tight.discretisation_error is not None
    # (18 times here: the time gradient's part does not fall with the tolerance's power)
    assert loose.discretisation_error > 5 * tight.discretisation_error > 0
    text = str(loose)
    assert "rtol=0.001, atol=0.001 (float64)" in text and "step=None" not in text
    assert "tolerances 1,000 times tighter change the exact gradient" in text
    assert loose.verdict == tight.verdict == "pass", (str(loose), str(tight))
    assert "tighten `rtol`/`atol`" in text and "reduce `step`" not in text


def test_the_adjoint_table_marks_the_finite_differences_as_not_counting() -> None:
    # A fine rk4 adjoint: its error against the discrete gradient is far below 0.01 %, which
    # must still read as a number, not "0.00%"; its finite-difference column is marked.
    report = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="rk4", step=0.05)
    text = str(report)
    assert "0.00%" not in text and f"{100 * report.max_rel_err_backprop:.2g} %" in text
    rows = text.splitlines()[3 : 3 + len(report.checks)]
    assert all(row.split()[-3].endswith("*") for row in rows)
    assert "* for information only" in text
    exact = str(check_gradients(MLPDynamics(), torch.randn(4, 3), adjoint="checkpoint"))
    assert "*" not in exact and "suspicious above 1e-05" in exact


# --- exact values of the report ----------------------------------------------------------------


def _double_f(w: torch.Tensor):
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ w.T) * torch.cos(t)

    return f


def test_the_table_names_its_columns_and_shows_each_inputs_shape_and_verdict() -> None:
    report = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="rk4", step=0.05)
    lines = str(report).splitlines()
    assert lines[0] == "gradient check: mode=adjoint, solver=rk4, step=0.05 (float64)"
    assert lines[2].split() == [
        "input", "shape", "vs", "reference", "vs", "finite", "diff", "tolerance", "verdict",
    ]  # fmt: skip
    for line, c in zip(lines[3:], report.checks):
        assert line.split()[0] == c.name and str(c.shape) in line and line.endswith(c.verdict)
    assert (
        report.step == 0.05 and report.checks[0].shape == (4, 3) and report.checks[1].shape == (2,)
    )


def test_the_same_seed_gives_the_same_report_and_another_seed_another() -> None:
    y0 = torch.randn(4, 3)
    f = MLPDynamics()
    g = MLPDynamics()
    g.load_state_dict(f.state_dict())
    a = check_gradients(f, y0, step=0.25, seed=3)
    b = check_gradients(g, y0, step=0.25, seed=3)
    c = check_gradients(g, y0, step=0.25, seed=4)
    assert [x.rel_err_fd for x in a.checks] == [x.rel_err_fd for x in b.checks]
    assert [x.rel_err_fd for x in a.checks] != [x.rel_err_fd for x in c.checks]


def test_the_times_are_the_given_ones_or_the_blocks() -> None:
    torch.manual_seed(0)
    block = ODEBlock(MLPDynamics(), solver="midpoint", step=0.1, t1=2.0, adjoint="checkpoint")
    y0 = torch.randn(2, 3)
    by_default = check_gradients(block, y0)
    explicit = check_gradients(block, y0, torch.tensor([0.0, 2.0]))
    assert [c.rel_err_fd for c in by_default.checks] == [c.rel_err_fd for c in explicit.checks]
    shorter = check_gradients(block, y0, torch.tensor([0.0, 1.0]))
    assert [c.rel_err_fd for c in by_default.checks] != [c.rel_err_fd for c in shorter.checks]
    t3 = torch.tensor([0.0, 0.3, 0.7], dtype=torch.float64)  # float32 0.3 is 3.0000001 steps
    three = check_gradients(block.dynamics, y0, t3, step=0.1)
    assert three.checks[1].shape == (3,)


def test_params_with_a_module_are_refused() -> None:
    with pytest.raises(
        ValueError,
        match="^`params` cannot be given with a module: its parameters are checked by name.$",
    ):
        check_gradients(MLPDynamics(), torch.randn(2, 3), params=[])
    with pytest.raises(
        TypeError,
        match=r"^`func_or_block` must be an ODEBlock, an nn.Module or a "
        r"function f\(t, y\), got int\.$",
    ):
        check_gradients(5, torch.randn(2, 3))
    with pytest.raises(
        TypeError,
        match=r"copied: params\[0\], params\[1\] of `params` are not "
        r"float64\. Build the function on float64 tensors \(e\.g\. "
        r"`w = w.double\(\)` before defining it\), or pass an "
        r"nn\.Module, which is copied and cast\.$",
    ):
        w = torch.ones(1)
        check_gradients(lambda t, y: y * w, torch.randn(2), params=[w, w], adjoint="checkpoint")


def test_a_function_without_params_is_checked_with_backprop() -> None:
    report = check_gradients(lambda t, y: -y * torch.cos(t), torch.randn(3), adjoint="backprop")
    assert report.verdict == "pass" and [c.name for c in report.checks] == ["y0", "t"]


def test_an_unused_parameter_gets_a_zero_gradient_row_that_passes() -> None:
    f = MLPDynamics()
    f.unused = torch.nn.Parameter(torch.ones(2))
    report = check_gradients(f, torch.randn(2, 3), step=0.25, adjoint="checkpoint")
    row = next(c for c in report.checks if c.name == "unused")
    assert row.shape == (2,) and row.verdict == "pass" and row.rel_err_backprop == 0.0


def test_backprop_through_reversible_heun_is_checked_against_the_reversible_mode() -> None:
    report = check_gradients(
        MLPDynamics(), torch.randn(2, 3), solver="reversible_heun", step=0.1, adjoint="backprop"
    )
    assert report.reference == "the reversible mode's backward pass through reversible_heun"
    assert report.verdict == "pass" and 0.0 < report.max_rel_err_backprop < 1e-9


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint", "reversible"])
def test_a_function_with_params_is_checked_in_every_mode(mode) -> None:
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    report = check_gradients(
        _double_f(w), torch.randn(2, 3), solver="rk4", step=0.1, adjoint=mode, params=[w]
    )
    assert report.verdict == "pass" and [c.name for c in report.checks] == ["y0", "t", "params[0]"]


def test_the_adjoint_tolerance_is_ten_times_the_change_of_the_exact_gradient_at_half_step():
    # Recomputed here from the documented loss: sum(w * odeint(...)) with w the first draw of a
    # generator seeded with `seed`, and the exact gradient's change when the step is halved.
    w_param = torch.randn(3, 3, dtype=torch.float64)
    f = _double_f(w_param)
    y0 = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    report = check_gradients(f, y0, t, solver="euler", step=0.25, params=[], seed=7)
    from torchode_adjoint import odeint

    weights = torch.randn(
        (2, 2, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float64
    )

    def grad_y0(step: float) -> torch.Tensor:
        y = y0.clone().requires_grad_()
        sol = odeint(f, y, t, solver="euler", step=step, adjoint="backprop", params=[])
        return torch.autograd.grad((weights * sol).sum(), y)[0]

    coarse, fine = grad_y0(0.25), grad_y0(0.125)
    change = float((coarse - fine).norm() / fine.norm())
    assert report.checks[0].tolerance == pytest.approx(10 * change, rel=1e-9)
    assert report.discretisation_error == pytest.approx(
        max(c.tolerance for c in report.checks) / 10, rel=1e-12
    )


class _WrongBackward(torch.autograd.Function):
    """tanh with a backward that is half the true derivative: wrong in every mode alike."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return 0.5 * g * (1 - y * y)


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_the_finite_difference_error_is_relative_to_the_larger_of_the_two(factor) -> None:
    # One scalar state: the direction is +-1, so the check's directional derivatives are the
    # gradient itself and the central difference, recomputed here.
    def f(t, y):
        return _Sin.apply(y, factor)

    y0 = torch.tensor([0.3], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    report = check_gradients(f, y0, t, step=0.25, adjoint="backprop", params=[])
    from torchode_adjoint import odeint

    def loss(y):
        w = torch.randn((2, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return (w * odeint(f, y, t, step=0.25, adjoint="backprop", params=[])).sum()

    y = y0.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(y), y)
    with torch.no_grad():
        fd = (loss(y0 + 1e-6) - loss(y0 - 1e-6)) / 2e-6
    expected = abs(float(g) - float(fd)) / max(abs(float(g)), abs(float(fd)))
    assert report.checks[0].rel_err_fd == pytest.approx(expected, rel=1e-4)


class _Sin(torch.autograd.Function):
    """sin with a backward scaled by ``factor`` (a wrong derivative unless it is 1)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(x)
        ctx.factor = factor
        return torch.sin(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return ctx.factor * g * torch.cos(x), None


def test_each_inputs_error_is_relative_to_its_own_gradient(monkeypatch) -> None:
    # Every parameter gradient of the adjoint halved: each row's error against backprop is
    # about 0.5 however small that parameter's gradient is next to the others.
    from torchode_adjoint.modes import adjoint as _adjoint

    original = _adjoint.accumulate_
    monkeypatch.setattr(
        _adjoint, "accumulate_", lambda accs, grads, alpha=1.0: original(accs, grads, 0.5 * alpha)
    )
    f = MLPDynamics()
    with torch.no_grad():
        f.u.mul_(1e-3)
    report = check_gradients(f, torch.randn(4, 3), solver="rk4", step=0.05)
    for c in report.checks[2:]:
        assert 0.45 < c.rel_err_backprop < 0.55, str(report)


@pytest.mark.parametrize("mode", ["backprop", "checkpoint"])
def test_a_gradient_wrong_in_the_mode_and_its_reference_alike_is_caught_by_finite_differences(
    mode,
) -> None:
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    report = check_gradients(
        lambda t, y: _WrongBackward.apply(y @ w.T),
        torch.randn(2, 3),
        step=0.25,
        adjoint=mode,
        params=[w],
    )
    assert report.max_rel_err_backprop < 1e-9  # the reference is wrong the same way
    for c in report.checks:
        if c.name != "t":  # (an autonomous system: its time gradient is exact)
            assert c.rel_err_fd > 0.1 and c.verdict == "suspicious", str(report)


class _ZeroWithGradient(torch.autograd.Function):
    """dy/dt = 0 whatever ``p``, with a backward that claims dF/dp = ``k`` for every element."""

    @staticmethod
    def forward(ctx, y, p, k):
        ctx.k = k
        return torch.zeros_like(y)

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g), ctx.k * g.sum().reshape(1), None


@pytest.mark.parametrize(("y0_value", "seed"), [(1e3, 0), (-1e3, 0), (1e-3, 0), (1e3, 1)])
def test_the_finite_difference_error_has_the_documented_round_off_floor(y0_value, seed) -> None:
    # The forward pass ignores p, so both perturbed losses are bitwise equal and fd = 0; the
    # claimed gradient dL/dp = k * w[1] * (t1 - t0) is far below the round-off floor, so the
    # row's error is |<g, v>| / (100 * eps64 * max(|L|, 1) / eps), with |v| = 1 for a scalar.
    # y0 = +-1e3 puts |L| above 1 (of either sign), y0 = 1e-3 below it. With seed 1 the draw
    # of p's direction has norm 0.17 before it is normalised to 1.
    p = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    k = 1e-12

    def f(t, y):
        return _ZeroWithGradient.apply(y, p, k)

    y0 = torch.tensor([y0_value], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    report = check_gradients(f, y0, t, step=0.25, adjoint="backprop", params=[p], seed=seed)
    w = torch.randn((2, 1), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss = float((w * torch.stack([y0, y0])).sum())  # dy/dt = 0: the state never moves
    directional = abs(k * float(w[1, 0]))
    floor = 100 * torch.finfo(torch.float64).eps * max(abs(loss), 1.0) / 1e-6
    assert directional < floor
    (row,) = [c for c in report.checks if c.name not in ("y0", "t")]
    assert row.rel_err_fd == pytest.approx(directional / floor, rel=1e-9)


@pytest.mark.parametrize("adjoint", ["backprop", "checkpoint"])
def test_finite_differences_that_leave_the_domain_make_the_row_suspicious(adjoint) -> None:
    # dy/dt = sqrt(p - 1) at p = 1 + 1e-7: the gradient is finite, but one of the two central
    # difference solves (p -+ 1e-6) takes the root of a negative number. The finite differences
    # verify nothing, which must not read as a pass.
    p = torch.tensor([1.0 + 1e-7], dtype=torch.float64, requires_grad=True)

    def f(t, y):
        return torch.sqrt(p - 1.0) * torch.ones_like(y)

    y0 = torch.tensor([0.2], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    report = check_gradients(f, y0, t, step=0.25, adjoint=adjoint, params=[p])
    rows = {c.name: c for c in report.checks}
    (name,) = set(rows) - {"y0", "t"}
    assert rows[name].rel_err_backprop < 1e-9  # the gradient itself is right
    assert rows[name].rel_err_fd == math.inf
    assert rows[name].verdict == "suspicious" and report.verdict == "suspicious"
    assert rows["y0"].verdict == "pass" and math.isfinite(rows["y0"].rel_err_fd)


_VISITED: list[float] = []


class _TimeRecorder(nn.Module):
    """Linear dynamics that record every time they are evaluated at (copies record too)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, t, y):
        _VISITED.append(float(t.detach()))
        return self.lin(y)


def test_a_float32_solve_is_checked_with_its_own_step_counts() -> None:
    # In float32, 0.3 / 0.1 is 3 steps (3.0000001 within the ulps tolerance); the same float32
    # times cast to float64 would give 4. The check must verify the discretisation the user's
    # solve takes: Euler evaluations only at multiples of 0.1.
    import warnings

    f = _TimeRecorder()
    t = torch.tensor([0.0, 0.3, 0.7])  # float32, as the user's block or solve has them
    n = NFECounter()
    odeint(f, torch.randn(3, 2), t, step=0.1, adjoint="checkpoint", nfe=n)
    assert n.forward == 3 + 4  # the user's own solve
    _VISITED.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no step-rounding warning from inside the check
        report = check_gradients(f, torch.randn(3, 2), t, step=0.1, adjoint="checkpoint")
    assert report.verdict == "pass", str(report)
    # (finite differences in t move the times by about 1e-6: far below a 0.075 spacing)
    assert _VISITED and all(abs(v * 10 - round(v * 10)) < 1e-3 for v in _VISITED), sorted(
        set(_VISITED)
    )[:8]


class _TimeMLP(torch.nn.Module):
    """A field whose couplings, chosen per step, move with its parameters and state."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(0.5 * torch.randn(3, 8, generator=g, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(0.5 * torch.randn(8, 3, generator=g, dtype=torch.float64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ self.w1) @ self.w2 * (1 + t) - 0.3 * y


@pytest.mark.parametrize("solver", ["rk4", "midpoint"])
def test_the_reversible_modes_chosen_couplings_are_held_in_the_finite_differences(solver):
    """The default reversible mode chooses each step's coupling from the state; its exact
    gradient holds those couplings as constants, and so must the finite differences (chosen
    anew, they moved with the perturbed inputs and the verdict read 'suspicious' at 1e-6 to
    1e-5 on this field)."""
    report = check_gradients(
        _TimeMLP(), torch.randn(3, 3), torch.tensor([0.0, 0.4, 1.0]), solver=solver, step=0.2,
        adjoint="reversible",
    )  # fmt: skip
    assert report.verdict == "pass", str(report)
    assert report.max_rel_err_fd < 1e-6, str(report)
