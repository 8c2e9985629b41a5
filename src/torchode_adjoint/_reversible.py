"""The reversible Heun method (Kidger et al. 2021) with its exact, memory-flat backward pass.

The method carries an auxiliary state ``z`` (``z_0 = y_0``) and evaluates ``f`` once per step::

    z_{k+1} = 2 y_k - z_k + h f(t_k, z_k)
    y_{k+1} = y_k + h/2 (f(t_k, z_k) + f(t_{k+1}, z_{k+1}))

It is second order and algebraically reversible: given ``(y_{k+1}, z_{k+1}, f_{k+1})``,
``z_k = 2 y_{k+1} - z_{k+1} - h f_{k+1}`` and ``y_k = y_{k+1} - h/2 (f_k + f_{k+1})``. The backward
pass reconstructs every earlier state this way (to round-off) and back-propagates through the
discrete step exactly, with one evaluation and one vector--Jacobian product per step. With
``lam_*`` the adjoints of ``y_k``, ``z_k`` and ``f_k``::

    lam_y[k] = 2 lam_z[k+1] + lam_y[k+1]                       (+ dL/dy at output times)
    lam_f[k] = h_k lam_z[k+1] + h_k/2 lam_y[k+1] + h_{k-1}/2 lam_y[k]
    lam_z[k] = J_f(t_k, z_k)^T lam_f[k] - lam_z[k+1]
    dL/dtheta += J_theta^T lam_f[k],   dL/dy0 = lam_y[0] + lam_z[0]

Dynamics that draw random numbers (dropout in training mode) have the random state before each
evaluation kept and replayed in the backward pass (a CPU generator state of about 5 KB per step,
so memory is then no longer flat in the number of steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._compiled import CompiledFunction, cast, vjp_names
from ._compiled import vjp as compiled_vjp
from ._dynamics import Dynamics
from ._grid import StageTimes, TimeGrid, step_sizes, time_gradient
from ._mode import BackwardJob, ForwardRecord, ForwardResult, GradientMode, Gradients, RngState
from ._solvers import HEUN
from ._spec import SolveSpec
from ._tableau import ButcherTableau
from ._vjp import accumulate_, dynamics_vjp

__all__ = [
    "Reversible",
    "reversible_heun_forward",
    "reversible_heun_reverse",
    "reversible_heun_autograd",
]

_COEFF_TOL = 1e-12


def reversible_heun_forward(
    f: Any,
    y: torch.Tensor,
    z: torch.Tensor,
    f_k: torch.Tensor,
    h: float | torch.Tensor,
    t_next: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step: ``(y_k, z_k, f(t_k, z_k)) -> (y_{k+1}, z_{k+1}, f(t_{k+1}, z_{k+1}))``.

    A tensor ``h`` (the compiled path) uses no ``alpha=`` coefficients: inductor drops them
    after a matrix product (pytorch/pytorch#167313).
    """
    if isinstance(h, torch.Tensor):
        z_next = 2 * y - z + h * f_k
        f_next = f(t_next, z_next)
        return y + (0.5 * h) * (f_k + f_next), z_next, f_next
    z_next = torch.add(torch.add(y, y), z, alpha=-1.0).add_(f_k, alpha=h)
    f_next = f(t_next, z_next)
    y_next = torch.add(y, torch.add(f_k, f_next), alpha=0.5 * h)
    return y_next, z_next, f_next


def reversible_heun_reverse(
    y_next: torch.Tensor, z_next: torch.Tensor, f_next: torch.Tensor, h: float
) -> torch.Tensor:
    """``z_k`` from the state after the step (the first half of the reverse step)."""
    return torch.add(torch.add(y_next, y_next), z_next, alpha=-1.0).add_(f_next, alpha=-h)


