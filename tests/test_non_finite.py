"""Non-finite states raise a RuntimeError naming the time; check_finite=False skips the check."""

from __future__ import annotations

import pytest
import torch
from problems import HEUN_MADE_REVERSIBLE

from torchode_adjoint import GRADIENT_MODES, odeint

pytestmark = HEUN_MADE_REVERSIBLE

D = torch.float64


def _blows_up_after(t_star: float):
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Finite before t_star, NaN from the first stage evaluated at or after it.
        return torch.where(t >= t_star, torch.full_like(y, float("nan")), -y)

    return f


@pytest.mark.parametrize("adjoint", [m for m in GRADIENT_MODES if m != "reversible"])
def test_nan_raises_runtime_error_naming_the_first_bad_step_time(adjoint: str) -> None:
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    # Euler evaluates at 0.5, 0.6, 0.7, ...: the first NaN derivative (at 0.7) makes the state
    # at the end of that step, t = 0.8, non-finite.
    with pytest.raises(RuntimeError, match=r"t = 0\.8 ") as info:
        odeint(
            _blows_up_after(0.62), torch.ones(2, dtype=D), t, step=0.1, adjoint=adjoint, params=()
        )
    assert "step 3 of 5" in str(info.value)


def test_nan_in_the_reversible_method_raises_naming_the_output_interval() -> None:
    # The reversible state cannot be re-run step by step: the interval is named instead.
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    with pytest.raises(RuntimeError, match=r"in \[0\.5, 1\]"):
        odeint(
            _blows_up_after(0.62),
            torch.ones(2, dtype=D),
            t,
            solver="heun",
            step=0.1,
            adjoint="reversible",
            params=(),
        )


def test_check_finite_false_returns_the_non_finite_result() -> None:
    sol = odeint(
        _blows_up_after(0.62),
        torch.ones(2, dtype=D),
        torch.tensor([0.0, 1.0]).double(),
        step=0.1,
        params=(),
        check_finite=False,
    )
    assert torch.isnan(sol[-1]).all()


def test_non_finite_y0_is_named() -> None:
    with pytest.raises(ValueError, match="`y0`"):
        odeint(lambda t, y: -y, torch.tensor([float("inf")]), torch.tensor([0.0, 1.0]), params=())


def test_overflowing_state_is_reported_as_infinite() -> None:
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        odeint(
            lambda t, y: y * y, torch.tensor([10.0]), torch.tensor([0.0, 5.0]), step=0.05, params=()
        )


def test_a_blow_up_with_the_defaults_names_the_settings_in_force_and_the_steps_taken() -> None:
    # No solver or step given: the error says they were solver='euler', step=0.1, and that the
    # steps taken were 0.0833 (each output interval of 0.25 split into 3 equal steps <= 0.1),
    # so that a user ported from torchdiffeq, who gave neither, sees what ran.
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=D)
    with pytest.raises(RuntimeError) as info:
        odeint(_blows_up_after(0.62), torch.ones(2, dtype=D), t, params=())
    message = str(info.value)
    assert "solver='euler', step=0.1 (steps of 0.0833333 in this interval" in message
    assert "default to solver='euler', step=0.1" in message


def test_a_blow_up_with_one_step_per_interval_says_so() -> None:
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    with pytest.raises(RuntimeError, match=r"solver='rk4', step=None \(one step per interval\)"):
        odeint(_blows_up_after(0.62), torch.ones(2, dtype=D), t, solver="rk4", step=None, params=())
