"""Every registered solver's measured order matches its tableau's order."""

from __future__ import annotations

import math

import pytest
import torch
from problems import PROBLEMS, Problem

from torchode_adjoint import available_solvers, get_solver, odeint


def _error(problem: Problem, solver: str, n: int) -> float:
    t0, t1 = 0.1, 1.1
    sol = odeint(
        problem.f,
        problem.y0,
        torch.tensor([t0, t1], dtype=torch.float64),
        solver=solver,
        step=(t1 - t0) / n,
        adjoint=False,
    )
    return float((sol[-1] - problem.exact(t1, problem.y0, t0)).abs().max())


@pytest.mark.parametrize("problem", PROBLEMS, ids=[p.name for p in PROBLEMS])
@pytest.mark.parametrize("solver", available_solvers())
def test_measured_order_matches_tableau_order(problem: Problem, solver: str) -> None:
    order = get_solver(solver).order
    # Coarse enough that round-off does not dominate (order 8 reaches it at about 6 steps),
    # fine enough to be asymptotic.
    n1, n2 = (20, 40) if order < 4 else (16, 32) if order < 6 else (2, 4)
    e1, e2 = _error(problem, solver, n1), _error(problem, solver, n2)
    measured = math.log2(e1 / e2)
    if order >= 6 and problem.name != "time_dependent":
        # On a linear problem the step is the stability polynomial; dopri8's matches exp(z) in
        # its z**9 term to 0.13 % (1 - 0.9987 of 1/9!), so its error falls faster than h**8
        # until round-off: at least the order there, exactly it on the non-autonomous problem.
        assert measured >= order - 0.35, (e1, e2)
        return
    assert measured == pytest.approx(order, abs=0.35), (e1, e2)
