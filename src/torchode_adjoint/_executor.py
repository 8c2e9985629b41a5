"""The executor: the one loop that runs a method's steps, and the one place that decides eager or
compiled.

:class:`Executor` runs steps of any :class:`~torchode_adjoint.solvers.protocol.Method`: the
forward steps of every gradient mode, the checkpointed re-runs, and the continuous adjoint's
augmented backward method. :func:`integrate` is the loop over a solve's output intervals with
fixed steps, :func:`controlled_steps` the loop of error-controlled ones. The record of steps (the
equal steps of :class:`~torchode_adjoint.controllers.fixed.TimeGrid`) says how many steps each
interval takes, their sizes and their stage times (``times.of(g)`` for step ``g``).

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
from ._rng import RngState
from ._structure import non_finite_part
from ._warnings import user_stacklevel
from .controllers.error import (
    ErrorControl,
    ErrorSteps,
    PartsFn,
    StepSizeController,
    refuse_vmap,
)
from .controllers.fixed import (
    FixedSteps,
    Leg,
    RecordedSteps,
    StageTimes,
    Steps,
    Times,
    interval_sizes,
)
from .controllers.protocol import LoopController, Run, StepPath
from .solvers.protocol import DynamicsFn, Method, Step, Stepped

__all__ = [
    "Executor",
    "run_steps",
    "StepCallbacks",
    "integrate",
    "StepHook",
    "locate_non_finite",
    "adaptive_interval",
    "integrate_adaptive",
    "DenseStep",
    "DenseTimes",
    "dense_stage_times",
    "dense_outputs",
]

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
        # A method that reads the host at every step (a coupling chosen per step) runs eagerly.
        if not method.compilable:
            options = None
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
        h: Step | Callable[[int], Step],
        times: Times,
        g0: int,
        steps: int,
        before_step: Callable[[int, Any], None] | None = None,
    ) -> Any:
        """``steps`` steps from ``carry``, the first being step ``g0`` of ``times``, all of size
        ``h`` or of size ``h(g)`` for step ``g`` (recorded steps); ``before_step(k, carry)``
        before each (then one step per call)."""
        step = self.method.step
        if self.options is None and before_step is None and not callable(h):
            # The plain eager loop: nothing to decide per step.
            for g in range(g0, g0 + steps):
                carry = step(f, carry, h, times.of(g))[0]
            return carry
        if self.options is None or before_step is not None or callable(h):
            for k in range(steps):
                if before_step is not None:
                    before_step(k, carry)
                h_k = h(g0 + k) if callable(h) else h
                carry = (
                    step(f, carry, h_k, times.of(g0 + k))[0]
                    if self.options is None
                    else self.step(f, carry, h_k, times.of(g0 + k))[0]
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
    grid: Steps,
    executor: Executor,
    *,
    check_finite: bool,
    before_step: StepHook | None = None,
    final: list[Any] | None = None,
    control: ErrorControl | None = None,
    stats: Any = None,
) -> list[torch.Tensor]:
    """Integrate over the output intervals and return the states at the output times after the
    first: equal steps (``grid``), or error-controlled ones (``control``, see
    :func:`integrate_adaptive`).

    Parameters
    ----------
    f : Dynamics
        ``f(t, y) -> dy/dt``, counting its evaluations.
    y0 : Tensor, shape (...)
    t : Tensor, shape (T,)
        Output times in ``y0``'s dtype and device. When it requires grad (backprop through the
        solver with learnable times), stage times and step sizes are differentiable tensors.
    grid : TimeGrid or RecordedSteps
        The steps of each interval: equal ones, or laid out by the user (``StepTo``).
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
    if control is not None:
        return integrate_adaptive(
            f, y0, t, grid.times, executor, control, check_finite=check_finite, stats=stats
        )
    method = executor.method
    times = StageTimes(t, grid, method.nodes)
    hs = interval_sizes(grid, t)
    states: list[torch.Tensor] = []
    offsets = grid.offsets
    legs = [Leg(i, offsets[i], n, hs[i]) for i, n in enumerate(grid.n_steps)]

    def leave(leg: Leg, carry: Any) -> Any:
        states.append(method.output(carry))
        return carry

    controller = FixedSteps(times, legs, leave=leave)
    hook = None
    if before_step is not None:
        hook = lambda k, c: before_step(controller.leg.interval, k, c)  # noqa: E731
    callbacks = StepCallbacks.of(getattr(f, "func", None), judged=False)
    carry = run_steps(
        executor, f, method.init(f, y0, t[0]), controller, before_step=hook, callbacks=callbacks
    )
    if final is not None:
        final.append(carry)
    # One host sync per call, never one per step: see locate_non_finite for the slow path.
    # Under torch.func transforms (vmap) a data-dependent branch is impossible: no check there.
    if check_finite and not functorch_transforms_active() and not bool(_all_finite(states)):
        locate_non_finite(f, y0, states, t, grid, method)
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
    grid: Steps,
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
    t_a, n = grid.times[i - 1], grid.n_steps[i - 1]
    times = StageTimes(t.detach(), grid, method.nodes)
    where = f"t = {grid.times[i]:.6g}"
    bad = sol[i]
    offsets = grid.offsets
    span = grid.times[i] - t_a
    h = grid.step_size(offsets[i - 1])
    eager = Executor(method, None)
    found: list[tuple[int, torch.Tensor]] = []

    def check(before: Any, out: Stepped, token: Any) -> Any:
        # The step's state, checked: the first non-finite one ends the replay.
        if not bool(torch.isfinite(method.output(out[0])).all()):
            found.append((scan.leg.interval, method.output(out[0])))
            scan.stop()
        return out[0]

    first = offsets[i - 1]
    scan = FixedSteps(
        times, [Leg(k, first + k, 1, grid.step_size(first + k)) for k in range(n)], split_first=True
    )
    with torch.no_grad():
        carry = method.init(f, y0.detach(), t.detach()[0])
        if isinstance(carry, torch.Tensor):
            carry = sol[i - 1]  # the carry is the state: start at the interval's stored one
        else:  # an auxiliary state, not stored: from y0
            carry = run_steps(
                eager, f, carry, FixedSteps(times, [Leg(0, 0, first, grid.step_size)])
            )
        run_steps(eager, f, carry, scan, accepted=check)
    if found:
        k, bad = found[0]
        h = grid.step_size(first + k)
        interval_text = f"[{t_a:.6g}, {grid.times[i]:.6g}]"
        end = t_a + grid.fractions(i - 1, k)[1] * span
        where = f"t = {end:.6g} (step {k + 1} of {n} in {interval_text})"
    sizes, here = ("steps of", "in this interval") if grid.uniform else ("a step of", "there")
    smaller = "reduce `step`" if grid.uniform else "add step times where it fails"
    raise RuntimeError(
        f"the ODE state became NaN or infinite at {where}{non_finite_part(f, bad)}, integrating "
        f"with solver={method.name!r}, {grid.describe()} ({sizes} {abs(h):.6g} {here}; "
        "`odeint` and `ODEBlock` default to solver='euler', step=0.1 when they are not given); "
        f"{smaller}, use a more stable solver such as solver='rk4', or check the dynamics "
        "(pass `check_finite=False` to skip this check)."
    )


