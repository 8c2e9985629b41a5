"""Methods built from solvers: the solver layer's answer to "what steps does this solver take?".

A gradient mode never names a solver class. It asks for a method (:func:`as_method`), for a
method with an exact inverse (:func:`as_reversible`), or for a capability: :func:`tableau_of`
(the Butcher tableau a method steps with, which the continuous adjoint and the checkpointed mode
integrate again), and a method's ``coupling`` (the reversible scheme's parameter, for advice on
its round-off).
"""

from __future__ import annotations

from .protocol import Method
from .registry import HEUN, Solver
from .reversible_coupling import Coupled
from .runge_kutta import RungeKutta
from .tableau import ButcherTableau

__all__ = [
    "as_method",
    "as_embedded",
    "as_reversible",
    "tableau_of",
    "runge_kutta_tableau",
    "is_heun",
]


def as_method(solver: Solver) -> Method:
    """The method ``solver`` steps with: a tableau's Runge--Kutta step, or the reversible Heun
    method, which is its own method."""
    if isinstance(solver, ButcherTableau):
        return RungeKutta(solver)
    return solver


def as_embedded(tableau: ButcherTableau) -> Method:
    """An embedded pair as the method of error-controlled steps (each step's error estimate
    returned beside the state)."""
    return RungeKutta(tableau, estimate=True)


def as_reversible(
    solver: Solver,
    coupling: float,
    *,
    estimate: bool = False,
    choose: bool = False,
    min_coupling: float = 0.5,
) -> Method:
    """``solver`` as a method with an exact inverse: a tableau made reversible by McCallum &
    Foster's coupling ``coupling`` (with ``choose``, chosen per step up to ``coupling``), or
    the reversible Heun method (its own inverse)."""
    if isinstance(solver, ButcherTableau):
        return Coupled(solver, coupling, estimate, choose, min_coupling)
    return solver


def tableau_of(solver: Solver) -> ButcherTableau | None:
    """The Butcher tableau ``solver`` steps with, or None for a method that is no tableau."""
    return solver if isinstance(solver, ButcherTableau) else None


def runge_kutta_tableau(method: Method) -> ButcherTableau | None:
    """The tableau ``method`` takes plain Runge--Kutta steps of (the continuous adjoint
    integrates its augmented system with it), or None for a method with a state of its own."""
    if isinstance(method, RungeKutta):
        return method.tableau
    return None


def is_heun(solver: Solver) -> bool:
    """Whether ``solver`` has Heun's tableau (whatever its name)."""
    if not isinstance(solver, ButcherTableau):
        return False
    return (solver.c, solver.a, solver.b) == (HEUN.c, HEUN.a, HEUN.b)
