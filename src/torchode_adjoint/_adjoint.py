"""The continuous adjoint of Chen et al. (2018) as one ``torch.autograd.Function``.

The forward pass integrates without building a graph and keeps only the states at the output
times. The backward pass integrates the augmented state ``(y, a, g_theta, g_t)`` from the last
output time to the first with the same tableau and grid::

    dy/dt       =  f(t, y)
    da/dt       = -a . df/dy        a(t_N) = dL/dy(t_N)
    dg_theta/dt = -a . df/dtheta    g_theta(t_N) = 0,  dL/dtheta = g_theta(t_0)
    dg_t/dt     = -a . df/dt        g_t(t_N) = -dL/dy(t_N) . f(t_N, y_N),  dL/dt_0 = g_t(t_0)

Each stage makes one evaluation of ``f`` and one vector--Jacobian product for ``y``, the
parameters and ``t`` together; parameter gradients arrive already summed over the batch.
At every output time ``t_i`` the incoming gradient is added to ``a``, the state is reset to the
stored forward state, and ``dL/dt_i = dL/dy(t_i) . f(t_i, y_i)``. The Function returns the states
at ``t[1:]`` as separate outputs, so that the gradient for ``y(t_0) = y0`` flows around it and a
caller that needs only the final state stacks nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ._dynamics import Dynamics, frozen_batchnorm
from ._grid import stage_times
from ._spec import SolveSpec
from ._stepping import StepPlan, combine, integrate, plan_for
from ._vjp import accumulate_, dynamics_vjp

__all__ = ["solve_adjoint"]


def solve_adjoint(
    spec: SolveSpec, y0: torch.Tensor, t: torch.Tensor, params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Solve with the continuous adjoint for the backward pass.

    Gradient: approximate, with error O(step^p) against the gradient of the discretised forward
    pass (the backward pass re-integrates the state instead of storing it). Memory: the states at
    the output times, independent of the number of steps.
    """
    return list(_ContinuousAdjoint.apply(spec, y0, t, *params))


class _ContinuousAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, spec: SolveSpec, y0: torch.Tensor, t: torch.Tensor, *params: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        f = Dynamics(spec.func)
        states = integrate(
            f, y0, t.detach(), spec.grid, spec.tableau, check_finite=spec.check_finite
        )
        spec.counter.forward, spec.counter.backward = f.nfe, 0
        ctx.spec = spec
        ctx.n_states = len(states)
        ctx.set_materialize_grads(False)
        # The states at the output times only: memory independent of the number of steps.
        ctx.save_for_backward(*states, t, *params)
        return tuple(states)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_states: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        spec: SolveSpec = ctx.spec
        saved = ctx.saved_tensors
        states, t, params = saved[: ctx.n_states], saved[ctx.n_states], saved[ctx.n_states + 1 :]
        need_t = ctx.needs_input_grad[2]
        need_p = bool(params) and any(ctx.needs_input_grad[3:])
        grid, plan = spec.grid, plan_for(spec.tableau)
        times = stage_times(t.detach(), grid, spec.tableau.c, reverse=True)
        f = Dynamics(spec.func, check=False)

        a = torch.zeros_like(states[-1])
        g_p = [torch.zeros_like(p) for p in params] if need_p else []
        g_t = torch.zeros((), dtype=t.dtype, device=t.device)
        dl_dt: list[torch.Tensor] = []
        pos = 0
        with torch.enable_grad(), frozen_batchnorm(spec.func):
            for i in range(len(grid.times) - 1, 0, -1):
                grad_i = grad_states[i - 1]
                if grad_i is not None:
                    a = a + grad_i
                y = states[i - 1]
                h = grid.h[i - 1]
                for k in range(grid.n_steps[i - 1]):
                    y, a, f_end, g_t = _adjoint_step(
                        f, y, a, h, times, pos, plan, params if need_p else (), g_p, g_t, need_t
                    )
                    pos += plan.stages
                    if k == 0 and need_t:
                        # The step's first stage is f(t_i, y_i): reuse it for dL/dt_i.
                        d = g_t.new_zeros(()) if grad_i is None else torch.sum(grad_i * f_end)
                        dl_dt.append(d)
                        g_t = g_t - d
        spec.counter.backward = f.nfe
        if spec.check_finite and not bool(torch.isfinite(a).all()):
            raise RuntimeError(
                "the adjoint state dL/dy became NaN or infinite during the backward pass; reduce "
                "`step`, or use `adjoint=False` (pass `check_finite=False` to skip this check)."
            )
        grad_y0 = a if ctx.needs_input_grad[1] else None
        grad_t = torch.stack([g_t, *reversed(dl_dt)]) if need_t else None
        grad_params = g_p if need_p else [None] * len(params)
        return (None, grad_y0, grad_t, *grad_params)


def _adjoint_step(
    f: Dynamics,
    y: torch.Tensor,
    a: torch.Tensor,
    h: float,
    times: Sequence[torch.Tensor],
    pos: int,
    plan: StepPlan,
    params: Sequence[torch.Tensor],
    g_p: list[torch.Tensor],
    g_t: torch.Tensor,
    need_t: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the augmented system from the end of a step to its start.

    In forward-time notation the augmented derivatives are ``(f, -a.df/dy, -a.df/dtheta,
    -a.df/dt)`` and the step is ``-h``; the signs are folded into the combinations below.
    Returns the new ``y``, ``a``, the first stage's ``f`` and the new ``g_t``.
    """
    ky: list[torch.Tensor] = []
    ka: list[torch.Tensor] = []
    for j in range(plan.stages):
        b_j = plan.b[j]
        # Stages with zero weight feed later stages only: they need no parameter or time VJP.
        vjp = dynamics_vjp(
            f,
            times[pos + j],
            combine(y, -h, plan.rows[j], ky),
            combine(a, h, plan.rows[j], ka),
            params if b_j != 0.0 else (),
            want_t=need_t and b_j != 0.0,
        )
        ky.append(vjp.value)
        ka.append(vjp.y)
        if b_j != 0.0:
            accumulate_(g_p, vjp.params, alpha=h * b_j)
            if vjp.t is not None:
                g_t = torch.add(g_t, vjp.t, alpha=h * b_j)
    return combine(y, -h, plan.weights, ky), combine(a, h, plan.weights, ka), ky[0], g_t
