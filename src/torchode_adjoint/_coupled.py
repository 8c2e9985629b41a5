"""McCallum & Foster's reversible coupling of any explicit Runge--Kutta method.

With ``Psi_h(t, x)`` one step of the base method, ``d_h(t, x) = Psi_h(t, x) - x`` its increment
and a coupling ``lam`` in (0, 1], the method carries a second state ``z`` (``z_0 = y_0``)::

    y_{n+1} = lam y_n + (1 - lam) z_n + d_h(t_n, z_n)
    z_{n+1} = z_n - d_{-h}(t_{n+1}, y_{n+1})

(McCallum & Foster 2024, "Efficient, accurate and stable gradients for neural ODEs", written with
increments: ``Psi_h(z) - z = d_h(z)`` and ``y - Psi_{-h}(y) = -d_{-h}(y)``). Each step is
algebraically invertible::

    z_n = z_{n+1} + d_{-h}(t_{n+1}, y_{n+1})
    y_n = (y_{n+1} - (1 - lam) z_n - d_h(t_n, z_n)) / lam

and the method has the base method's order. A step costs two base steps (``2 s`` evaluations
for an ``s``-stage tableau). The backward pass (:meth:`Coupled.backward_step`) reconstructs
``(y_n, z_n)`` from ``(y_{n+1}, z_{n+1})`` with the same two base steps, recorded, and takes one
vector--Jacobian product through each: with ``(A_y, A_z)`` the adjoints of ``(y_{n+1}, z_{n+1})``,
``J_Q`` the Jacobian of ``d_{-h}(t_{n+1}, .)`` at ``y_{n+1}`` and ``J_P`` that of ``d_h(t_n, .)``
at ``z_n``::

    B      = A_y - J_Q^T A_z
    A_y(n) = lam B
    A_z(n) = A_z + (1 - lam) B + J_P^T B

with the parameter and time gradients of the two products accumulated alongside. That is the
exact gradient of the discretisation, to the round-off of the reconstruction.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from ._compiled import cast
from ._runge_kutta import StepPlan, combine, plan_for, rk_increment, rk_stages
from ._step import Step, Stepped, StepProducts
from ._tableau import ButcherTableau

__all__ = ["Coupled"]

Carry = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Coupled:
    """A tableau made reversible by McCallum & Foster's coupling (see the module docstring).

    Parameters
    ----------
    tableau : ButcherTableau
        The base method.
    coupling : float
        ``lam`` in (0, 1].
    """

    tableau: ButcherTableau
    coupling: float
    estimate: bool = False
    plan: StepPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Resolved here, not in the step: the compiled step traces no cache lookups.
        object.__setattr__(self, "plan", plan_for(self.tableau))

    @property
    def name(self) -> str:
        return f"{self.tableau.name} made reversible (coupling {self.coupling:g})"

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def nodes(self) -> tuple[float, ...]:
        # The base step from t_n, then the one from t_{n+1} with -h: t_{n+1} - c h.
        return (*self.tableau.c, *(1.0 - c for c in self.tableau.c))

    @property
    def key(self) -> Hashable:
        return ("coupled", self.tableau, self.coupling)

    def init(self, f: Any, y0: torch.Tensor, t0: torch.Tensor) -> Carry:
        return (y0, y0)

    def output(self, carry: Carry) -> torch.Tensor:
        return carry[0]

    def step(self, f: Any, carry: Carry, h: Step, ts: tuple[torch.Tensor, ...]) -> Stepped:
        y, z = carry
        plan, lam = self.plan, self.coupling
        s = plan.stages
        ks = rk_stages(f, z, h, ts[:s], plan)
        d_p = combine(None, h, plan.weights, ks)
        # The base step's error estimate (an embedded pair under error control).
        error = combine(None, h, plan.errors, ks) if self.estimate else None
        # Plain products, no `alpha=` (the compiled path; see `combine`).
        y = d_p + y if lam == 1.0 else d_p + lam * y + (1.0 - lam) * z
        d_q = rk_increment(f, y, -h, ts[s:], plan)
        return (y, z - d_q), error, None

    @property
    def error_order(self) -> int:
        """The embedded order of the base tableau (error-controlled steps)."""
        return int(self.tableau.embedded_order or 1)

    def bind(self, func: Any, inputs: Any) -> Any:
        return cast(func)

    @property
    def backward_nodes(self) -> tuple[float, ...]:
        """Where a backward step evaluates: the forward step's stage times."""
        return self.nodes

    def backward_start(self, vjp: StepProducts, carry: Carry, a_y: torch.Tensor, h: float) -> Carry:
        """The adjoints ``(A_y, A_z)`` at the last state (``z_N`` is no output)."""
        return (a_y, torch.zeros_like(a_y))

    def backward_step(
        self,
        vjp: StepProducts,
        carry: Carry,
        adjoint: Carry,
        h: Step,
        h_prev: Step | None,
        incoming: torch.Tensor | None,
    ) -> tuple[Carry, Carry]:
        """``(y_n, z_n)`` and their adjoints from those of ``(y_{n+1}, z_{n+1})``; ``incoming``
        is ``dL/dy_n`` when ``t_n`` is an output time (``h_prev`` is not needed: the steps share
        no evaluation)."""
        y1, z1 = carry
        a_y, a_z = adjoint
        plan, lam = self.plan, self.coupling
        # z_{n+1} = z_n - d_{-h}(y_{n+1}): the product with -A_z.
        d_q, g_q = vjp.increment(plan, y1, torch.neg(a_z), -h, first=plan.stages, offset=1)
        z0 = z1 + d_q
        b = a_y + g_q
        d_p, g_p = vjp.increment(plan, z0, b, h, first=0, offset=0)
        if lam == 1.0:
            y0, a_y0, a_z0 = y1 - d_p, b, a_z + g_p
        else:
            y0 = (y1 - (1.0 - lam) * z0 - d_p) / lam
            a_y0, a_z0 = lam * b, torch.add(a_z, b, alpha=1.0 - lam).add_(g_p)
        if incoming is not None:
            a_y0 = a_y0 + incoming
        return (y0, z0), (a_y0, a_z0)
