"""One generic explicit Runge--Kutta step for any tableau, and the fixed-step loop."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._compiled import Compile, CompiledFunction, CompileFallbackWarning, cast
from ._grid import StageTimes, TimeGrid, step_sizes
from ._rng import RngState
from ._tableau import ButcherTableau

__all__ = ["StepPlan", "plan_for", "combine", "rk_step", "Stepper", "integrate", "StepHook"]

Step = float | torch.Tensor
DynamicsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Callable[[int, int, torch.Tensor], None]
"""``hook(i, k, y)``: called with the state before step ``k`` of interval ``i``."""


@dataclass(frozen=True)
class StepPlan:
    """A tableau's non-zero coefficients, resolved once per tableau.

    Attributes
    ----------
    stages : int
    rows : tuple of tuple of (int, float)
        For each stage ``j``, the pairs ``(l, a_jl)`` with ``a_jl != 0``.
    weights : tuple of (int, float)
        The pairs ``(j, b_j)`` with ``b_j != 0``.
    b : tuple of float
        All weights, zeros included.
    """

    stages: int
    rows: tuple[tuple[tuple[int, float], ...], ...]
    weights: tuple[tuple[int, float], ...]
    b: tuple[float, ...]


@functools.lru_cache(maxsize=64)
def plan_for(tableau: ButcherTableau) -> StepPlan:
    """The :class:`StepPlan` of a tableau (cached: tableaus are frozen and hashable)."""
    rows = tuple(
        tuple((m, a_jm) for m, a_jm in enumerate(row[:j]) if a_jm != 0.0)
        for j, row in enumerate(tableau.a)
    )
    weights = tuple((j, b_j) for j, b_j in enumerate(tableau.b) if b_j != 0.0)
    return StepPlan(stages=tableau.stages, rows=rows, weights=weights, b=tableau.b)


def combine(
    y: torch.Tensor, h: Step, terms: Sequence[tuple[int, float]], ks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``y + h * sum(coef * ks[l] for l, coef in terms)`` with fused kernels.

    With a float ``h`` each term is one ``torch.add(..., alpha=)``; with a tensor ``h`` (times
    that need a gradient, and the compiled path) the sum is formed first and then added.
    """
    if not terms:
        return y
    if isinstance(h, float):
        out = y
        for m, coef in terms:
            out = torch.add(out, ks[m], alpha=coef * h)
        return out
    # No `alpha=`/`value=` coefficients here: this path is also the compiled one, and
    # torch.compile's inductor drops the `alpha` of `add(x, mm(a, b), alpha=c)` when it rewrites
    # it to `addmm` (pytorch/pytorch#167313), which a stage that is a matrix product triggers.
    acc = ks[terms[0][0]] * terms[0][1]
    for m, coef in terms[1:]:
        acc = acc + ks[m] * coef
    return y + acc * h


def rk_step(
    f: Callable[[torch.Tensor, Any], Any],
    y: Any,
    h: Any,
    times: Sequence[torch.Tensor],
    pos: int,
    plan: StepPlan,
) -> Any:
    """One explicit RK step from ``y``; stage ``j`` is evaluated at ``times[pos + j]``.

    ``y`` is a tensor and ``h`` its step, or, for an augmented system (the continuous adjoint's
    ``(y, a)``), a tuple of tensors with a tuple of per-component steps; ``f`` then returns a
    tuple of the same length.
    """
    ks: list[Any] = []
    for j in range(plan.stages):
        ks.append(f(times[pos + j], _combine_state(y, h, plan.rows[j], ks)))
    return _combine_state(y, h, plan.weights, ks)


def _combine_state(y: Any, h: Any, terms: Sequence[tuple[int, float]], ks: Sequence[Any]) -> Any:
    if isinstance(y, tuple):
        return tuple(
            combine(y_c, h_c, terms, [k[c] for k in ks]) for c, (y_c, h_c) in enumerate(zip(y, h))
        )
    return combine(y, h, terms, ks)


