"""Butcher tableaus: explicit Runge--Kutta methods described as data."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ButcherTableau", "StepPlan", "plan_for"]

# Consistency conditions (sum(b) == 1, c_i == sum_j a_ij) are checked to this absolute tolerance:
# loose enough for coefficients typed as decimals (e.g. 0.1666...), tight enough to catch a typo.
_COEFF_TOL = 1e-10


def _as_floats(values: Sequence[float], field: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)):
        raise TypeError(
            f"`{field}` must be a sequence of real numbers, got the string {values!r}; pass e.g. "
            f"`{field}=[0.0, 1.0]`."
        )
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`{field}` must be a sequence of real numbers, got {values!r}; "
            f"pass e.g. `{field}=[0.0, 1.0]`."
        ) from err
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"`{field}` must hold finite numbers, got {out}.")
    return out


def _order_conditions(
    c: tuple[float, ...], a: tuple[tuple[float, ...], ...], b: tuple[float, ...]
) -> list[tuple[int, str, float, float]]:
    """The order conditions of an explicit RK method up to order 4: (order, name, value, target).

    The rooted-tree conditions (Butcher): order 1 needs one, order 2 one more, order 3 two more,
    order 4 four more.
    """
    s = len(b)
    ac = [sum(a[i][j] * c[j] for j in range(s)) for i in range(s)]
    ac2 = [sum(a[i][j] * c[j] ** 2 for j in range(s)) for i in range(s)]
    aac = [sum(a[i][j] * ac[j] for j in range(s)) for i in range(s)]
    return [
        (1, "sum(b)", sum(b), 1.0),
        (2, "sum(b c)", sum(b[i] * c[i] for i in range(s)), 1 / 2),
        (3, "sum(b c^2)", sum(b[i] * c[i] ** 2 for i in range(s)), 1 / 3),
        (3, "sum(b a c)", sum(b[i] * ac[i] for i in range(s)), 1 / 6),
        (4, "sum(b c^3)", sum(b[i] * c[i] ** 3 for i in range(s)), 1 / 4),
        (4, "sum(b c a c)", sum(b[i] * c[i] * ac[i] for i in range(s)), 1 / 8),
        (4, "sum(b a c^2)", sum(b[i] * ac2[i] for i in range(s)), 1 / 12),
        (4, "sum(b a a c)", sum(b[i] * aac[i] for i in range(s)), 1 / 24),
    ]


@dataclass(frozen=True, init=False)
class ButcherTableau:
    """An explicit Runge--Kutta method as its Butcher tableau.

    A method with ``s`` stages advances ``y`` by one step ``h`` as::

        k_i = f(t + c_i h, y + h * sum_{j<i} a_ij k_j),   i = 0..s-1
        y_next = y + h * sum_i b_i k_i

    The tableau is validated when it is built, so a registered method is always consistent.

    Parameters
    ----------
    c : sequence of float, length s
        Stage nodes; ``c[0]`` must be 0 and ``c[i]`` must equal the row sum of ``a[i]``.
    a : sequence of sequences of float, shape (s, s)
        The full, strictly lower-triangular coupling matrix (zeros on and above the diagonal).
    b : sequence of float, length s
        Weights; they must sum to 1.
    order : int
        The method's order of accuracy ``p`` (global error O(h^p)).
    name : str, default "custom"
        A label used in messages and reprs.
    b_embedded : sequence of float, length s, optional
        The weights of an embedded method of lower order (an *embedded pair*, such as
        Dormand--Prince 5(4)): the difference of the two solutions,
        ``h * sum_i (b_i - b_embedded_i) k_i``, estimates the local error for error-controlled
        steps (``rtol=``/``atol=``). They must sum to 1 and satisfy the order conditions of
        ``embedded_order``.
    embedded_order : int, optional
        The embedded method's order, below ``order``; required with ``b_embedded``.
    b_dense : sequence of sequences of float, shape (s, P), optional
        A continuous extension (dense output): ``y(t + theta h) = y + h sum_i b_i(theta) k_i``
        with ``b_i(theta) = sum_p b_dense[i][p] theta**(p + 1)``. Checked for consistency
        (``sum_i b_i(theta) = theta``) and against ``b`` at ``theta = 1``.

    Raises
    ------
    ValueError
        Naming the field: wrong lengths or shapes, a non-zero entry on or above the diagonal of
        ``a``, weights not summing to 1, ``c[i]`` different from the row sum of ``a[i]``,
        a non-positive order, an order the coefficients do not satisfy (the order conditions
        are checked up to order 4, for the embedded weights too) or a non-finite coefficient.
    TypeError
        If a field is not made of real numbers.

    Examples
    --------
    >>> from torchode_adjoint import ButcherTableau
    >>> heun = ButcherTableau(c=[0.0, 1.0], a=[[0.0, 0.0], [1.0, 0.0]], b=[0.5, 0.5], order=2)
    >>> heun.stages
    2
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    name: str = "custom"
    b_embedded: tuple[float, ...] | None = None
    embedded_order: int | None = None
    b_dense: tuple[tuple[float, ...], ...] | None = None

    def __init__(
        self,
        c: Sequence[float],
        a: Sequence[Sequence[float]],
        b: Sequence[float],
        order: int,
        name: str = "custom",
        *,
        b_embedded: Sequence[float] | None = None,
        embedded_order: int | None = None,
        b_dense: Sequence[Sequence[float]] | None = None,
    ) -> None:
        # Any sequences in, tuples kept (validated and converted below): the dataclass's own
        # __init__ would type the arguments as the stored tuples.
        for field_name, value in (
            ("c", c),
            ("a", a),
            ("b", b),
            ("order", order),
            ("name", name),
            ("b_embedded", b_embedded),
            ("embedded_order", embedded_order),
            ("b_dense", b_dense),
        ):
            object.__setattr__(self, field_name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        c = _as_floats(self.c, "c")
        b = _as_floats(self.b, "b")
        try:
            rows = list(self.a)
        except TypeError as err:
            raise TypeError(f"`a` must be a sequence of rows, got {self.a!r}.") from err
        a = tuple(_as_floats(row, "a") for row in rows)
        s = len(b)
        if s == 0:
            raise ValueError("`b` must have at least one weight (one stage), got an empty `b`.")
        if len(c) != s:
            raise ValueError(
                f"`c` must have one node per stage ({s}, the length of `b`), got {len(c)}."
            )
        if len(a) != s or any(len(row) != s for row in a):
            shape = (len(a), *sorted({len(row) for row in a}))
            raise ValueError(
                f"`a` must be a full {s}x{s} matrix (one row and column per stage, zeros on and "
                f"above the diagonal), got rows of lengths {shape[1:]} in {shape[0]} rows."
            )
        for i, row in enumerate(a):
            for j in range(i, s):
                if row[j] != 0.0:
                    raise ValueError(
                        f"`a` must be strictly lower-triangular for an explicit method, got "
                        f"a[{i}][{j}] = {row[j]}; implicit methods are not supported."
                    )
        if abs(sum(b) - 1.0) > _COEFF_TOL:
            raise ValueError(f"`b` must sum to 1 (consistency), got sum(b) = {sum(b)!r}.")
        for i, row in enumerate(a):
            if abs(sum(row) - c[i]) > _COEFF_TOL:
                raise ValueError(
                    f"`c[{i}]` must equal the row sum of `a[{i}]` ({sum(row)!r}), got {c[i]!r}."
                )
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"`order` must be a positive int, got {self.order!r}.")
        # The claimed order is checked against the coefficients (conditions up to order 4; a
        # higher claim is checked up to 4).
        for p, name, value, target in _order_conditions(c, a, b):
            if p <= self.order and abs(value - target) > _COEFF_TOL:
                raise ValueError(
                    f"`order={self.order}` is not what the coefficients give: the order-{p} "
                    f"condition {name} = {target:.6g} fails ({value!r}); pass the order the "
                    "method has, or fix the coefficients."
                )
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"`name` must be a non-empty str, got {self.name!r}.")
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        self._check_embedded(c, a, s)
        self._check_dense(b, s)

    def _check_embedded(
        self, c: tuple[float, ...], a: tuple[tuple[float, ...], ...], s: int
    ) -> None:
        if self.b_embedded is None:
            if self.embedded_order is not None:
                raise ValueError(
                    f"`embedded_order={self.embedded_order!r}` needs `b_embedded`, the embedded "
                    "method's weights; pass both, or neither for a method without error estimate."
                )
            return
        b_hat = _as_floats(self.b_embedded, "b_embedded")
        if len(b_hat) != s:
            raise ValueError(
                f"`b_embedded` must have one weight per stage ({s}), got {len(b_hat)}."
            )
        p = self.embedded_order
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p < self.order:
            raise ValueError(
                f"`embedded_order` must be an int from 1 to order - 1 = {self.order - 1} (the "
                f"embedded method is the lower-order one), got {p!r}."
            )
        if b_hat == self.b:
            raise ValueError(
                "`b_embedded` equals `b`: the error estimate would always be zero; pass the "
                "weights of the embedded lower-order method."
            )
        for q, name, value, target in _order_conditions(c, a, b_hat):
            if q <= p and abs(value - target) > _COEFF_TOL:
                raise ValueError(
                    f"`embedded_order={p}` is not what `b_embedded` gives: the order-{q} "
                    f"condition {name} = {target:.6g} fails ({value!r}); pass the order the "
                    "embedded method has, or fix its weights."
                )
        object.__setattr__(self, "b_embedded", b_hat)

    def _check_dense(self, b: tuple[float, ...], s: int) -> None:
        if self.b_dense is None:
            return
        rows = tuple(_as_floats(row, "b_dense") for row in self.b_dense)
        widths = {len(row) for row in rows}
        if len(rows) != s or len(widths) != 1 or 0 in widths:
            raise ValueError(
                f"`b_dense` must have one row per stage ({s}) of equal, non-zero length (the "
                f"coefficients of theta**1, theta**2, ...), got {len(rows)} rows of lengths "
                f"{sorted(widths)}."
            )
        width = widths.pop()
        for p in range(width):
            total = sum(row[p] for row in rows)
            if abs(total - (1.0 if p == 0 else 0.0)) > _COEFF_TOL:
                raise ValueError(
                    f"`b_dense` is inconsistent: the theta**{p + 1} coefficients sum to "
                    f"{total!r}, not {1.0 if p == 0 else 0.0} (sum_i b_i(theta) must be theta)."
                )
        for i, row in enumerate(rows):
            if abs(sum(row) - b[i]) > _COEFF_TOL:
                raise ValueError(
                    f"`b_dense` row {i} gives b_{i}(1) = {sum(row)!r}, not b[{i}] = {b[i]!r}: "
                    "the interpolant must end on the step's solution."
                )
        object.__setattr__(self, "b_dense", rows)

    @property
    def stages(self) -> int:
        """Number of stages, i.e. evaluations of the dynamics per step."""
        return len(self.b)

    @property
    def adaptive(self) -> bool:
        """Whether the tableau is an embedded pair (it has an error estimate)."""
        return self.b_embedded is not None

    @property
    def error_weights(self) -> tuple[float, ...] | None:
        """``b - b_embedded``: the local error estimate is ``h * sum_i e_i k_i``."""
        if self.b_embedded is None:
            return None
        return tuple(x - y for x, y in zip(self.b, self.b_embedded))

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is ``f`` at the new solution (``c = 1`` and the
        last row of ``a`` equals ``b``), so it is the next step's first stage."""
        s = self.stages
        return (
            s > 1
            and self.c[-1] == 1.0
            and self.b[-1] == 0.0
            and self.a[-1][: s - 1] == self.b[: s - 1]
        )

    def stability(self, z: float) -> float:
        """The stability function ``R(z)``: one step of size ``h`` of ``y' = lam y`` multiplies
        ``y`` by ``R(h lam)`` (for real ``z = h lam``; a polynomial of degree at most ``s``).

        Examples
        --------
        >>> from torchode_adjoint import get_solver
        >>> get_solver("euler").stability(-0.5)
        0.5
        """
        ks: list[float] = []
        for row in self.a:
            ks.append(1.0 + z * sum(a_ij * k for a_ij, k in zip(row, ks)))
        return 1.0 + z * sum(b_i * k for b_i, k in zip(self.b, ks))

    def __repr__(self) -> str:
        pair = f", embedded_order={self.embedded_order}" if self.adaptive else ""
        return f"ButcherTableau(name={self.name!r}, order={self.order}{pair}, stages={self.stages})"


