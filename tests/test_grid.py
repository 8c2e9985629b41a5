"""Step counts, output times hit exactly, decreasing time, 1.1 / 0.1 -> 11 steps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from problems import count_steps

from torchode_adjoint import odeint


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("t", "step", "expected"),
    [
        ([0.0, 1.1], 0.1, 11),
        ([0.3, 0.9], 0.1, 6),
        ([0.0, 1.0], 0.1, 10),
        ([0.0, 1.0], 0.3, 4),
        ([0.0, 0.05], 0.1, 1),
        ([1.0, 0.0], 0.25, 4),
        ([0.0, 0.5, 1.7], 0.5, 1 + 3),
        ([0.0, 1.0, 3.0], None, 2),
    ],
)
def test_step_counts_per_interval(
    t: list[float], step: float | None, expected: int, dtype: torch.dtype
) -> None:
    assert count_steps(t, step, dtype) == expected


def test_output_times_are_hit_exactly_with_a_grid_not_aligned_to_the_step() -> None:
    # y' = 1 integrates exactly with Euler: y(t) = t - t0 at every output time.
    t = torch.tensor([0.0, 0.37, 0.41, 1.93], dtype=torch.float64)
    sol = odeint(
        lambda t, y: torch.ones_like(y), torch.zeros(1, dtype=torch.float64), t, step=0.1, params=()
    )
    torch.testing.assert_close(sol[:, 0], t, rtol=0, atol=1e-14)


def test_decreasing_times_integrate_backwards() -> None:
    t = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    y1 = torch.tensor([math.exp(-1.0)], dtype=torch.float64)
    sol = odeint(lambda t, y: -y, y1, t, solver="rk4", step=0.01, params=())
    torch.testing.assert_close(sol[-1], torch.ones(1, dtype=torch.float64), rtol=1e-9, atol=0)
    torch.testing.assert_close(
        sol[1], torch.tensor([math.exp(-0.5)], dtype=torch.float64), rtol=1e-9, atol=0
    )


@given(
    t0=st.floats(-5, 5),
    length=st.floats(0.01, 5),
    step=st.floats(0.005, 1.0),
)
@example(t0=0.0, length=1.1, step=0.1)
@example(t0=0.3, length=0.6, step=0.1)
def test_step_count_is_the_ceiling_and_no_step_exceeds_the_step_size(
    t0: float, length: float, step: float
) -> None:
    t1 = t0 + length
    n = count_steps([t0, t1], step, torch.float64)
    exact = abs(t1 - t0) / step
    # Either the true ceiling, or one less when the ratio is an integer up to round-off.
    assert n in (math.ceil(exact), math.ceil(exact - 1e-9))
    assert abs(t1 - t0) / n <= step * (1 + 1e-9)
    assert n == 1 or abs(t1 - t0) / (n - 1) > step * (1 - 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_interval_barely_over_a_whole_number_of_steps_warns_naming_the_fix(dtype) -> None:
    # Output times spaced 0.025025 with step=0.025: each interval is 0.1 % over one step and
    # takes two (twice the evaluations); the warning names the interval, the step and the fix.
    from torchode_adjoint import NFECounter, StepRoundingWarning

    t = torch.arange(5, dtype=torch.float64) * 0.025025
    nfe = NFECounter()
    with pytest.warns(
        StepRoundingWarning, match=r"\[0, 0\.025025\] .*0\.1 % of a step longer than 1 step"
    ) as rec:
        odeint(lambda t, y: -y, torch.ones(1, dtype=dtype), t.to(dtype), step=0.025, nfe=nfe,
               adjoint=False)  # fmt: skip
    assert nfe.forward == 4 * 2  # the documented rule still holds: never a step above `step`
    assert len(rec) == 1  # once per solve, not once per interval
    assert "pass `step=0.025025`" in str(rec[0].message)


@pytest.mark.parametrize(
    ("length", "step"),
    [(0.0255, 0.025), (1.0, 0.1), (1.1, 0.1), (0.05, 0.1), (1.0, None), (1.0, 0.002), (2.0, 1e-3)],
)
def test_intervals_not_within_one_percent_over_a_whole_count_do_not_warn(length, step) -> None:
    import warnings

    from torchode_adjoint import StepRoundingWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", StepRoundingWarning)
        odeint(lambda t, y: -y, torch.ones(1, dtype=torch.float64), [0.0, length], step=step,
               adjoint=False)  # fmt: skip
