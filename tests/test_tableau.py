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
