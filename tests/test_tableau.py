"""Valid tableaus build; bad ones raise naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from torchode_adjoint import ButcherTableau


def test_valid_tableau_builds_and_normalises_to_tuples() -> None:
    tab = ButcherTableau(c=[0, 0.5], a=[[0, 0], [0.5, 0]], b=[0, 1], order=2, name="mid")
    assert tab.stages == 2
    assert tab.c == (0.0, 0.5) and tab.b == (0.0, 1.0)
    assert tab.a == ((0.0, 0.0), (0.5, 0.0))
    assert all(isinstance(v, float) for v in tab.c)


def test_tableau_is_frozen() -> None:
    tab = ButcherTableau(c=[0.0], a=[[0.0]], b=[1.0], order=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tab.order = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(c=[0.0], a=[[0.0]], b=[], order=1), "`b`"),
        (dict(c=[0.0, 1.0], a=[[0.0]], b=[1.0], order=1), "`c`"),
        (dict(c=[0.0, 1.0], a=[[0.0, 0.0]], b=[0.5, 0.5], order=1), "`a`"),
        (dict(c=[0.0, 1.0], a=[[0.0], [1.0, 0.0]], b=[0.5, 0.5], order=1), "`a`"),
        (dict(c=[0.0, 1.0], a=[[0.0, 0.0], [1.0, 0.5]], b=[0.5, 0.5], order=1), "`a`"),
        (dict(c=[1.0], a=[[1.0]], b=[1.0], order=1), "`a`"),
        (dict(c=[0.0, 1.0], a=[[0.0, 0.0], [1.0, 0.0]], b=[0.5, 0.6], order=1), "`b`"),
        (dict(c=[0.0, 0.5], a=[[0.0, 0.0], [1.0, 0.0]], b=[0.5, 0.5], order=1), "`c[1]`"),
        (dict(c=[0.0], a=[[0.0]], b=[1.0], order=0), "`order`"),
        (dict(c=[0.0], a=[[0.0]], b=[1.0], order=1.5), "`order`"),
        (dict(c=[0.0], a=[[0.0]], b=[float("nan")], order=1), "`b`"),
    ],
)
def test_bad_tableau_raises_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ButcherTableau(**kwargs)


def test_non_numeric_coefficients_raise_type_error_naming_the_field() -> None:
    with pytest.raises(TypeError, match="`c`"):
        ButcherTableau(c=["zero"], a=[[0.0]], b=[1.0], order=1)


def test_a_string_is_not_a_sequence_of_coefficients() -> None:
    with pytest.raises(TypeError, match="`c` must be a sequence of real numbers, got the string"):
        ButcherTableau(c="01", a=[[0.0, 0.0], [1.0, 0.0]], b=[0.5, 0.5], order=2)


@pytest.mark.parametrize(
    ("kwargs", "condition"),
    [
        # Euler claimed as second order.
        (dict(c=[0.0], a=[[0.0]], b=[1.0], order=2), "sum(b c)"),
        # Heun claimed as third order.
        (dict(c=[0.0, 1.0], a=[[0.0, 0.0], [1.0, 0.0]], b=[0.5, 0.5], order=3), "sum(b c^2)"),
        # Kutta's RK3 with a perturbed a[2][1] (and c[2] to match) claimed as third order.
        (
            dict(
                c=[0.0, 0.5, 1.1],
                a=[[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [-1.0, 2.1, 0.0]],
                b=[1 / 6, 2 / 3, 1 / 6],
                order=3,
            ),
            "sum(b c)",
        ),
    ],
)
def test_a_claimed_order_the_coefficients_do_not_have_is_refused(kwargs, condition) -> None:
    with pytest.raises(
        ValueError,
        match=r"`order=\d` is not what the coefficients give.*"
        + condition.replace("(", r"\(").replace(")", r"\)").replace("^", r"\^"),
    ):
        ButcherTableau(**kwargs)


def test_every_builtin_satisfies_the_order_conditions_of_its_order() -> None:
    from torchode_adjoint import available_solvers, get_solver

    for name in available_solvers():  # built at import: a wrong built-in would not import
        assert get_solver(name).order >= 1


# Butcher's rooted-tree conditions up to order 4, as (order, name, f(b, c, A), target), written
# in matrix form (independently of the library's sums).
def _conditions(b, c, A):
    return [
        (1, "sum(b)", b.sum(), 1.0),
        (2, "sum(b c)", b @ c, 1 / 2),
        (3, "sum(b c^2)", b @ c**2, 1 / 3),
        (3, "sum(b a c)", b @ A @ c, 1 / 6),
        (4, "sum(b c^3)", b @ c**3, 1 / 4),
        (4, "sum(b c a c)", (b * c) @ A @ c, 1 / 8),
        (4, "sum(b a c^2)", b @ A @ c**2, 1 / 12),
        (4, "sum(b a a c)", b @ A @ A @ c, 1 / 24),
    ]


def test_the_order_conditions_are_butchers_trees_with_their_orders_and_names() -> None:
    import numpy as np

    from torchode_adjoint.solvers.tableau import _order_conditions

    rng = np.random.default_rng(0)
    for s in (1, 2, 4, 6):
        A = np.tril(rng.normal(size=(s, s)), -1)
        c, b = A.sum(axis=1), rng.normal(size=s)
        got = _order_conditions(tuple(c), tuple(map(tuple, A)), tuple(b))
        want = _conditions(b, c, A)
        assert [(p, n, t) for p, n, _, t in got] == [(p, n, t) for p, n, _, t in want]
        np.testing.assert_allclose(
            [v for _, _, v, _ in got], [v for _, _, v, _ in want], rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("order", [2, 3, 4])
def test_a_wrong_order_claim_names_the_first_condition_that_fails(order) -> None:
    # Kutta's third-order method claims one order too many; Heun's second-order one and the
    # midpoint method likewise.
    tableaus = {
        2: ([0.0, 0.0], [[0.0, 0.0], [0.0, 0.0]], [1.0, 0.0]),  # Euler written with two stages
        3: ([0.0, 1.0], [[0.0, 0.0], [1.0, 0.0]], [0.5, 0.5]),
        4: ([0.0, 0.5, 1.0], [[0, 0, 0], [0.5, 0, 0], [-1.0, 2.0, 0]], [1 / 6, 2 / 3, 1 / 6]),
    }
    c, a, b = tableaus[order]
    import numpy as np

    first = next(
        (p, n)
        for p, n, v, t in _conditions(np.array(b), np.array(c), np.array(a, dtype=float))
        if p <= order and abs(v - t) > 1e-10
    )
    assert first[0] == order
    with pytest.raises(ValueError) as info:
        ButcherTableau(c=c, a=a, b=b, order=order)
    message = str(info.value)
    assert f"the order-{first[0]} condition {first[1]} = " in message
    assert message.endswith("pass the order the method has, or fix the coefficients.")


def test_malformed_rows_and_names_get_their_own_messages() -> None:
    with pytest.raises(TypeError, match=r"^`a` must be a sequence of rows, got 5\.$"):
        ButcherTableau(c=[0.0], a=5, b=[1.0], order=1)
    with pytest.raises(
        TypeError, match=r"^`a` must be a sequence of real numbers, got the string 'xy'"
    ):
        ButcherTableau(c=[0.0, 1.0], a=[[0.0, 0.0], "xy"], b=[0.5, 0.5], order=1)
    with pytest.raises(TypeError, match=r"^`a` must be a sequence of real numbers, got \[None"):
        ButcherTableau(c=[0.0, 1.0], a=[[0.0, 0.0], [None, 0.0]], b=[0.5, 0.5], order=1)
    with pytest.raises(ValueError, match=r"^`b` must have at least one weight \(one stage\)"):
        ButcherTableau(c=[], a=[], b=[], order=1)
    with pytest.raises(ValueError, match=r"rows of lengths \(2,\) in 3 rows\.$"):
        ButcherTableau(c=[0.0, 1.0], a=[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], b=[0.5, 0.5], order=1)
    with pytest.raises(ValueError, match=r"rows of lengths \(2, 3\) in 2 rows\.$"):
        ButcherTableau(c=[0.0, 1.0], a=[[0.0, 0.0], [1.0, 0.0, 0.0]], b=[0.5, 0.5], order=1)
    for name in ("", 3):
        with pytest.raises(TypeError, match=rf"^`name` must be a non-empty str, got {name!r}"):
            ButcherTableau(c=[0.0], a=[[0.0]], b=[1.0], order=1, name=name)


def test_a_row_sum_off_by_exactly_the_tolerance_is_accepted_and_beyond_it_refused() -> None:
    ButcherTableau(c=[0.0, 0.0], a=[[0.0, 0.0], [1e-10, 0.0]], b=[1.0, 0.0], order=1)
    with pytest.raises(ValueError, match=r"`c\[1\]` must equal the row sum"):
        ButcherTableau(c=[0.0, 0.0], a=[[0.0, 0.0], [1.1e-10, 0.0]], b=[1.0, 0.0], order=1)


def _rooted_trees(n: int) -> list[tuple]:
    """Butcher's rooted trees with ``n`` nodes, each the sorted tuple of its root's subtrees."""
    import functools

    @functools.cache
    def trees(m: int) -> tuple:
        return () if m < 1 else tuple(sorted({tuple(sorted(f)) for f in forests(m - 1)}))

    @functools.cache
    def forests(m: int) -> tuple:  # sorted tuples of trees whose sizes sum to m
        if m == 0:
            return ((),)
        out = set()
        for k in range(1, m + 1):
            for tree in trees(k):
                out.update(tuple(sorted((tree, *rest))) for rest in forests(m - k))
        return tuple(sorted(out))

    return list(trees(n))


def _weight_and_density(tree: tuple, A, size_of) -> tuple:
    """The tree's elementary weight vector (per stage) and its density gamma."""
    import numpy as np

    phi, gamma = np.ones(A.shape[0]), size_of(tree)
    for child in tree:
        phi_c, gamma_c = _weight_and_density(child, A, size_of)
        phi, gamma = phi * (A @ phi_c), gamma * gamma_c
    return phi, gamma


