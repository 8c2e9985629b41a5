"""Register, overwrite, lookup; unknown names list the known ones."""

from __future__ import annotations

import pytest

from torchode_adjoint import ButcherTableau, available_solvers, get_solver, register_solver

BUILT_INS = {
    "euler": (1, 1),
    "midpoint": (2, 2),
    "heun": (2, 2),
    "ralston": (2, 2),
    "rk3": (3, 3),
    "ssprk3": (3, 3),
    "rk4": (4, 4),
    "rk38": (4, 4),
    "adaptive_heun": (2, 2),
    "fehlberg2": (2, 3),
    "bosh3": (3, 4),
    "dopri5": (5, 7),
    "tsit5": (5, 7),
    "dopri8": (8, 13),
}


@pytest.mark.parametrize("name", sorted(BUILT_INS))
def test_built_in_solvers_are_registered_with_their_order_and_stages(name: str) -> None:
    tab = get_solver(name)
    assert (tab.order, tab.stages) == BUILT_INS[name]
    assert tab.name == name


def test_unknown_solver_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match="`solver`") as info:
        get_solver("dopri7")
    for name in BUILT_INS:
        assert name in str(info.value)


def test_get_solver_passes_a_tableau_through_and_rejects_other_types() -> None:
    tab = get_solver("rk4")
    assert get_solver(tab) is tab
    with pytest.raises(TypeError, match="`solver`"):
        get_solver(4)  # type: ignore[arg-type]


def test_register_then_lookup_and_overwrite_needs_the_flag() -> None:
    tab = ButcherTableau(c=[0.0], a=[[0.0]], b=[1.0], order=1, name="test_custom")
    register_solver("test_custom_registry", tab)
    assert "test_custom_registry" in available_solvers()
    assert get_solver("test_custom_registry") is tab
    other = ButcherTableau(c=[0.0, 1.0], a=[[0, 0], [1, 0]], b=[0.5, 0.5], order=2)
    with pytest.raises(ValueError, match="overwrite=True"):
        register_solver("test_custom_registry", other)
    register_solver("test_custom_registry", other, overwrite=True)
    assert get_solver("test_custom_registry") is other


def test_register_rejects_non_tableaus_naming_the_argument() -> None:
    with pytest.raises(TypeError, match="`tableau`"):
        register_solver("bad", [[0.0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`name`"):
        register_solver("", get_solver("euler"))


def test_available_solvers_is_sorted() -> None:
    names = available_solvers()
    assert names == sorted(names)
    assert set(BUILT_INS) <= set(names)
