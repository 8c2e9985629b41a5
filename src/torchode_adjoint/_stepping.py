"""The solver step as data, and the fixed-step loop of the forward passes.

A *method* says what one step computes: an explicit Runge--Kutta tableau
(:class:`RungeKutta`), or a reversible method with a state of its own (see
:mod:`torchode_adjoint._coupled` and :mod:`torchode_adjoint._reversible_heun`). The
:class:`Stepper` runs a method's forward steps, eagerly or as compiled graphs;
:func:`integrate` is the fixed-step loop over the time grid that the forward pass of every gradient
mode, backprop and the checkpointed re-runs call. The backward passes are not all run here yet:
the continuous adjoint's backward loop (:mod:`._adjoint`, with its own compiled step) and the
reversible mode's (:mod:`._reversible`, eager) are loops of their own.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ._compat import BatchNormBase, functorch_transforms_active
from ._compiled import Compile, CompiledFunction, CompileFallbackWarning, cast
from ._grid import StageTimes, TimeGrid, Times, step_sizes
from ._rng import RngState
from ._structure import non_finite_part
from ._tableau import ButcherTableau
from ._warnings import user_stacklevel

__all__ = [
    "StepPlan",
    "plan_for",
    "combine",
    "rk_step",
    "rk_increment",
    "Method",
    "RungeKutta",
    "Stepper",
    "integrate",
    "StepHook",
    "StepProducts",
]

Step = float | torch.Tensor
DynamicsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Callable[[int, int, Any], None]
"""``hook(i, k, carry)``: called with the method's state before step ``k`` of interval ``i``."""


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
    y: torch.Tensor | None, h: Step, terms: Sequence[tuple[int, float]], ks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``y + h * sum(coef * ks[l] for l, coef in terms)`` with fused kernels (``y=None``: the
    increment alone).

    With a float ``h`` each term is one ``torch.add(..., alpha=)``; with a tensor ``h`` (times
    that need a gradient, and the compiled path) the sum is formed first and then added.
    """
    if not terms:
        return y if y is not None else torch.zeros_like(ks[0])
    if isinstance(h, float):
        m0, c0 = terms[0]
        out = torch.mul(ks[m0], c0 * h) if y is None else torch.add(y, ks[m0], alpha=c0 * h)
        for m, coef in terms[1:]:
            out = torch.add(out, ks[m], alpha=coef * h)
        return out
    # No `alpha=`/`value=` coefficients here: this path is also the compiled one, and
    # torch.compile's inductor drops the `alpha` of `add(x, mm(a, b), alpha=c)` when it rewrites
    # it to `addmm` (pytorch/pytorch#167313), which a stage that is a matrix product triggers.
    acc = ks[terms[0][0]] * terms[0][1]
    for m, coef in terms[1:]:
        acc = acc + ks[m] * coef
    return acc * h if y is None else y + acc * h


def _stages(f: Any, y: Any, h: Any, times: Times, pos: int, plan: StepPlan) -> list[Any]:
    ks: list[Any] = []
    for j in range(plan.stages):
        ks.append(f(times[pos + j], _combine_state(y, h, plan.rows[j], ks)))
    return ks


def rk_step(
    f: Callable[[torch.Tensor, Any], Any],
    y: Any,
    h: Any,
    times: Times,
    pos: int,
    plan: StepPlan,
) -> Any:
    """One explicit RK step from ``y``; stage ``j`` is evaluated at ``times[pos + j]``.

    ``y`` is a tensor and ``h`` its step, or, for an augmented system (the continuous adjoint's
    ``(y, a)``), a tuple of tensors with a tuple of per-component steps; ``f`` then returns a
    tuple of the same length.
    """
    return _combine_state(y, h, plan.weights, _stages(f, y, h, times, pos, plan))


def rk_increment(
    f: DynamicsFn, y: torch.Tensor, h: Step, times: Times, pos: int, plan: StepPlan
) -> torch.Tensor:
    """``Psi_h(y) - y = h * sum_j b_j k_j``: one step's increment, formed without ``y`` (so
    that a method that adds it to another state loses no digits to a cancellation)."""
    return combine(None, h, plan.weights, _stages(f, y, h, times, pos, plan))


def _combine_state(y: Any, h: Any, terms: Sequence[tuple[int, float]], ks: Sequence[Any]) -> Any:
    if isinstance(y, tuple):
        return tuple(
            combine(y_c, h_c, terms, [k[c] for k in ks]) for c, (y_c, h_c) in enumerate(zip(y, h))
        )
    return combine(y, h, terms, ks)


class Method(Protocol):
    """What a solver step computes; :class:`Stepper` runs it.

    ``carry`` is the method's state: the solution itself for a Runge--Kutta method, a tuple
    with auxiliary tensors for a reversible one.
    """

    @property
    def name(self) -> str:
        """The method's name in messages."""

    @property
    def order(self) -> int:
        """The order of convergence."""

    @property
    def nodes(self) -> tuple[float, ...]:
        """Where the evaluations of one step lie, as fractions of the step, in the order made."""

    @property
    def key(self) -> Hashable:
        """What the compiled steps are cached under."""

    def init(self, f: Any, y0: torch.Tensor, t0: torch.Tensor) -> Any:
        """The carry at the first time."""

    def output(self, carry: Any) -> torch.Tensor:
        """The solution held in a carry."""

    def step(self, f: Any, carry: Any, h: Step, times: Times, pos: int) -> Any:
        """One step; its evaluations are at ``times[pos:pos + len(nodes)]``."""


