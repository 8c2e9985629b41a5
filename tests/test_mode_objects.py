"""Gradient modes are objects with their own options; shorthands and the solver pairing."""

from __future__ import annotations

import pytest
import torch
from problems import MLPDynamics

from torchode_adjoint import (
    GRADIENT_MODES,
    Backprop,
    ButcherTableau,
    Checkpoint,
    ContinuousAdjoint,
    ODEBlock,
    Reversible,
    odeint,
)

D = torch.float64


@pytest.mark.parametrize(
    "shorthand, cls",
    [
        (True, ContinuousAdjoint),
        (False, Backprop),
        ("adjoint", ContinuousAdjoint),
        ("backprop", Backprop),
        ("checkpoint", Checkpoint),
        ("reversible", Reversible),
    ],
)
def test_shorthands_stand_for_the_mode_objects_with_default_options(shorthand, cls) -> None:
    solver = "heun" if cls is Reversible else "euler"
    block = ODEBlock(MLPDynamics(), solver=solver, adjoint=shorthand)
    assert type(block.adjoint) is cls and block.adjoint.name in GRADIENT_MODES
    if cls is Checkpoint:
        assert block.adjoint.every == 1
    assert f"adjoint={block.adjoint.name!r}" in repr(block)


def test_the_mode_names_are_the_shorthands() -> None:
    assert set(GRADIENT_MODES) == {"backprop", "adjoint", "checkpoint", "reversible"}


@pytest.mark.parametrize("every", [0, -1, 2.5, True])
def test_checkpoint_validates_its_own_option(every) -> None:
    with pytest.raises(ValueError, match="`every`"):
        Checkpoint(every=every)


def test_reversible_is_refused_with_another_solver_when_the_block_is_built() -> None:
    with pytest.raises(ValueError, match="`solver='heun'`"):
        ODEBlock(MLPDynamics(), adjoint="reversible")  # euler by default
    with pytest.raises(ValueError, match="`solver='heun'`"):
        odeint(MLPDynamics(), torch.ones(2, 3), [0.0, 1.0], solver="rk4", adjoint=Reversible())


def test_reversible_pairing_is_checked_by_coefficients_not_by_name() -> None:
    midpoint_named_heun = ButcherTableau(
        c=[0.0, 0.5], a=[[0.0, 0.0], [0.5, 0.0]], b=[0.0, 1.0], order=2, name="heun"
    )
    with pytest.raises(ValueError, match="not Heun's"):
        ODEBlock(MLPDynamics(), solver=midpoint_named_heun, adjoint="reversible")
    trapezoid = ButcherTableau(
        c=[0.0, 1.0], a=[[0.0, 0.0], [1.0, 0.0]], b=[0.5, 0.5], order=2, name="trapezoid"
    )
    block = ODEBlock(MLPDynamics().double(), solver=trapezoid, step=0.1, adjoint="reversible")
    reference = ODEBlock(block.dynamics, solver="heun", step=0.1, adjoint="reversible")
    y0 = torch.randn(2, 3, dtype=D)
    torch.testing.assert_close(block(y0), reference(y0), rtol=0, atol=0)


def test_checkpoint_every_still_works_with_a_deprecation_warning(gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.warns(DeprecationWarning, match=r"Checkpoint\(every=k\)"):
        old = odeint(f, y0, t, solver="rk4", step=0.1, adjoint="checkpoint", checkpoint_every=3)
    new = odeint(f, y0, t, solver="rk4", step=0.1, adjoint=Checkpoint(every=3))
    (g_old,) = torch.autograd.grad(old.sum(), [y0])
    (g_new,) = torch.autograd.grad(new.sum(), [y0])
    torch.testing.assert_close(g_old, g_new, rtol=0, atol=0)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="`checkpoint_every`"):
        ODEBlock(MLPDynamics(), adjoint="checkpoint", checkpoint_every=0)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="checkpointed mode"):
        ODEBlock(MLPDynamics(), checkpoint_every=2)  # the default mode is the adjoint


def test_an_unknown_mode_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="`adjoint` must be True, False, one of"):
        ODEBlock(MLPDynamics(), adjoint="adjiont")  # type: ignore[arg-type]