def adaptive_interval(
    executor: Executor,
    f: Any,
    carry: Any,
    t_a: float,
    t_b: float,
    h: float,
    sizer: StepSizeController,
    parts: PartsFn,
    *,
    t: torch.Tensor | None = None,
    interval: int = 0,
    like: torch.Tensor,
    h_sign: float = 1.0,
    first: Callable[[Stepped], None] | None = None,
    before_try: Callable[[], Any] | None = None,
    on_accept: Callable[[int, float, float, Any, Any], None] | None = None,
    callbacks: StepCallbacks | None = None,
) -> tuple[Any, float]:
    """Integrate one interval from ``t_a`` to ``t_b`` with error-controlled steps; the last step
    ends on ``t_b`` exactly. Returns the carry at ``t_b`` and the next step size proposed.

    Parameters
    ----------
    executor : Executor
        Runs the steps of a method whose ``step`` returns an error estimate.
    h : float
        The first step's size to try (positive).
    sizer : StepSizeController
        Accepts or rejects each step and sizes the next (its counts go on across intervals;
        the last error is forgotten at the interval's start).
    parts : callable
        ``parts(carry, new_carry, error) -> (errors, before, after)``: the tensors the error
        norm is taken over (all of the state; the continuous adjoint's seminorm: the state and
        the adjoint, not the parameter gradients).
    t : Tensor, optional
        Output times that require grad (backprop): stage times and step sizes are then formed
        from ``t[interval]`` and ``t[interval + 1]`` differentiably; the step-size decisions
        are not differentiated.
    like : Tensor
        The stage times' dtype and device.
    h_sign : float
        ``-1`` for a method whose step size counts against the direction of integration (the
        continuous adjoint's augmented method, integrated backwards).
    first : callable, optional
        Called with the first step tried (accepted or not).
    before_try : callable, optional
        Called before each step is tried; what it returns is handed to ``on_accept``.
    on_accept : callable, optional
        ``on_accept(k, m0, m1, carry, token)`` for the ``k``-th accepted step, from ``m0`` to
        ``m1`` (fractions of the interval), with the carry it started from.

    Raises
    ------
    RuntimeError
        When the step size falls below what the times' precision resolves (naming the time,
        the step and the likely causes), or when more than ``max_steps`` steps are tried
        (from ``sizer``).
    """
    path = _IntervalPath(
        executor.method.nodes, t_a, t_b, like, sizer.control.jump_times, t, interval, h_sign
    )
    sizer.restart()
    k0 = sizer.accepted

    def accepted(before: Any, out: Stepped, token: Any) -> Any:
        if on_accept is not None:
            on_accept(sizer.accepted - 1 - k0, path.m, path.m1, before, token)
        return out[0]

    return controlled_steps(
        executor, f, carry, h, sizer, parts, path,
        before_try=before_try, first=first, accepted=accepted, callbacks=callbacks,
    )  # fmt: skip


