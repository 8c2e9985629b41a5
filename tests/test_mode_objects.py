"""Gradient modes are objects with their own options; shorthands and the solver pairing."""

from __future__ import annotations

import warnings

import pytest
import torch
from problems import HEUN_MADE_REVERSIBLE, MLPDynamics

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

pytestmark = HEUN_MADE_REVERSIBLE

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
    block = ODEBlock(MLPDynamics(), solver="euler", adjoint=shorthand)
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


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint"])
def test_reversible_heun_is_refused_by_the_modes_that_cannot_integrate_it(mode: str) -> None:
    with pytest.raises(ValueError, match=r"`solver='reversible_heun'`.*'reversible'.*'backprop'"):
        ODEBlock(MLPDynamics(), solver="reversible_heun", adjoint=mode)


@pytest.mark.parametrize("coupling", [0.0, -0.5, 1.5, float("nan"), True, "0.9"])
def test_reversible_validates_its_coupling(coupling) -> None:
    with pytest.raises(ValueError, match="`coupling`"):
        Reversible(coupling=coupling)


@pytest.mark.parametrize("tol", [0.0, -1.0, True])
def test_reversible_validates_its_drift_tolerance(tol) -> None:
    with pytest.raises(ValueError, match="`drift_tol`"):
        Reversible(drift_tol=tol)


def test_heun_with_the_reversible_mode_now_means_heun_made_reversible_with_a_warning() -> None:
    # Up to 0.1.0 `solver="heun", adjoint="reversible"` integrated the reversible Heun method
    # (one evaluation per step). It now integrates Heun's method made reversible by the coupling
    # (two per step) and says so with a FutureWarning; the old method has its own name.
    f = MLPDynamics().double()
    y0 = torch.randn(2, 3, dtype=D)
    with pytest.warns(FutureWarning, match="solver='reversible_heun'"):
        block = ODEBlock(f, solver="heun", step=0.1, adjoint="reversible")
    assert block.solver.name == "heun" and block.solver.stages == 2
    block(y0)
    assert block.nfe_forward == 10 * 2 * 2  # 10 steps, two Heun steps of two stages each
    old = ODEBlock(f, solver="reversible_heun", step=0.1, adjoint="reversible")
    assert old.solver.name == "reversible_heun" and "reversible_heun" in repr(old)
    old(y0)
    assert old.nfe_forward == 10 + 1
    # Both second order, but not the same numbers: the meaning changed.
    assert not torch.allclose(block(y0), old(y0), rtol=0, atol=1e-12)
    torch.testing.assert_close(block(y0), old(y0), rtol=0, atol=1e-2)


def test_the_heun_warning_is_raised_by_coefficients_and_not_for_other_tableaus() -> None:
    trapezoid = ButcherTableau(
        c=[0.0, 1.0], a=[[0.0, 0.0], [1.0, 0.0]], b=[0.5, 0.5], order=2, name="trapezoid"
    )
    with pytest.warns(FutureWarning, match="reversible_heun"):
        ODEBlock(MLPDynamics(), solver=trapezoid, adjoint="reversible")
    # Heun's nodes and matrix with other weights (an order-1 method): no Heun, no warning.
    near = ButcherTableau(
        c=[0.0, 1.0], a=[[0.0, 0.0], [1.0, 0.0]], b=[0.5 + 1e-6, 0.5 - 1e-6], order=1, name="n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ODEBlock(MLPDynamics(), solver=near, adjoint="reversible")


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
