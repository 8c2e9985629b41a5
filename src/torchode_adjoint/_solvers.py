"""The built-in tableaus and the solver registry."""

from __future__ import annotations

from ._reversible_heun import REVERSIBLE_HEUN, ReversibleHeun
from ._tableau import ButcherTableau

__all__ = [
    "EULER",
    "MIDPOINT",
    "HEUN",
    "RALSTON",
    "RK3",
    "SSPRK3",
    "RK4",
    "RK38",
    "Solver",
    "register_solver",
    "get_solver",
    "available_solvers",
]

_Z = 0.0

EULER = ButcherTableau(c=[0.0], a=[[_Z]], b=[1.0], order=1, name="euler")
"""Explicit (forward) Euler: order 1, one evaluation per step."""

MIDPOINT = ButcherTableau(
    c=[0.0, 0.5], a=[[_Z, _Z], [0.5, _Z]], b=[0.0, 1.0], order=2, name="midpoint"
)
"""Explicit midpoint method: order 2, two evaluations per step."""

HEUN = ButcherTableau(c=[0.0, 1.0], a=[[_Z, _Z], [1.0, _Z]], b=[0.5, 0.5], order=2, name="heun")
"""Heun's method (explicit trapezoid rule): order 2, two evaluations per step."""

RALSTON = ButcherTableau(
    c=[0.0, 2.0 / 3.0],
    a=[[_Z, _Z], [2.0 / 3.0, _Z]],
    b=[0.25, 0.75],
    order=2,
    name="ralston",
)
"""Ralston's second-order method (minimal error bound): order 2, two evaluations per step."""

RK3 = ButcherTableau(
    c=[0.0, 0.5, 1.0],
    a=[[_Z, _Z, _Z], [0.5, _Z, _Z], [-1.0, 2.0, _Z]],
    b=[1.0 / 6.0, 2.0 / 3.0, 1.0 / 6.0],
    order=3,
    name="rk3",
)
"""Kutta's third-order method: order 3, three evaluations per step."""

SSPRK3 = ButcherTableau(
    c=[0.0, 1.0, 0.5],
    a=[[_Z, _Z, _Z], [1.0, _Z, _Z], [0.25, 0.25, _Z]],
    b=[1.0 / 6.0, 1.0 / 6.0, 2.0 / 3.0],
    order=3,
    name="ssprk3",
)
"""Strong-stability-preserving RK3 (Shu--Osher): order 3, three evaluations per step."""

RK4 = ButcherTableau(
    c=[0.0, 0.5, 0.5, 1.0],
    a=[[_Z, _Z, _Z, _Z], [0.5, _Z, _Z, _Z], [_Z, 0.5, _Z, _Z], [_Z, _Z, 1.0, _Z]],
    b=[1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
    order=4,
    name="rk4",
)
"""The classic fourth-order Runge--Kutta method: order 4, four evaluations per step."""

RK38 = ButcherTableau(
    c=[0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0],
    a=[
        [_Z, _Z, _Z, _Z],
        [1.0 / 3.0, _Z, _Z, _Z],
        [-1.0 / 3.0, 1.0, _Z, _Z],
        [1.0, -1.0, 1.0, _Z],
    ],
    b=[0.125, 0.375, 0.375, 0.125],
    order=4,
    name="rk38",
)
"""Kutta's 3/8 rule (torchdiffeq's fixed-grid ``rk4``): order 4, four evaluations per step."""

Solver = ButcherTableau | ReversibleHeun
"""What ``solver=`` resolves to: a tableau, or the reversible Heun method."""

_REGISTRY: dict[str, Solver] = {}

# torchdiffeq's adaptive solvers, named so that their users get the right hint.
_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "tsit5", "scipy_solver")


def register_solver(name: str, tableau: ButcherTableau, *, overwrite: bool = False) -> None:
    """Register a tableau under ``name`` so that ``solver=name`` selects it.

    Parameters
    ----------
    name : str
        The key, e.g. ``"my_rk"``.
    tableau : ButcherTableau
        The method; it was validated when it was built.
    overwrite : bool, default False
        Replacing an existing name needs ``overwrite=True``.

    Raises
    ------
    TypeError
        If ``name`` is not a non-empty str or ``tableau`` is not a :class:`ButcherTableau`.
    ValueError
        If ``name`` is taken and ``overwrite`` is False.

    Examples
    --------
    >>> from torchode_adjoint import ButcherTableau, register_solver, get_solver
    >>> tab = ButcherTableau(c=[0.0], a=[[0.0]], b=[1.0], order=1, name="my_euler")
    >>> register_solver("my_euler", tab)
    >>> get_solver("my_euler").order
    1
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty str, got {name!r}.")
    if not isinstance(tableau, ButcherTableau):
        raise TypeError(
            f"`tableau` must be a ButcherTableau, got {type(tableau).__name__}; build one with "
            "`ButcherTableau(c, a, b, order)`."
        )
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"`name` {name!r} is already registered; pass `overwrite=True` to replace it."
        )
    _REGISTRY[name] = tableau


def get_solver(solver: str | Solver) -> Solver:
    """Resolve a solver name or object to a :class:`ButcherTableau` or the reversible Heun method.

    Parameters
    ----------
    solver : str, ButcherTableau or ReversibleHeun
        A registered name (see :func:`available_solvers`) or a solver, returned as is.

    Returns
    -------
    ButcherTableau or ReversibleHeun

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known names.
    TypeError
        For anything that is neither a str nor a tableau.
    """
    if isinstance(solver, (ButcherTableau, ReversibleHeun)):
        return solver
    if not isinstance(solver, str):
        raise TypeError(
            f"`solver` must be a solver name or a ButcherTableau, got {type(solver).__name__}."
        )
    try:
        return _REGISTRY[solver]
    except KeyError:
        if solver in _ADAPTIVE:
            raise ValueError(
                f"`solver` {solver!r} is an adaptive solver of torchdiffeq; torchode_adjoint "
                "integrates with fixed steps: pass a fixed-step method and its largest step, e.g. "
                "`solver='rk4', step=0.05` (see the 'Coming from torchdiffeq' page of the docs). "
                f"Registered solvers: {available_solvers()}."
            ) from None
        raise ValueError(
            f"`solver` {solver!r} is not a registered solver; choose one of "
            f"{available_solvers()} or pass a ButcherTableau."
        ) from None


def available_solvers() -> list[str]:
    """The registered solver names, sorted.

    Returns
    -------
    list of str
    """
    return sorted(_REGISTRY)


for _tab in (EULER, MIDPOINT, HEUN, RALSTON, RK3, SSPRK3, RK4, RK38):
    register_solver(_tab.name, _tab)
del _tab
_REGISTRY[REVERSIBLE_HEUN.name] = REVERSIBLE_HEUN