class StepCallbacks:
    """The user's step callbacks, called by the loop (torchdiffeq's names, methods of the
    dynamics): ``callback_step(t0, y0, dt)`` before each step taken or tried, and after an
    error-controlled step is judged ``callback_accept_step`` or ``callback_reject_step`` with the
    same arguments; the continuous adjoint's backward pass calls those named with ``_adjoint``
    after them. ``t0`` is the step's start, ``y0`` the state there, ``dt`` its signed size
    (0-dim tensors)."""

    __slots__ = ("on_step", "on_accept", "on_reject", "_dt")

    NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")

    def __init__(self, step: Any, accept: Any, reject: Any) -> None:
        self.on_step, self.on_accept, self.on_reject = step, accept, reject
        self._dt: tuple[Any, torch.Tensor] | None = None  # the last step size, as a tensor

    @classmethod
    def of(cls, func: Any, suffix: str = "", *, judged: bool = True) -> StepCallbacks | None:
        """The callbacks ``func`` defines (with ``suffix``), None if none; ``judged`` False
        (fixed steps) warns where accept/reject callbacks are given, as they are never called."""
        found = [getattr(func, name + suffix, None) for name in cls.NAMES]
        if not judged and any(found[1:]):
            warnings.warn(
                f"`callback_accept_step{suffix}`/`callback_reject_step{suffix}` are called for "
                "error-controlled steps only; with fixed steps every step is taken (see "
                f"`callback_step{suffix}`).",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        if not judged:  # fixed steps: every step is taken, none is judged
            found[1:] = [None, None]
        if not any(found):
            return None
        return cls(*found)

    def before(self, t0: torch.Tensor, y0: torch.Tensor, dt: Step) -> None:
        if self.on_step is not None:
            self.on_step(t0, y0, self._as_tensor(dt, t0))

    def judged(self, accepted: bool, t0: torch.Tensor, y0: torch.Tensor, dt: Step) -> None:
        call = self.on_accept if accepted else self.on_reject
        if call is not None:
            call(t0, y0, self._as_tensor(dt, t0))

    def _as_tensor(self, dt: Step, like: torch.Tensor) -> torch.Tensor:
        """``dt`` as a 0-dim tensor; equal sizes in a row (fixed steps) share one."""
        if isinstance(dt, torch.Tensor):
            return dt
        key, cached = (dt, like.dtype, like.device), self._dt
        if cached is None or cached[0] != key:
            cached = self._dt = (key, like.new_tensor(dt))
        return cached[1]


def run_steps(
    executor: Executor,
    f: Any,
    carry: Any,
    controller: LoopController,
    *,
    before_step: Callable[[int, Any], None] | None = None,
    before_try: Callable[[], Any] | None = None,
    first: Callable[[Stepped], None] | None = None,
    accepted: Callable[[Any, Stepped, Any], Any] | None = None,
    callbacks: StepCallbacks | None = None,
) -> Any:
    """The one loop: every pass of every gradient mode steps through here.

    It asks ``controller`` what to do next: a run of steps taken as they come (fixed steps,
    which ``executor`` may take in compiled chunks; ``before_step(k, carry)`` before each), or
    one step tried with its error and dense information (``before_try()`` before it, its
    result kept as a token), which the controller judges (an error-controlled step's one host
    read); an accepted step is handed to ``accepted(before, out, token)``, which returns the
    carry to go on from (``out[0]`` without it). ``first(out)`` sees the first step tried.
    After each accepted step or run the controller moves on (its stops may change the carry).
    ``callbacks`` are the user's (:class:`StepCallbacks`). Returns the last carry.
    """
    output = executor.method.output
    carry = controller.start(carry)
    while (plan := controller.plan()) is not None:
        if isinstance(plan, Run):
            hook = before_step
            if callbacks is not None:
                hook = _with_callback(before_step, callbacks, plan, output)
            carry = executor.advance(f, carry, plan.h, plan.times, plan.g0, plan.n, hook)
        else:
            token = before_try() if before_try is not None else None
            if callbacks is not None:
                callbacks.before(plan.ts[0], output(carry), plan.h)
            out = executor.step(f, carry, plan.h, plan.ts, dense=plan.dense)
            if first is not None:
                first(out)
                first = None
            judged = controller.judge(carry, out)
            if callbacks is not None:
                callbacks.judged(judged, plan.ts[0], output(carry), plan.h)
            if not judged:
                continue
            carry = accepted(carry, out, token) if accepted is not None else out[0]
        carry = controller.passed(carry)
    return carry


def _with_callback(
    before_step: Callable[[int, Any], None] | None,
    callbacks: StepCallbacks,
    plan: Run,
    output: Callable[[Any], torch.Tensor],
) -> Callable[[int, Any], None]:
    """``before_step`` for a run, calling the user's ``callback_step`` before each step too."""

    def hook(k: int, carry: Any) -> None:
        if before_step is not None:
            before_step(k, carry)
        g = plan.g0 + k
        callbacks.before(
            plan.times.of(g)[0], output(carry), plan.h(g) if callable(plan.h) else plan.h
        )

    return hook


def controlled_steps(
    executor: Executor,
    f: Any,
    carry: Any,
    h: float,
    sizer: StepSizeController,
    parts: PartsFn,
    path: StepPath,
    *,
    before_try: Callable[[], Any] | None = None,
    first: Callable[[Stepped], None] | None = None,
    accepted: Callable[[Any, Stepped, Any], Any] | None = None,
    callbacks: StepCallbacks | None = None,
) -> tuple[Any, float]:
    """Error-controlled steps along ``path`` through the one loop (an
    :class:`~torchode_adjoint.controllers.error.ErrorSteps` controller); the carry where
    ``path`` ends and the next step size proposed."""
    controller = ErrorSteps(sizer, path, parts, h)
    carry = run_steps(
        executor, f, carry, controller, before_try=before_try, first=first, accepted=accepted,
        callbacks=callbacks,
    )  # fmt: skip
    return carry, controller.h


class _IntervalPath(StepPath):
    """From ``t_a`` to ``t_b`` (one output interval), where a step is as fractions ``m0``,
    ``m1`` of the interval: its stage times ``t_a + (m0 + c (m1 - m0)) (t_b - t_a)``, formed
    from ``t[interval]`` and ``t[interval + 1]`` where ``t`` requires grad (the step-size
    decisions are not differentiated). ``h_sign`` is ``-1`` for a method whose step counts
    against the direction of integration (the continuous adjoint's augmented method)."""

    def __init__(
        self,
        nodes: Sequence[float],
        t_a: float,
        t_b: float,
        like: torch.Tensor,
        jumps: Sequence[float],
        t: torch.Tensor | None,
        interval: int,
        h_sign: float,
    ) -> None:
        self.nodes, self.t_a, self.t_b, self.like, self.jumps = nodes, t_a, t_b, like, jumps
        self.t, self.interval, self.h_sign = t, interval, h_sign
        self.length = abs(t_b - t_a)
        self.m = self.m1 = 0.0

    def remaining(self) -> float:
        return (1.0 - self.m) * self.length

    def try_step(self, hh: float, last: bool) -> tuple[float, float, float]:
        m = self.m
        self.m1 = m1 = 1.0 if last else m + hh / self.length
        return (m1 - m) * self.length, self.t_a + m * (self.t_b - self.t_a), self.t_b

    def stage_times(self) -> tuple[tuple[torch.Tensor, ...], Step]:
        m, m1, t_a, t_b, t = self.m, self.m1, self.t_a, self.t_b, self.t
        fr = [m + c * (m1 - m) for c in self.nodes]
        h_step: Step
        if t is not None and t.requires_grad:
            lo, hi = t[self.interval], t[self.interval + 1]
            ts = tuple(torch.addcmul(lo, t.new_tensor(fr), hi - lo).unbind(0))
            h_step = (hi - lo) * (m1 - m) * self.h_sign
        else:
            ts = tuple(self.like.new_tensor([t_a + x * (t_b - t_a) for x in fr]).unbind(0))
            h_step = (m1 - m) * (t_b - t_a) * self.h_sign
        if self.jumps:
            ts = _inside_jumps(ts, fr, t_a, t_b, self.jumps)
        return ts, h_step

    def advance(self, last: bool, carry: Any) -> tuple[Any, bool]:
        self.m = self.m1
        return carry, last


def integrate_adaptive(
    f: Any,
    y0: torch.Tensor,
    t: torch.Tensor,
    host_times: Sequence[float],
    executor: Executor,
    control: ErrorControl,
    *,
    check_finite: bool,
    stats: Any = None,
    record: list[RecordedSteps] | None = None,
    before_try: Callable[[], Any] | None = None,
    on_accept: Callable[[int, int, float, float, Any, Any], None] | None = None,
    final: list[Any] | None = None,
    dense_steps: list[DenseStep] | None = None,
) -> list[torch.Tensor]:
    """Integrate with error-controlled steps of an embedded pair, stepping to every output
    time exactly; the states at ``t[1:]``. The first step is Hairer's (one evaluation more),
    capped by ``control.max_step``. With ``record``, the accepted steps are appended to it
    (:class:`~torchode_adjoint.controllers.fixed.RecordedSteps`); ``on_accept(i, k, m0, m1, carry,
    token)`` follows each accepted step of interval ``i`` (see :func:`adaptive_interval`).

    With ``dense_steps`` (a list), a pair with an interpolant steps past output times as
    without a record (dense output), appends each accepted step's ``(t0, h, t1)`` to it and
    calls ``on_accept(-1, k, t0, t1, carry, token)`` after it (a replaying mode's record);
    where dense output is not possible (no interpolant, ``interpolate`` off, learnable times)
    the list stays empty and the steps end on every output time."""
    method = executor.method
    carry = method.init(f, y0, t[0])
    f0 = method.derivative(carry)
    if f0 is None:
        f0 = f(t[0], y0)
    direction = 1.0 if host_times[-1] > host_times[0] else -1.0
    if method.error_order is None:
        raise ValueError(f"{method.name} has no error estimate: it takes fixed steps only.")
    sizer = StepSizeController(control, method.error_order, y0.dtype)
    try:
        h = sizer.first_step(f, t[0], y0, f0, direction)
    except RuntimeError as err:
        refuse_vmap(err)
        raise

    def parts(before: Any, after: Any, error: Any) -> tuple[Sequence[torch.Tensor], ...]:
        return [error], [method.output(before)], [method.output(after)]

    callbacks = StepCallbacks.of(getattr(f, "func", None))
    dense = (
        control.interpolate
        and method.interpolates
        and not t.requires_grad
        and (dense_steps is not None or (record is None and on_accept is None))
    )
    if dense:
        states = _dense_solve(
            executor, f, carry, host_times, h, sizer, parts, y0,
            steps=dense_steps, before_try=before_try, on_accept=on_accept, final=final,
            callbacks=callbacks,
        )  # fmt: skip
        if stats is not None:
            stats.accepted, stats.rejected = sizer.accepted, sizer.rejected
        _check_states(states, f, method, control, host_times, check_finite)
        return states
    states = []
    accepted: list[list[tuple[float, float]]] = []
    for i in range(len(host_times) - 1):
        steps: list[tuple[float, float]] = []
        accepted.append(steps)

        def keep(
            k: int, m0: float, m1: float, before: Any, token: Any, i: int = i, steps: Any = steps
        ) -> None:
            steps.append((m0, m1))
            if on_accept is not None:
                on_accept(i, k, m0, m1, before, token)

        if i > 0 and host_times[i] in control.jump_times:
            carry = _after_jump(method, f, carry, host_times[i], host_times[i + 1], y0)
        carry, h = adaptive_interval(
            executor,
            f,
            carry,
            host_times[i],
            host_times[i + 1],
            h,
            sizer,
            parts,
            t=t,
            interval=i,
            like=y0,
            before_try=before_try,
            on_accept=keep,
            callbacks=callbacks,
        )
        states.append(method.output(carry))
    if record is not None:
        record.append(
            RecordedSteps(times=tuple(host_times), steps=tuple(tuple(s) for s in accepted))
        )
    if final is not None:
        final.append(carry)
    if stats is not None:
        stats.accepted, stats.rejected = sizer.accepted, sizer.rejected
    _check_states(states, f, method, control, host_times, check_finite)
    return states


def _inside_jumps(
    ts: tuple[torch.Tensor, ...],
    fractions: Sequence[float],
    t_a: float,
    t_b: float,
    jumps: Sequence[float],
) -> tuple[torch.Tensor, ...]:
    """The stage times of a step in ``[t_a, t_b]`` (``fractions`` of it) with those on a jump
    time at either end moved to the next time the dtype resolves inside the step: the
    dynamics are evaluated on the step's side of the jump (torchdiffeq's ``jump_t``)."""
    out = list(ts)
    for j, x in enumerate(fractions):
        end, toward = (t_a, t_b) if x == 0.0 else (t_b, t_a) if x == 1.0 else (None, None)
        if end is not None and end in jumps:
            moved = torch.nextafter(out[j].detach(), out[j].detach().new_tensor(toward))
            out[j] = out[j] + (moved - out[j].detach())  # differentiable where t is
    return tuple(out)


def _after_jump(method: Any, f: Any, carry: Any, t_jump: float, toward: float, like: Any) -> Any:
    """The carry after a jump of the dynamics at ``t_jump``: a first-same-as-last pair's
    derivative evaluated anew at the next time ``like``'s dtype resolves towards ``toward``
    (torchdiffeq's ``jump_t``); other methods carry no derivative."""
    if method.derivative(carry) is None:
        return carry
    t_j = like.new_tensor(t_jump)
    after = torch.nextafter(t_j, like.new_tensor(toward))
    return method.init(f, method.output(carry), after)


def _check_states(
    states: list[torch.Tensor],
    f: Any,
    method: Any,
    control: ErrorControl,
    host_times: Sequence[float],
    check_finite: bool,
) -> None:
    if check_finite and not functorch_transforms_active() and not bool(_all_finite(states)):
        bad = next(j for j, s in enumerate(states) if not bool(torch.isfinite(s).all()))
        raise RuntimeError(
            f"the ODE state became NaN or infinite by t = {host_times[bad + 1]:.6g}"
            f"{non_finite_part(f, states[bad])}, integrating with solver={method.name!r} under "
            f"error control ({control.describe()}); check the dynamics "
            "(pass `check_finite=False` to skip this check)."
        )


#: One accepted step of a dense solve: its start, its signed size, its end (host floats).
DenseStep = tuple[float, float, float]


def dense_stage_times(
    like: torch.Tensor, t0: float, h: float, nodes: Sequence[float]
) -> tuple[torch.Tensor, ...]:
    """The stage times ``t0 + c h`` of a dense solve's step, formed on the host the same way
    wherever the step is taken again (a replay must evaluate at bit-identical times)."""
    return tuple(like.new_tensor([t0 + c * h for c in nodes]).unbind(0))


def _dense_solve(
    executor: Executor,
    f: Any,
    carry: Any,
    host_times: Sequence[float],
    h: float,
    sizer: StepSizeController,
    parts: PartsFn,
    like: torch.Tensor,
    *,
    steps: list[DenseStep] | None = None,
    before_try: Callable[[], Any] | None = None,
    on_accept: Callable[[int, int, float, float, Any, Any], None] | None = None,
    final: list[Any] | None = None,
    callbacks: StepCallbacks | None = None,
) -> list[torch.Tensor]:
    """Error-controlled steps from the first output time to the last, past the ones between:
    the solution there is the method's interpolant inside the step that covers it (torchdiffeq's
    and diffrax's behaviour; fewer steps where output times are dense). A step ending on an
    output time gives its end state, not an interpolation."""
    method: Any = executor.method
    path = _SpanPath(method, f, host_times, sizer.control, like)
    direction = path.direction
    states: list[torch.Tensor] = []
    nxt = 1

    def accepted(before: Any, out: Stepped, token: Any) -> Any:
        nonlocal nxt
        t_now, h_signed, t_new = path.t_now, path.h_signed, path.t_new
        if steps is not None:
            steps.append((t_now, h_signed, t_new))
        if on_accept is not None:
            on_accept(-1, sizer.accepted - 1, t_now, t_new, before, token)
        reached, nxt = _outputs_reached(host_times, nxt, t_now, h_signed, t_new, direction)
        for _, theta in reached:
            states.append(
                method.output(out[0])
                if theta is None
                else method.interpolate(before, h_signed, out[2], theta)
            )
        return out[0]

    carry, _ = controlled_steps(
        executor, f, carry, h, sizer, parts, path, before_try=before_try, accepted=accepted,
        callbacks=callbacks,
    )  # fmt: skip
    if final is not None:
        final.append(carry)
    return states


class _SpanPath(StepPath):
    """From the first output time to the last, past the ones between, each step's stage times
    ``t + c h`` formed on the host (:func:`dense_stage_times`); steps end on the stops
    (``step_t``, ``jump_t``) and the last output time, and after a jump a first-same-as-last
    pair evaluates its derivative anew."""

    def __init__(
        self, method: Any, f: Any, host_times: Sequence[float], control: ErrorControl, like: Any
    ) -> None:
        self.method, self.f, self.like = method, f, like
        self.nodes = method.nodes
        self.jumps = control.jump_times
        t0, self.t_end = host_times[0], host_times[-1]
        self.direction = direction = 1.0 if self.t_end > t0 else -1.0
        # The times a step must end on (step_t, jump_t), then the last output time.
        self.stops = sorted(
            {s for s in (*control.step_times, *control.jump_times)
             if (s - t0) * direction > 0 and (self.t_end - s) * direction > 0},
            reverse=direction < 0,
        ) + [self.t_end]  # fmt: skip
        self.t_now = self.t_new = t0
        self.h_signed = 0.0
        self.target = self.t_end

    def remaining(self) -> float:
        stops = self.stops
        if stops[0] != self.t_end and (stops[0] - self.t_now) * self.direction <= 0.0:
            stops.pop(0)
        self.target = stops[0]
        return abs(self.target - self.t_now)

    def try_step(self, hh: float, last: bool) -> tuple[float, float, float]:
        size = abs(self.target - self.t_now) if last else hh
        self.h_signed = self.direction * size
        self.t_new = self.target if last else self.t_now + self.h_signed
        return size, self.t_now, self.target

    def stage_times(self) -> tuple[tuple[torch.Tensor, ...], Step]:
        ts = dense_stage_times(self.like, self.t_now, self.h_signed, self.nodes)
        if self.jumps:
            ts = _inside_jumps(ts, self.nodes, self.t_now, self.t_new, self.jumps)
        return ts, self.h_signed

    def advance(self, last: bool, carry: Any) -> tuple[Any, bool]:
        self.t_now = t_new = self.t_new
        if last and t_new in self.jumps:
            carry = _after_jump(self.method, self.f, carry, t_new, self.t_end, self.like)
        return carry, (t_new - self.t_end) * self.direction >= 0.0


class DenseTimes:
    """The stage times of a dense solve's accepted steps (``times.of(g)`` for step ``g``), formed
    by :func:`dense_stage_times` as the forward pass formed them."""

    __slots__ = ("steps", "nodes", "like")

    def __init__(
        self, steps: Sequence[DenseStep], nodes: Sequence[float], like: torch.Tensor
    ) -> None:
        self.steps, self.nodes, self.like = steps, tuple(nodes), like

    def of(self, g: int) -> tuple[torch.Tensor, ...]:
        t0, h, _ = self.steps[g]
        return dense_stage_times(self.like, t0, h, self.nodes)


def dense_outputs(
    steps: Sequence[DenseStep], host: Sequence[float]
) -> tuple[dict[int, list[tuple[int, float]]], dict[int, list[int]]]:
    """Which output times each accepted step of a dense solve gave, as the forward pass
    assigned them: ``(j, theta)`` interpolated inside step ``k``, or ``j`` at its end."""
    direction = 1.0 if host[-1] > host[0] else -1.0
    inside: dict[int, list[tuple[int, float]]] = {}
    at_end: dict[int, list[int]] = {}
    nxt = 1
    for k, (t0, h, t1) in enumerate(steps):
        reached, nxt = _outputs_reached(host, nxt, t0, h, t1, direction)
        for j, theta in reached:
            if theta is None:
                at_end.setdefault(k, []).append(j)
            else:
                inside.setdefault(k, []).append((j, theta))
    return inside, at_end


def _outputs_reached(
    host: Sequence[float], nxt: int, t0: float, h: float, t1: float, direction: float
) -> tuple[list[tuple[int, float | None]], int]:
    """The output times from index ``nxt`` on that a dense step from ``t0`` (signed size ``h``)
    to ``t1`` reaches: ``(j, theta)`` inside it, ``(j, None)`` on its end; and the next index.
    The one rule the dense solve and the replaying modes' backward passes assign outputs by."""
    reached: list[tuple[int, float | None]] = []
    while nxt < len(host) and (host[nxt] - t1) * direction <= 0.0:
        reached.append((nxt, None if host[nxt] == t1 else (host[nxt] - t0) / h))
        nxt += 1
    return reached, nxt