def _compiled_rk_steps(plan: StepPlan, steps: int) -> Callable[..., torch.Tensor]:
    def rk_steps_compiled(
        func: DynamicsFn, y: torch.Tensor, h: torch.Tensor, ts: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        f = cast(func)
        for k in range(steps):
            y = rk_step(f, y, h, ts, k * plan.stages, plan)
        return y

    return rk_steps_compiled


class Stepper:
    """The steps of a tableau, eager or compiled: what :func:`integrate`, backprop and the
    checkpointed re-runs call.

    ``stepper(f, y, h, times, pos)`` takes one step and ``stepper.advance(..., steps)`` several,
    with ``f`` a :class:`~torchode_adjoint._dynamics.Dynamics`. Compiled, the first step of each
    ``f`` runs eagerly (the output check, and a look at whether the dynamics draw random
    numbers, which keeps the pass eager); later ones run compiled graphs of
    ``options.steps`` steps (and of one step for the rest), with the step size and the stage
    times as tensors, and count the evaluations themselves.

    Parameters
    ----------
    tableau : ButcherTableau
    options : Compile or None
        None for the eager step.
    """

    __slots__ = ("tableau", "options", "plan", "single", "chunk", "chunk_steps", "_h")

    def __init__(self, tableau: ButcherTableau, options: Compile | None) -> None:
        self.tableau, self.options = tableau, options
        self.plan = plan_for(tableau)
        plan = self.plan
        self.single: CompiledFunction | None = None
        self.chunk: CompiledFunction | None = None
        self.chunk_steps = 1
        if options is not None:
            self.single = options.function(("rk", tableau, 1), lambda: _compiled_rk_steps(plan, 1))
            if options.steps > 1:
                self.chunk_steps = options.steps
                self.chunk = options.function(
                    ("rk", tableau, options.steps),
                    lambda: _compiled_rk_steps(plan, options.steps),
                )
        self._h: tuple[Any, torch.Tensor | None] = (None, None)

    def __reduce__(self) -> tuple[type[Stepper], tuple[ButcherTableau, Compile | None]]:
        # Compiled functions do not pickle: a saved block rebuilds them from its settings.
        return (Stepper, (self.tableau, self.options))

    def __call__(self, f: Any, y: torch.Tensor, h: Step, times: Any, pos: int) -> torch.Tensor:
        # Under torch.func transforms the compiled graphs cannot run: eager, no attempt.
        if self.single is None or f.compile_ok is False or _functorch_active():
            return rk_step(f, y, h, times, pos, self.plan)
        if f.compile_ok is None:
            before = RngState.capture(y.device)
            out = rk_step(f, y, h, times, pos, self.plan)
            f.compile_ok = (
                f.checked
                and before.same_as(RngState.capture(y.device))
                and _compilable_with_grad(f.func)
            )
            return out
        return self._run(self.single, 1, f, y, h, times, pos)

    def advance(
        self, f: Any, y: torch.Tensor, h: Step, times: Any, pos: int, steps: int
    ) -> torch.Tensor:
        """``steps`` steps from ``y``, the first at evaluation ``pos`` of ``times``."""
        stages, chunk, size = self.plan.stages, self.chunk, self.chunk_steps
        if self.single is None:  # eager: the plain loop, nothing to decide per step
            for _ in range(steps):
                y = rk_step(f, y, h, times, pos, self.plan)
                pos += stages
            return y
        k = 0
        while k < steps:
            if chunk is not None and f.compile_ok and steps - k >= size and not _functorch_active():
                y = self._run(chunk, size, f, y, h, times, pos)
                k, pos = k + size, pos + size * stages
            else:
                y = self(f, y, h, times, pos)
                k, pos = k + 1, pos + stages
        return y

    def _run(
        self,
        fn: CompiledFunction,
        steps: int,
        f: Any,
        y: torch.Tensor,
        h: Step,
        times: Any,
        pos: int,
    ) -> torch.Tensor:
        evaluations = steps * self.plan.stages
        ts = tuple(times[pos + e] for e in range(evaluations))
        out = fn(f.func, y, self.step_tensor(h, y), ts)
        f.nfe += evaluations
        return out

    def step_tensor(self, h: Step, like: torch.Tensor) -> torch.Tensor:
        """``h`` as a 0-dim tensor in ``like``'s dtype and device (the last one is reused)."""
        if isinstance(h, torch.Tensor):
            return h
        key = (h, like.dtype, like.device)
        if self._h[0] != key:
            self._h = (key, torch.tensor(h, dtype=like.dtype, device=like.device))
        assert self._h[1] is not None
        return self._h[1]


def _functorch_active() -> bool:
    return torch._C._are_functorch_transforms_active()


def _compilable_with_grad(func: object) -> bool:
    """False (with a warning) where a recorded compiled step would fail: under autograd, a
    compiled graph saves ``nn.BatchNorm``'s running buffers, which the next step's update
    modifies in place (autograd then refuses the backward pass)."""
    if not torch.is_grad_enabled() or not isinstance(func, torch.nn.Module):
        return True
    tracking = any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
        for m in func.modules()
    )
    if tracking:
        warnings.warn(
            "a compiled step recorded for backprop cannot update an nn.BatchNorm's running "
            "statistics in place, so this pass runs eagerly (same results); with "
            "TemporalBatchNorm, or adjoint='adjoint' or 'checkpoint', it compiles.",
            CompileFallbackWarning,
            stacklevel=5,
        )
    return not tracking


