"""What one solver step is: the protocols between the methods, the executor and the modes.

A *method* owns its step. ``method.step(f, carry, h, ts)`` takes one step of size ``h`` from the
method's state ``carry`` with its evaluations at the stage times ``ts`` (one 0-dim tensor per
node, ``t0 + c_j h``, in the order the method makes them) and returns a :data:`Stepped`: the new
carry, an error estimate (None for a method without an embedded pair) and what its interpolant
needs (the stage derivatives of a Runge--Kutta step, or None). The executor runs steps; a
gradient mode asks a method for capabilities (an inverse, a tableau), never for its class.

A reversible method's exact backward step asks for vector--Jacobian products through
:class:`StepProducts`, which the reversible mode implements: the methods import nothing from a
mode.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import torch

from .tableau import StepPlan

__all__ = [
    "Step",
    "Stepped",
    "Method",
    "MethodBase",
    "StepProducts",
    "DynamicsFn",
    "StageCombinations",
]

Step = float | torch.Tensor
"""A step size: a host float, or a 0-dim tensor (learnable times, the compiled path)."""

DynamicsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

StageCombinations = Sequence[tuple[Sequence[tuple[int, float]], torch.Tensor]]
"""``(terms, g)`` pairs: combinations ``h sum_i terms_i k_i`` of a base step's stages (an
interpolant's) and the cotangent each is to be multiplied with."""

Stepped = tuple[Any, Any, Any]
"""``(carry, error, dense)``: a step's new carry, its error estimate (a tensor, a tuple of
tensors for an augmented method, or None) and its dense output information (the stage
derivatives of a Runge--Kutta step) or None."""


class Method(Protocol):
    """What a solver step computes; the executor runs it.

    ``carry`` is the method's state: the solution itself for a Runge--Kutta method, a tuple
    with auxiliary tensors for a reversible one.
    """

    @property
    def name(self) -> str:
        """The method's name in messages."""

    @property
    def order(self) -> int:
        """The order of convergence."""

    @property
    def nodes(self) -> tuple[float, ...]:
        """Where the evaluations of one step lie, as fractions of the step, in the order made."""

    @property
    def key(self) -> Hashable:
        """What the compiled steps are cached under."""

    def init(self, f: Any, y0: torch.Tensor, t0: torch.Tensor) -> Any:
        """The carry at the first time."""

    def output(self, carry: Any) -> torch.Tensor:
        """The solution held in a carry."""

    def step(self, f: Any, carry: Any, h: Step, ts: tuple[torch.Tensor, ...]) -> Stepped:
        """One step of size ``h``; its evaluations are at ``ts`` (one time per node)."""

    def bind(self, func: Any, inputs: Any) -> Any:
        """What ``step`` evaluates inside a compiled graph: the user's ``func`` (with the graph
        inputs ``inputs`` the executor passed along) in the form the step calls."""

    # What the method can do, declared (see MethodBase for the defaults), never probed.

    @property
    def error_order(self) -> int | None:
        """The order of the error estimate a step returns (the embedded order); None for a
        method without one (fixed steps only)."""

    @property
    def interpolates(self) -> bool:
        """Whether :meth:`interpolate` gives the solution inside a step (dense output)."""

    @property
    def compilable(self) -> bool:
        """Whether the steps may run as compiled graphs (not where a step reads the host)."""

    def derivative(self, carry: Any) -> torch.Tensor | None:
        """``f(t, y)`` at the carry's time where the carry holds it (first same as last)."""

    def interpolate(self, carry: Any, h: Step, dense: Any, theta: Any) -> torch.Tensor:
        """The solution at ``t + theta h`` inside a step from ``carry`` with dense
        information ``dense``."""


class MethodBase:
    """The capabilities of a plain method, which a method class inherits and overrides where it
    can do more: no error estimate, no interpolant, no derivative carried over, compilable."""

    @property
    def error_order(self) -> int | None:
        return None

    @property
    def interpolates(self) -> bool:
        return False

    @property
    def compilable(self) -> bool:
        return True

    def derivative(self, carry: Any) -> torch.Tensor | None:
        return None

    def interpolate(self, carry: Any, h: Step, dense: Any, theta: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no interpolant")


class StepProducts(Protocol):
    """The vector--Jacobian products a reversible method's exact backward step asks for.

    A gradient mode implements it (the reversible mode's ``StepVJP``) with its bookkeeping:
    stage times, replayed random draws, parameter and time gradients. The methods
    (:mod:`~torchode_adjoint.solvers.reversible_coupling`,
    :mod:`~torchode_adjoint.solvers.reversible_heun`) call it and import nothing from a mode.
    """

    need_t: bool
    """Whether the time gradients are asked for."""

    def evaluate(
        self, x: torch.Tensor, v: torch.Tensor, *, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f(t, x)`` at the current step's start (``offset=0``) or end (1), and ``v^T df/dx``."""

    def increment(
        self,
        plan: StepPlan,
        x: torch.Tensor,
        v: torch.Tensor,
        h: Step,
        *,
        first: int,
        offset: int,
        extra: StageCombinations = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The increment ``Psi_h(t, x) - x`` of one base step of the tableau resolved in
        ``plan`` from the current step's start (``offset=0``) or end (1), its evaluations being
        the step's ``first...first + stages``, and ``v^T`` its Jacobian; with ``extra``, pairs
        ``(terms, g)`` of other combinations ``h sum_i terms_i k_i`` of the same stages (an
        interpolant) whose products with ``g`` are added to ``v``'s."""

    def add_step_size_gradient(self, g: torch.Tensor) -> None:
        """Add ``dL/dh`` of the current step."""

    def begin_step(self, ts: tuple[torch.Tensor, ...], g_p: Sequence[torch.Tensor]) -> None:
        """The products that follow belong to the next step backwards, whose evaluations are
        at ``ts`` (the method's ``backward_nodes``); parameter gradients accumulate onto
        ``g_p`` and are read back from ``g_p`` after the step."""

    g_p: list[torch.Tensor]
    """The parameter gradients accumulated so far."""
