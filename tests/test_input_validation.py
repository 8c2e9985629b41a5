"""Every bad input raises ValueError or TypeError naming the argument."""

from __future__ import annotations

import re

import pytest
import torch
from problems import MLPDynamics
from torch import nn

from torchode_adjoint import ODEBlock, odeint

Y0 = torch.ones(2, 3)
T = torch.tensor([0.0, 1.0])
F = MLPDynamics()


@pytest.mark.parametrize(
    ("kwargs", "exc", "arg"),
    [
        (dict(step=0.0), ValueError, "`step`"),
        (dict(step=-0.1), ValueError, "`step`"),
        (dict(step=float("nan")), ValueError, "`step`"),
        (dict(step=float("inf")), ValueError, "`step`"),
        (dict(step="0.1"), TypeError, "`step`"),
        (dict(step=True), TypeError, "`step`"),
        (dict(solver="dopri7"), ValueError, "`solver`"),
        (dict(adjoint="sometimes"), ValueError, "`adjoint`"),
        (dict(params=torch.ones(2)), TypeError, "`params`"),
        (dict(params=[1.0]), TypeError, "`params`"),
    ],
)
def test_bad_options_name_the_argument(kwargs: dict, exc: type, arg: str) -> None:
    with pytest.raises(exc, match=arg):
        odeint(F, Y0, T, **kwargs)


@pytest.mark.parametrize(
    ("t", "exc"),
    [
        (torch.tensor(1.0), ValueError),
        (torch.tensor([float("nan")]), ValueError),
        (torch.tensor([[0.0, 1.0]]), ValueError),
        (torch.tensor([0.0, 0.5, 0.5, 1.0]), ValueError),
        (torch.tensor([0.0, 1.0, 0.5]), ValueError),
        (torch.tensor([0.0, float("nan")]), ValueError),
        (torch.tensor([0.0, 1.0], dtype=torch.complex64), TypeError),
        ("0 to 1", TypeError),
    ],
)
def test_bad_times_name_t(t: object, exc: type) -> None:
    with pytest.raises(exc, match="`t`"):
        odeint(F, Y0, t)


@pytest.mark.parametrize("t", [torch.tensor([0.3]), [0.3]])
def test_one_output_time_gives_y0_there_as_torchdiffeq(t: object) -> None:
    from torchode_adjoint import NFECounter

    y0 = torch.randn(3, 2, requires_grad=True)
    nfe = NFECounter()
    y = odeint(F, y0, t, solver="dopri5", rtol=1e-6, nfe=nfe, params=())
    assert y.shape == (1, 3, 2) and torch.equal(y[0], y0) and nfe.forward == 0
    (g,) = torch.autograd.grad(y.sum(), [y0])
    assert torch.equal(g, torch.ones_like(y0))
    a, b = odeint(lambda s, s_: s_, (y0, y0 * 2), t, params=())
    assert a.shape == (1, 3, 2) and torch.equal(b[0], y0 * 2)


def test_times_that_collapse_in_the_state_dtype_are_rejected() -> None:
    t = torch.tensor([0.0, 1.0, 1.0 + 1e-12], dtype=torch.float64)
    with pytest.raises(ValueError, match="`t`.*strictly"):
        odeint(F, Y0, t)


def test_times_on_the_meta_device_are_rejected_as_another_device() -> None:
    with pytest.raises(ValueError, match="`t`.*device"):
        odeint(F, Y0, torch.tensor([0.0, 1.0], device="meta"))


@pytest.mark.parametrize("y0", [torch.ones(2, dtype=torch.long), [1.0, 2.0], None])
def test_non_floating_y0_raises_type_error_naming_y0(y0: object) -> None:
    with pytest.raises(TypeError, match="`y0`"):
        odeint(F, y0, T)


def test_non_callable_func_raises_naming_func() -> None:
    with pytest.raises(TypeError, match="`func`"):
        odeint("f", Y0, T)


def test_dynamics_returning_another_shape_names_func() -> None:
    with pytest.raises(ValueError, match="`func`.*shape"):
        odeint(lambda t, y: y.sum(-1), Y0, T, params=())


def test_dynamics_returning_another_dtype_names_func() -> None:
    with pytest.raises(TypeError, match="`func`.*dtype"):
        odeint(lambda t, y: y.double(), Y0, T, params=())