def integrate(
    f: DynamicsFn,
    y0: torch.Tensor,
    t: torch.Tensor,
    grid: TimeGrid,
    tableau: ButcherTableau,
    *,
    check_finite: bool,
    before_step: StepHook | None = None,
    stepper: Stepper | None = None,
) -> list[torch.Tensor]:
    """Integrate over the grid and return the states at the output times after the first.

    Parameters
    ----------
    f : callable
        ``f(t, y) -> dy/dt``.
    y0 : Tensor, shape (...)
    t : Tensor, shape (T,)
        Output times in ``y0``'s dtype and device. When it requires grad (backprop through the
        solver with learnable times), stage times and step sizes are differentiable tensors.
    grid : TimeGrid
    tableau : ButcherTableau
    check_finite : bool
        Check the result once, after the loop, and locate the first non-finite step if needed.
    before_step : callable, optional
        ``before_step(i, k, y)`` before every step (a gradient mode keeping checkpoints).
    stepper : Stepper, optional
        The step to take (compiled or eager); default the eager step of ``tableau``.

    Returns
    -------
    list of Tensor, T - 1 of shape (...)
        The states at ``t[1:]``; the caller stacks them with ``y0`` if it needs to.
    """
    step = stepper if stepper is not None else Stepper(tableau, None)
    stages = step.plan.stages
    times = StageTimes(t, grid, tableau.c)
    hs: Sequence[Step] = step_sizes(t, grid) if t.requires_grad else grid.h
    states = []
    y = y0
    pos = 0
    for i, n in enumerate(grid.n_steps):
        h = hs[i]
        if before_step is None:
            y = step.advance(f, y, h, times, pos, n)
            pos += n * stages
        else:
            for k in range(n):
                before_step(i, k, y)
                y = step(f, y, h, times, pos)
                pos += stages
        states.append(y)
    # One host sync per call, never one per step: see locate_non_finite for the slow path.
    # Under torch.func transforms (vmap) a data-dependent branch is impossible: no check there.
    if (
        check_finite
        and not torch._C._are_functorch_transforms_active()
        and not bool(_all_finite(states))
    ):
        locate_non_finite(f, y0, states, t, grid, tableau)
    return states


def _all_finite(states: list[torch.Tensor]) -> torch.Tensor:
    if len(states) == 1:
        return torch.isfinite(states[0]).all()
    return torch.stack([torch.isfinite(s).all() for s in states]).all()


def locate_non_finite(
    f: DynamicsFn,
    y0: torch.Tensor,
    states: list[torch.Tensor],
    t: torch.Tensor,
    grid: TimeGrid,
    tableau: ButcherTableau,
) -> None:
    """Raise a RuntimeError naming the first time at which the state became non-finite.

    Only called on failure: re-integrates the first bad interval step by step, checking each.
    """
    sol = torch.stack([y0, *states]).detach()
    finite = torch.isfinite(sol.reshape(sol.shape[0], -1)).all(dim=1).tolist()
    i = finite.index(False)
    if i == 0:
        raise ValueError("`y0` contains NaN or infinite values; pass a finite initial state.")
    plan = plan_for(tableau)
    t_a, n, h = grid.times[i - 1], grid.n_steps[i - 1], grid.h[i - 1]
    times = StageTimes(t.detach(), grid, tableau.c)
    pos = grid.offsets[i - 1] * plan.stages
    y = sol[i - 1].detach()
    where = f"t = {grid.times[i]:.6g}"
    with torch.no_grad():
        for k in range(n):
            y = rk_step(f, y, h, times, pos, plan)
            pos += plan.stages
            if not bool(torch.isfinite(y).all()):
                interval = f"[{t_a:.6g}, {grid.times[i]:.6g}]"
                where = f"t = {t_a + (k + 1) * h:.6g} (step {k + 1} of {n} in {interval})"
                break
    raise RuntimeError(
        f"the ODE state became NaN or infinite at {where}; reduce `step`, use a more stable "
        "solver, or check the dynamics (pass `check_finite=False` to skip this check)."
    )
