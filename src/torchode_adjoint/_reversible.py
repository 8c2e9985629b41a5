"""The reversible gradient mode: exact gradients at memory independent of the number of steps.

The forward pass integrates with a reversible method and keeps only the outputs and the method's
last state. The backward pass walks the steps in reverse: each step is inverted algebraically
(the state before it is reconstructed from the state after it, to round-off) and differentiated
by vector--Jacobian products through the evaluations of that step alone. Nothing per step is
kept, so memory does not grow with the number of steps, learnable times included.

Two methods are reversible:

- any explicit Runge--Kutta tableau, through McCallum & Foster's coupling
  (:class:`~torchode_adjoint._coupled.Coupled`, two base steps per step, same order);
- the reversible Heun method (``solver="reversible_heun"``,
  :class:`~torchode_adjoint.ReversibleHeun`, one evaluation per step, order 2).

The reconstruction is watched: the state it ends with at ``t0`` is compared with the stored
``y0``, and a drift beyond what the dtype explains raises with the fixes named.

Dynamics that draw random numbers (dropout) get their draws replayed exactly: the first
evaluation's generator state is kept and every later evaluation draws from a generator seeded
with one base seed plus its index, so the backward pass, which visits the evaluations in
another order, draws the same numbers, and memory stays flat.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._compat import vector_jacobian_product
from ._dynamics import Dynamics
from ._grid import StageTimes
from ._methods import as_reversible
from ._mode import BackwardJob, ForwardRecord, ForwardResult, GradientMode, Gradients
from ._rng import SeededDraws
from ._solvers import Solver
from ._spec import SolveSpec
from ._stepping import Method, integrate, plan_for, rk_increment
from ._tableau import ButcherTableau
from ._vjp import accumulate_, dynamics_vjp

__all__ = ["Reversible", "StepVJP"]


@dataclass(frozen=True)
class Reversible(GradientMode):
    """Exact gradients at memory independent of the number of steps: ``adjoint="reversible"``.

    With a Butcher tableau (any registered solver, or your own), the solve integrates McCallum
    & Foster's reversible coupling of that method::

        y_{n+1} = lam y_n + (1 - lam) z_n + Psi_h(t_n, z_n) - z_n
        z_{n+1} = z_n + y_{n+1} - Psi_{-h}(t_{n+1}, y_{n+1})

    (``Psi_h`` one step of the tableau, ``z`` an auxiliary state with ``z_0 = y_0``), which has
    the tableau's order. With ``solver="reversible_heun"`` it integrates the reversible Heun
    method. Gradient: exact for the discretisation integrated (to the round-off of the
    reconstruction). Memory: the outputs and one auxiliary state, independent of the number of
    steps. Cost per step, for an ``s``-stage tableau: ``2 s`` evaluations forward; ``2 s``
    evaluations with their vector--Jacobian products backward (the reconstruction and the
    products share them). Reversible Heun: one evaluation forward, one evaluation with its
    product backward.

    Parameters
    ----------
    coupling : float, default 0.999
        ``lam`` in (0, 1]. The reconstruction divides by it once per step, so round-off grows
        like ``lam**-n`` over ``n`` steps where the dynamics do not damp it: values near 1 are
        the stable choice; McCallum & Foster note that ``lam = 1`` loses the scheme's linear
        stability. Not used by the reversible Heun method.
    drift_tol : float, optional
        The largest relative difference allowed between the reconstructed and the stored
        ``y0``; default ``sqrt(eps)`` of the state's dtype (1.5e-8 in float64, 3.5e-4 in
        float32). Beyond it the backward pass raises rather than return the gradient of another
        trajectory.

    Raises
    ------
    ValueError
        For a ``coupling`` outside (0, 1] or a non-positive ``drift_tol``.
    """

    name: ClassVar[str] = "reversible"
    saves_y0: ClassVar[bool] = True
    coupling: float = 0.999
    drift_tol: float | None = None

    def __post_init__(self) -> None:
        c = self.coupling
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0.0 < float(c) <= 1.0:
            raise ValueError(
                f"`coupling` must be a number in (0, 1], got {c!r}; pass e.g. "
                "`Reversible(coupling=0.999)` (values near 1 reconstruct most stably)."
            )
        object.__setattr__(self, "coupling", float(c))
        tol = self.drift_tol
        if tol is not None and (
            isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not float(tol) > 0.0
        ):
            raise ValueError(
                f"`drift_tol` must be a positive number or None, got {tol!r}; pass e.g. "
                "`Reversible(drift_tol=1e-6)`, or None for sqrt(eps) of the state's dtype."
            )

    def check_solver(self, solver: Solver) -> None:
        """Any solver: a tableau is made reversible, the reversible Heun method is already."""

    def method_for(self, solver: Solver) -> Method:
        return as_reversible(solver, self.coupling)

    def integrate_only(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec
    ) -> list[torch.Tensor]:
        # The same draws as a pass with a gradient (a re-run by torch.utils.checkpoint must
        # see what the first, gradient-free run saw).
        f.draws = SeededDraws(y0.device)
        return super().integrate_only(f, y0, t, spec)

    def forward(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        record.draws = f.draws = SeededDraws(y0.device)
        last: list[Any] = []
        states = integrate(
            f, y0, t, spec.grid, spec.stepper, check_finite=spec.check_finite, final=last
        )
        # The method's last auxiliary tensors beside the outputs: memory flat in the steps.
        return states, tuple(last[0][1:])

    def backward(self, job: BackwardJob) -> Gradients:
        grid = job.spec.grid
        method: Any = job.spec.stepper.method
        draws = job.record.draws
        assert draws is not None  # the reversible forward always sets them
        if job.record.random and not draws.active:
            raise RuntimeError(
                "the dynamics drew random numbers in the forward pass, but not in their first "
                "evaluation, so adjoint='reversible' cannot replay them; use "
                "adjoint='checkpoint' or 'backprop'."
            )
        assert job.y0 is not None  # saves_y0
        job.f.draws = draws if draws.active else None
        vjp = StepVJP(job, method)
        # Detached: the reconstruction runs under enable_grad and must record nothing.
        carry: Any = tuple(x.detach() for x in (job.states[-1], *job.extra))
        n_int = len(grid.n_steps)
        last = job.grads[-1]
        a_y = last if last is not None else torch.zeros_like(job.states[-1])
        job.watch(grid.times[-1], a_y)
        total = grid.offsets[-1]
        vjp.at_step(n_int - 1, grid.n_steps[-1] - 1, total - 1)
        adjoint = method.backward_start(vjp, carry, a_y, grid.h[-1])
        evaluations = len(method.nodes)
        h_prev: float | None
        for i in range(n_int - 1, -1, -1):
            n, h = grid.n_steps[i], grid.h[i]
            for k in range(n - 1, -1, -1):
                g = grid.offsets[i] + k
                vjp.at_step(i, k, g)
                if k:
                    h_prev, incoming = h, None
                else:
                    h_prev = grid.h[i - 1] if i else None
                    incoming = job.grads[i - 1] if i else None
                carry, adjoint = method.backward_step(
                    vjp, carry, adjoint, h, h_prev, g * evaluations, incoming
                )
            vjp.end_interval()
            job.watch(grid.times[i], adjoint[0])
        grad_y0 = adjoint[0] + adjoint[1]
        self._check_drift(carry, job.y0, job.states[-1], total, method)
        return Gradients(y0=grad_y0, t=vjp.g_t, params=vjp.g_p)

    def _check_drift(
        self, carry: Any, y0: torch.Tensor, y_end: torch.Tensor, steps: int, method: Any
    ) -> None:
        """Raise if the reconstructed ``(y_0, z_0)`` is not the stored ``y0`` to the tolerance,
        relative to the trajectory's scale (a zero ``y0`` is reconstructed to round-off of the
        states the reconstruction passed through, not to zero)."""
        y0 = y0.detach()
        scale = torch.maximum(y0.abs().max(), y_end.detach().abs().max())
        drift = torch.maximum((carry[0] - y0).abs().max(), (carry[1] - y0).abs().max())
        eps = torch.finfo(y0.dtype).eps
        tol = self.drift_tol if self.drift_tol is not None else math.sqrt(eps)
        rel = float(drift / scale.clamp_min(torch.finfo(y0.dtype).tiny))
        if rel <= tol:
            return
        if getattr(method, "coupling", None) is not None:  # a coupled scheme
            # Round-off in the reconstruction grows like coupling**-steps: suggest a coupling
            # that keeps that factor near e (it damps the scheme's second mode by as much).
            fixes = (
                f"a `coupling` closer to 1 (over {steps:,} steps {self.coupling:g}**-{steps} = "
                f"{_power(self.coupling, -steps)}; e.g. `Reversible(coupling="
                f"{1.0 - 1.0 / steps:.6g})`), a smaller `step`, or float64"
            )
        else:
            fixes = "a smaller `step`, or float64"
        raise RuntimeError(
            f"adjoint='reversible' reconstructed the initial state with a relative error of "
            f"{rel:.3g} (allowed: {tol:.3g}, sqrt(eps) of {y0.dtype} unless `drift_tol` says "
            f"otherwise): round-off grew through the reversed steps, so the gradient would be "
            f"that of another trajectory. Use {fixes}; or adjoint='checkpoint' (exact, stores "
            "states)."
        )


def _power(base: float, exponent: int) -> str:
    log10 = exponent * math.log10(base)
    return f"{10**log10:.3g}" if log10 < 300 else f"1e{log10:.0f}"


class StepVJP:
    """Vector--Jacobian products through the evaluations of one step, for a reversible method's
    backward step, with the bookkeeping every such product needs: the stage times (recorded
    when the times need a gradient), the replay of random draws, the parameter gradients
    (accumulated in place) and the time gradients (folded into the output times per interval,
    so nothing per step is kept).
    """

    def __init__(self, job: BackwardJob, method: Any) -> None:
        self.job, self.f = job, job.f
        self.need_t = job.need_t
        self.params = job.vjp_params
        self.g_p = [torch.zeros_like(p) for p in self.params]
        grid = job.spec.grid
        self.grid = grid
        self.times = StageTimes(job.t, grid, method.nodes)
        self.ends = StageTimes(job.t, grid, (1.0,))
        self.g_t = torch.zeros_like(job.t) if self.need_t else None
        zero = job.t.new_zeros(())
        self._lo, self._hi = zero, zero.clone()
        self.i = self.k = self.step = 0
        self._h_leaf: torch.Tensor | None = None

    def at_step(self, i: int, k: int, step: int) -> None:
        """The products that follow belong to step ``k`` of interval ``i`` (global ``step``)."""
        self.i, self.k, self.step = i, k, step
        self._h_leaf = None

    def end_interval(self) -> None:
        """Fold the interval's time gradients into ``dL/dt_i`` and ``dL/dt_{i+1}``."""
        if self.g_t is not None:
            self.g_t[self.i] += self._lo
            self.g_t[self.i + 1] += self._hi
            self._lo, self._hi = self._lo.new_zeros(()), self._hi.new_zeros(())

    def _point_time(self, offset: int) -> torch.Tensor:
        g = self.step + offset
        return self.ends[g - 1] if g else self.job.t[0]

    def _add_point_gradient(self, g: torch.Tensor | None, offset: int) -> None:
        if g is not None:
            m = (self.k + offset) / self.grid.n_steps[self.i]
            self._lo = torch.add(self._lo, g, alpha=1.0 - m)
            self._hi = torch.add(self._hi, g, alpha=m)

    def add_step_size_gradient(self, g: torch.Tensor) -> None:
        """Add ``dL/dh`` of the current step."""
        n = self.grid.n_steps[self.i]
        self._lo = torch.add(self._lo, g, alpha=-1.0 / n)
        self._hi = torch.add(self._hi, g, alpha=1.0 / n)

    def _grad(
        self, out: torch.Tensor, x: torch.Tensor, v: torch.Tensor, times: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        inputs = [x, *self.params, *times]
        grads = vector_jacobian_product(out, inputs, v)
        accumulate_(self.g_p, grads[1 : 1 + len(self.params)])
        g_x = grads[0] if grads[0] is not None else torch.zeros_like(x)
        return g_x, grads[1 + len(self.params) :]

    def evaluate(
        self, x: torch.Tensor, v: torch.Tensor, *, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f(t, x)`` at the current step's start (``offset=0``) or end (1), and ``v^T df/dx``."""
        self.f.index = self.step + offset
        out = dynamics_vjp(self.f, self._point_time(offset), x, v, self.params, want_t=self.need_t)
        accumulate_(self.g_p, out.params)
        self._add_point_gradient(out.t, offset)
        return out.value, out.y

    def increment(
        self,
        tableau: ButcherTableau,
        x: torch.Tensor,
        v: torch.Tensor,
        h: float,
        pos: int,
        offset: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The increment ``Psi_h(t, x) - x`` of one base step from the current step's start
        (``offset=0``) or end (1), evaluated at ``times[pos:]``, and ``v^T`` its Jacobian."""
        plan = plan_for(tableau)  # cached
        x_leaf = x.detach().requires_grad_(True)
        self.f.index = pos  # a tableau's coupled steps evaluate nothing at t0
        if not self.need_t:
            out = rk_increment(self.f, x_leaf, h, self.times, pos, plan)
            g_x, _ = self._grad(out, x_leaf, v, ())
            return out.detach(), g_x
        tau = self._point_time(offset).detach().requires_grad_(True)
        h_signed = self.grid.h[self.i]
        if self._h_leaf is None:  # the interval's step, one leaf for both base steps
            self._h_leaf = torch.tensor(h_signed, dtype=tau.dtype, device=tau.device)
            self._h_leaf.requires_grad_(True)
        hh = self._h_leaf if h == h_signed else -self._h_leaf
        stage_times = [tau if c == 0.0 else tau + c * hh for c in tableau.c]
        out = rk_increment(self.f, x_leaf, hh, stage_times, 0, plan)
        g_x, (g_tau, g_h) = self._grad(out, x_leaf, v, (tau, self._h_leaf))
        self._add_point_gradient(g_tau, offset)
        if g_h is not None:
            self.add_step_size_gradient(g_h)
        return out.detach(), g_x
