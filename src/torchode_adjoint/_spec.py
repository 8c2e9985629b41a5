"""The normalised description of one solve, shared by every gradient mode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._compiled import Compile
from ._dynamics import NFECounter
from ._grid import TimeGrid
from ._stepping import Stepper

__all__ = ["SolveSpec"]


@dataclass(frozen=True, eq=False)
class SolveSpec:
    """Every non-tensor setting of one :func:`~torchode_adjoint.odeint` call, validated.

    Built once by :func:`~torchode_adjoint._prepare.prepare`; gradient modes take
    ``(spec, y0, t, params)`` and return the solution. ``spec`` travels into
    ``torch.autograd.Function`` as one object, so their ``backward`` returns one ``None`` for it.

    Attributes
    ----------
    func : callable
        The user's dynamics ``f(t, y)``.
    tableau : ButcherTableau or ReversibleHeun
        The solver (a tableau, except for the reversible Heun method).
    grid : TimeGrid
    check_finite : bool
    counter : NFECounter
        Filled by the forward pass and, where the mode re-evaluates, by the backward pass.
    stepper : Stepper
        The tableau's step, eager or compiled.
    compile : Compile or None
        The compiled path's options (None: eager), for the modes' own compiled backward steps.
    """

    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    tableau: Any
    grid: TimeGrid
    check_finite: bool
    counter: NFECounter
    stepper: Stepper
    compile: Compile | None = None