def _size(tree: tuple) -> int:
    return 1 + sum(_size(child) for child in tree)


def test_the_rooted_trees_are_counted_right() -> None:
    # OEIS A000081: the number of rooted trees with n nodes.
    assert [len(_rooted_trees(n)) for n in range(1, 10)] == [1, 1, 2, 4, 9, 20, 48, 115, 286]


def _worst_condition(b, A, order: int) -> float:
    """The largest violation of the order conditions of exactly ``order`` (relative to the sum
    of the terms' magnitudes)."""
    import numpy as np

    worst = 0.0
    for tree in _rooted_trees(order):
        phi, gamma = _weight_and_density(tree, A, _size)
        phi_abs, _ = _weight_and_density(tree, np.abs(A), _size)
        scale = max(1.0, float(np.abs(b) @ phi_abs) * gamma)
        worst = max(worst, abs(float(b @ phi) * gamma - 1.0) / scale)
    return worst


@pytest.mark.parametrize(
    "name",
    [n for n in __import__("torchode_adjoint").available_solvers() if n != "reversible_heun"],
)
def test_every_builtin_has_exactly_its_order_by_every_rooted_tree(name: str) -> None:
    """Every order condition (Butcher's trees, 200 up to order 8) of the claimed order holds,
    for the embedded weights at their order too, and one of the next order fails: the claims
    are neither too high nor too low. Independent of the library's own check (order 4)."""
    import numpy as np

    from torchode_adjoint import get_solver

    tab = get_solver(name)
    A = np.array(tab.a)
    pairs = [(np.array(tab.b), tab.order)]
    if tab.b_embedded is not None:
        pairs.append((np.array(tab.b_embedded), tab.embedded_order))
    for b, order in pairs:
        for p in range(1, order + 1):
            assert _worst_condition(b, A, p) < 1e-13, (name, order, p)
        assert _worst_condition(b, A, order + 1) > 1e-6, (name, order)