@dataclass(frozen=True)
class StepPlan:
    """A tableau's non-zero coefficients, resolved once per tableau.

    Attributes
    ----------
    stages : int
    rows : tuple of tuple of (int, float)
        For each stage ``j``, the pairs ``(l, a_jl)`` with ``a_jl != 0``.
    weights : tuple of (int, float)
        The pairs ``(j, b_j)`` with ``b_j != 0``.
    b : tuple of float
        All weights, zeros included.
    c : tuple of float
        The nodes.
    errors : tuple of (int, float)
        The pairs ``(j, e_j)`` of the error weights ``b - b_embedded`` with ``e_j != 0``
        (empty for a tableau without an embedded method).
    """

    stages: int
    rows: tuple[tuple[tuple[int, float], ...], ...]
    weights: tuple[tuple[int, float], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    errors: tuple[tuple[int, float], ...] = ()


@functools.lru_cache(maxsize=64)
def plan_for(tableau: ButcherTableau) -> StepPlan:
    """The :class:`StepPlan` of a tableau (cached: tableaus are frozen and hashable)."""
    rows = tuple(
        tuple((m, a_jm) for m, a_jm in enumerate(row[:j]) if a_jm != 0.0)
        for j, row in enumerate(tableau.a)
    )
    weights = tuple((j, b_j) for j, b_j in enumerate(tableau.b) if b_j != 0.0)
    errors = tuple((j, e_j) for j, e_j in enumerate(tableau.error_weights or ()) if e_j != 0.0)
    return StepPlan(
        stages=tableau.stages, rows=rows, weights=weights, b=tableau.b, c=tableau.c, errors=errors
    )
