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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ._dynamics import Dynamics, frozen_batchnorm
from ._grid import stage_times
from ._spec import SolveSpec
from ._vjp import accumulate_, dynamics_vjp

__all__ = ["solve_reversible", "reversible_heun_forward", "reversible_heun_reverse"]


def solve_reversible(
    spec: SolveSpec, y0: torch.Tensor, t: torch.Tensor, params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Solve with the reversible Heun method and its exact reversible backward pass.

    Gradient: exact for the reversible Heun discretisation (up to the round-off of the state
    reconstruction). Memory: independent of the number of steps. Cost: one evaluation per step
    forward (plus one at ``t0``) and one evaluation with its VJP per step backward.
    """
    if spec.tableau.name != "heun":
        raise ValueError(
            f"`adjoint='reversible'` integrates with the reversible Heun method; pass "
            f"`solver='heun'` (got solver {spec.tableau.name!r})."
        )
    return list(_ReversibleHeun.apply(spec, y0, t, *params))


def reversible_heun_forward(
    f: Any, y: torch.Tensor, z: torch.Tensor, f_k: torch.Tensor, h: float, t_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step: ``(y_k, z_k, f(t_k, z_k)) -> (y_{k+1}, z_{k+1}, f(t_{k+1}, z_{k+1}))``."""
    z_next = torch.add(torch.add(y, y), z, alpha=-1.0).add_(f_k, alpha=h)
    f_next = f(t_next, z_next)
    y_next = torch.add(y, torch.add(f_k, f_next), alpha=0.5 * h)
    return y_next, z_next, f_next


def reversible_heun_reverse(
    y_next: torch.Tensor, z_next: torch.Tensor, f_next: torch.Tensor, h: float
) -> torch.Tensor:
    """``z_k`` from the state after the step (the first half of the reverse step)."""
    return torch.add(torch.add(y_next, y_next), z_next, alpha=-1.0).add_(f_next, alpha=-h)


class _ReversibleHeun(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, spec: SolveSpec, y0: torch.Tensor, t: torch.Tensor, *params: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        f = Dynamics(spec.func)
        grid = spec.grid
        ends = stage_times(t.detach(), grid, (1.0,))
        y, z = y0, y0
        f_k = f(t.detach()[0], y0)
        states, pos = [], 0
        for i, n in enumerate(grid.n_steps):
            for _ in range(n):
                y, z, f_k = reversible_heun_forward(f, y, z, f_k, grid.h[i], ends[pos])
                pos += 1
            states.append(y)
        if spec.check_finite and not bool(torch.isfinite(y).all()):
            raise RuntimeError(
                f"the ODE state became NaN or infinite before t = {grid.times[-1]:.6g}; reduce "
                "`step` (pass `check_finite=False` to skip this check)."
            )
        spec.counter.forward, spec.counter.backward = f.nfe, 0
        ctx.spec = spec
        ctx.n_states = len(states)
        ctx.set_materialize_grads(False)
        # The last (y, z) pair and the outputs: memory independent of the number of steps.
        ctx.save_for_backward(*states, z, t, *params)
        return tuple(states)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_states: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        spec: SolveSpec = ctx.spec
        grid = spec.grid
        saved = ctx.saved_tensors
        states, z = saved[: ctx.n_states], saved[ctx.n_states]
        t, params = saved[ctx.n_states + 1], list(saved[ctx.n_states + 2 :])
        need_t = ctx.needs_input_grad[2]
        need_p = bool(params) and any(ctx.needs_input_grad[3:])
        starts = stage_times(t.detach(), grid, (0.0,))
        t_end = t.detach()[-1]
        f = Dynamics(spec.func, check=False)
        # Step sizes and output indices per step, in forward order.
        hs = [h for h, n in zip(grid.h, grid.n_steps) for _ in range(n)]
        g_p = [torch.zeros_like(p) for p in params] if need_p else []
        # Per evaluation point: (interval, local index m, dL/d(time argument)); per step dL/dh.
        dtau: list[tuple[int, int, torch.Tensor]] = []
        dh: list[torch.Tensor] = []
        owner = [(i, m) for i, n in enumerate(grid.n_steps) for m in range(n)]
        n_steps = len(hs)

        def vjp(
            tau: torch.Tensor, z_k: torch.Tensor, lam_f: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            out = dynamics_vjp(f, tau, z_k, lam_f, params if need_p else (), want_t=need_t)
            accumulate_(g_p, out.params)
            return out.value, out.y, out.t

        with torch.enable_grad(), frozen_batchnorm(spec.func):
            y = states[-1]
            lam_y = grad_states[-1] if grad_states[-1] is not None else torch.zeros_like(y)
            lam_f = lam_y * (0.5 * hs[-1])
            f_next, lam_z, g_tau = vjp(t_end, z, lam_f)
            if g_tau is not None:
                dtau.append((len(grid.n_steps) - 1, grid.n_steps[-1], g_tau))
            out_at = {sum(grid.n_steps[: i + 1]): i for i in range(len(grid.n_steps) - 1)}
            for k in range(n_steps - 1, -1, -1):
                h = hs[k]
                z_k = reversible_heun_reverse(y, z, f_next, h)
                lam_y_next, lam_z_next = lam_y, lam_z
                lam_y = torch.add(lam_y_next, lam_z_next, alpha=2.0)
                if k in out_at and grad_states[out_at[k]] is not None:
                    lam_y = lam_y + grad_states[out_at[k]]
                lam_f = torch.add(lam_z_next * h, lam_y_next, alpha=0.5 * h)
                if k:
                    lam_f = lam_f.add_(lam_y, alpha=0.5 * hs[k - 1])
                f_k, jz, g_tau = vjp(starts[k], z_k, lam_f)
                if need_t:
                    dh.append(
                        0.5 * torch.sum(lam_y_next * (f_k + f_next)) + torch.sum(lam_z_next * f_k)
                    )
                    if g_tau is not None:
                        dtau.append((*owner[k], g_tau))
                y = torch.add(y, torch.add(f_k, f_next), alpha=-0.5 * h)
                z, f_next = z_k, f_k
                lam_z = jz - lam_z_next
        spec.counter.backward = f.nfe
        grad_t = _time_gradient(t, grid, dtau, dh[::-1], owner) if need_t else None
        grad_y0 = lam_y + lam_z if ctx.needs_input_grad[1] else None
        grad_params = g_p if need_p else [None] * len(params)
        return (None, grad_y0, grad_t, *grad_params)


def _time_gradient(
    t: torch.Tensor,
    grid: Any,
    dtau: list[tuple[int, int, torch.Tensor]],
    dh: list[torch.Tensor],
    owner: list[tuple[int, int]],
) -> torch.Tensor:
    """Chain dL/d(evaluation time) and dL/d(step size) to the output times.

    In interval ``i`` with ``n`` steps, the evaluation at local index ``m`` is at
    ``t_i + m (t_{i+1} - t_i) / n`` and every step has ``h = (t_{i+1} - t_i) / n``.
    """
    grads = [torch.zeros((), dtype=t.dtype, device=t.device) for _ in range(t.shape[0])]
    for i, m, g in dtau:
        n = grid.n_steps[i]
        grads[i] = grads[i] + g * (1.0 - m / n)
        grads[i + 1] = grads[i + 1] + g * (m / n)
    for (i, _), g in zip(owner, dh):
        n = grid.n_steps[i]
        grads[i] = grads[i] - g / n
        grads[i + 1] = grads[i + 1] + g / n
    return torch.stack(grads)
