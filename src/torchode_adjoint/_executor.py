"""The executor: the one loop that runs a method's steps, and the one place that decides eager or
compiled.

:class:`Executor` runs steps of any :class:`~torchode_adjoint._step.Method`: the forward steps of
every gradient mode, the checkpointed re-runs, and the continuous adjoint's augmented backward
method. :func:`integrate` is the loop over a solve's output intervals. The record of steps (the
equal steps of :class:`~torchode_adjoint._grid.TimeGrid`) says how many steps each interval takes,
their sizes and their stage times (``times.of(g)`` for step ``g``).

Compiled (``compile=True``), the first step of each pass runs eagerly: it checks the dynamics'
output, and finds out whether they draw random numbers (which keeps the pass eager: a compiled
graph does not draw the eager generator's numbers, which the gradient modes replay). Later steps
run compiled graphs of ``Compile.steps`` steps (and of one step for the rest), with the step size
and the stage times as tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._compat import BatchNormBase, functorch_transforms_active
from ._compiled import Compile, CompiledFunction, CompileFallbackWarning
from ._grid import StageTimes, TimeGrid, Times, step_sizes
from ._rng import RngState
from ._step import DynamicsFn, Method, Step, Stepped
from ._structure import non_finite_part
from ._warnings import user_stacklevel

__all__ = ["Executor", "integrate", "StepHook", "locate_non_finite"]

StepHook = Callable[[int, int, Any], None]
"""``hook(i, k, carry)``: called with the method's state before step ``k`` of interval ``i``."""


def _compiled_steps(method: Method, steps: int, full: bool) -> Callable[..., Any]:
    evaluations = len(method.nodes)

    def steps_compiled(
        func: Any, inputs: Any, h: torch.Tensor, ts: tuple[torch.Tensor, ...], *carry: torch.Tensor
    ) -> Any:
        f = method.bind(func, inputs)
        c: Any = carry if len(carry) > 1 else carry[0]
        out: Any = None
        for k in range(steps):
            out = method.step(f, c, h, ts[k * evaluations : (k + 1) * evaluations])
            c = out[0]
        return out if full else c

    return steps_compiled


