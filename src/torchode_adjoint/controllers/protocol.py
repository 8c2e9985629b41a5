"""What the one loop asks a step controller, and what a controller answers.

The loop (:func:`torchode_adjoint._executor.run_steps`) knows nothing of output times, error
norms or replays: it asks its controller for the next thing to do, a :class:`Run` of steps taken
as they come or one :class:`Try` judged by the controller, takes it through the executor, and
tells the controller what was accepted. Every pass of every gradient mode is one controller:

- :class:`~torchode_adjoint.controllers.fixed.FixedSteps`: equal, user-given or recorded steps,
  leg by leg (an output interval, or a part of one), forward or in reverse, with hooks where a
  leg begins and ends (an output to keep, an incoming gradient to add);
- :class:`~torchode_adjoint.controllers.error.ErrorSteps`: steps sized from their error, along a
  :class:`StepPath` (one output interval, or the span past the output times).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..solvers.protocol import Step, Stepped

__all__ = ["Run", "Try", "LoopController", "StepPath"]


class _Times(Protocol):
    def of(self, g: int) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True, slots=True)
class Run:
    """``n`` steps the loop takes as they come (no error is read): steps ``g0 ... g0 + n - 1``
    of ``times``, each of size ``h``, or ``h(g)`` for step ``g``. The executor may take them as
    compiled chunks."""

    h: Step | Callable[[int], Step]
    times: _Times
    g0: int
    n: int


@dataclass(frozen=True, slots=True)
class Try:
    """One step of size ``h`` at stage times ``ts``, taken with its error estimate and dense
    information where ``dense`` (a compiled step leaves them out otherwise), then judged by the
    controller and, accepted, handed to the loop's ``accepted`` hook."""

    h: Step
    ts: tuple[torch.Tensor, ...]
    dense: bool = True


class LoopController(Protocol):
    """A step controller as the loop drives it.

    ``start(carry)`` before the first step (a hook where the first leg begins); ``plan()`` the
    next :class:`Run` or :class:`Try`, None when the pass is done; ``judge(carry, out)`` whether
    a :class:`Try` is accepted (an error-controlled step reads its error here, the loop's one
    host read per step); ``passed(carry)`` after an accepted step or a run: the carry to go on
    from (a stop may change it: an incoming gradient, a jump of the dynamics).
    """

    def start(self, carry: Any) -> Any: ...

    def plan(self) -> Run | Try | None: ...

    def judge(self, carry: Any, out: Stepped) -> bool: ...

    def passed(self, carry: Any) -> Any: ...


class StepPath(Protocol):
    """Where the error-controlled steps of one pass go: how far is left, where a step tried
    ends, its stage times and size, and what happens when an accepted step reaches a stop."""

    def remaining(self) -> float:
        """The length left to the next time a step must end on."""
        ...

    def try_step(self, hh: float, last: bool) -> tuple[float, float, float]:
        """Lay out the step tried (``hh``; ``last``: to the next stop): its size, where it
        starts and where it must end at the latest."""
        ...

    def stage_times(self) -> tuple[tuple[torch.Tensor, ...], Step]:
        """The step tried's stage times and signed size."""
        ...

    def advance(self, last: bool, carry: Any) -> tuple[Any, bool]:
        """Move past the accepted step; the carry to go on from, and whether the path ends."""
        ...
