"""The checkpointed discrete adjoint: exact gradients from stored step boundaries.

The forward pass runs without a graph and keeps the state at the start of every
``checkpoint_every``-th step. The backward pass walks the segments between kept states in
reverse, re-runs each segment with autograd on and back-propagates through it: the gradient is
backprop's to round-off, and memory is one state per ``checkpoint_every`` steps plus one segment's
activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ._dynamics import Dynamics, frozen_batchnorm
from ._grid import stage_times
from ._spec import SolveSpec
from ._stepping import StepPlan, integrate, plan_for, rk_step
from ._vjp import accumulate_

__all__ = ["solve_checkpoint"]


def solve_checkpoint(
    spec: SolveSpec, y0: torch.Tensor, t: torch.Tensor, params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Solve with the checkpointed discrete adjoint for the backward pass.

    Gradient: exact (backprop's, to round-off). Memory: one state per ``checkpoint_every`` steps
    plus the activations of one segment of ``checkpoint_every`` steps. Backward cost: every step
    is evaluated once more.
    """
    return list(_CheckpointedAdjoint.apply(spec, y0, t, *params))


def _segments(n: int, every: int) -> list[tuple[int, int]]:
    return [(k, min(k + every, n)) for k in range(0, n, every)]


class _CheckpointedAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, spec: SolveSpec, y0: torch.Tensor, t: torch.Tensor, *params: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        f = Dynamics(spec.func)
        kept: list[torch.Tensor] = []
        states = integrate(
            f,
            y0,
            t.detach(),
            spec.grid,
            spec.tableau,
            check_finite=spec.check_finite,
            checkpoints=kept,
            checkpoint_every=spec.checkpoint_every,
        )
        spec.counter.forward, spec.counter.backward = f.nfe, 0
        ctx.spec = spec
        ctx.counts = (len(states), len(kept))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y0, *states, *kept, t, *params)
        return tuple(states)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_states: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        spec: SolveSpec = ctx.spec
        n_states, n_kept = ctx.counts
        saved = ctx.saved_tensors
        y0, states = saved[0], saved[1 : 1 + n_states]
        kept = list(saved[1 + n_states : 1 + n_states + n_kept])
        t, params = saved[1 + n_states + n_kept], list(saved[2 + n_states + n_kept :])
        need_t = ctx.needs_input_grad[2]
        need_p = bool(params) and any(ctx.needs_input_grad[3:])
        grid, plan, every = spec.grid, plan_for(spec.tableau), spec.checkpoint_every
        host_times = stage_times(t.detach(), grid, spec.tableau.c)
        t_leaf = t.detach().requires_grad_(True) if need_t else None
        f = Dynamics(spec.func, check=False)

        a = torch.zeros_like(states[-1])
        g_p = [torch.zeros_like(p) for p in params] if need_p else []
        g_t = torch.zeros_like(t) if need_t else None
        step_offsets = [0]
        for n in grid.n_steps:
            step_offsets.append(step_offsets[-1] + n)
        with torch.enable_grad(), frozen_batchnorm(spec.func):
            for i in range(len(grid.n_steps) - 1, -1, -1):
                grad_i = grad_states[i]
                if grad_i is not None:
                    a = a + grad_i
                n = grid.n_steps[i]
                for k0, k1 in reversed(_segments(n, every)):
                    start = kept.pop() if k0 else (states[i - 1] if i else y0)
                    y_s = start.detach().requires_grad_(True)
                    pos = (step_offsets[i] + k0) * plan.stages
                    if t_leaf is None:
                        h: float | torch.Tensor = grid.h[i]
                        times: Sequence[torch.Tensor] = host_times
                    else:
                        h, times, pos = _segment_times(t_leaf, i, n, k0, k1, plan, spec)
                    y = y_s
                    for _ in range(k0, k1):
                        y = rk_step(f, y, h, times, pos, plan)
                        pos += plan.stages
                    inputs = [
                        y_s,
                        *(params if need_p else ()),
                        *(() if t_leaf is None else (t_leaf,)),
                    ]
                    grads = torch.autograd.grad(y, inputs, a, allow_unused=True)
                    a = grads[0] if grads[0] is not None else torch.zeros_like(a)
                    if need_p:
                        accumulate_(g_p, grads[1 : 1 + len(params)])
                    if g_t is not None and grads[-1] is not None:
                        g_t += grads[-1]
        spec.counter.backward = f.nfe
        grad_y0 = a if ctx.needs_input_grad[1] else None
        grad_params = g_p if need_p else [None] * len(params)
        return (None, grad_y0, g_t, *grad_params)


def _segment_times(
    t: torch.Tensor, i: int, n: int, k0: int, k1: int, plan: StepPlan, spec: SolveSpec
) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Differentiable step size and stage times of steps ``k0..k1`` of interval ``i``."""
    h = (t[i + 1] - t[i]) / n
    frac = torch.tensor(
        [k + c for k in range(k0, k1) for c in spec.tableau.c], dtype=t.dtype, device=t.device
    )
    return h, list(torch.addcmul(t[i], frac, h).unbind(0)), 0