class Executor:
    """A method's steps, eager or compiled: the one executor of every solve.

    ``executor.step(f, carry, h, ts)`` takes one step and ``executor.advance(...)`` several of
    one size. ``f`` is the evaluator the method calls: a
    :class:`~torchode_adjoint._dynamics.Dynamics`, or a mode's augmented evaluator. It tells the
    executor what a compiled graph needs: ``f.func`` (the user's dynamics, what graphs are
    compiled for), ``f.graph_inputs`` (what the method's ``bind`` needs besides it, None where
    no graph can run), ``f.checked`` (the first evaluation's checks are done), and it keeps
    ``f.compile_ok`` (the verdict) and ``f.nfe`` (the count of evaluations).

    Parameters
    ----------
    method : Method
    options : Compile or None
        None for the eager steps.
    """

    __slots__ = ("method", "options", "evaluations", "_fns", "chunk_steps", "_h")

    def __init__(self, method: Method, options: Compile | None) -> None:
        self.method, self.options = method, options
        self.evaluations = len(method.nodes)
        self.chunk_steps = options.steps if options is not None else 1
        self._fns: dict[tuple[int, bool], CompiledFunction] = {}
        self._h: tuple[Any, torch.Tensor | None] = (None, None)

    def __reduce__(self) -> tuple[type[Executor], tuple[Method, Compile | None]]:
        # Compiled functions do not pickle: a saved block rebuilds them from its settings.
        return (Executor, (self.method, self.options))

    def _function(self, steps: int, full: bool) -> CompiledFunction:
        fn = self._fns.get((steps, full))
        if fn is None:
            assert self.options is not None
            method = self.method
            fn = self._fns[(steps, full)] = self.options.function(
                ("steps", method.key, steps, full), lambda: _compiled_steps(method, steps, full)
            )
        return fn

    def _eager_only(self, f: Any) -> bool:
        # Under torch.func transforms the compiled graphs cannot run: eager, no attempt.
        return self.options is None or f.compile_ok is False or functorch_transforms_active()

    def step(
        self, f: Any, carry: Any, h: Step, ts: tuple[torch.Tensor, ...], *, dense: bool = False
    ) -> Stepped:
        """One step; compiled without ``dense``, the error and dense information are None."""
        if self._eager_only(f):
            return self.method.step(f, carry, h, ts)
        if f.compile_ok is None:
            return self._first_step(f, carry, h, ts)
        out = self._run(self._function(1, dense), 1, f, carry, h, ts)
        return out if dense else (out, None, None)

    def _first_step(self, f: Any, carry: Any, h: Step, ts: tuple[torch.Tensor, ...]) -> Stepped:
        """An eager step, after which the pass's verdict is made (once the first evaluation's
        checks are done)."""
        device = self.method.output(carry).device
        before = RngState.capture(device)
        out = self.method.step(f, carry, h, ts)
        if f.checked:
            f.compile_ok = (
                f.graph_inputs is not None
                and before.same_as(RngState.capture(device))
                and _compilable_with_grad(f.func)
            )
        return out

    def advance(
        self,
        f: Any,
        carry: Any,
        h: Step,
        times: Times,
        g0: int,
        steps: int,
        before_step: Callable[[int, Any], None] | None = None,
    ) -> Any:
        """``steps`` steps of size ``h`` from ``carry``, the first being step ``g0`` of
        ``times``; ``before_step(k, carry)`` before each (then one step per call)."""
        step = self.method.step
        if self.options is None or before_step is not None:
            for k in range(steps):
                if before_step is not None:
                    before_step(k, carry)
                carry = (
                    step(f, carry, h, times.of(g0 + k))[0]
                    if self.options is None
                    else self.step(f, carry, h, times.of(g0 + k))[0]
                )
            return carry
        size, k = self.chunk_steps, 0
        while k < steps:
            if size > 1 and f.compile_ok and steps - k >= size and not self._eager_only(f):
                ts = tuple(x for g in range(g0 + k, g0 + k + size) for x in times.of(g))
                carry = self._run(self._function(size, False), size, f, carry, h, ts)
                k += size
            else:
                carry = self.step(f, carry, h, times.of(g0 + k))[0]
                k += 1
        return carry

    def _run(
        self,
        fn: CompiledFunction,
        steps: int,
        f: Any,
        carry: Any,
        h: Step,
        ts: tuple[torch.Tensor, ...],
    ) -> Any:
        parts = carry if isinstance(carry, tuple) else (carry,)
        h_t = self.step_tensor(h, parts[0])
        if f.differentiable_graph:
            out = fn(f.func, f.graph_inputs, h_t, ts, *parts)
        else:  # the evaluator differentiates inside the graph: nothing to record
            with torch.no_grad():
                out = fn(f.func, f.graph_inputs, h_t, ts, *parts)
        f.nfe += steps * self.evaluations
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


def _compilable_with_grad(func: object) -> bool:
    """False (with a warning) where a recorded compiled step would fail: under autograd, a
    compiled graph saves ``nn.BatchNorm``'s running buffers, which the next step's update
    modifies in place (autograd then refuses the backward pass)."""
    if not torch.is_grad_enabled() or not isinstance(func, torch.nn.Module):
        return True
    tracking = any(
        isinstance(m, BatchNormBase) and m.training and m.track_running_stats
        for m in func.modules()
    )
    if tracking:
        warnings.warn(
            "a compiled step recorded for backprop cannot update an nn.BatchNorm's running "
            "statistics in place, so this pass runs eagerly (same results); with "
            "TemporalBatchNorm, or adjoint='adjoint' or 'checkpoint', it compiles.",
            CompileFallbackWarning,
            stacklevel=user_stacklevel(),
        )
    return not tracking


