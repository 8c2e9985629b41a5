"""The normalised description of one solve, shared by every gradient mode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._compiled import Compile
from ._dynamics import NFECounter
from ._executor import Executor
from .controllers.error import ErrorControl
from .controllers.fixed import Steps, TimeGrid
from .controllers.per_sample import SampleTimes
from .solvers.protocol import Method

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
    grid : TimeGrid or RecordedSteps
        The record of steps: how many each output interval takes, their sizes and stage times
        (equal steps, or the user's step times laid out by ``StepTo``).
    check_finite : bool
    counter : NFECounter
        Filled by the forward pass and, where the mode re-evaluates, by the backward pass.
    executor : Executor
        The method the solve steps with (``executor.method``), and how its steps run (eager or
        compiled).
    control : ErrorControl or None
        Error-controlled steps (``rtol=``/``atol=``); None for the equal steps of ``grid``.
    samples : SampleTimes or None
        Per-sample output times (a 2-D ``t``): each sample is solved on its own row (``grid``
        is then the first sample's, and ``layout`` lays out any sample's fixed steps).
    layout : callable or None
        With ``samples``: a sample's host times to its equal steps.
    """

    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    grid: Steps
    check_finite: bool
    counter: NFECounter
    executor: Executor
    control: ErrorControl | None = None
    samples: SampleTimes | None = None
    layout: Callable[[Sequence[float]], TimeGrid] | None = None

    @property
    def n_outputs(self) -> int:
        """The number of output times after the first."""
        if self.samples is not None:
            return self.samples.count - 1
        return len(self.grid.n_steps)

    @property
    def method(self) -> Method:
        """The method the solve steps with."""
        return self.executor.method

    @property
    def compile(self) -> Compile | None:
        """The compiled path's options (None: eager)."""
        return self.executor.options
