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
    # Coarse enough that round-off does not dominate for order 4, fine enough to be asymptotic.
    n1, n2 = (20, 40) if order < 4 else (16, 32)
    e1, e2 = _error(problem, solver, n1), _error(problem, solver, n2)
    measured = math.log2(e1 / e2)
    assert measured == pytest.approx(order, abs=0.35), (e1, e2)
