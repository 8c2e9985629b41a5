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

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._compiled import cast
from .protocol import MethodBase, Step, Stepped, StepProducts
from .runge_kutta import StepPlan, combine, dense_terms, plan_for, rk_stages
from .tableau import ButcherTableau

__all__ = ["Coupled", "CouplingReplay"]

Carry = tuple[torch.Tensor, torch.Tensor]


class CouplingReplay:
    """Couplings taken in turn, one per step: a solve that takes a recorded solve's couplings
    as fixed numbers (finite differences then see the discretisation the exact gradient
    differentiates, whose couplings are constants). Fixed steps only (a rejected trial would
    take one too)."""

    __slots__ = ("couplings", "taken")

    def __init__(self, couplings: Sequence[float]) -> None:
        self.couplings, self.taken = tuple(couplings), 0

    def take(self) -> float:
        """The next step's coupling."""
        if self.taken >= len(self.couplings):
            raise RuntimeError(
                f"the replayed solve takes more steps than the {len(self.couplings)} couplings "
                "recorded; replay a solve with the same steps."
            )
        lam = self.couplings[self.taken]
        self.taken += 1
        return lam


@dataclass(frozen=True)
class Coupled(MethodBase):
    """A tableau made reversible by McCallum & Foster's coupling (see the module docstring).

    Parameters
    ----------
    tableau : ButcherTableau
        The base method.
    coupling : float
        ``lam`` in (0, 1]; with ``choose``, the largest coupling a step may take.
    estimate : bool
        Error-controlled steps: each step returns an error estimate.
    choose : bool
        Choose each step's coupling from the contraction the step shows (see
        :meth:`coupling_for`); the carry then holds ``f(t_n, y_n)`` and the coupling the step
        that made it took (a host float, which the reversible mode records).
    min_coupling : float
        With ``choose``: the smallest coupling a step may take. A step that contracts by more
        raises (fixed steps) or takes it and lets the error control see the gap grow.
    replay : CouplingReplay, optional
        With ``choose``: take these couplings instead of choosing (see :class:`CouplingReplay`).
    """

    #: The backward step adds an output's gradient dL/dy_n after the step (the step's
    #: evaluations do not read it): the mode takes every backward step through the executor.
    incoming_after_step: ClassVar[bool] = True

    tableau: ButcherTableau
    coupling: float
    estimate: bool = False
    choose: bool = False
    min_coupling: float = 0.5
    replay: CouplingReplay | None = field(default=None, repr=False, compare=False)
    plan: StepPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Resolved here, not in the step: the compiled step traces no cache lookups.
        object.__setattr__(self, "plan", plan_for(self.tableau))

    @property
    def name(self) -> str:
        if self.choose:
            return f"{self.tableau.name} made reversible (coupling chosen per step)"
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
        return ("coupled", self.tableau, self.coupling, self.choose, self.min_coupling)

    @property
    def compilable(self) -> bool:
        """Whether the steps may run as compiled graphs: not with a coupling chosen per step,
        which is read on the host at every step."""
        return not self.choose

    def init(self, f: Any, y0: torch.Tensor, t0: torch.Tensor) -> Any:
        # (y, z), and with a chosen coupling f(t_n, y_n) and the last step's coupling: none
        # yet (y_0 = z_0, so the first step has no gap to measure).
        return (y0, y0, None, None) if self.choose else (y0, y0)

    def output(self, carry: Any) -> torch.Tensor:
        return carry[0]  # type: ignore[no-any-return]

    def auxiliary(self, carry: Any) -> tuple[torch.Tensor, ...]:
        """What the backward pass starts from besides the output: ``z_N``."""
        return (carry[1],)

    def draw_alias(self, index: int) -> int:
        """The evaluation whose random draws evaluation ``index`` repeats: with a chosen
        coupling, each step's first evaluation (``f(t_n, z_n)``) draws what the previous step's
        backward base step drew at the same time (``f(t_n, y_n)``), so that their difference is
        the dynamics' change along the gap, not between two dropout masks."""
        period = 2 * self.plan.stages
        if self.choose and index > 0 and index % period == 0:
            return index - self.plan.stages
        return index

    @staticmethod
    def coupling_of(carry: Any) -> float | None:
        """The coupling the step that made ``carry`` took (None before the first step, or for
        a fixed coupling)."""
        return carry[3] if len(carry) > 2 else None  # type: ignore[no-any-return]

    def step(self, f: Any, carry: Any, h: Step, ts: tuple[torch.Tensor, ...]) -> Stepped:
        y, z = carry[0], carry[1]
        plan = self.plan
        s = plan.stages
        ks = rk_stages(f, z, h, ts[:s], plan)
        d_p = combine(None, h, plan.weights, ks)
        # The base step's error estimate (an embedded pair under error control).
        error = combine(None, h, plan.errors, ks) if self.estimate else None
        lam = self.coupling_for(carry, ks[0], h, ts[0]) if self.choose else self.coupling
        # Plain products, no `alpha=` (the compiled path; see `combine`).
        y1 = d_p + y if lam == 1.0 else d_p + lam * y + (1.0 - lam) * z
        ks_q = rk_stages(f, y1, -h, ts[s:], plan)
        z1 = z - combine(None, -h, plan.weights, ks_q)
        if error is not None:
            # The coupled state's own error: the change of the gap between y and z, which the
            # scheme's second (parasitic) mode grows where the coupling exceeds a step's
            # contraction. Zero-order in a healthy step (the gap is the round trip's defect).
            error = error + ((y1 - z1) - (y - z))
        # Under error control the dense information: the base step's stages from z_n and the
        # coupling (see `interpolate`).
        dense = (ks, lam) if self.estimate else None
        if self.choose:
            return (y1, z1, ks_q[0], lam), error, dense
        return (y1, z1), error, dense

    @property
    def interpolates(self) -> bool:
        """Under error control with a pair that has a continuous extension (dense output)."""
        return self.estimate and self.tableau.b_dense is not None

    def interpolate(self, carry: Any, h: Step, dense: Any, theta: Any) -> torch.Tensor:
        """The solution at ``t_n + theta h`` inside the step from ``carry``:
        ``(1 - w) y_n + w z_n + h sum_i b_i(theta) k_i`` with ``w = theta (1 - lam)`` and
        ``k_i`` the stages of the base step from ``z_n``: ``y_n`` at ``theta = 0``,
        ``y_{n+1}`` at 1, and the base method's continuous extension where ``y = z``."""
        ks, lam = dense
        y, z = carry[0], carry[1]
        w = theta * (1.0 - lam)
        base = y if w == 0.0 else (1.0 - w) * y + w * z
        return combine(base, h, dense_terms(self.tableau, theta), ks)

    def coupling_for(self, carry: Any, f_z: torch.Tensor, h: Step, t: torch.Tensor) -> float:
        """The coupling of the step from ``carry``: the step's contraction along the gap.

        For ``y' = J y`` a coupled step with coupling ``lam`` has the eigenvalues ``R`` (the
        solution) and about ``lam / R`` (the parasitic mode), ``R = R(h mu)`` the base
        tableau's stability function at an eigenvalue ``mu`` of ``J``: with ``lam = R`` the
        parasitic mode neither grows forwards nor backwards. The gap ``g = y_n - z_n`` is that
        mode's amplitude, and grows fastest along the most contracting direction, so the
        Rayleigh quotient ``mu = <g, f(t_n, y_n) - f(t_n, z_n)> / <g, g>`` (both evaluations
        the scheme makes anyway: the last reverse step's first stage and this step's) measures
        the rate that matters. The coupling is ``min(coupling, R(h mu))``; with ``replay``,
        the next of the given couplings instead.
        """
        if self.replay is not None:
            return self.replay.take()
        f_y = carry[2]
        if f_y is None:
            return self.coupling
        y, z = carry[0], carry[1]
        # Three inner products and one host read (the forward pass records no graph, and the
        # numbers leave as host floats).
        g, d, yv = (y - z).reshape(-1), (f_y - f_z).reshape(-1), y.reshape(-1)
        if g.is_complex():
            g, d, yv = (torch.view_as_real(x).reshape(-1) for x in (g, d, yv))
        gg, gd, yy = torch.stack([g @ g, g @ d, yv @ yv]).tolist()
        # While the gap (the parasitic mode's amplitude) is below sqrt(eps) of the state, the
        # reconstruction's own tolerance, the largest coupling costs the solution nothing, and
        # a smaller one would cost the backward pass: its reconstruction grows the other
        # directions' round-off by R_i / lam per step (measured on the latent ODE in float32:
        # a drift of 3.3e-4 against 8.5e-5). Below it the gap is also too small to measure.
        tol = math.sqrt(torch.finfo(y.dtype).eps)
        if not gg > tol * tol * max(yy, torch.finfo(y.dtype).tiny):
            return self.coupling
        mu = gd / gg
        h_f = float(h.detach()) if isinstance(h, torch.Tensor) else float(h)
        r = self.tableau.stability(h_f * mu)
        lam = min(self.coupling, r)
        if lam >= self.min_coupling:
            return lam
        if self.estimate:
            # Error control: the gap's growth enters the error estimate and shortens the step.
            return self.min_coupling
        raise RuntimeError(_too_contracting(self, float(t.detach()), h_f, mu, r))

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
        vjp: Any,
        carry: Carry,
        adjoint: Carry,
        h: Step,
        h_prev: Step | None,
        incoming: torch.Tensor | None,
        inside: Sequence[tuple[float, torch.Tensor]] = (),
    ) -> tuple[Carry, Carry]:
        """``(y_n, z_n)`` and their adjoints from those of ``(y_{n+1}, z_{n+1})``; ``incoming``
        is ``dL/dy_n`` when ``t_n`` is an output time (``h_prev`` is not needed: the steps share
        no evaluation), and ``inside`` the ``(theta, dL/dy)`` of outputs interpolated inside
        the step (:meth:`interpolate`: their products go through the base step's stages from
        ``z_n`` with the one that ``z_n``'s own increment takes)."""
        y1, z1 = carry
        a_y, a_z = adjoint
        plan = self.plan
        lam = vjp.coupling if self.choose else self.coupling
        # z_{n+1} = z_n - d_{-h}(y_{n+1}): the product with -A_z.
        d_q, g_q = vjp.increment(plan, y1, torch.neg(a_z), -h, first=plan.stages, offset=1)
        z0 = z1 + d_q
        b = a_y + g_q
        extra = [(dense_terms(self.tableau, theta), g) for theta, g in inside]
        d_p, g_p = vjp.increment(plan, z0, b, h, first=0, offset=0, extra=extra)
        if lam == 1.0:
            y0, a_y0, a_z0 = y1 - d_p, b, a_z + g_p
        else:
            y0 = (y1 - (1.0 - lam) * z0 - d_p) / lam
            a_y0, a_z0 = lam * b, torch.add(a_z, b, alpha=1.0 - lam).add_(g_p)
        for theta, g in inside:  # the interpolant's direct terms in y_n and z_n
            w = theta * (1.0 - lam)
            a_y0 = a_y0 + (g if w == 0.0 else (1.0 - w) * g)
            if w != 0.0:
                a_z0 = a_z0 + w * g
        if incoming is not None:
            a_y0 = a_y0 + incoming
        return (y0, z0), (a_y0, a_z0)


def _too_contracting(method: Coupled, t: float, h: float, mu: float, r: float) -> str:
    """The message for a fixed step that contracts by more than the smallest coupling."""
    # The largest step (a fraction of this one) whose contraction the coupling can follow.
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if method.tableau.stability(mid * h * mu) >= method.min_coupling:
            lo = mid
        else:
            hi = mid
    return (
        f"adjoint='reversible' with solver={method.tableau.name!r}: at t = {t:.6g} a step of "
        f"{abs(h):.3g} contracts the state by a factor of {r:.3g} (the dynamics' rate along the "
        f"gap between the scheme's two states is about {mu:.3g}), more than the smallest "
        f"coupling {method.min_coupling:g} can follow, so the coupling's parasitic mode would "
        f"grow at every step and the solution and gradient would be wrong. Use a smaller "
        f"`step` (at most about {lo * abs(h):.3g} there), error control (`rtol=`/`atol=`), "
        "or adjoint='checkpoint' (exact, stores one state per segment)."
    )