def reversible_heun_autograd(
    f: Any, y0: torch.Tensor, t: torch.Tensor, grid: TimeGrid
) -> list[torch.Tensor]:
    """The reversible Heun method with autograd recording every operation, differentiable in
    ``y0``, the parameters and ``t``: the reference the reversible mode's gradient must equal
    (:func:`~torchode_adjoint.check_gradients` compares against it). Memory grows with the
    number of steps.
    """
    hs = step_sizes(t, grid)
    y, z = y0, y0
    f_k = f(t[0], y0)
    states = []
    for i, n in enumerate(grid.n_steps):
        for m in range(n):
            t_next = t[i] + (m + 1) * hs[i]
            z_next = 2 * y - z + hs[i] * f_k
            f_next = f(t_next, z_next)
            y = y + hs[i] / 2 * (f_k + f_next)
            z, f_k = z_next, f_next
        states.append(y)
    return states


def _is_heun(tableau: ButcherTableau) -> bool:
    if tableau.stages != HEUN.stages:
        return False
    pairs = [
        *zip(tableau.c, HEUN.c),
        *zip(tableau.b, HEUN.b),
        *((x, y) for ra, rb in zip(tableau.a, HEUN.a) for x, y in zip(ra, rb)),
    ]
    return all(abs(x - y) <= _COEFF_TOL for x, y in pairs)


