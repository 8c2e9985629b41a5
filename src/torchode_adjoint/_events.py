"""``odeint_event``: a solve that stops where a condition crosses zero, with a differentiable
event time.

Two passes. The search (no graph) steps the method through the one loop from ``t0`` until the
condition ``event_fn(t, y)`` changes sign over an accepted step, then locates the root inside
that step on the method's own step from its start (a step of size ``theta h``: the solution the
second pass computes there) with the Illinois method. The second pass runs the same steps in the
chosen gradient mode (``odeint`` with ``StepTo`` their ends, then the partial last step), and
the event time comes from one differentiated Newton step on the root of that computed solution
(the implicit function theorem's gradient). Without a gradient (``no_grad``) the search's own
result is returned and there is no second pass. Recorded events (``terminal=False``) are a chain
of such searches, each starting at the event before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, cast

import torch

from ._compiled import Compile
from ._dynamics import NFECounter
from ._executor import Executor, StepCallbacks, dense_stage_times, run_steps
from ._odeint import odeint
from ._prepare import ModeName, _resolve_params, resolve_mode
from ._structure import StateStructure, StructuredDynamics
from .controllers.error import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    ErrorControl,
    ErrorSteps,
    StepSizeController,
)
from .controllers.fixed import DEFAULT_STEP, FixedSteps, Leg, StepTo
from .controllers.protocol import Try
from .modes.adjoint import ContinuousAdjoint
from .modes.base import GradientMode
from .solvers.methods import as_embedded, as_method, tableau_of
from .solvers.protocol import Method, Step, Stepped
from .solvers.registry import get_solver
from .solvers.tableau import ButcherTableau

__all__ = ["odeint_event", "EventResult"]

EventFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Root-finder iterations at most (the Illinois method halves the bracket at least every
#: other iteration; 200 is far past the dtype's resolution).
_MAX_ROOT_ITERATIONS = 200


def odeint_event(
    func: Callable[[torch.Tensor, Any], Any],
    y0: Any,
    t0: torch.Tensor | float,
    *,
    event_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    reverse_time: bool = False,
    direction: int = 0,
    terminal: bool = True,
    t_end: float | None = None,
    solver: str | ButcherTableau = "euler",
    step: float | None = DEFAULT_STEP,
    rtol: float | None = None,
    atol: float | None = None,
    adjoint: bool | ModeName | GradientMode = True,
    params: Iterable[torch.Tensor] | None = None,
    max_steps: int = 100_000,
    nfe: NFECounter | None = None,
    compile: bool | Compile = False,
) -> EventResult:
    """Integrate ``dy/dt = func(t, y)`` from ``t0`` until ``event_fn(t, y)`` crosses zero;
    torchdiffeq's ``odeint_event`` signature and return value.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
    y0 : Tensor, or a tuple, list or dict of Tensors
        The initial state. A structured one is solved as its flat vector (as ``odeint``
        does); ``func`` and ``event_fn`` get it in its structure, and ``solution`` has it.
    t0 : Tensor (0-dim) or float
        The start time; its gradient flows where it requires grad.
    event_fn : callable ``(t, y) -> Tensor``
        The condition: a tensor of any shape, each element a condition of its own; the event is
        the first time any of them crosses zero (changes sign, or reaches zero). A condition
        exactly zero at ``t0`` is an event at ``t0`` (torchdiffeq's rule: the state returned is
        ``y0``) when ``direction`` is 0; with a direction, it is watched from its first nonzero
        value.
        Every tensor it reads gets its gradient (its parameters, the tensors it closes over).
    reverse_time : bool, default False
        Integrate towards decreasing ``t``.
    direction : {0, 1, -1}, default 0
        Which crossings count: 0 either, 1 from negative to positive, -1 from positive to
        negative.
    terminal : bool, default True
        Stop at the first event; False records every event up to ``t_end`` (each event's
        steps starting where the one before it fired).
    t_end : float, optional
        Where the solve ends if no (further) event comes first; required with
        ``terminal=False``. Without it a terminal solve runs until its event.
    solver, step, rtol, atol, adjoint, params, nfe, compile
        As for :func:`~torchode_adjoint.odeint`: fixed steps of ``step`` (default 0.1), or
        error-controlled ones of an embedded pair where ``rtol`` or ``atol`` is given; every
        gradient mode. ``nfe.forward`` counts every evaluation: the search's, the second
        pass's, and with fixed steps and ``t_end`` those of the pass to ``t_end`` that watches
        the condition (an event that never fires costs that pass alone; see the events page).
    max_steps : int, default 100,000
        The most steps the search takes before it gives up (no event found, or ``t_end`` not
        reached).

    Returns
    -------
    EventResult
        A pair ``(event_t, solution)``, with ``.fired`` (whether an event occurred; False: the
        solve reached ``t_end``).
    event_t : Tensor, 0-dim (``terminal=False``: shape (K,), the K events in order)
        The event time (``t_end`` where none fired), differentiable with respect to ``y0``,
        ``t0``, the dynamics' and the event function's parameters: the implicit function
        theorem's gradient for the root of the computed solution (one Newton step on it; see
        the events page).
    solution : Tensor, shape (2, ...) (``terminal=False``: (K + 2, ...))
        The states at ``t0`` and at the event time (``terminal=False``: at ``t0``, at each
        event and at ``t_end``), differentiable as ``odeint``'s with the event times'
        dependence included; for a structured ``y0``, its structure with each tensor so
        stacked.

    Raises
    ------
    RuntimeError
        When no event occurs (or ``t_end`` is not reached) within ``max_steps`` steps; when a
        gradient is wanted and the
        condition has no time derivative along the solution at the root (the event time has
        no gradient there).
    """
    structure = None
    if not isinstance(y0, torch.Tensor):  # a tuple, list or dict: solved as its flat vector
        structure = StateStructure.of(y0)  # raises, naming a part that is not a tensor
        assert structure is not None
        # The tensors to differentiate are the user's function's (a plain function in a mode
        # that needs them raises here, as odeint does).
        params = _resolve_params(func, params, resolve_mode(adjoint))
        func, event_fn = StructuredDynamics(func, structure), _on_parts(event_fn, structure)
        y0 = structure.flatten(y0)
    y0, t0_t, sign, dyn_params, g0 = _validate(
        func, y0, t0, event_fn, reverse_time, direction, params, max_steps, adjoint
    )
    method, tableau, control = _method(solver, step, rtol, atol, t0_t.dtype)
    calls = [0]

    def counted(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return func(t, y)

    t_stop = _check_end(terminal, t_end, float(t0_t.detach()), sign)
    ref = torch.sign(g0).reshape(-1)  # each condition's sign at t0
    out_t: list[torch.Tensor] = []
    out_y: list[torch.Tensor] = []
    evaluations = 0
    if direction == 0 and bool((ref == 0).any()):
        # torchdiffeq's rule: a condition zero at t0 is an event there (t0, y0); recorded,
        # the solve goes on, the condition watched from its first nonzero value.
        out_t.append(t0_t.clone())
        out_y.append(y0)
    segment = Segment(
        func, counted, event_fn, method, tableau, step, control, sign, direction, adjoint,
        dyn_params, compile, calls,
    )  # fmt: skip
    t_cur, y_cur, steps_left = t0_t, y0, max_steps
    final: tuple[torch.Tensor, torch.Tensor] | None = None
    while not (terminal and out_t):
        if t_stop is not None and float(t_cur.detach()) == t_stop:  # an event on t_end
            final = (t_cur, y_cur)
            break
        found = segment.run(t_cur, y_cur, ref, t_stop, steps_left, nfe)
        if nfe is not None:
            evaluations += nfe.forward
        if found[0] == "end":  # t_end reached: the state there
            final = (found[1], found[2])
            break
        _, t_cur, y_cur, ref, taken = found
        steps_left -= taken
        out_t.append(t_cur)
        out_y.append(y_cur)
    if nfe is not None:
        nfe.forward = evaluations + calls[0]

    def result(event_t: torch.Tensor, rows: list[torch.Tensor], fired: bool) -> EventResult:
        solution = torch.stack(rows)
        return EventResult(
            event_t, solution if structure is None else structure.unflatten(solution), fired
        )

    if terminal:
        if out_t:
            return result(out_t[0], [y0, out_y[0]], True)
        assert final is not None
        return result(final[0], [y0, final[1]], False)
    if final is None:  # recorded up to an event on t_end itself
        final = (out_t[-1], out_y[-1])
    event_ts = torch.stack(out_t) if out_t else t0_t.detach().new_zeros((0,))
    return result(event_ts, [y0, *out_y, final[1]], bool(out_t))


def _on_parts(event_fn: Callable[..., Any], structure: StateStructure) -> EventFn:
    """``event_fn`` of a structured state as a condition on its flat vector."""

    def condition(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return event_fn(t, structure.unflatten(y))

    return condition


class EventResult(tuple):  # type: ignore[type-arg]
    """What :func:`odeint_event` returns: the pair ``(event_t, solution)``, unpacked as
    torchdiffeq's is (``t, sol = odeint_event(...)``), with ``fired``: whether an event occurred
    (False where the solve reached ``t_end`` first).

    Parameters
    ----------
    event_t : Tensor
    solution : Tensor, or the structure of a structured state
    fired : bool
    """

    fired: bool

    def __new__(cls, event_t: torch.Tensor, solution: Any, fired: bool) -> EventResult:
        out = super().__new__(cls, (event_t, solution))
        out.fired = fired
        return out


class Segment:
    """One terminal search and its second pass: from ``(t_cur, y_cur)`` (the start, or the
    previous event: differentiable tensors) to the first crossing. Recorded events are a chain
    of these, each starting where the last one fired, so that every event time depends on the
    ones before it exactly as the steps do.

    With a gradient, fixed steps and ``t_end``, the steps to ``t_end`` are first taken in the
    gradient mode with the condition checked between them (``one_pass``; off: the search first,
    as for error-controlled steps): an event that never fires then costs that one pass."""

    #: Take fixed steps to ``t_end`` in the gradient mode first (False: search first; for the
    #: events benchmark's comparison).
    one_pass: ClassVar[bool] = True

    def __init__(
        self, func: Any, search: Any, event_fn: EventFn, method: Method, tableau: ButcherTableau,
        step: float | None, control: ErrorControl | None, sign: float, direction: int,
        adjoint: Any, dyn_params: Any,
        compile: bool | Compile, calls: list[int],
    ) -> None:  # fmt: skip
        self.func, self.event_fn, self.method, self.tableau = func, event_fn, method, tableau
        self.search = search  # the dynamics counting the search's evaluations (in ``calls``)
        self.calls = calls
        self.step, self.control, self.sign, self.direction = step, control, sign, direction
        self.adjoint, self.dyn_params = adjoint, dyn_params
        self.compile = compile

    def run(
        self,
        t_cur: torch.Tensor,
        y_cur: torch.Tensor,
        ref: torch.Tensor,
        t_end: float | None,
        max_steps: int,
        nfe: NFECounter | None,
    ) -> tuple[Any, ...]:
        """``("event", time, state, signs after it, steps taken)``: the event's time and state
        with their gradients; ``("end", t_end, state there)`` where ``t_end`` comes first."""
        t_start = float(t_cur.detach())
        graph = torch.is_grad_enabled()
        done: list[float] = []
        if (
            self.one_pass and t_end is not None and not _has_callbacks(self)
            and not y_cur.is_complex()
        ):  # fmt: skip
            result = self._one_pass(t_cur, y_cur, ref, t_start, t_end, max_steps, nfe)
            if result[0] == "end":
                return result
            # It fired: search on from the start of the step it fired in.
            _, done, t_start_search, y_start_search, ref = result
        else:
            t_start_search, y_start_search = t_start, y_cur.detach()
        with torch.no_grad():
            ends, event, y_found = _search(
                self.search, y_start_search, t_start_search, self.event_fn, self.method,
                self.step, self.control, self.sign, self.direction, max_steps - len(done),
                t_end, ref,
            )  # fmt: skip
        ends = done + ends
        # Without a gradient the search's own states are the result: no second pass.
        if nfe is not None and not graph:
            nfe.forward = nfe.backward = 0
        if event is None:
            assert t_end is not None
            if not graph:
                return "end", t_cur.new_tensor(t_end), y_found
            return ("end", *_to_end(self, y_cur, t_cur, t_start, ends, t_end, nfe))
        t_e, j = event
        if graph:
            event_t, y_event = _differentiable_event(self, y_cur, t_cur, t_start, ends, t_e, j, nfe)
        else:
            event_t, y_event = t_cur.new_tensor(t_e), y_found
        with torch.no_grad():
            after = torch.sign(self.event_fn(event_t.detach(), y_event.detach())).reshape(-1)
        flipped = ref.clone()
        flipped[j] = -ref[j]  # it crossed: watched from the other side now
        after = torch.where(after != 0, after, ref)
        after[j] = flipped[j]
        return "event", event_t, y_event, after, len(ends) + 1

    def _one_pass(
        self,
        t_cur: torch.Tensor,
        y_cur: torch.Tensor,
        ref: torch.Tensor,
        t_start: float,
        t_end: float,
        max_steps: int,
        nfe: NFECounter | None,
    ) -> tuple[Any, ...]:
        """The steps to ``t_end`` in the gradient mode (the search's fixed steps, or with error
        control ``odeint``'s own solve at the search's tolerances), the condition checked at
        each (accepted) step's end: where it never crosses, that pass is the result
        (``("end", t_end, state)``: one pass, no search); where it does, the pass stops, and
        ``("fired", the step ends before the window it crossed in, the window's start, the
        state there, the signs there)`` lets the search go on from there."""
        fixed = self.control is None
        ends: list[float] = []
        if fixed:
            assert self.step is not None
            h, k = self.sign * self.step, 0
            while not ends or ends[-1] != t_end:  # the search's grid (see _Open.plan)
                t_new = t_start + (k + 1) * h
                ends.append(t_end if (t_new - t_end) * self.sign >= -1e-9 * abs(h) else t_new)
                k += 1
                if k > max_steps:  # the search raises, naming it
                    return "fired", [], t_start, y_cur.detach(), ref
        # Fixed steps' starts are known; error-controlled ones are recorded as accepted.
        watch = _Watch(self.event_fn, ref, self.direction, t_start, y_cur.detach(), not fixed)
        watched = _watched(self.func, watch, "callback_step" if fixed else "callback_accept_step")
        try:
            if fixed:
                end, y_end = _to_end(self, y_cur, t_cur, t_start, ends, t_end, nfe, func=watched)
            else:
                end, y_end = self._controlled_to_end(watched, y_cur, t_cur, t_end, max_steps, nfe)
            watch.finish(end, y_end)
        except _Crossed:
            self.calls[0] += watch.evaluations  # the stopped pass's evaluations
            before = ends[: watch.start] if fixed else watch.starts[1 : watch.start + 1]
            return "fired", before, watch.t_start, watch.y_start, watch.ref_start
        return "end", end, y_end

    def _controlled_to_end(
        self,
        func: Any,
        y_cur: torch.Tensor,
        t_cur: torch.Tensor,
        t_end: float,
        max_steps: int,
        nfe: NFECounter | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``t_end`` and the state there: ``odeint``'s error-controlled solve in the gradient
        mode at the search's tolerances."""
        control = self.control
        assert control is not None
        end = t_cur.detach().new_tensor(t_end)
        sol = odeint(
            func, y_cur, torch.stack([t_cur, end]), solver=self.tableau, rtol=control.rtol,
            atol=control.atol, step=None if math.isinf(control.max_step) else control.max_step,
            adjoint=self.adjoint, params=self.dyn_params, compile=self.compile, nfe=nfe,
            max_steps=max_steps,
        )  # fmt: skip
        return end, cast(Any, sol)[-1]


