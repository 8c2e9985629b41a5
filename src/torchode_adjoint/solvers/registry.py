"""The built-in tableaus and the solver registry."""

from __future__ import annotations

from .reversible_heun import REVERSIBLE_HEUN, ReversibleHeun
from .tableau import ButcherTableau

__all__ = [
    "EULER",
    "MIDPOINT",
    "HEUN",
    "RALSTON",
    "RK3",
    "SSPRK3",
    "RK4",
    "RK38",
    "DOPRI8",
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

# Embedded pairs: a method and a lower-order one sharing its stages; the difference of the two
# solutions estimates the local error for error-controlled steps. Each is also a fixed-step
# method of its (higher) order.

HEUN_EULER = ButcherTableau(
    c=[0.0, 1.0],
    a=[[_Z, _Z], [1.0, _Z]],
    b=[0.5, 0.5],
    order=2,
    name="adaptive_heun",
    b_embedded=[1.0, 0.0],
    embedded_order=1,
    # The quadratic through y0 with slope f(y0) and through y1 (second order, as the method).
    b_dense=[[1.0, -0.5], [0.0, 0.5]],
)
"""Heun--Euler 2(1) (torchdiffeq's ``adaptive_heun``): Heun's method with Euler's for the error
estimate; two evaluations per step; a quadratic interpolant."""

FEHLBERG2 = ButcherTableau(
    c=[0.0, 0.5, 1.0],
    a=[[_Z, _Z, _Z], [0.5, _Z, _Z], [1.0 / 256.0, 255.0 / 256.0, _Z]],
    b=[1.0 / 512.0, 255.0 / 256.0, 1.0 / 512.0],
    order=2,
    name="fehlberg2",
    b_embedded=[1.0 / 256.0, 255.0 / 256.0, 0.0],
    embedded_order=1,
    # The quadratic through y0 with slope f(y0) and through y1 (second order, as the method).
    b_dense=[[1.0, 1.0 / 512.0 - 1.0], [0.0, 255.0 / 256.0], [0.0, 1.0 / 512.0]],
)
"""Runge--Kutta--Fehlberg 2(1) (Fehlberg 1969): three evaluations per step; a quadratic
interpolant."""

BOSH3 = ButcherTableau(
    c=[0.0, 0.5, 0.75, 1.0],
    a=[
        [_Z, _Z, _Z, _Z],
        [0.5, _Z, _Z, _Z],
        [_Z, 0.75, _Z, _Z],
        [2.0 / 9.0, 1.0 / 3.0, 4.0 / 9.0, _Z],
    ],
    b=[2.0 / 9.0, 1.0 / 3.0, 4.0 / 9.0, 0.0],
    order=3,
    name="bosh3",
    b_embedded=[7.0 / 24.0, 0.25, 1.0 / 3.0, 0.125],
    embedded_order=2,
    # Cubic Hermite interpolation between (y0, f(y0)) and (y1, f(y1)), f(y1) being the last
    # stage (third order, as the method).
    b_dense=[
        [1.0, -4.0 / 3.0, 5.0 / 9.0],
        [0.0, 1.0, -2.0 / 3.0],
        [0.0, 4.0 / 3.0, -8.0 / 9.0],
        [0.0, -1.0, 1.0],
    ],
)
"""Bogacki--Shampine 3(2) (1989): first same as last, three new evaluations per step; cubic
Hermite interpolation."""

DOPRI5 = ButcherTableau(
    c=[0.0, 0.2, 0.3, 0.8, 8.0 / 9.0, 1.0, 1.0],
    a=[
        [_Z] * 7,
        [0.2, _Z, _Z, _Z, _Z, _Z, _Z],
        [3.0 / 40.0, 9.0 / 40.0, _Z, _Z, _Z, _Z, _Z],
        [44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0, _Z, _Z, _Z, _Z],
        [19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0, _Z, _Z, _Z],
        [9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0, _Z, _Z],
        [35.0 / 384.0, _Z, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0, _Z],
    ],
    b=[35.0 / 384.0, _Z, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0, _Z],
    order=5,
    name="dopri5",
    b_embedded=[
        5179.0 / 57600.0,
        _Z,
        7571.0 / 16695.0,
        393.0 / 640.0,
        -92097.0 / 339200.0,
        187.0 / 2100.0,
        1.0 / 40.0,
    ],
    embedded_order=4,
    # Shampine's (1986) fourth-order continuous extension, as polynomials in theta.
    b_dense=[
        [1.0, -8048581381 / 2820520608, 8663915743 / 2820520608, -12715105075 / 11282082432],
        [_Z, _Z, _Z, _Z],
        [_Z, 131558114200 / 32700410799, -68118460800 / 10900136933, 87487479700 / 32700410799],
        [_Z, -1754552775 / 470086768, 14199869525 / 1410260304, -10690763975 / 1880347072],
        [
            _Z,
            127303824393 / 49829197408,
            -318862633887 / 49829197408,
            701980252875 / 199316789632,
        ],
        [_Z, -282668133 / 205662961, 2019193451 / 616988883, -1453857185 / 822651844],
        [_Z, 40617522 / 29380423, -110615467 / 29380423, 69997945 / 29380423],
    ],
)
"""Dormand--Prince 5(4) (1980), torchdiffeq's default: first same as last, six new evaluations
per step, a fourth-order interpolant."""


def _tsit5() -> ButcherTableau:
    c = [0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0]
    # Tsitouras's coefficients without the first column, which makes each row sum to c.
    rows = [
        [],
        [],
        [0.335480655492357],
        [-6.359448489975075, 4.3622954328695815],
        [-11.748883564062828, 7.4955393428898365, -0.09249506636175525],
        [-12.92096931784711, 8.159367898576159, -0.071584973281401, -0.028269050394068383],
    ]
    b = [
        0.09646076681806523,
        0.01,
        0.4798896504144996,
        1.379008574103742,
        -3.290069515436081,
        2.324710524099774,
        0.0,
    ]
    # Tsitouras's error weights b - b_embedded.
    e = [
        0.001780011052226,
        0.000816434459657,
        -0.007880878010262,
        0.144711007173263,
        -0.582357165452555,
        0.458082105929187,
        -1.0 / 66.0,
    ]
    # Tsitouras's fourth-order interpolant, coefficients of theta**1..4; the sixth row is what
    # makes the columns sum to (1, 0, 0, 0), as they must.
    dense = [
        [1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216],
        [_Z, 0.13169999999999998, -0.2234, 0.1017],
        [_Z, 3.930296236894751, -5.941033872131505, 2.490627285651253],
        [_Z, -12.411077166933676, 30.338188630282318, -16.548102889244902],
        [_Z, 37.50931341651104, -88.1789048947664, 47.37952196281928],
        [_Z, _Z, _Z, _Z],
        [_Z, 1.5, -4.0, 2.5],
    ]
    dense[5] = [_Z, *(-sum(row[p] for row in dense) for p in (1, 2, 3))]
    a = [[_Z] * 7 for _ in range(7)]
    a[1][0] = c[1]
    for i in range(2, 6):
        a[i][0] = c[i] - sum(rows[i])
        a[i][1:i] = rows[i]
    a[6] = [*b[:6], _Z]
    return ButcherTableau(
        c=c,
        a=a,
        b=b,
        order=5,
        name="tsit5",
        b_embedded=[b_i - e_i for b_i, e_i in zip(b, e)],
        embedded_order=4,
        b_dense=dense,
    )


TSIT5 = _tsit5()
"""Tsitouras 5(4) (2011): first same as last, six new evaluations per step; smaller error
constants than Dormand--Prince."""


def _dopri8() -> ButcherTableau:
    # Prince & Dormand's RK8(7)13M (J. Comput. Appl. Math. 7, 1981), in the rational
    # approximations of their Table 2 (as in RKSUITE): the order conditions hold to about 1e-18.
    c = [
        0.0, 1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200,
        5490023248 / 9719169821, 13 / 20, 1201146811 / 1299019798, 1.0, 1.0,
    ]  # fmt: skip
    # Each row's nonzero entries, by column.
    rows: list[dict[int, float]] = [
        {},
        {0: 1 / 18},
        {0: 1 / 48, 1: 1 / 16},
        {0: 1 / 32, 2: 3 / 32},
        {0: 5 / 16, 2: -75 / 64, 3: 75 / 64},
        {0: 3 / 80, 3: 3 / 16, 4: 3 / 20},
        {0: 29443841 / 614563906, 3: 77736538 / 692538347, 4: -28693883 / 1125000000,
         5: 23124283 / 1800000000},
        {0: 16016141 / 946692911, 3: 61564180 / 158732637, 4: 22789713 / 633445777,
         5: 545815736 / 2771057229, 6: -180193667 / 1043307555},
        {0: 39632708 / 573591083, 3: -433636366 / 683701615, 4: -421739975 / 2616292301,
         5: 100302831 / 723423059, 6: 790204164 / 839813087, 7: 800635310 / 3783071287},
        {0: 246121993 / 1340847787, 3: -37695042795 / 15268766246,
         4: -309121744 / 1061227803, 5: -12992083 / 490766935, 6: 6005943493 / 2108947869,
         7: 393006217 / 1396673457, 8: 123872331 / 1001029789},
        {0: -1028468189 / 846180014, 3: 8478235783 / 508512852, 4: 1311729495 / 1432422823,
         5: -10304129995 / 1701304382, 6: -48777925059 / 3047939560,
         7: 15336726248 / 1032824649, 8: -45442868181 / 3398467696,
         9: 3065993473 / 597172653},
        {0: 185892177 / 718116043, 3: -3185094517 / 667107341, 4: -477755414 / 1098053517,
         5: -703635378 / 230739211, 6: 5731566787 / 1027545527, 7: 5232866602 / 850066563,
         8: -4093664535 / 808688257, 9: 3962137247 / 1805957418, 10: 65686358 / 487910083},
        {0: 403863854 / 491063109, 3: -5068492393 / 434740067, 4: -411421997 / 543043805,
         5: 652783627 / 914296604, 6: 11173962825 / 925320556, 7: -13158990841 / 6184727034,
         8: 3936647629 / 1978049680, 9: -160528059 / 685178525, 10: 248638103 / 1413531060},
    ]  # fmt: skip
    b = [
        14005451 / 335480064, _Z, _Z, _Z, _Z, -59238493 / 1068277825, 181606767 / 758867731,
        561292985 / 797845732, -1041891430 / 1371343529, 760417239 / 1151165299,
        118820643 / 751138087, -528747749 / 2220607170, 1 / 4,
    ]  # fmt: skip
    b_embedded = [
        13451932 / 455176623, _Z, _Z, _Z, _Z, -808719846 / 976000145, 1757004468 / 5645159321,
        656045339 / 265891186, -3867574721 / 1518517206, 465885868 / 322736535,
        53011238 / 667516719, 2 / 45, _Z,
    ]  # fmt: skip
    a = [[row.get(j, _Z) for j in range(13)] for row in rows]
    return ButcherTableau(
        c=c, a=a, b=b, order=8, name="dopri8", b_embedded=b_embedded, embedded_order=7
    )


DOPRI8 = _dopri8()
"""Dormand--Prince 8(7) (Prince & Dormand 1981, RK8(7)13M; torchdiffeq's ``dopri8``): 13
evaluations per step, not first same as last; no interpolant here, so its solves step to every
output time."""

Solver = ButcherTableau | ReversibleHeun
"""What ``solver=`` resolves to: a tableau, or the reversible Heun method."""

_REGISTRY: dict[str, Solver] = {}

# torchdiffeq's adaptive solvers not built in, named so that their users get the right hint.
_ADAPTIVE = ("scipy_solver",)


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
                f"`solver` {solver!r} is a torchdiffeq solver that torchode_adjoint does not "
                "build in: for error control pass an embedded pair such as `solver='dopri5', "
                "rtol=1e-5, atol=1e-7` or `solver='tsit5'`, or register your own tableau with "
                "`b_embedded` (see the 'Coming from torchdiffeq' page of the docs). "
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


for _tab in (
    EULER,
    MIDPOINT,
    HEUN,
    RALSTON,
    RK3,
    SSPRK3,
    RK4,
    RK38,
    HEUN_EULER,
    FEHLBERG2,
    BOSH3,
    DOPRI5,
    TSIT5,
    DOPRI8,
):
    register_solver(_tab.name, _tab)
del _tab
_REGISTRY[REVERSIBLE_HEUN.name] = REVERSIBLE_HEUN
