"""``odeint_event``: a solve that stops where a condition crosses zero, with a differentiable
event time.

Two passes. The search (no graph) steps the method through the one loop from ``t0`` until the
condition ``event_fn(t, y)`` changes sign over an accepted step, then locates the root inside
that step on the method's own step from its start (a step of size ``theta h``: the solution the
second pass computes there) with the Illinois method. The second pass is an ordinary ``odeint``
in the chosen gradient mode over the same steps (``StepTo`` their ends, the last one the event
time): its state at the event carries the gradient of every mode. The event time's gradient
comes from the implicit function theorem at that state (:class:`_EventGradient`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import nn

from ._compiled import Compile
from ._dynamics import NFECounter
from ._executor import Executor, dense_stage_times, run_steps
from ._odeint import odeint
from ._prepare import ModeName
from .controllers.error import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    ErrorControl,
    ErrorSteps,
    StepSizeController,
)
from .controllers.fixed import DEFAULT_STEP, FixedSteps, Leg, StepTo
from .controllers.protocol import Try
from .modes.base import GradientMode, graph_nodes
from .solvers.methods import as_embedded, as_method, tableau_of
from .solvers.protocol import Method, Step, Stepped
from .solvers.registry import get_solver
from .solvers.tableau import ButcherTableau

__all__ = ["odeint_event"]

EventFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Root-finder iterations at most (the Illinois method halves the bracket at least every
#: other iteration; 200 is far past the dtype's resolution).
_MAX_ROOT_ITERATIONS = 200


def odeint_event(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t0: torch.Tensor | float,
    *,
    event_fn: EventFn,
    reverse_time: bool = False,
    direction: int = 0,
    solver: str | ButcherTableau = "euler",
    step: float | None = DEFAULT_STEP,
    rtol: float | None = None,
    atol: float | None = None,
    adjoint: bool | ModeName | GradientMode = True,
    params: Iterable[torch.Tensor] | None = None,
    event_params: Iterable[torch.Tensor] | None = None,
    max_steps: int = 100_000,
    nfe: NFECounter | None = None,
    compile: bool | Compile = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate ``dy/dt = func(t, y)`` from ``t0`` until ``event_fn(t, y)`` crosses zero;
    torchdiffeq's ``odeint_event`` signature and return value.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
    y0 : Tensor
        The initial state (one tensor).
    t0 : Tensor (0-dim) or float
        The start time; its gradient flows where it requires grad.
    event_fn : callable ``(t, y) -> Tensor``
        The condition: a tensor of any shape, each element a condition of its own; the event is
        the first time any of them crosses zero (changes sign, or reaches zero). A condition
        exactly zero at ``t0`` is an event at ``t0`` (torchdiffeq's rule: the state returned is
        ``y0``) when ``direction`` is 0; with a direction, it is watched from its first nonzero
        value.
        Its parameters get gradients: those of an ``nn.Module`` and ``event_params``.
    reverse_time : bool, default False
        Integrate towards decreasing ``t``.
    direction : {0, 1, -1}, default 0
        Which crossings count: 0 either, 1 from negative to positive, -1 from positive to
        negative.
    solver, step, rtol, atol, adjoint, params, nfe, compile
        As for :func:`~torchode_adjoint.odeint`: fixed steps of ``step`` (default 0.1), or
        error-controlled ones of an embedded pair where ``rtol`` or ``atol`` is given; every
        gradient mode.
    event_params : iterable of Tensor, optional
        Tensors ``event_fn`` reads that should get a gradient (besides an ``nn.Module``'s
        parameters).
    max_steps : int, default 100,000
        The most steps the search takes before it gives up (no event found).

    Returns
    -------
    event_t : Tensor, 0-dim
        The event time, differentiable with respect to ``y0``, ``t0``, the dynamics' and the
        event function's parameters (the implicit function theorem at the returned state).
    solution : Tensor, shape (2, ...)
        The states at ``t0`` and at the event time (differentiable as ``odeint``'s, the event
        time's dependence included).

    Raises
    ------
    RuntimeError
        When no event occurs within ``max_steps`` steps; in the backward pass, when the
        condition has no time derivative along the solution at the root (the event time's
        gradient does not exist there).
    """
    y0, t0_t, sign, dyn_params, ev_params = _validate(
        func, y0, t0, event_fn, reverse_time, direction, params, event_params, max_steps
    )
    method, tableau, control = _method(solver, step, rtol, atol, t0_t.dtype)
    calls = [0]

    def counted(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return func(t, y)

    with torch.no_grad():
        ends, t_event, index = _search(
            counted, y0.detach(), float(t0_t.detach()), event_fn, method, step, control, sign,
            direction, max_steps,
        )  # fmt: skip
    searched = calls[0]
    if index < 0:  # the event at t0: the state there is y0
        if nfe is not None:
            nfe.forward, nfe.backward = searched, 0
        return t0_t.clone(), torch.stack([y0, y0])
    # The same steps again, in the gradient mode (one step where the event is in the first).
    # With a learnable t0 they are solved in the time since t0 (s = t - t0), so that moving t0
    # moves every step, as it moves the search's.
    t_event_t = t0_t.detach().new_tensor(t_event)
    solved, t0_s = cast(Any, func), t0_t.detach()
    if t0_t.requires_grad:
        if dyn_params is None and not isinstance(func, nn.Module):
            raise ValueError(
                "`params` is required when `func` is not an nn.Module (the tensors the "
                "memory-saving modes differentiate); pass params=() for none."
            )
        solved = _Shifted(func, t0_t)
        ends = [e - float(t0_s) for e in ends]
        t_event_t, t0_s = t_event_t - t0_s, torch.zeros_like(t0_s)
    layout: dict[str, Any] = {"controller": StepTo(ends)} if ends else {"step": None}
    sol: Any = odeint(
        solved, y0, torch.stack([t0_s, t_event_t]), solver=tableau, adjoint=adjoint,
        params=dyn_params, nfe=nfe, compile=compile, **layout,
    )  # fmt: skip
    # The event time: t0 + s_e, its dependence on t0 direct (the rest through the state).
    t_in = t0_t + (t_event - float(t0_t.detach())) if t0_t.requires_grad else t_event_t
    if nfe is not None:
        nfe.forward += searched
    event_t, y_event = _EventGradient.apply(event_fn, func, t_in, sol[-1], index, *ev_params)
    return event_t, torch.stack([sol[0], y_event])


def _validate(
    func: Any,
    y0: Any,
    t0: Any,
    event_fn: Any,
    reverse_time: bool,
    direction: int,
    params: Iterable[torch.Tensor] | None,
    event_params: Iterable[torch.Tensor] | None,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, float, Any, tuple[torch.Tensor, ...]]:
    if not isinstance(y0, torch.Tensor) or not (y0.is_floating_point() or y0.is_complex()):
        raise TypeError(
            f"`y0` must be a floating-point tensor for odeint_event, got {type(y0).__name__}; "
            "a structured state (tuple, list, dict) is not supported with events yet: "
            "flatten it into one tensor."
        )
    if not callable(event_fn):
        raise TypeError(f"`event_fn` must be callable as event_fn(t, y), got {event_fn!r}.")
    if direction not in (0, 1, -1):
        raise ValueError(f"`direction` must be 0 (either), 1 (up) or -1 (down), got {direction!r}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive int, got {max_steps!r}.")
    if isinstance(t0, torch.Tensor):
        if t0.numel() != 1:
            raise ValueError(
                f"`t0` must be one time (a 0-dim tensor), got shape {tuple(t0.shape)}."
            )
        t0_t = t0.reshape(()).to(dtype=_real(y0.dtype), device=y0.device)
    else:
        t0_t = torch.tensor(float(t0), dtype=_real(y0.dtype), device=y0.device)
    if not math.isfinite(float(t0_t.detach())):
        raise ValueError(f"`t0` must be finite, got {float(t0_t.detach())}.")
    ev_params = list(event_params) if event_params is not None else []
    if isinstance(event_fn, nn.Module):
        ev_params += [p for p in event_fn.parameters() if p.requires_grad]
    unique = tuple({id(p): p for p in ev_params}.values())
    _check_event_reads(event_fn, y0, t0_t, unique)
    dyn_params = None if params is None else tuple(params)
    return y0, t0_t, -1.0 if reverse_time else 1.0, dyn_params, unique


def captured_leaves(event_fn: EventFn, y0: torch.Tensor, t0: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that require grad which ``event_fn(t0, y0)`` reads besides ``t`` and ``y``
    (the leaves of its graph): what ``event_params`` must hold for their gradients."""
    with torch.enable_grad():
        g = event_fn(t0.detach(), y0.detach())
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"`event_fn` must return a tensor, got {type(g).__name__}.")
    if g.grad_fn is None:
        return []
    leaves = {}
    for node in graph_nodes(g.grad_fn, set()):
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves[id(variable)] = variable
    return list(leaves.values())


def _check_event_reads(
    event_fn: EventFn, y0: torch.Tensor, t0: torch.Tensor, declared: Sequence[torch.Tensor]
) -> None:
    """Raise where the condition reads a tensor that requires grad and is not declared: its
    gradient would be silently missing."""
    known = {id(p) for p in declared}
    for variable in captured_leaves(event_fn, y0, t0):
        if id(variable) not in known:
            raise ValueError(
                "`event_fn` reads a tensor that requires grad (shape "
                f"{tuple(variable.shape)}) that is neither a parameter of an nn.Module "
                "event_fn nor in `event_params`, so its gradient would be missing; pass it "
                "in `event_params=`."
            )


def _method(
    solver: str | ButcherTableau,
    step: float | None,
    rtol: float | None,
    atol: float | None,
    dtype: torch.dtype,
) -> tuple[Method, ButcherTableau, ErrorControl | None]:
    resolved = get_solver(solver)
    tableau = tableau_of(resolved)
    if tableau is None:
        raise ValueError(
            f"odeint_event takes a Runge--Kutta tableau, got solver={solver!r}; name one of "
            "available_solvers() other than 'reversible_heun'."
        )
    if rtol is None and atol is None:
        if step is None or not step > 0 or not math.isfinite(step):
            raise ValueError(f"`step` must be a positive float for fixed steps, got {step!r}.")
        return as_method(tableau), tableau, None
    if tableau.b_embedded is None:
        raise ValueError(
            f"`rtol`/`atol` need an embedded pair (e.g. solver='dopri5'), got {tableau.name!r}."
        )
    control = ErrorControl(
        rtol=DEFAULT_RTOL if rtol is None else float(rtol),
        atol=DEFAULT_ATOL if atol is None else float(atol),
        max_step=math.inf if step is None or step is DEFAULT_STEP else float(step),
    )
    return as_embedded(tableau), tableau, control


class _Open:
    """Steps from ``t0`` without an end: fixed ones of size ``h`` (signed), or, with ``sizer``,
    the error-controlled steps' path (a :class:`~torchode_adjoint.controllers.protocol.StepPath`
    with nothing left to end on)."""

    def __init__(self, like: torch.Tensor, t0: float, h: float, nodes: Sequence[float]) -> None:
        self.like, self.t0, self.h, self.nodes = like, t0, h, nodes
        self.direction = 1.0 if h > 0 else -1.0
        self.t_now = self.t_new = t0
        self.count = 0
        self.stopped = False
        self.size = abs(h)

    # The fixed controller: a Try per step, every one accepted.
    def start(self, carry: Any) -> Any:
        return carry

    def plan(self) -> Try | None:
        if self.stopped:
            return None
        self.t_new = self.t0 + (self.count + 1) * self.h
        h = self.t_new - self.t_now
        return Try(h, dense_stage_times(self.like, self.t_now, h, self.nodes), False)

    def judge(self, carry: Any, out: Stepped) -> bool:
        return True

    def passed(self, carry: Any) -> Any:
        self.t_now = self.t_new
        self.count += 1
        return carry

    # The path of error-controlled steps.
    def remaining(self) -> float:
        return math.inf

    def try_step(self, hh: float, last: bool) -> tuple[float, float, float]:
        self.size = hh
        self.t_new = self.t_now + self.direction * hh
        return hh, self.t_now, self.t_new

    def stage_times(self) -> tuple[tuple[torch.Tensor, ...], Step]:
        h = self.t_new - self.t_now
        return dense_stage_times(self.like, self.t_now, h, self.nodes), h

    def advance(self, last: bool, carry: Any) -> tuple[Any, bool]:
        self.t_now = self.t_new
        self.count += 1
        return carry, self.stopped


def _real(dtype: torch.dtype) -> torch.dtype:
    """The times' dtype for a state of ``dtype`` (float64 for complex128)."""
    return torch.empty((), dtype=dtype).real.dtype


class _Shifted(nn.Module):
    """``func`` in the time since ``t0``: ``(s, y) -> func(t0 + s, y)``, ``t0`` a tensor the
    memory-saving modes differentiate (an attribute that requires grad)."""

    def __init__(self, func: Any, t0: torch.Tensor) -> None:
        super().__init__()
        self.func = func
        self.t0 = t0

    def forward(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.func(self.t0 + s, y)  # type: ignore[no-any-return]


class _Given:
    """The stage times of one step, whatever its number."""

    def __init__(self, ts: tuple[torch.Tensor, ...]) -> None:
        self.ts = ts

    def of(self, g: int) -> tuple[torch.Tensor, ...]:
        return self.ts


def _search(
    func: Any,
    y0: torch.Tensor,
    t0: float,
    event_fn: EventFn,
    method: Method,
    step: float | None,
    control: ErrorControl | None,
    sign: float,
    direction: int,
    max_steps: int,
) -> tuple[list[float], float, int]:
    """The step ends before the event, the event time and the index of the condition that
    crossed (the earliest where several cross in one step)."""
    executor = Executor(method, None)
    nodes = method.nodes
    clock = torch.zeros((), dtype=_real(y0.dtype), device=y0.device)  # the times' dtype
    t0_t = clock.new_tensor(t0)
    ref = torch.sign(event_fn(t0_t, y0)).reshape(-1)
    if direction == 0 and bool((ref == 0).any()):
        return [], t0, -1  # torchdiffeq's rule: a condition zero at t0 is an event there
    ends: list[float] = []
    found: list[Any] = []
    if control is None:
        assert step is not None
        path = _Open(clock, t0, sign * step, nodes)
        controller: Any = path
    else:
        path = _Open(clock, t0, sign, nodes)
        sizer = StepSizeController(control, method.error_order or 1, clock.dtype)
        f0 = method.derivative(method.init(func, y0, t0_t))
        h = sizer.first_step(func, t0_t, y0, func(t0_t, y0) if f0 is None else f0, sign)

        def parts(before: Any, after: Any, error: Any) -> tuple[Any, ...]:
            return [error], [method.output(before)], [method.output(after)]

        controller = ErrorSteps(sizer, path, parts, h)

    def check(before: Any, out: Stepped, token: Any) -> Any:
        nonlocal ref
        t_new, y_new = path.t_new, method.output(out[0])
        g_new = event_fn(clock.new_tensor(t_new), y_new).reshape(-1)
        s_new = torch.sign(g_new)
        # A crossing: a condition with a sign that changed it, or reached zero.
        crossed = (ref != 0) & (s_new != ref)
        if direction:
            crossed = crossed & (ref == -direction)
        if bool(crossed.any()):
            found.append((path.t_now, t_new, before, crossed.nonzero().flatten().tolist()))
            path.stopped = True
        else:
            ends.append(t_new)
            if path.count + 1 >= max_steps:
                raise RuntimeError(
                    f"odeint_event found no event within `max_steps={max_steps:,}` steps "
                    f"(from t = {t0:.6g} to {t_new:.6g}); check `event_fn` and `direction`, "
                    "or pass a larger `max_steps`."
                )
            ref = torch.where(s_new != 0, s_new, ref)
        return out[0]

    run_steps(executor, func, method.init(func, y0, t0_t), controller, accepted=check)
    t_a, t_b, before, crossed = found[0]
    best = (math.inf, 0)
    for j in crossed:
        t_root = _locate(executor, func, before, t_a, t_b, event_fn, j, method)
        if (t_root - t_a) * sign < (best[0] - t_a) * sign or best[0] == math.inf:
            best = (t_root, j)
    t_event, index = best
    if ends and (t_event - ends[-1]) * sign <= 0.0:
        ends.pop()  # the root on the step's start: no step of zero length
    return ends, t_event, index


def _locate(
    executor: Executor,
    func: Any,
    carry: Any,
    t_a: float,
    t_b: float,
    event_fn: EventFn,
    j: int,
    method: Method,
) -> float:
    """The root of condition ``j`` in the step from ``t_a`` to ``t_b`` (the Illinois method on
    the method's step of part of the size from ``carry``), to the times' resolution."""
    y_a = method.output(carry)
    like = torch.zeros((), dtype=_real(y_a.dtype), device=y_a.device)

    def g_at(t: float) -> float:
        if t == t_a:
            y = y_a
        else:
            ts = dense_stage_times(like, t_a, t - t_a, method.nodes)
            c = run_steps(executor, func, carry, FixedSteps(_Given(ts), [Leg(0, 0, 1, t - t_a)]))
            y = method.output(c)
        return float(event_fn(like.new_tensor(t), y).reshape(-1)[j])

    lo, hi = t_a, t_b
    g_lo, g_hi = g_at(lo), g_at(hi)
    if g_hi == 0.0:
        return hi
    eps = torch.finfo(like.dtype).eps
    side = 0
    for _ in range(_MAX_ROOT_ITERATIONS):
        if abs(hi - lo) <= 4.0 * eps * max(abs(lo), abs(hi), 1e-300):
            break
        t = hi - g_hi * (hi - lo) / (g_hi - g_lo)
        if not (min(lo, hi) < t < max(lo, hi)):
            t = 0.5 * (lo + hi)
        g_t = g_at(t)
        if g_t == 0.0:
            return t
        if (g_t > 0) == (g_hi > 0):  # the root lies between lo and t
            hi, g_hi = t, g_t
            if side == -1:
                g_lo *= 0.5  # Illinois: the retained end's value halved
            side = -1
        else:
            lo, g_lo = t, g_t
            if side == 1:
                g_hi *= 0.5
            side = 1
    return hi


class _EventGradient(torch.autograd.Function):
    """The event time and the state there, with the implicit function theorem's gradient.

    With ``D = dg/dt + dg/dy . f`` at the root, the event time moves by ``-(dg/dy dy +
    dg/dphi dphi) / D``; a loss ``L(t_e, y(t_e))`` then sends the solve's state the gradient
    ``dL/dy - c dg/dy`` and the condition's parameters ``-c dg/dphi``, where ``c = (dL/dt_e
    + dL/dy . f) / D``; the event time's input (``t0 + s_e`` where ``t0`` is learnable) gets
    ``dL/dt - c dg/dt``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        event_fn: EventFn,
        func: Any,
        t_event: torch.Tensor,
        y_event: torch.Tensor,
        index: int,
        *event_params: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.event_fn, ctx.func, ctx.index = event_fn, func, index
        ctx.save_for_backward(t_event, y_event, *event_params)
        return t_event.detach().clone(), y_event.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_t: torch.Tensor | None, grad_y: torch.Tensor | None) -> Any:
        t_event, y_event, *phi = ctx.saved_tensors
        with torch.enable_grad():
            t = t_event.detach().requires_grad_(True)
            y = y_event.detach().requires_grad_(True)
            g = ctx.event_fn(t, y).reshape(-1)[ctx.index]
            # The graph kept: the condition may read tensors whose graph the caller reuses.
            grads = torch.autograd.grad(g, [t, y, *phi], allow_unused=True, retain_graph=True)
        with torch.no_grad():
            f = ctx.func(t_event.detach(), y_event.detach())
        g_t = grads[0] if grads[0] is not None else torch.zeros_like(t_event)
        g_y = grads[1] if grads[1] is not None else torch.zeros_like(y_event)
        rate = g_t + torch.sum(g_y * f)
        if float(rate) == 0.0:
            raise RuntimeError(
                f"the event condition has no time derivative along the solution at its root "
                f"t = {float(t_event):.6g} (dg/dt + dg/dy . f = 0: it touches zero instead of "
                "crossing), so the event time has no gradient there; reformulate `event_fn` "
                "so that it crosses zero with a nonzero rate."
            )
        total = torch.zeros_like(t_event) if grad_t is None else grad_t
        if grad_y is not None:
            total = total + torch.sum(grad_y * f)
        c = total / rate
        new_grad_y = -c * g_y if grad_y is None else grad_y - c * g_y
        # The event time's direct dependence (on t0, when it is learnable): dL/dt - c dg/dt.
        new_grad_t = -c * g_t if grad_t is None else grad_t - c * g_t
        phi_grads = [None if gp is None else -c * gp for gp in grads[2:]]
        return (None, None, new_grad_t, new_grad_y, None, *phi_grads)
