"""The normalised description of one solve, shared by every gradient mode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._dynamics import NFECounter
from ._grid import TimeGrid
from ._tableau import ButcherTableau

__all__ = ["SolveSpec"]


@dataclass(frozen=True, eq=False)
class SolveSpec:
    """Every non-tensor setting of one :func:`~torchode_adjoint.odeint` call, validated.

    Gradient modes take ``(spec, y0, t, params)`` and return the solution; ``spec`` travels into
    ``torch.autograd.Function`` as one object, so their ``backward`` returns one ``None`` for it.

    Attributes
    ----------
    func : callable
        The user's dynamics ``f(t, y)``.
    tableau : ButcherTableau
    grid : TimeGrid
    check_finite : bool
    counter : NFECounter
        Filled by the forward pass and, where the mode re-evaluates, by the backward pass.
    checkpoint_every : int
        For the checkpointed mode: keep the state at every this many steps.
    """

    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    tableau: ButcherTableau
    grid: TimeGrid
    check_finite: bool
    counter: NFECounter
    checkpoint_every: int = 1