class StepProducts(Protocol):
    """The vector--Jacobian products a reversible method's exact backward step asks for.

    A gradient mode implements it (the reversible mode's ``StepVJP``) with its bookkeeping:
    stage times, replayed random draws, parameter and time gradients. The methods
    (:mod:`._coupled`, :mod:`._reversible_heun`) call it and import nothing from a mode.
    """

    need_t: bool
    """Whether the time gradients are asked for."""

    def evaluate(
        self, x: torch.Tensor, v: torch.Tensor, *, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f(t, x)`` at the current step's start (``offset=0``) or end (1), and ``v^T df/dx``."""

    def increment(
        self,
        tableau: ButcherTableau,
        x: torch.Tensor,
        v: torch.Tensor,
        h: float,
        pos: int,
        offset: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The increment ``Psi_h(t, x) - x`` of one base step of ``tableau`` from the current
        step's start (``offset=0``) or end (1), evaluated at stage times ``pos...``, and ``v^T``
        its Jacobian."""  # fmt: skip

    def add_step_size_gradient(self, g: torch.Tensor) -> None:
        """Add ``dL/dh`` of the current step."""


@dataclass(frozen=True)
class RungeKutta:
    """An explicit Runge--Kutta method: its carry is the solution."""

    tableau: ButcherTableau
    plan: StepPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Resolved here, not in the step: the compiled step traces no cache lookups.
        object.__setattr__(self, "plan", plan_for(self.tableau))

    @property
    def name(self) -> str:
        return self.tableau.name

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def nodes(self) -> tuple[float, ...]:
        return self.tableau.c

    @property
    def key(self) -> Hashable:
        return ("rk", self.tableau)

    def init(self, f: Any, y0: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
        return y0

    def output(self, carry: torch.Tensor) -> torch.Tensor:
        return carry

    def step(self, f: Any, carry: torch.Tensor, h: Step, times: Times, pos: int) -> torch.Tensor:
        return rk_step(f, carry, h, times, pos, self.plan)


def _compiled_steps(method: Method, steps: int) -> Callable[..., Any]:
    evaluations = len(method.nodes)

    def steps_compiled(
        func: DynamicsFn, h: torch.Tensor, ts: tuple[torch.Tensor, ...], *carry: torch.Tensor
    ) -> Any:
        f = cast(func)
        c: Any = carry if len(carry) > 1 else carry[0]
        for k in range(steps):
            c = method.step(f, c, h, ts, k * evaluations)
        return c

    return steps_compiled


class Stepper:
    """A method's steps, eager or compiled: the one executor of every solve.

    ``stepper(f, carry, h, times, pos)`` takes one step and ``stepper.advance(..., steps)``
    several, with ``f`` a :class:`~torchode_adjoint._dynamics.Dynamics`. Compiled, the first
    step of each ``f`` runs eagerly (the output check, and a look at whether the dynamics draw
    random numbers, which keeps the pass eager); later ones run compiled graphs of
    ``options.steps`` steps (and of one step for the rest), with the step size and the stage
    times as tensors, and count the evaluations themselves.

    Parameters
    ----------
    method : Method
    options : Compile or None
        None for the eager step.
    """

    __slots__ = ("method", "options", "evaluations", "single", "chunk", "chunk_steps", "_h")

    def __init__(self, method: Method, options: Compile | None) -> None:
        self.method, self.options = method, options
        self.evaluations = len(method.nodes)
        self.single: CompiledFunction | None = None
        self.chunk: CompiledFunction | None = None
        self.chunk_steps = 1
        if options is not None:
            self.single = options.function(
                ("steps", method.key, 1), lambda: _compiled_steps(method, 1)
            )
            if options.steps > 1:
                self.chunk_steps = options.steps
                self.chunk = options.function(
                    ("steps", method.key, options.steps),
                    lambda: _compiled_steps(method, options.steps),
                )
        self._h: tuple[Any, torch.Tensor | None] = (None, None)

    def __reduce__(self) -> tuple[type[Stepper], tuple[Method, Compile | None]]:
        # Compiled functions do not pickle: a saved block rebuilds them from its settings.
        return (Stepper, (self.method, self.options))

    def __call__(self, f: Any, carry: Any, h: Step, times: Any, pos: int) -> Any:
        if self.single is None or f.compile_ok is False or functorch_transforms_active():
            # Under torch.func transforms the compiled graphs cannot run: eager, no attempt.
            return self.method.step(f, carry, h, times, pos)
        if f.compile_ok is None:
            y = self.method.output(carry)
            before = RngState.capture(y.device)
            out = self.method.step(f, carry, h, times, pos)
            f.compile_ok = (
                f.checked
                and before.same_as(RngState.capture(y.device))
                and _compilable_with_grad(f.func)
            )
            return out
        return self._run(self.single, 1, f, carry, h, times, pos)

    def advance(self, f: Any, carry: Any, h: Step, times: Any, pos: int, steps: int) -> Any:
        """``steps`` steps from ``carry``, the first at evaluation ``pos`` of ``times``."""
        evaluations, chunk, size = self.evaluations, self.chunk, self.chunk_steps
        if self.single is None:  # eager: the plain loop, nothing to decide per step
            step = self.method.step
            for _ in range(steps):
                carry = step(f, carry, h, times, pos)
                pos += evaluations
            return carry
        k = 0
        while k < steps:
            if (
                chunk is not None
                and f.compile_ok
                and steps - k >= size
                and not functorch_transforms_active()
            ):
                carry = self._run(chunk, size, f, carry, h, times, pos)
                k, pos = k + size, pos + size * evaluations
            else:
                carry = self(f, carry, h, times, pos)
                k, pos = k + 1, pos + evaluations
        return carry

    def _run(
        self,
        fn: CompiledFunction,
        steps: int,
        f: Any,
        carry: Any,
        h: Step,
        times: Any,
        pos: int,
    ) -> Any:
        evaluations = steps * self.evaluations
        ts = tuple(times[pos + e] for e in range(evaluations))
        parts = carry if isinstance(carry, tuple) else (carry,)
        out = fn(f.func, self.step_tensor(h, parts[0]), ts, *parts)
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
    f: DynamicsFn,
    y0: torch.Tensor,
    t: torch.Tensor,
    grid: TimeGrid,
    stepper: Stepper,
    *,
    check_finite: bool,
    before_step: StepHook | None = None,
    final: list[Any] | None = None,
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
    stepper : Stepper
        The method and its executor (compiled or eager).
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
    method = stepper.method
    evaluations = stepper.evaluations
    times = StageTimes(t, grid, method.nodes)
    hs: Sequence[Step] = step_sizes(t, grid) if t.requires_grad else grid.h
    states = []
    carry = method.init(f, y0, t[0])
    pos = 0
    for i, n in enumerate(grid.n_steps):
        h = hs[i]
        if before_step is None:
            carry = stepper.advance(f, carry, h, times, pos, n)
            pos += n * evaluations
        else:
            for k in range(n):
                before_step(i, k, carry)
                carry = stepper(f, carry, h, times, pos)
                pos += evaluations
        states.append(method.output(carry))
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
    grid: TimeGrid,
    method: Method,
) -> None:
    """Raise a RuntimeError naming the first time at which the state became non-finite.

    Only called on failure: re-integrates the first bad interval step by step, checking each
    (from its stored first state; a reversible method, whose auxiliary state is not stored,
    from ``y0``).
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
    evaluations = len(method.nodes)
    where = f"t = {grid.times[i]:.6g}"
    bad = sol[i]
    with torch.no_grad():
        if isinstance(method, RungeKutta):  # its carry is the stored state: start there
            carry, pos = sol[i - 1], grid.offsets[i - 1] * evaluations
        else:
            carry, pos = method.init(f, y0.detach(), t.detach()[0]), 0
            for interval in range(i - 1):
                for _ in range(grid.n_steps[interval]):
                    carry = method.step(f, carry, grid.h[interval], times, pos)
                    pos += evaluations
        for k in range(n):
            carry = method.step(f, carry, h, times, pos)
            pos += evaluations
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