def test_dynamics_returning_a_non_tensor_names_func() -> None:
    with pytest.raises(TypeError, match="`func`"):
        odeint(lambda t, y: 1.0, Y0, T, params=())


def test_adjoint_with_a_plain_function_requires_params() -> None:
    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="`params`"):
        odeint(lambda t, y: lin(y), Y0, T)
    # Backprop needs no list, and params=() is an explicit "none".
    odeint(lambda t, y: lin(y), Y0, T, adjoint=False)
    odeint(lambda t, y: -y, Y0, T, params=())


def test_block_rejects_equal_times_and_non_module_dynamics() -> None:
    with pytest.raises(ValueError, match="`t0` and `t1`"):
        ODEBlock(F, t0=1.0, t1=1.0)
    with pytest.raises(TypeError, match="`dynamics`"):
        ODEBlock(lambda t, y: -y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`step`"):
        ODEBlock(F, step=-1.0)
    with pytest.raises(ValueError, match="`solver`"):
        ODEBlock(F, solver="nope")
    with pytest.raises(ValueError, match="`t1`"):
        ODEBlock(F, t1=float("inf"))


def test_dynamics_without_the_time_argument_get_a_hint_about_t_y() -> None:
    class NoTime(torch.nn.Module):
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return -y

    with pytest.raises(TypeError, match=r"called as `f\(t, y\)`.*`forward\(self, t, y\)`"):
        ODEBlock(NoTime())(torch.ones(2, 3))


class _InPlaceFirst(nn.Module):
    """A common CNN habit: an in-place activation as the first operation on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.lin = nn.Linear(3, 3)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lin(self.act(y))


@pytest.mark.parametrize("mode", ["backprop", "adjoint", "checkpoint", "reversible"])
@pytest.mark.parametrize("case", ["leaf", "non-leaf", "no_grad", "inference_mode"])
def test_dynamics_that_modify_the_state_in_place_raise_instead_of_a_wrong_solution(
    mode: str, case: str
) -> None:
    # The solver uses the state again after the call (y + h k): an in-place change of y gave a
    # quietly different solution under no_grad and with backprop from a non-leaf state.
    torch.manual_seed(0)
    f, lin = _InPlaceFirst(), nn.Linear(3, 3)
    x = torch.randn(4, 3)
    solver = "rk4"
    grad_mode = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}
    with grad_mode.get(case, torch.enable_grad()):
        y0 = lin(x) if case == "non-leaf" else x.clone().requires_grad_(case == "leaf")
        with pytest.raises(RuntimeError, match=r"modify their input `y` in place.*inplace=False"):
            odeint(f, y0, T, solver=solver, step=0.25, adjoint=mode)


def test_in_place_operations_on_the_dynamics_own_tensors_are_fine() -> None:
    class InPlaceInside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.lin(y).relu_()  # the layer's output is the dynamics' own tensor

    f = InPlaceInside()
    y0 = torch.randn(4, 3, requires_grad=True)
    out = odeint(f, y0, T, solver="rk4", step=0.25, adjoint="adjoint")
    ref = odeint(lambda t, y: torch.relu(f.lin(y)), y0, T, solver="rk4", step=0.25, params=())
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("keyword", "hint"),
    [
        ("method", "solver="),
        ("options", "step=h"),
        ("adjoint_rtol", "ContinuousAdjoint(rtol="),
        ("adjoint_atol", "ContinuousAdjoint(rtol="),
        ("event_fn", "odeint_event(func, y0, t0, event_fn="),
        ("adjoint_params", "params="),
    ],
)
def test_a_torchdiffeq_keyword_says_what_to_pass_instead(keyword: str, hint: str) -> None:
    with pytest.raises(TypeError, match=rf"torchdiffeq's `{keyword}=`.*{re.escape(hint)}"):
        odeint(lambda t, y: -y, torch.ones(2), T, params=(), **{keyword: "dopri5"})


def test_an_unknown_keyword_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepsize'"):
        odeint(lambda t, y: -y, torch.ones(2), T, params=(), stepsize=0.1)


def test_a_torchdiffeq_solver_not_built_in_gets_the_embedded_pair_hint() -> None:
    with pytest.raises(ValueError, match=r"'scipy_solver' is a torchdiffeq solver.*'dopri5', rto"):
        odeint(lambda t, y: -y, torch.ones(2), T, params=(), solver="scipy_solver")


# --- messages and checks at their edges ----------------------------------------------------


def test_the_step_limit_message_names_the_interval_its_count_is_for_and_both_fixes() -> None:
    times = [0.0, 1.0, 3.0]
    with pytest.raises(ValueError) as info:  # the interval [1, 3] alone needs 2,000 > 1,500
        odeint(lambda t, y: -y, torch.ones(1), times, step=1e-3, max_steps=1500, params=())
    message = str(info.value)
    assert (
        "over the interval [1, 3] needs about 2e+03 steps, more than `max_steps=1,500`" in message
    )
    assert message.endswith("pass a larger `step`, or a larger `max_steps` if you mean it.")
    with pytest.raises(ValueError) as info:  # each interval fits, the 3,000 together do not
        odeint(lambda t, y: -y, torch.ones(1), times, step=1e-3, max_steps=2500, params=())
    assert "over the interval [0, 3] needs about 3e+03 steps" in str(info.value)


def test_a_wrong_output_names_the_type_and_the_dtype_fix() -> None:
    with pytest.raises(TypeError, match=r"must return a Tensor \(dy/dt\), got list; return a"):
        odeint(lambda t, y: [y], torch.ones(2), T, params=())
    with pytest.raises(
        TypeError,
        match=r"got torch.float64; cast the output or build the "
        r"dynamics in the state's dtype\.$",
    ):
        odeint(lambda t, y: y.double(), torch.ones(2), T, params=())


def test_in_inference_mode_only_a_real_in_place_change_is_refused() -> None:
    # Inference tensors have no version counter: their values are compared, NaN equal to NaN.
    with torch.inference_mode():
        y0 = torch.tensor([1.0, float("nan"), 2.0])
        sol = odeint(lambda t, y: torch.zeros_like(y), y0, T, params=(), check_finite=False)
        assert torch.equal(sol[-1][[0, 2]], y0[[0, 2]]) and torch.isnan(sol[-1][1])
        sol = odeint(lambda t, y: -y, torch.ones(2), T, params=())
        assert sol.shape == (2, 2)
        with pytest.raises(RuntimeError, match="modify their input `y` in place"):
            odeint(lambda t, y: y.mul_(1.0 + float("nan")), y0, T, params=(), check_finite=False)
        with pytest.raises(RuntimeError, match="modify their input `y` in place"):
            odeint(lambda t, y: y.add_(1.0), torch.ones(2), T, params=())


def test_a_pairing_error_and_the_torch_func_error_give_their_fixes() -> None:
    with pytest.raises(
        ValueError,
        match=r"pass one of those, or a Runge--Kutta solver such as "
        r"`solver='heun'`\.$",
    ):
        odeint(
            lambda t, y: -y,
            torch.ones(2),
            T,
            solver="reversible_heun",
            adjoint="adjoint",
            params=(),
        )
    with pytest.raises(
        RuntimeError,
        match=r"Use adjoint='backprop' inside torch\.func, or "
        r"torch\.autograd\.grad outside it\.$",
    ):
        torch.func.grad(lambda y: odeint(lambda t, x: -x, y, T, params=())[-1].sum())(torch.ones(2))


def test_a_solve_without_grad_counts_no_backward_evaluations() -> None:
    from torchode_adjoint import NFECounter

    nfe = NFECounter(forward=7, backward=7)
    with torch.no_grad():
        odeint(lambda t, y: -y, torch.ones(2), T, step=0.25, params=(), nfe=nfe)
    assert (nfe.forward, nfe.backward) == (4, 0)


def test_dynamics_without_the_time_argument_get_the_signature_fix() -> None:
    with pytest.raises(TypeError) as info:
        odeint(lambda y: -y, torch.ones(2), T, params=())
    assert str(info.value).startswith("the dynamics are called as `f(t, y)` with the time first")
    assert (
        "Define `forward(self, t, y)` (or `def f(t, y)`), even if the dynamics do not use `t`."
        in str(info.value)
    )
