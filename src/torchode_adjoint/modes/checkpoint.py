"""The checkpointed discrete adjoint: exact gradients from stored step boundaries.

The forward pass runs without a graph and keeps the state at the start of every ``every``-th
step. The backward pass walks the segments between kept states in reverse, re-runs each segment
with autograd on (replaying the forward's random draws and autocast state) and back-propagates
through it: the gradient is backprop's to round-off, and memory is one state per ``every`` steps
plus one segment's activations.

Under error control with a pair that has an interpolant, the forward pass steps past output
times and interpolates there, as backprop does (dense output: the same accepted steps and the
same values), and the backward pass differentiates the interpolant of each re-run step at the
output times inside it (the interpolant is linear in the stages the re-run computes anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._compat import vector_jacobian_product
from .._dynamics import Dynamics
from .._executor import (
    DenseTimes,
    Executor,
    dense_outputs,
    integrate,
    run_steps,
)
from .._spec import SolveSpec
from .._vjp import accumulate_
from ..controllers.fixed import FixedSteps, Leg, StageTimes, Times
from ..solvers.methods import as_method, runge_kutta_tableau
from .base import (
    BackwardJob,
    ForwardRecord,
    ForwardResult,
    GradientMode,
    Gradients,
    RngState,
    recorded_solve,
)
from .per_sample import checkpoint_backward, checkpoint_forward

__all__ = ["Checkpoint"]


def _segments(n: int, every: int) -> list[tuple[int, int]]:
    return [(k, min(k + every, n)) for k in range(0, n, every)]


_RANDOM_UNDER_ERROR_CONTROL = (
    "the dynamics drew random numbers in an error-controlled forward pass: its rejected trials "
    "and its first-same-as-last stages drew numbers that a replay of the accepted steps cannot "
    "draw again, so adjoint='checkpoint' cannot reproduce them. Use fixed steps (`step=`) with "
    "random dynamics, or keep the randomness out of the dynamics (e.g. `model.eval()`)."
)


@dataclass(frozen=True)
class Checkpoint(GradientMode):
    """The checkpointed discrete adjoint: ``adjoint="checkpoint"`` is ``Checkpoint(every=1)``.

    Gradient: exact (backprop's, to round-off), also with dropout in the dynamics (the forward's
    random state is replayed per segment). Memory: one state per ``every`` steps plus the
    activations of one segment of ``every`` steps. Backward cost: every step is evaluated once
    more.

    Parameters
    ----------
    every : int, default 1
        Keep the state every this many steps (the memory/time dial: fewer states kept, longer
        segments re-run with their activations).
    """

    name: ClassVar[str] = "checkpoint"
    # Dense output under error control, as backprop (the backward differentiates the
    # interpolant); the recorded steps cannot replay jump_t's evaluation after a jump.
    interpolates: ClassVar[bool] = True
    replays_steps: ClassVar[bool] = True
    saves_y0: ClassVar[bool] = True
    every: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(
                f"`every` must be a positive int, got {self.every!r}; pass e.g. "
                "`Checkpoint(every=1)` to keep every step's state, or 10 for every tenth."
            )

    def forward_samples(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        return checkpoint_forward(f, y0, spec, record, self.every), ()

    def backward_samples(self, job: BackwardJob) -> Gradients:
        return checkpoint_backward(job)

    def forward(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        if spec.control is not None:
            return self._adaptive_forward(f, y0, t, spec, record)
        kept: list[torch.Tensor] = []
        every = self.every

        def keep(i: int, k: int, y: torch.Tensor) -> None:
            if k % every == 0:
                # The segment's first state is y0 or the previous output unless k > 0.
                if k:
                    kept.append(y)
                state = RngState.capture(y.device)
                if record.rng and record.rng[-1].same_as(state):
                    # No draw since the last segment: share its state (a CPU generator state is
                    # 5 KB, more than a small ODE state).
                    state = record.rng[-1]
                record.rng.append(state)

        states = integrate(
            f, y0, t, spec.grid, spec.executor, check_finite=spec.check_finite, before_step=keep
        )
        return states, tuple(kept)

    def _adaptive_forward(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        """Error-controlled steps, keeping the accepted steps (two host floats each) and the
        state at the start of every ``every``-th of them."""
        assert spec.control is not None
        kept: list[torch.Tensor] = []
        method = spec.method

        def keep(i: int, k: int, m0: float, m1: float, before: Any, token: Any) -> None:
            if k % self.every == 0:
                if k:
                    kept.append(method.output(before))
                record.rng.append(token)

        states = recorded_solve(
            f, y0, t, spec, record, before_try=lambda: RngState.capture(y0.device), on_accept=keep
        )
        return states, tuple(kept)

    def backward(self, job: BackwardJob) -> Gradients:
        if job.record.dense_steps is not None:
            return self._dense_backward(job, job.record.dense_steps)
        spec, grid = job.spec, job.steps
        nodes = spec.method.nodes
        executor = spec.executor
        if job.record.steps is not None:
            if job.record.random:
                raise RuntimeError(_RANDOM_UNDER_ERROR_CONTROL)
            # The accepted steps again, as plain steps of the pair's higher-order method.
            tableau = runge_kutta_tableau(spec.method)
            assert tableau is not None
            executor = Executor(as_method(tableau), spec.compile)
        assert job.y0 is not None  # saves_y0
        kept, rng = list(job.extra), list(job.record.rng)
        t_leaf = job.t.requires_grad_(True) if job.need_t else None
        host_times = StageTimes(job.t.detach(), grid, nodes)
        a = torch.zeros_like(job.states[-1])
        g_p = [torch.zeros_like(p) for p in job.vjp_params]
        g_t = torch.zeros_like(job.t) if job.need_t else None
        offsets = grid.offsets
        for i in range(len(grid.n_steps) - 1, -1, -1):
            grad_i = job.grads[i]
            if grad_i is not None:
                a = a + grad_i
            job.watch(grid.times[i + 1], a)
            n = grid.n_steps[i]
            for k0, k1 in reversed(_segments(n, self.every)):
                start = kept.pop() if k0 else (job.states[i - 1] if i else job.y0)
                y_s = start.detach().requires_grad_(True)
                if t_leaf is None:
                    h: Any = grid.sizes(i)
                    times: Times = host_times
                else:
                    h, times = grid.segment(t_leaf, nodes, i, k0, k1)
                state = rng.pop() if rng else None
                g0 = offsets[i] + k0
                y = self._rerun(executor, job.f, y_s, h, times, g0, k1 - k0, state)
                inputs = [y_s, *job.vjp_params, *(() if t_leaf is None else (t_leaf,))]
                grads = vector_jacobian_product(y, inputs, a)
                a = grads[0] if grads[0] is not None else torch.zeros_like(a)
                accumulate_(g_p, grads[1 : 1 + len(job.vjp_params)])
                if g_t is not None and grads[-1] is not None:
                    g_t += grads[-1]
        job.watch(grid.times[0], a)
        return Gradients(y0=a, t=g_t, params=g_p)

    def _dense_backward(
        self, job: BackwardJob, steps: tuple[tuple[float, float, float], ...]
    ) -> Gradients:
        """The backward pass of a dense forward: segments of ``every`` accepted steps in
        reverse, each re-run with a graph from its kept state, its end state and the
        interpolated outputs inside its steps differentiated together."""
        if job.record.random:
            raise RuntimeError(_RANDOM_UNDER_ERROR_CONTROL)
        tableau = runge_kutta_tableau(job.spec.method)
        assert tableau is not None and job.y0 is not None
        # The pair's higher-order steps again, eagerly, with their interpolant.
        plain = as_method(tableau)
        executor = Executor(plain, None)
        times = DenseTimes(steps, tableau.c, job.states[-1])
        host = job.spec.grid.times
        inside, at_end = dense_outputs(steps, host)
        kept = list(job.extra)
        params = job.vjp_params
        a = torch.zeros_like(job.states[-1])
        g_p = [torch.zeros_like(p) for p in params]
        last = job.grads[-1]
        job.watch(host[-1], last if last is not None else a)  # the incoming gradient there
        for k0, k1 in reversed(_segments(len(steps), self.every)):
            start = kept.pop() if k0 else job.y0
            y_s = start.detach().requires_grad_(True)
            outs: list[torch.Tensor] = []
            cots: list[torch.Tensor] = []

            # Each step alone, with its stages: one leg per step.
            legs = [Leg(k, k, 1, steps[k][1]) for k in range(k0, k1)]
            controller = FixedSteps(times, legs, split_first=True, dense_first=True)

            def outputs(
                y: Any,
                out: Any,
                token: Any,
                outs: Any = outs,
                cots: Any = cots,
                controller: FixedSteps = controller,
            ) -> Any:
                # The outputs the step gave (inside it, interpolated; at its end) with their
                # incoming gradients.
                k = controller.leg.interval
                y_new, _, ks = out
                for j, theta in inside.get(k, ()):
                    g = job.grads[j - 1]
                    if g is not None:
                        outs.append(plain.interpolate(y, steps[k][1], ks, theta))
                        cots.append(g)
                for j in at_end.get(k, ()):
                    g = job.grads[j - 1]
                    if g is not None:
                        outs.append(y_new)
                        cots.append(g)
                return y_new

            with torch.enable_grad():
                y = run_steps(executor, job.f, y_s, controller, accepted=outputs)
            outs.append(y)
            cots.append(a)
            grads = torch.autograd.grad(outs, [y_s, *params], cots, allow_unused=True)
            a = grads[0] if grads[0] is not None else torch.zeros_like(a)
            accumulate_(g_p, grads[1:])
            job.watch(steps[k0][0], a)
        return Gradients(y0=a, t=None, params=g_p)

    @staticmethod
    def _rerun(
        executor: Executor,
        f: Dynamics,
        y: torch.Tensor,
        h: Any,
        times: Times,
        g0: int,
        steps: int,
        rng: RngState | None,
    ) -> torch.Tensor:
        """Re-run steps ``g0...g0 + steps`` with a graph, under the forward's random state if it
        had one."""
        if rng is None:
            result: torch.Tensor = run_steps(
                executor, f, y, FixedSteps(times, [Leg(0, g0, steps, h)])
            )
            return result
        with rng.replayed(y.device):
            return Checkpoint._rerun(executor, f, y, h, times, g0, steps, None)