def integrate(
    f: Any,
    y0: torch.Tensor,
    t: torch.Tensor,
    grid: TimeGrid,
    executor: Executor,
    *,
    check_finite: bool,
    before_step: StepHook | None = None,
    final: list[Any] | None = None,
) -> list[torch.Tensor]:
    """Integrate over the output intervals and return the states at the output times after the
    first.

    Parameters
    ----------
    f : Dynamics
        ``f(t, y) -> dy/dt``, counting its evaluations.
    y0 : Tensor, shape (...)
    t : Tensor, shape (T,)
        Output times in ``y0``'s dtype and device. When it requires grad (backprop through the
        solver with learnable times), stage times and step sizes are differentiable tensors.
    grid : TimeGrid
        The steps of each interval.
    executor : Executor
        The method and how its steps run (compiled or eager).
    check_finite : bool
        Check the result once, after the loop, and locate the first non-finite step if needed.
    before_step : callable, optional
        ``before_step(i, k, carry)`` before every step (a gradient mode keeping checkpoints).
    final : list, optional
        If given, the method's last carry is appended to it (a reversible method's auxiliary
        state, which its backward pass starts from).

    Returns
    -------
    list of Tensor, T - 1 of shape (...)
        The states at ``t[1:]``; the caller stacks them with ``y0`` if it needs to.
    """
    method = executor.method
    times = StageTimes(t, grid, method.nodes)
    hs: Sequence[Step] = step_sizes(t, grid) if t.requires_grad else grid.h
    states = []
    carry = method.init(f, y0, t[0])
    offsets = grid.offsets
    for i, n in enumerate(grid.n_steps):
        hook = None if before_step is None else _interval_hook(before_step, i)
        carry = executor.advance(f, carry, hs[i], times, offsets[i], n, hook)
        states.append(method.output(carry))
    if final is not None:
        final.append(carry)
    # One host sync per call, never one per step: see locate_non_finite for the slow path.
    # Under torch.func transforms (vmap) a data-dependent branch is impossible: no check there.
    if check_finite and not functorch_transforms_active() and not bool(_all_finite(states)):
        locate_non_finite(f, y0, states, t, grid, method)
    return states


def _interval_hook(hook: StepHook, i: int) -> Callable[[int, Any], None]:
    return lambda k, carry: hook(i, k, carry)


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
    method: Method,
) -> None:
    """Raise a RuntimeError naming the first time at which the state became non-finite.

    Only called on failure: re-integrates the first bad interval step by step, checking each
    (from its stored first state where the carry is the state, else from ``y0``).
    """
    sol = torch.stack([y0, *states]).detach()
    finite = torch.isfinite(sol.reshape(sol.shape[0], -1)).all(dim=1).tolist()
    i = finite.index(False)
    if i == 0:
        part = non_finite_part(f, sol[0])
        raise ValueError(
            f"`y0` contains NaN or infinite values{part}; pass a finite initial state."
        )
    t_a, n, h = grid.times[i - 1], grid.n_steps[i - 1], grid.h[i - 1]
    times = StageTimes(t.detach(), grid, method.nodes)
    where = f"t = {grid.times[i]:.6g}"
    bad = sol[i]
    offsets = grid.offsets
    with torch.no_grad():
        carry = method.init(f, y0.detach(), t.detach()[0])
        if isinstance(carry, torch.Tensor):
            carry = sol[i - 1]  # the carry is the state: start at the interval's stored one
        else:  # an auxiliary state, not stored: from y0
            for interval in range(i - 1):
                for k in range(grid.n_steps[interval]):
                    g = offsets[interval] + k
                    carry = method.step(f, carry, grid.h[interval], times.of(g))[0]
        for k in range(n):
            carry = method.step(f, carry, h, times.of(offsets[i - 1] + k))[0]
            if not bool(torch.isfinite(method.output(carry)).all()):
                bad = method.output(carry)
                interval_text = f"[{t_a:.6g}, {grid.times[i]:.6g}]"
                where = f"t = {t_a + (k + 1) * h:.6g} (step {k + 1} of {n} in {interval_text})"
                break
    step = "None (one step per interval)" if grid.step is None else f"{grid.step!r}"
    raise RuntimeError(
        f"the ODE state became NaN or infinite at {where}{non_finite_part(f, bad)}, integrating "
        f"with solver={method.name!r}, step={step} (steps of {abs(h):.6g} in this interval; "
        "`odeint` and `ODEBlock` default to solver='euler', step=0.1 when they are not given); "
        "reduce `step`, use a more stable solver such as solver='rk4', or check the dynamics "
        "(pass `check_finite=False` to skip this check)."
    )