@dataclass(frozen=True)
class Reversible(GradientMode):
    """The reversible Heun method (Kidger et al. 2021): ``adjoint="reversible"``.

    Needs ``solver="heun"`` (checked by its coefficients when the mode is paired with a
    solver). Gradient: exact for the reversible Heun discretisation (up to the round-off of the
    state reconstruction). Memory: independent of the number of steps. Cost: one evaluation per
    step forward (plus one at ``t0``) and one evaluation with its VJP per step backward.
    """

    name: ClassVar[str] = "reversible"
    required_solver: ClassVar[str | None] = "heun"

    def check_solver(self, tableau: ButcherTableau) -> None:
        if not _is_heun(tableau):
            raise ValueError(
                f"`adjoint='reversible'` integrates with the reversible Heun method; pass "
                f"`solver='heun'` (got {tableau!r}, whose coefficients are not Heun's)."
            )

    def integrate_only(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec
    ) -> list[torch.Tensor]:
        states, _ = self.forward(f, y0, t, spec, ForwardRecord.start(y0.device))
        return states

    def forward(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        grid = spec.grid
        ends = StageTimes(t, grid, (1.0,))
        before = RngState.capture(y0.device)
        f_k = f(t[0], y0)
        # Keep the random state before every evaluation only if the first one drew.
        random = not before.same_as(RngState.capture(y0.device))
        if random:
            record.rng.append(before)
        y, z = y0, y0
        states, pos = [], 0
        step = _compiled(spec, "reversible_step", lambda: _reversible_step) if not random else None
        for i, n in enumerate(grid.n_steps):
            for _ in range(n):
                if random:
                    record.rng.append(RngState.capture(y0.device))
                if step is None:
                    y, z, f_k = reversible_heun_forward(f, y, z, f_k, grid.h[i], ends[pos])
                else:
                    h = spec.stepper.step_tensor(grid.h[i], y)
                    y, z, f_k = step(spec.func, y, z, f_k, h, ends[pos])
                    f.nfe += 1
                pos += 1
            states.append(y)
        if spec.check_finite:
            _check_states(states, grid.times)
        # The last z beside the outputs: memory independent of the number of steps.
        return states, (z,)

    def backward(self, job: BackwardJob) -> Gradients:
        grid = job.spec.grid
        if job.record.random and not job.record.rng:
            raise RuntimeError(
                "the dynamics drew random numbers in the forward pass, but not in their first "
                "evaluation, so adjoint='reversible' kept no random states to replay; use "
                "adjoint='checkpoint' or 'backprop'."
            )
        rng = list(job.record.rng)
        (z,) = job.extra
        starts = StageTimes(job.t, grid, (0.0,))
        t_end = job.t[-1]
        hs = [h for h, n in zip(grid.h, grid.n_steps) for _ in range(n)]
        owner = [i for i, n in enumerate(grid.n_steps) for _ in range(n)]
        local = [m for n in grid.n_steps for m in range(n)]
        g_p = [torch.zeros_like(p) for p in job.vjp_params]
        at_points: list[tuple[int, float, torch.Tensor]] = []
        per_step: list[tuple[int, torch.Tensor]] = []

        names = vjp_names(job.spec.compile, job.spec.func, job.vjp_params)
        compiled = (
            _compiled(job.spec, "reversible_vjp", lambda: compiled_vjp)
            if names is not None and not job.record.random
            else None
        )
        params = tuple(p.detach() for p in job.vjp_params)

        def vjp(
            tau: torch.Tensor, z_k: torch.Tensor, lam_f: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            if compiled is not None and job.f.checked:
                with torch.no_grad():  # torch.func's VJP differentiates inside
                    value, g_y, g_ps, g_t = compiled(job.spec.func, tau, z_k, lam_f, names, params)
                job.f.nfe += 1
                accumulate_(g_p, g_ps)
                return value, g_y, g_t if job.need_t else None
            state = rng.pop() if rng else None
            with state.replayed(z_k.device) if state is not None else contextlib.nullcontext():
                out = dynamics_vjp(job.f, tau, z_k, lam_f, job.vjp_params, want_t=job.need_t)
            accumulate_(g_p, out.params)
            return out.value, out.y, out.t

        y = job.states[-1]
        last = job.grads[-1]
        lam_y = last if last is not None else torch.zeros_like(y)
        job.watch(grid.times[-1], lam_y)
        lam_f = lam_y * (0.5 * hs[-1])
        f_next, lam_z, g_tau = vjp(t_end, z, lam_f)
        if g_tau is not None:
            at_points.append((len(grid.n_steps) - 1, float(grid.n_steps[-1]), g_tau))
        out_at = {grid.offsets[i + 1]: i for i in range(len(grid.n_steps) - 1)}
        for k in range(len(hs) - 1, -1, -1):
            h = hs[k]
            z_k = reversible_heun_reverse(y, z, f_next, h)
            lam_y_next, lam_z_next = lam_y, lam_z
            lam_y = torch.add(lam_y_next, lam_z_next, alpha=2.0)
            if k in out_at:
                if job.grads[out_at[k]] is not None:
                    lam_y = lam_y + job.grads[out_at[k]]
                job.watch(grid.times[out_at[k] + 1], lam_y)
            lam_f = torch.add(lam_z_next * h, lam_y_next, alpha=0.5 * h)
            if k:
                lam_f = lam_f.add_(lam_y, alpha=0.5 * hs[k - 1])
            f_k, jz, g_tau = vjp(starts[k], z_k, lam_f)
            if job.need_t:
                dh = 0.5 * torch.sum(lam_y_next * (f_k + f_next)) + torch.sum(lam_z_next * f_k)
                per_step.append((owner[k], dh))
                if g_tau is not None:
                    at_points.append((owner[k], float(local[k]), g_tau))
            y = torch.add(y, torch.add(f_k, f_next), alpha=-0.5 * h)
            z, f_next = z_k, f_k
            lam_z = jz - lam_z_next
        grad_y0 = lam_y + lam_z
        job.watch(grid.times[0], grad_y0)
        grad_t = time_gradient(job.t, grid, at_points, per_step) if job.need_t else None
        return Gradients(y0=grad_y0, t=grad_t, params=g_p)


def _compiled(
    spec: SolveSpec, name: str, make: Callable[[], Callable[..., Any]]
) -> CompiledFunction | None:
    return None if spec.compile is None else spec.compile.function((name, HEUN), make)


def _reversible_step(
    func: Callable[..., torch.Tensor],
    y: torch.Tensor,
    z: torch.Tensor,
    f_k: torch.Tensor,
    h: torch.Tensor,
    t_next: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`reversible_heun_forward` of the module ``func``, as the function to compile."""
    return reversible_heun_forward(cast(func), y, z, f_k, h, t_next)


def _check_states(states: list[torch.Tensor], times: tuple[float, ...]) -> None:
    """The forward non-finite policy of :func:`~torchode_adjoint._stepping.integrate`, per
    output time (the reversible state cannot be re-run step by step to locate the step)."""
    flags = torch.stack([torch.isfinite(s).all() for s in states]).tolist()
    if all(flags):
        return
    i = flags.index(False)
    raise RuntimeError(
        f"the ODE state became NaN or infinite in [{times[i]:.6g}, {times[i + 1]:.6g}]; reduce "
        "`step`, or check the dynamics (pass `check_finite=False` to skip this check)."
    )