class _Crossed(Exception):
    """A condition crossed zero in the last step (the pass that watched it stops)."""


class _Watch:
    """The conditions evaluated at each step's end (at the next step's start, in
    ``callback_step``, and at the pass's end, in :meth:`finish`), their signs read on the host
    once per :attr:`WINDOW` steps (one read, no tensor work besides the conditions): raises
    :class:`_Crossed` where one crossed zero (or is not finite, or changed its number) in the
    window, keeping the window's first step (``start``), the time and state there and the
    signs (``t_start``, ``y_start``, ``ref_start``), from which the search goes on."""

    #: Steps per host read; an event costs at most this many steps of the search again.
    WINDOW = 8

    def __init__(
        self, event_fn: EventFn, ref: torch.Tensor, direction: int, t0: float, y0: torch.Tensor,
        record: bool = False,
    ) -> None:  # fmt: skip
        self.event_fn, self.direction, self.like = event_fn, direction, ref
        self.ref: list[float] = ref.tolist()
        self.pending: list[torch.Tensor] = []
        self.steps = self.evaluations = self.start = 0
        self.t_start, self.y_start, self.ref_start = t0, y0, ref
        # Each step's start (``record``: error-controlled steps, whose error the loop reads on
        # the host anyway); fixed steps' are known beforehand.
        self.record = record
        self.starts: list[float] = []

    def callback_step(self, t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
        """Before each step (or, for error-controlled steps, after each accepted one): the
        step's start ``t0``, the state there ``y0``."""
        if self.record:
            self.starts.append(float(t0.detach()))
        if self.steps:  # the first step starts where the conditions are known
            with torch.no_grad():
                self.pending.append(self.event_fn(t0.detach(), y0.detach()).reshape(-1))
                if len(self.pending) == self.WINDOW:
                    self._read()
                    self.start, self.t_start = self.steps, float(t0.detach())
                    self.y_start = y0.detach().clone()  # the carry may be updated in place
                    self.ref_start = self.like.new_tensor(self.ref)
        self.steps += 1

    def finish(self, t: torch.Tensor, y: torch.Tensor) -> None:
        """The conditions at the pass's end, and the window's read."""
        with torch.no_grad():
            self.pending.append(self.event_fn(t.detach(), y.detach()).reshape(-1))
            self._read()

    def _read(self) -> None:
        rows, self.pending = self.pending, []
        if any(r.shape != self.like.shape for r in rows):
            raise _Crossed  # the search raises, naming it
        ref, direction = self.ref, self.direction
        for row in torch.stack(rows).tolist():
            for c, v in enumerate(row):
                if not math.isfinite(v):
                    raise _Crossed  # the search raises, naming it
                s = (v > 0) - (v < 0)
                if ref[c] != 0 and s != ref[c] and (not direction or ref[c] == -direction):
                    raise _Crossed
                if s != 0:
                    ref[c] = s


def _watched(func: Any, watch: _Watch, callback: str = "callback_step") -> Any:
    """``func`` with ``watch`` as its step callback ``callback`` (``callback_step`` before each
    fixed step, ``callback_accept_step`` after each accepted one), counting its evaluations; a
    module where ``func`` is one (its tensors are found as the module's own)."""
    module = isinstance(func, torch.nn.Module)
    out = _WatchedModule(func, watch) if module else _Watched(func, watch)
    object.__setattr__(out, callback, watch.callback_step)
    return out


class _Watched:
    def __init__(self, func: Any, watch: _Watch) -> None:
        self.func, self.watch = func, watch

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.watch.evaluations += 1
        return self.func(t, y)


class _WatchedModule(torch.nn.Module):
    def __init__(self, func: torch.nn.Module, watch: _Watch) -> None:
        super().__init__()
        self.func, self.watch = func, watch

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.watch.evaluations += 1
        return self.func(t, y)

    # Called as a function: a module's hooks would cost more than the evaluation of a small
    # system (``func``'s own are kept).
    __call__ = forward


def _has_callbacks(seg: Segment) -> bool:
    """Whether the dynamics define step callbacks (the one-pass path would call them for steps
    the pass that differentiates the event calls them for again)."""
    return any(hasattr(seg.func, name) for name in StepCallbacks.NAMES)


def _signs(g: torch.Tensor, ref: torch.Tensor, t: float) -> torch.Tensor:
    """The signs of the conditions ``g`` at ``t``, or an error where they are not ``ref``'s
    number or not finite."""
    g = g.reshape(-1)
    if g.shape != ref.shape or not bool(torch.isfinite(g).all()):
        raise RuntimeError(
            f"`event_fn` returned {g.numel()} value(s) at t = {t:.6g}, "
            + ("not all finite" if g.shape == ref.shape else f"not {ref.numel()}")
            + "; it must return the same number of finite conditions at every time."
        )
    return torch.sign(g)


def _crossing(ref: torch.Tensor, s_new: torch.Tensor, direction: int) -> torch.Tensor:
    """Which conditions crossed: a sign that changed, or reached zero (in ``direction``)."""
    crossed = (ref != 0) & (s_new != ref)
    if direction:
        crossed = crossed & (ref == -direction)
    return crossed


def _check_end(terminal: bool, t_end: float | None, t0: float, sign: float) -> float | None:
    if t_end is None:
        if terminal:
            return None
        raise ValueError("`terminal=False` records every event up to `t_end`: pass t_end.")
    if not math.isfinite(float(t_end)) or (float(t_end) - t0) * sign <= 0:
        raise ValueError(
            f"`t_end={float(t_end):.6g}` must be finite and lie "
            + ("before" if sign < 0 else "after")
            + f" t0 = {t0:.6g} (`reverse_time={sign < 0}`)."
        )
    return float(t_end)


def _to_end(
    seg: Segment,
    y_cur: torch.Tensor,
    t_cur: torch.Tensor,
    t_start: float,
    ends: list[float],
    t_end: float,
    nfe: NFECounter | None,
    func: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``t_end`` and the state there: the search's steps again in the gradient mode, every step
    end ``t_cur`` plus a constant (they move with a learnable start, as the search's do) but
    ``t_end`` itself, which the last step ends on (``func``: the dynamics, default the
    segment's)."""
    inner = [e for e in ends if e != t_end]

    def at(t: float) -> torch.Tensor:
        return t_cur + (t - t_start) if t_cur.requires_grad else t_cur.new_tensor(t)

    end = t_cur.detach().new_tensor(t_end)
    times = [t_cur, at(inner[-1]), end] if inner else [t_cur, end]
    layout: dict[str, Any] = {"controller": StepTo(inner[:-1])} if inner[:-1] else {"step": None}
    sol = odeint(
        seg.func if func is None else func, y_cur, torch.stack(times), solver=seg.tableau,
        adjoint=seg.adjoint,
        params=seg.dyn_params, compile=seg.compile, nfe=nfe, **layout,
    )  # fmt: skip
    return end, cast(Any, sol)[-1]


def _differentiable_event(
    seg: Segment,
    y_cur: torch.Tensor,
    t_cur: torch.Tensor,
    t_start: float,
    ends: list[float],
    t_e: float,
    j: int,
    nfe: NFECounter | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The event's time and state with their gradients: the search's steps again in the
    gradient mode to the last step end ``t_n`` (``StepTo`` the ends), then the last, partial
    step ``Phi`` from ``t_n`` to the event, and one Newton step on the discrete root,

        T = t_e - g(t_e, Phi(t_e)) / D,    D = d/dt g(t, Phi(t)) at t_e (a constant),

    whose value is ``t_e`` (``g`` vanishes there to the root's tolerance) and whose gradient is
    the implicit function theorem's for the root of the computed solution; the state is
    ``Phi(T)``. Every time is ``t_cur`` plus a constant, so that moving a learnable start
    (``t0``, or the previous event of a recorded chain) moves every step as it moves the
    search's (the steps are fractions of their intervals)."""
    func, event_fn = seg.func, seg.event_fn
    kw: dict[str, Any] = {
        "solver": seg.tableau, "adjoint": seg.adjoint, "params": seg.dyn_params,
        "compile": seg.compile,
    }  # fmt: skip

    def at(t: float) -> torch.Tensor:  # ``t`` as t_cur plus a constant
        return t_cur + (t - t_start) if t_cur.requires_grad else t_cur.new_tensor(t)

    counted = [NFECounter() for _ in range(3)]
    t_last, y_last = t_start, y_cur
    if ends:
        t_last = ends[-1]
        layout: dict[str, Any] = {"step": None}
        if len(ends) > 1:
            layout = {"controller": StepTo(ends[:-1])}
        t_pass = torch.stack([at(t_start), at(t_last)])
        y_last = cast(Any, odeint(func, y_cur, t_pass, nfe=counted[0], **kw, **layout))[-1]
    start = at(t_last)

    def last_step(y: torch.Tensor, end: torch.Tensor, nfe: NFECounter | None, **more: Any) -> Any:
        t_pair = torch.stack([start if end.requires_grad else start.detach(), end])
        return cast(Any, odeint(func, y, t_pair, step=None, nfe=nfe, **{**kw, **more}))[-1]

    # D: the condition's total derivative in the event time along the last step (no graph
    # kept: a constant of the Newton step).
    with torch.enable_grad():
        leaf = t_cur.new_tensor(t_e).requires_grad_(True)
        y_probe = last_step(y_last.detach(), leaf, None, adjoint="backprop", compile=False)
        (rate,) = torch.autograd.grad(event_fn(leaf, y_probe).reshape(-1)[j], leaf)
    t_event = at(t_e)
    g_e = event_fn(t_event, last_step(y_last, t_event, counted[1])).reshape(-1)[j]
    wanted = torch.is_grad_enabled() and g_e.requires_grad
    if wanted and float(rate) == 0.0:
        raise RuntimeError(
            f"the event condition has no time derivative along the solution at its root "
            f"t = {t_e:.6g} (d/dt g(t, y(t)) = 0: it touches zero instead of crossing), so the "
            "event time has no gradient there; reformulate `event_fn` so that it crosses zero "
            "with a nonzero rate."
        )
    if wanted:
        t_event = t_event - g_e / rate
    y_event = last_step(y_last, t_event, counted[2])
    if nfe is not None:
        nfe.forward = sum(c.forward for c in counted)
        nfe.backward = 0
    return t_event, y_event


def _validate(
    func: Any,
    y0: Any,
    t0: Any,
    event_fn: Any,
    reverse_time: bool,
    direction: int,
    params: Iterable[torch.Tensor] | None,
    max_steps: int,
    adjoint: object,
) -> tuple[torch.Tensor, torch.Tensor, float, Any, torch.Tensor]:
    if not isinstance(y0, torch.Tensor) or not (y0.is_floating_point() or y0.is_complex()):
        raise TypeError(
            f"`y0` must be a floating-point tensor (or a tuple, list or dict of them) for "
            f"odeint_event, got {type(y0).__name__} of {getattr(y0, 'dtype', None)}."
        )
    if not callable(event_fn):
        raise TypeError(f"`event_fn` must be callable as event_fn(t, y), got {event_fn!r}.")
    if direction not in (0, 1, -1):
        raise ValueError(f"`direction` must be 0 (either), 1 (up) or -1 (down), got {direction!r}.")
    if isinstance(adjoint, ContinuousAdjoint):
        given = [n for n in ("rtol", "atol") if getattr(adjoint, n) is not None]
        if given or callable(adjoint.norm):
            raise ValueError(
                f"`ContinuousAdjoint({(given or ['norm'])[0]}=...)` sets the backward pass's "
                "error control, which odeint_event does not take: its backward pass takes the "
                "forward's steps in reverse (or, for an error-controlled event that never fires, "
                "controls them at the forward's tolerances): drop it."
            )
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
    with torch.enable_grad():
        g = event_fn(t0_t.detach(), y0.detach())
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"`event_fn` must return a tensor, got {type(g).__name__}.")
    if g.numel() == 0 or g.is_complex():
        raise ValueError(
            "`event_fn` must return a real tensor with at least one condition, got shape "
            f"{tuple(g.shape)} and dtype {g.dtype} (take `.real` of a complex condition)."
        )
    if not bool(torch.isfinite(g.detach()).all()):
        raise ValueError(f"`event_fn` returned a non-finite value at t0 = {float(t0_t):.6g}.")
    dyn_params = None if params is None else tuple(params)
    return y0, t0_t, -1.0 if reverse_time else 1.0, dyn_params, g.detach()


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
    """Steps from ``t0`` to ``t_end`` (None: without an end): fixed ones of size ``h``
    (signed), or, with an error-controlled controller, their path (a
    :class:`~torchode_adjoint.controllers.protocol.StepPath` ending on ``t_end``)."""

    def __init__(
        self, like: torch.Tensor, t0: float, h: float, nodes: Sequence[float], t_end: float | None
    ) -> None:
        self.like, self.t0, self.h, self.nodes, self.t_end = like, t0, h, nodes, t_end
        self.direction = 1.0 if h > 0 else -1.0
        self.t_now = self.t_new = t0
        self.count = 0
        self.stopped = self.last = False

    # The fixed controller: a Try per step, every one accepted.
    def start(self, carry: Any) -> Any:
        return carry

    def plan(self) -> Try | None:
        if self.stopped:
            return None
        self.t_new = self.t0 + (self.count + 1) * self.h
        end = self.t_end
        if end is not None and (self.t_new - end) * self.direction >= -1e-9 * abs(self.h):
            self.t_new, self.last = end, True  # the last step ends on t_end
        h = self.t_new - self.t_now
        return Try(h, dense_stage_times(self.like, self.t_now, h, self.nodes), False)

    def judge(self, carry: Any, out: Stepped) -> bool:
        return True

    def passed(self, carry: Any) -> Any:
        self.t_now = self.t_new
        self.count += 1
        self.stopped = self.stopped or self.last
        return carry

    # The path of error-controlled steps.
    def remaining(self) -> float:
        return math.inf if self.t_end is None else abs(self.t_end - self.t_now)

    def try_step(self, hh: float, last: bool) -> tuple[float, float, float]:
        self.last = last
        if last:
            assert self.t_end is not None
            self.t_new = self.t_end
            return abs(self.t_end - self.t_now), self.t_now, self.t_end
        self.t_new = self.t_now + self.direction * hh
        return hh, self.t_now, self.t_new

    def stage_times(self) -> tuple[tuple[torch.Tensor, ...], Step]:
        h = self.t_new - self.t_now
        return dense_stage_times(self.like, self.t_now, h, self.nodes), h

    def advance(self, last: bool, carry: Any) -> tuple[Any, bool]:
        self.t_now = self.t_new
        self.count += 1
        return carry, self.stopped or last


def _real(dtype: torch.dtype) -> torch.dtype:
    """The times' dtype for a state of ``dtype`` (float64 for complex128)."""
    return torch.empty((), dtype=dtype).real.dtype


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
    t_end: float | None,
    ref: torch.Tensor,
) -> tuple[list[float], tuple[float, int] | None, torch.Tensor]:
    """The search from ``t0`` to the first crossing (``ref``: each condition's sign at ``t0``,
    0 where it is watched from its first nonzero value): the step ends before it and the event
    ``(time, condition)``, the earliest where several cross in one step; None where ``t_end``
    comes first; and the state there (the event's, or ``t_end``'s), without a graph."""
    executor = Executor(method, None)
    nodes = method.nodes
    clock = _clock(y0)  # the times' dtype
    t0_t = clock.new_tensor(t0)
    ends: list[float] = []
    found: list[Any] = []
    if control is None:
        assert step is not None
        path = _Open(clock, t0, sign * step, nodes, t_end)
        controller: Any = path
    else:
        path = _Open(clock, t0, sign, nodes, t_end)
        sizer = StepSizeController(control, method.error_order or 1, clock.dtype)
        f0 = method.derivative(method.init(func, y0, t0_t))
        h = sizer.first_step(func, t0_t, y0, func(t0_t, y0) if f0 is None else f0, sign)

        def parts(before: Any, after: Any, error: Any) -> tuple[Any, ...]:
            return [error], [method.output(before)], [method.output(after)]

        controller = ErrorSteps(sizer, path, parts, h)

    def check(before: Any, out: Stepped, token: Any) -> Any:
        nonlocal ref
        t_new, y_new = path.t_new, method.output(out[0])
        s_new = _signs(event_fn(clock.new_tensor(t_new), y_new), ref, t_new)
        crossed = _crossing(ref, s_new, direction)
        if bool(crossed.any()):
            found.append((path.t_now, t_new, before, crossed.nonzero().flatten().tolist()))
            path.stopped = True
            return out[0]
        ends.append(t_new)
        if path.count + 1 >= max_steps and not path.last:
            raise RuntimeError(
                f"odeint_event took `max_steps={max_steps:,}` steps (from t = {t0:.6g} to "
                f"{t_new:.6g}) without "
                + ("an event" if t_end is None else "reaching `t_end`")
                + "; check `event_fn` and `direction`, or pass a larger `max_steps`."
            )
        ref = torch.where(s_new != 0, s_new, ref)
        return out[0]

    last = run_steps(executor, func, method.init(func, y0, t0_t), controller, accepted=check)
    if not found:
        return ends, None, method.output(last)
    t_a, t_b, before, crossed = found[0]
    roots = [(_locate(executor, func, before, t_a, t_b, event_fn, j, method), j) for j in crossed]
    event = min(roots, key=lambda r: (r[0] - t_a) * sign)
    if ends and (event[0] - ends[-1]) * sign <= 0.0:
        ends.pop()  # the root on the step's start: no step of zero length
    y_event = method.output(_partial(executor, func, before, t_a, event[0], method))
    return ends, event, y_event


def _partial(
    executor: Executor, func: Any, carry: Any, t_a: float, t: float, method: Method
) -> Any:
    """The carry after the method's step from ``t_a`` to ``t`` (part of a step)."""
    ts = dense_stage_times(_clock(method.output(carry)), t_a, t - t_a, method.nodes)
    return run_steps(executor, func, carry, FixedSteps(_Given(ts), [Leg(0, 0, 1, t - t_a)]))


def _clock(y: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=_real(y.dtype), device=y.device)


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
    like = _clock(y_a)

    def g_at(t: float) -> float:
        y = y_a if t == t_a else method.output(_partial(executor, func, carry, t_a, t, method))
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
        t = hi - g_hi * (hi - lo) / (g_hi - g_lo)  # inside the bracket, but for rounding
        if not math.isfinite(t):
            t = 0.5 * (lo + hi)
        # At least ``tol`` inside the bracket (as Brent's method steps): where the secant lands
        # on an end that is the root to rounding, the next point lies on the root's other side
        # and the bracket closes, where bisecting from there took about 45 more evaluations (a
        # condition linear along the step).
        tol = eps * max(abs(lo), abs(hi), 1e-300)
        t = min(max(t, min(lo, hi) + tol), max(lo, hi) - tol)
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
