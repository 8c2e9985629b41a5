"""The reversible Heun method (Kidger et al. 2021): a solver of its own, ``"reversible_heun"``.

The method carries an auxiliary state ``z`` (``z_0 = y_0``) and the last evaluation
``f_n = f(t_n, z_n)``, and evaluates ``f`` once per step (plus once at ``t_0``)::

    z_{n+1} = 2 y_n - z_n + h f_n
    f_{n+1} = f(t_{n+1}, z_{n+1})
    y_{n+1} = y_n + h/2 (f_n + f_{n+1})

It is second order and algebraically reversible: ``z_n = 2 y_{n+1} - z_{n+1} - h f_{n+1}`` and
``y_n = y_{n+1} - h/2 (f_n + f_{n+1})``. It is not Heun's method (two evaluations per step, no
auxiliary state). With ``adjoint="reversible"`` the backward pass reconstructs each step and
back-propagates through it with one evaluation and one vector--Jacobian product per step: with
``A_y``, ``A_z`` the adjoints of ``y_{n+1}``, ``z_{n+1}`` (the latter including the product
through ``f_{n+1}``)::

    A_y(n)    = A_y + 2 A_z
    A_f(n)    = h/2 A_y + h A_z
    v         = A_f(n) + h_{n-1}/2 A_y(n)          (the use of f_n in the step before)
    A_z(n)    = -A_z + J_f(t_n, z_n)^T v,   dL/dtheta += (df/dtheta)^T v
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._compiled import cast
from .protocol import MethodBase, Step, Stepped, StepProducts

__all__ = ["ReversibleHeun", "REVERSIBLE_HEUN"]

Carry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Adjoint = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ReversibleHeun(MethodBase):
    """The reversible Heun method (Kidger et al. 2021), ``solver="reversible_heun"``.

    Order 2, one evaluation per step (plus one at ``t0``). It pairs with
    ``adjoint="reversible"`` (exact gradient, memory independent of the number of steps, one
    evaluation and one vector--Jacobian product per step backwards) and with
    ``adjoint="backprop"``. See :mod:`torchode_adjoint.solvers.reversible_heun` for the scheme.
    """

    name: str = "reversible_heun"
    order: int = 2
    #: No coupling (McCallum & Foster's, of a tableau made reversible), none chosen per step.
    coupling: ClassVar[None] = None
    choose: ClassVar[bool] = False
    #: dL/dy_n enters A_y(n) before the product at z_n, with the size of the step before.
    incoming_after_step: ClassVar[bool] = False

    @property
    def nodes(self) -> tuple[float, ...]:
        return (1.0,)

    @property
    def adaptive(self) -> bool:
        """No embedded error estimate: the method takes fixed steps."""
        return False

    @property
    def stages(self) -> int:
        """Evaluations per step."""
        return 1

    @property
    def key(self) -> Hashable:
        return ("reversible_heun",)

    def init(self, f: Any, y0: torch.Tensor, t0: torch.Tensor) -> Carry:
        return (y0, y0, f(t0, y0))

    def output(self, carry: Carry) -> torch.Tensor:
        return carry[0]

    def auxiliary(self, carry: Carry) -> tuple[torch.Tensor, ...]:
        """What the backward pass starts from besides the output: ``z_N`` and ``f(z_N)``."""
        return carry[1:]

    def step(self, f: Any, carry: Carry, h: Step, ts: tuple[torch.Tensor, ...]) -> Stepped:
        y, z, f_n = carry
        if isinstance(h, torch.Tensor):
            # No `alpha=` on the compiled path (see `_runge_kutta.combine`).
            z_next = 2 * y - z + h * f_n
            f_next = f(ts[0], z_next)
            return (y + (0.5 * h) * (f_n + f_next), z_next, f_next), None, None
        z_next = torch.add(torch.add(y, y), z, alpha=-1.0).add_(f_n, alpha=h)
        f_next = f(ts[0], z_next)
        return (torch.add(y, torch.add(f_n, f_next), alpha=0.5 * h), z_next, f_next), None, None

    def bind(self, func: Any, inputs: Any) -> Any:
        return cast(func)

    @property
    def backward_nodes(self) -> tuple[float, ...]:
        """Where a backward step evaluates: at the step's start."""
        return (0.0,)

    def backward_start(
        self, vjp: StepProducts, carry: Carry, a_y: torch.Tensor, h: float
    ) -> Adjoint:
        """The adjoints ``(A_y, A_z)`` at the last state, with the product through ``f_N``."""
        _, g = vjp.evaluate(carry[1], a_y * (0.5 * h), offset=1)
        return (a_y, g)

    def backward_step(
        self,
        vjp: StepProducts,
        carry: Carry,
        adjoint: Adjoint,
        h: Step,
        h_prev: Step | None,
        incoming: torch.Tensor | None,
    ) -> tuple[Carry, Adjoint]:
        """One step back; ``incoming`` is ``dL/dy_n`` when ``t_n`` is an output time (it must
        enter ``A_y(n)`` before the product at ``z_n``)."""
        y1, z1, f1 = carry
        a_y, a_z = adjoint
        a_y0 = torch.add(a_y, a_z, alpha=2.0)
        if incoming is not None:
            a_y0 = a_y0 + incoming
        if isinstance(h, torch.Tensor) or isinstance(h_prev, torch.Tensor):
            # A compiled step: no `alpha=` (see `_runge_kutta.combine`).
            v = a_z * h + a_y * (0.5 * h)
            if h_prev is not None:
                v = v + a_y0 * (0.5 * h_prev)
            z0 = 2 * y1 - z1 - h * f1
        else:
            v = torch.add(a_z * h, a_y, alpha=0.5 * h)
            if h_prev is not None:
                v = v.add_(a_y0, alpha=0.5 * h_prev)
            z0 = torch.add(torch.add(y1, y1), z1, alpha=-1.0).add_(f1, alpha=-h)
        f0, g = vjp.evaluate(z0, v, offset=0)
        if vjp.need_t:
            vjp.add_step_size_gradient(0.5 * torch.sum(a_y * (f0 + f1)) + torch.sum(a_z * f0))
        if isinstance(h, torch.Tensor):
            y0 = y1 - (0.5 * h) * (f0 + f1)
        else:
            y0 = torch.add(y1, torch.add(f0, f1), alpha=-0.5 * h)
        return (y0, z0, f0), (a_y0, g - a_z)


REVERSIBLE_HEUN = ReversibleHeun()
"""The reversible Heun method: order 2, one evaluation per step."""
