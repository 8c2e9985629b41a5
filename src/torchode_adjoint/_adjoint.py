"""The continuous adjoint of Chen et al. (2018).

The forward pass integrates without building a graph and keeps only the states at the output
times. The backward pass integrates the augmented state ``(y, a, g_theta, g_t)`` from the last
output time to the first with the same tableau and grid::

    dy/dt       =  f(t, y)
    da/dt       = -a . df/dy        a(t_N) = dL/dy(t_N)
    dg_theta/dt = -a . df/dtheta    g_theta(t_N) = 0,  dL/dtheta = g_theta(t_0)
    dg_t/dt     = -a . df/dt        g_t(t_N) = -dL/dy(t_N) . f(t_N, y_N),  dL/dt_0 = g_t(t_0)

Each backward step is the forward's Runge--Kutta step (:func:`~torchode_adjoint._stepping.
rk_step`) on the pair ``(y, a)`` with steps ``(-h, h)`` (the signs of ``-h`` and of ``-a.df/dy``
cancel for ``a``). The ``g_theta`` and ``g_t`` components enter no stage, so they are accumulated
with the weights ``h b_j`` as each stage's one vector--Jacobian product arrives, and stages with
``b_j = 0`` skip their parameter and time products. At every output time ``t_i`` the incoming
gradient is added to ``a``, the state is reset to the stored forward state, and
``dL/dt_i = dL/dy(t_i) . f(t_i, y_i)``.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._compiled import CompiledFunction, ParamNames, vjp, vjp_names
from ._dynamics import Dynamics
from ._grid import StageTimes
from ._mode import BackwardJob, ForwardRecord, ForwardResult, GradientMode, Gradients
from ._spec import SolveSpec
from ._stepping import StepPlan, integrate, plan_for, rk_step
from ._vjp import accumulate_, dynamics_vjp

__all__ = ["ContinuousAdjoint"]


@dataclass(frozen=True)
class ContinuousAdjoint(GradientMode):
    """The continuous adjoint (Chen et al. 2018): ``adjoint=True`` or ``"adjoint"``.

    Gradient: approximate, with error O(step^p) against the gradient of the discretised forward
    pass (the backward pass re-integrates the state instead of storing it). Memory: the states
    at the output times, independent of the number of steps. Backward cost: one evaluation and
    one vector--Jacobian product per stage. Dynamics that draw random numbers (dropout in
    training mode) raise: the backward pass cannot replay the forward's draws.
    """

    name: ClassVar[str] = "adjoint"
    exact: ClassVar[bool] = False
    replays_randomness: ClassVar[bool] = False

    def forward(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        states = integrate(f, y0, t, spec.grid, spec.stepper, check_finite=spec.check_finite)
        # The states at the output times only: memory independent of the number of steps.
        return states, ()

    def backward(self, job: BackwardJob) -> Gradients:
        spec, grid = job.spec, job.spec.grid
        plan = plan_for(spec.tableau)
        aug = _Augmented(job, plan.b)
        compiled = _compiled_step(job)
        times = StageTimes(job.t, grid, spec.tableau.c, reverse=True)
        a = torch.zeros_like(job.states[-1])
        dl_dt: list[torch.Tensor] = []
        pos = 0
        for i in range(len(grid.times) - 1, 0, -1):
            grad_i = job.grads[i - 1]
            if grad_i is not None:
                a = a + grad_i
            job.watch(grid.times[i], a)
            # Detached: the saved output carries the Function's graph, and each backward step
            # would otherwise record one more node on it (memory growing with the steps).
            y, h = job.states[i - 1].detach(), grid.h[i - 1]
            aug.h = h
            k, n = 0, grid.n_steps[i - 1]
            while k < n:
                if compiled is not None and job.f.checked:
                    steps = compiled.steps_for(n - k)
                    y, a = compiled(aug, y, a, spec.stepper.step_tensor(h, y), times, pos, steps)
                else:
                    steps = 1
                    y, a = rk_step(aug, (y, a), (-h, h), times, pos, plan)
                if k == 0 and job.need_t:
                    # The step's first stage is f(t_i, y_i): reuse it for dL/dt_i.
                    d = aug.g_t.new_zeros(()) if grad_i is None else torch.sum(grad_i * aug.first)
                    dl_dt.append(d)
                    aug.g_t = aug.g_t - d
                k, pos = k + steps, pos + steps * plan.stages
        job.watch(grid.times[0], a)
        grad_t = torch.stack([aug.g_t, *reversed(dl_dt)]) if job.need_t else None
        return Gradients(y0=a, t=grad_t, params=aug.g_p)


class _Augmented:
    """The augmented dynamics ``(y, a) -> (f, a.df/dy)`` for :func:`rk_step`, which on the side
    accumulates ``h b_j a.df/dtheta`` and ``h b_j a.df/dt`` of stage ``j`` of each step."""

    __slots__ = ("job", "b", "j", "h", "g_p", "g_t", "first")

    def __init__(self, job: BackwardJob, b: tuple[float, ...]) -> None:
        self.job, self.b, self.j, self.h = job, b, 0, 0.0
        self.g_p = [torch.zeros_like(p) for p in job.vjp_params]
        self.g_t = torch.zeros((), dtype=job.t.dtype, device=job.t.device)
        self.first = self.g_t

    def __call__(
        self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        job, j = self.job, self.j
        weight = self.b[j]
        self.j = (j + 1) % len(self.b)
        # Stages with zero weight feed later stages only: they need no parameter or time VJP.
        vjp = dynamics_vjp(
            job.f,
            t,
            state[0],
            state[1],
            job.vjp_params if weight != 0.0 else (),
            want_t=job.need_t and weight != 0.0,
        )
        if weight != 0.0:
            accumulate_(self.g_p, vjp.params, alpha=self.h * weight)
            if vjp.t is not None:
                self.g_t = torch.add(self.g_t, vjp.t, alpha=self.h * weight)
        if j == 0:
            self.first = vjp.value
        return vjp.value, vjp.y


def _compiled_step(job: BackwardJob) -> _CompiledStep | None:
    """The compiled backward step, or None where the eager one runs (see
    :func:`~torchode_adjoint._compiled.vjp_names`)."""
    options = job.spec.compile
    names = vjp_names(options, job.spec.func, job.vjp_params)
    if options is None or names is None:
        return None
    tableau = job.spec.tableau
    plan = plan_for(tableau)
    fns = {
        steps: options.function(
            ("adjoint", tableau, steps), functools.partial(_make_adjoint_steps, plan, steps)
        )
        for steps in {1, options.steps}
    }
    params = tuple(p.detach() for p in job.vjp_params)
    return _CompiledStep(fns, job.spec.func, names, params)


class _CompiledStep:
    """Compiled backward steps (one, and ``Compile.steps``) with the bookkeeping of
    :class:`_Augmented` around them."""

    __slots__ = ("fns", "func", "names", "params", "size")

    def __init__(
        self,
        fns: dict[int, CompiledFunction],
        func: object,
        names: ParamNames,
        params: tuple[torch.Tensor, ...],
    ) -> None:
        self.fns, self.func, self.names, self.params = fns, func, names, params
        self.size = max(fns)

    def steps_for(self, remaining: int) -> int:
        """The steps the next compiled call takes: a full graph, or one."""
        return self.size if remaining >= self.size else 1

    def __call__(
        self,
        aug: _Augmented,
        y: torch.Tensor,
        a: torch.Tensor,
        h: torch.Tensor,
        times: StageTimes,
        pos: int,
        steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        evaluations = steps * len(aug.b)
        ts = tuple(times[pos + e] for e in range(evaluations))
        with torch.no_grad():  # torch.func's VJP differentiates inside; nothing to record
            out = self.fns[steps](self.func, y, a, h, ts, self.names, self.params)
        y, a, g_p, g_t, first = out
        aug.job.f.nfe += evaluations
        accumulate_(aug.g_p, g_p)
        if aug.job.need_t:
            aug.g_t = aug.g_t + g_t
        aug.first = first
        return y, a


def _make_adjoint_steps(plan: StepPlan, steps: int) -> Callable[..., Any]:
    weights = plan.weights

    def adjoint_steps(
        func: Callable[..., torch.Tensor],
        y: torch.Tensor,
        a: torch.Tensor,
        h: torch.Tensor,
        ts: tuple[torch.Tensor, ...],
        names: ParamNames,
        params: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        # `steps` backward steps of `_Augmented` as one pure function, with torch.func's VJP;
        # returns the parameter and time gradients they add and the first stage's value.
        stage_out: list[tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]] = []

        def augmented(
            t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            value, g_y, g_p, g_t = vjp(func, t, state[0], state[1], names, params)
            stage_out.append((value, g_p, g_t))
            return value, g_y

        for k in range(steps):
            y, a = rk_step(augmented, (y, a), (-h, h), ts, k * plan.stages, plan)
        used = [(k * plan.stages + j, h * b_j) for k in range(steps) for j, b_j in weights]
        # (sum() starts from the int 0, which the first tensor term absorbs.)
        g_p = tuple(
            typing.cast(torch.Tensor, sum(w * stage_out[e][1][m] for e, w in used))
            for m in range(len(params))
        )
        g_t = typing.cast(torch.Tensor, sum(w * stage_out[e][2] for e, w in used))
        return y, a, g_p, g_t, stage_out[0][0]

    return adjoint_steps
