"""The time grid: steps per output interval, step sizes, stage times and their time gradients.

Every time a solve evaluates the dynamics at is derived here, once per call, from the host grid:
the forward loop, the backward passes of every gradient mode and the finite differences of
``check_gradients`` all read their step sizes and stage times from this module.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from .._warnings import user_stacklevel
from ..solvers.protocol import Step, Stepped
from .protocol import Run, Try

__all__ = [
    "DEFAULT_MAX_STEPS",
    "DEFAULT_STEP",
    "FixedSteps",
    "Leg",
    "StepTo",
    "NEAR_WHOLE",
    "StepRoundingWarning",
    "distinct_stage_times",
    "TimeGrid",
    "make_grid",
    "regrid",
    "StageTimes",
    "SegmentTimes",
    "RecordedSteps",
    "Steps",
    "Times",
    "step_sizes",
    "interval_sizes",
    "segment_times",
]

# Step counts are ceil(|dt| / step) up to this many ulps of the state's dtype, so that an
# interval of 1.1 with step 0.1 gives 11 steps although 1.1 / 0.1 rounds to 11.000000000000002
# (float64) or 11.0000002 (float32). The tolerance is capped: in bfloat16 (eps 2^-7) 16 ulps
# would be 12.5 % and a step larger than `step` could pass.
_ULPS = 16
_MAX_TOLERANCE = 1e-5

# An interval longer than a whole number of steps by at most this fraction of one step (1 %)
# takes one more step, as `step` is never exceeded, with a StepRoundingWarning: the output
# spacing 0.025025 with `step=0.025` would otherwise double the cost in silence.
NEAR_WHOLE = 0.01


class _DefaultStep(float):
    """``step``'s default, 0.1, told apart from a ``step=0.1`` the caller passed: with
    tolerances (error-controlled steps) an explicit ``step`` is the largest step, the default
    none."""

    def __repr__(self) -> str:
        return "0.1"


DEFAULT_STEP: float = _DefaultStep(0.1)
"""``step``'s default: 0.1 for fixed steps."""

DEFAULT_MAX_STEPS = 10_000_000
"""The largest number of steps one call may take unless ``max_steps`` says otherwise."""

# Stage times are materialised this many at a time, so that memory stays flat in the number of
# steps (a 0-dim tensor per stage, kept for a whole solve, costs about a kilobyte each).
_CHUNK = 2048
# Small grids (an ODEBlock in a training loop) keep their host-built times in a bounded cache,
# so that a repeated call builds nothing; larger ones are built per call and released after it.
_CACHED_EVALUATIONS = 256


@dataclass(frozen=True)
class TimeGrid:
    """Equal steps inside each interval between consecutive output times.

    Attributes
    ----------
    times : tuple of float
        The output times as host floats (in the state's dtype's precision).
    n_steps : tuple of int
        Steps in each interval ``[times[i], times[i+1]]``.
    h : tuple of float
        The signed step size of each interval (negative for decreasing times).
    step : float or None
        The largest step size asked for (``step=``), for messages; None for one step per
        interval.
    """

    times: tuple[float, ...]
    n_steps: tuple[int, ...]
    h: tuple[float, ...]
    step: float | None = None

    #: Every step of an interval has the same size (one size per interval, compiled in chunks).
    uniform: ClassVar[bool] = True

    def describe(self) -> str:
        """The steps as the user asked for them, for messages."""
        return "step=None (one step per interval)" if self.step is None else f"step={self.step!r}"

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """The global index of each interval's first step (length ``len(n_steps) + 1``)."""
        out = [0]
        for n in self.n_steps:
            out.append(out[-1] + n)
        return tuple(out)

    def fractions(self, i: int, k: int) -> tuple[float, float, float]:
        """Where step ``k`` of interval ``i`` starts and ends, and its size, as fractions of the
        interval: a step's ends are ``t[i] + m (t[i+1] - t[i])``, which the time gradients
        follow."""
        n = self.n_steps[i]
        return k / n, (k + 1) / n, 1.0 / n

    def stage_fraction(self, i: int, k: int, c: float, reverse: bool) -> float:
        """Where the stage at node ``c`` of step ``k`` of interval ``i`` lies in the interval
        (``reverse``: counted from the step's end)."""
        return ((k + 1 - c) if reverse else (k + c)) / self.n_steps[i]

    def sizes(self, i: int) -> float:
        """The signed step size of interval ``i`` (all its steps are equal)."""
        return self.h[i]

    def step_size(self, g: int) -> float:
        """The signed size of global step ``g``."""
        return self.h[bisect.bisect_right(self.offsets, g) - 1]

    def segment(
        self, t: torch.Tensor, nodes: Sequence[float], i: int, k0: int, k1: int
    ) -> tuple[torch.Tensor, SegmentTimes]:
        """Step size and stage times of steps ``k0..k1`` of interval ``i``, differentiable in
        ``t`` (see :func:`segment_times`)."""
        return segment_times(t, self, nodes, i, k0, k1)


@dataclass(frozen=True)
class RecordedSteps:
    """The accepted steps of an error-controlled solve: the record the exact modes replay.

    Each step is kept as where it starts and ends in its output interval, as fractions ``m0``,
    ``m1`` of it (two host floats per step, no state): its times are ``t[i] + m (t[i+1] -
    t[i])``, its stage times ``t[i] + (m0 + c (m1 - m0)) (t[i+1] - t[i])``, as the forward
    pass computed them, and the time gradients follow the same expressions.

    Attributes
    ----------
    times : tuple of float
        The output times.
    steps : tuple of tuple of (float, float)
        Per output interval, the ``(m0, m1)`` of each accepted step.
    """

    times: tuple[float, ...]
    steps: tuple[tuple[tuple[float, float], ...], ...]
    step: float | None = None
    #: How the steps were asked for, for messages (a user-given layout: ``StepTo(...)``).
    origin: str = "error control"

    uniform: ClassVar[bool] = False

    def describe(self) -> str:
        """The steps as the user asked for them, for messages."""
        return self.origin

    @property
    def n_steps(self) -> tuple[int, ...]:
        """Steps in each interval."""
        return tuple(len(s) for s in self.steps)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """The global index of each interval's first step (length ``len(steps) + 1``)."""
        out = [0]
        for s in self.steps:
            out.append(out[-1] + len(s))
        return tuple(out)

    def fractions(self, i: int, k: int) -> tuple[float, float, float]:
        """Where step ``k`` of interval ``i`` starts and ends, and its size, as fractions."""
        m0, m1 = self.steps[i][k]
        return m0, m1, m1 - m0

    def stage_fraction(self, i: int, k: int, c: float, reverse: bool) -> float:
        """Where the stage at node ``c`` of step ``k`` of interval ``i`` lies in the interval."""
        m0, m1 = self.steps[i][k]
        return (m1 - c * (m1 - m0)) if reverse else (m0 + c * (m1 - m0))

    def size(self, i: int, k: int) -> float:
        """The signed size of step ``k`` of interval ``i``."""
        m0, m1 = self.steps[i][k]
        return (m1 - m0) * (self.times[i + 1] - self.times[i])

    def step_size(self, g: int) -> float:
        """The signed size of global step ``g``."""
        i = bisect.bisect_right(self.offsets, g) - 1
        return self.size(i, g - self.offsets[i])

    def sizes(self, i: int) -> Callable[[int], float]:
        """The signed size of each step of interval ``i``, by global step index."""
        first = self.offsets[i]
        return lambda g: self.size(i, g - first)

    def segment(
        self, t: torch.Tensor, nodes: Sequence[float], i: int, k0: int, k1: int
    ) -> tuple[Callable[[int], torch.Tensor], SegmentTimes]:
        """Per-step sizes and stage times of steps ``k0..k1`` of interval ``i``, differentiable
        in ``t``."""
        span = t[i + 1] - t[i]
        frac = t.new_tensor(
            [self.stage_fraction(i, k, c, False) for k in range(k0, k1) for c in nodes]
        )
        values = tuple(torch.addcmul(t[i], frac, span).unbind(0))
        first = self.offsets[i]
        return (
            lambda g: span * (self.fractions(i, g - first)[2]),
            SegmentTimes(first + k0, len(nodes), values),
        )


def make_grid(
    times: Sequence[float], step: float | None, eps: float, *, max_steps: int = DEFAULT_MAX_STEPS
) -> TimeGrid:
    """Build the grid for host times already validated as strictly monotonic.

    Parameters
    ----------
    times : sequence of float
        Output times, length >= 2.
    step : float or None
        The largest step size; None takes one step per interval.
    eps : float
        Machine epsilon of the dtype the times are used in.
    max_steps : int
        The largest total number of steps; checked before anything is allocated.

    Raises
    ------
    ValueError
        When the grid would take more than ``max_steps`` steps.
    """
    tolerance = min(_ULPS * eps, _MAX_TOLERANCE)
    n_steps = []
    near: tuple[float, float, int] | None = None  # the first interval barely over a whole count
    for t_a, t_b in zip(times[:-1], times[1:]):
        if step is None:
            n_steps.append(1)
            continue
        # In float64 (host floats) whatever the state's dtype: a ratio above 2^53 is no count.
        ratio = abs(t_b - t_a) / step
        if not math.isfinite(ratio) or ratio > max_steps:  # this interval alone is too many
            _too_many((t_a, t_b), step, ratio, max_steps)
        n = max(1, math.ceil(ratio * (1.0 - tolerance)))
        if near is None and n > 1 and ratio - (n - 1) <= NEAR_WHOLE:
            near = (t_a, t_b, n)
        n_steps.append(n)
    total = sum(n_steps)
    if total > max_steps:
        _too_many(times, step, float(total), max_steps)
    if near is not None and step is not None:
        _warn_near_whole(*near, step)
    h = tuple((t_b - t_a) / n for t_a, t_b, n in zip(times[:-1], times[1:], n_steps))
    return TimeGrid(times=tuple(times), n_steps=tuple(n_steps), h=h, step=step)


@dataclass(frozen=True, init=False)
class StepTo:
    """Fixed steps that end on given times (``controller=StepTo(times)`` on ``odeint`` and
    ``ODEBlock``): torchdiffeq's ``grid_constructor``, diffrax's ``StepTo``.

    A step ends on every given time inside the span of ``t`` and on every output time, so the
    output times are step ends, never interpolated: the interval between two consecutive output
    times is split at the given times inside it. Any explicit method, any gradient mode; the
    steps are laid out on the host before the solve (no error estimate, nothing read per step).

    Parameters
    ----------
    times : 1-D Tensor or sequence of float
        The step times, in any order (sorted, repeats dropped). Every one must lie within the
        span of the output times ``t`` (its ends included); they are rounded to the state's
        dtype like ``t``.

    Examples
    --------
    >>> import torch
    >>> from torchode_adjoint import StepTo, odeint
    >>> steps = StepTo(torch.linspace(0.0, 1.0, 11) ** 2)  # fine steps near t = 0
    >>> y = odeint(lambda t, y: -y, torch.ones(1), torch.tensor([0.0, 1.0]),
    ...            solver="rk4", controller=steps, params=())
    >>> abs(float(y[-1, 0]) - math.exp(-1.0)) < 1e-5
    True
    """

    times: tuple[float, ...]

    def __init__(self, times: Sequence[float] | torch.Tensor) -> None:
        if isinstance(times, torch.Tensor):
            if times.dim() != 1 or times.is_complex() or not times.dtype.is_floating_point:
                raise ValueError(
                    f"`StepTo(times=...)` must be a 1-D real floating tensor or a list of "
                    f"times, got shape {tuple(times.shape)} of {times.dtype}; pass e.g. "
                    "`StepTo(torch.linspace(0.0, 1.0, 11))`."
                )
            values = times.detach().cpu().tolist()
        elif isinstance(times, Sequence) and not isinstance(times, str):
            values = list(times)
        else:
            raise TypeError(
                f"`StepTo(times=...)` must be a list or 1-D tensor of times, got "
                f"{type(times).__name__}; pass e.g. `StepTo([0.0, 0.1, 0.3, 1.0])`."
            )
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(
                    f"`StepTo(times=...)` must hold finite real times, got {v!r}; pass e.g. "
                    "`StepTo([0.0, 0.1, 0.3, 1.0])`."
                )
        if not values:
            raise ValueError(
                "`StepTo(times=...)` is empty; pass the times the steps end on, e.g. "
                "`StepTo([0.0, 0.1, 0.3, 1.0])`, or `step=` for equal steps."
            )
        object.__setattr__(self, "times", tuple(sorted({float(v) for v in values})))

    def __repr__(self) -> str:
        shown = ", ".join(f"{v:g}" for v in self.times[:4])
        more = f", ... ({len(self.times)} times)" if len(self.times) > 4 else ""
        return f"StepTo([{shown}{more}])"

    def layout(
        self, times: Sequence[float], dtype: torch.dtype, *, max_steps: int = DEFAULT_MAX_STEPS
    ) -> RecordedSteps:
        """The steps over the output ``times`` (host floats, strictly monotonic): each interval
        split at the given times strictly inside it, as fractions of the interval.

        Raises
        ------
        ValueError
            When a given time lies outside the span of ``times``, or the steps number more
            than ``max_steps``.
        """
        given = torch.tensor(self.times, dtype=dtype).tolist()  # the dtype's precision, as t
        lo, hi = min(times[0], times[-1]), max(times[0], times[-1])
        outside = [v for v in given if not lo <= v <= hi]
        if outside:
            raise ValueError(
                f"`{self!r}` holds {outside[0]:g}, outside the span [{lo:g}, {hi:g}] of the "
                "output times `t`; pass step times within it (a step always ends on every "
                "output time, so the span's ends need not be given)."
            )
        steps: list[tuple[tuple[float, float], ...]] = []
        for t_a, t_b in zip(times[:-1], times[1:]):
            a, b = min(t_a, t_b), max(t_a, t_b)
            inner = [v for v in given if a < v < b]
            if t_b < t_a:
                inner.reverse()
            ends = [0.0, *((v - t_a) / (t_b - t_a) for v in inner), 1.0]
            steps.append(tuple(zip(ends[:-1], ends[1:])))
        total = sum(len(s) for s in steps)
        if total > max_steps:
            raise ValueError(
                f"`{self!r}` over `t` takes {total:,} steps, more than `max_steps="
                f"{max_steps:,}`; pass fewer step times, or a larger `max_steps` if you mean it."
            )
        return RecordedSteps(times=tuple(times), steps=tuple(steps), origin=repr(self))


Steps = TimeGrid | RecordedSteps
"""A solve's record of steps: equal steps per interval, or the accepted steps of an
error-controlled solve."""


def distinct_stage_times(grid: Steps, nodes: Sequence[float], cap: int) -> tuple[int, bool]:
    """How many distinct times a solve on ``grid`` evaluates at (stage times ``t + c_j h``,
    rounded to 12 significant digits so that a stage at ``t + h`` meets the next step's first),
    counting up to ``cap``; and whether counting stopped there."""
    seen: set[float] = set()
    ts = grid.times
    for i, n in enumerate(grid.n_steps):
        for k in range(n):
            for c in nodes:
                m = grid.stage_fraction(i, k, c, False)
                seen.add(float(f"{ts[i] + m * (ts[i + 1] - ts[i]):.12g}"))
            if len(seen) >= cap:
                return len(seen), True
    return len(seen), False


class StepRoundingWarning(UserWarning):
    """An interval of ``t`` is barely longer than a whole number of steps, so it takes one more.

    Silence it with ``warnings.filterwarnings("ignore", category=StepRoundingWarning)``.
    """


def _warn_near_whole(t_a: float, t_b: float, n: int, step: float) -> None:
    length = abs(t_b - t_a)
    excess = 100.0 * (length / step - (n - 1))
    warnings.warn(
        f"the interval [{t_a:.6g}, {t_b:.6g}] of `t` (length {length:.6g}) is {excess:.2g} % "
        f"of a step longer than {n - 1} step{'s' if n > 2 else ''} of `step={step!r}`, so it "
        f"takes {n} steps of {length / n:.6g} ({n / (n - 1):.3g}x the evaluations of {n - 1}); "
        "`step` is the largest step, never exceeded. If you meant the output spacing, pass "
        f"`step={length / (n - 1):.6g}` (or `step=None`: one step per interval). Warned once "
        "per solve, for the first such interval.",
        StepRoundingWarning,
        stacklevel=user_stacklevel(),
    )


def _too_many(times: Sequence[float], step: float | None, count: float, max_steps: int) -> None:
    raise ValueError(
        f"`step={step!r}` over the interval [{times[0]:.6g}, {times[-1]:.6g}] needs about "
        f"{count:.3g} steps, more than `max_steps={max_steps:,}`; pass a larger `step`, or a "
        "larger `max_steps` if you mean it."
    )


def regrid(grid: Steps, times: Sequence[float]) -> Steps:
    """The same steps, as fractions of each interval, over new output times (for finite
    differences in the times)."""
    if isinstance(grid, RecordedSteps):
        return dataclasses.replace(grid, times=tuple(times))
    h = tuple((t_b - t_a) / n for t_a, t_b, n in zip(times[:-1], times[1:], grid.n_steps))
    return TimeGrid(times=tuple(times), n_steps=grid.n_steps, h=h, step=grid.step)


def _fractions(
    grid: Steps, c: Sequence[float], first: int, count: int, reverse: bool
) -> tuple[list[int], list[float]]:
    """Interval index and fraction of the interval of the stage evaluations of steps
    ``first..first+count``.

    Steps are numbered in the order the integration visits them: forward; with ``reverse``
    backwards, each starting at its end (stage ``j`` at ``(k + 1 - c_j) / n``).
    """
    offsets = grid.offsets
    total = offsets[-1]
    index, frac = [], []
    i = 0
    for g in range(first, first + count):
        if reverse:
            g = total - 1 - g
            i = 0
        # The interval of global step g (few intervals: a linear scan is fine).
        while offsets[i + 1] <= g:
            i += 1
        k = g - offsets[i]
        for c_j in c:
            index.append(i)
            frac.append(grid.stage_fraction(i, k, c_j, reverse))
    return index, frac


class Times(Protocol):
    """The stage times a step reads: ``times.of(g)`` holds the 0-dim times of step ``g``'s
    evaluations, one per node of the method, in the order it makes them."""

    def of(self, g: int) -> tuple[torch.Tensor, ...]: ...


class StageTimes:
    """Every stage time of a solve, as 0-dim tensors, built lazily a chunk of steps at a time.

    ``times.of(g)`` holds the times of the evaluations of step ``g`` in the order the integration
    visits the steps (see :func:`_fractions`); the time of stage ``j`` of step ``k`` in interval
    ``i`` is ``t[i] + (k + c_j) / n_i * (t[i+1] - t[i])``. Only the chunk in use is held, so
    memory does not grow with the number of steps. When ``t`` requires grad, each chunk is
    computed from it by one differentiable op.

    Parameters
    ----------
    t : Tensor, shape (T,)
        Output times in the state's dtype and device; their values equal ``grid.times``.
    grid : TimeGrid
    c : tuple of float
        The method's nodes.
    reverse : bool, default False
        Number the steps backwards (the continuous adjoint's order).
    """

    __slots__ = ("t", "grid", "c", "reverse", "_start", "_chunk", "_per_chunk")

    def __init__(
        self, t: torch.Tensor, grid: Steps, c: Sequence[float], *, reverse: bool = False
    ) -> None:
        self.t, self.grid, self.c, self.reverse = t, grid, tuple(c), reverse
        self._start = -1
        self._chunk: tuple[torch.Tensor, ...] = ()
        self._per_chunk = max(1, _CHUNK // max(1, len(self.c)))

    def __len__(self) -> int:
        """The number of steps."""
        return self.grid.offsets[-1]

    def of(self, g: int) -> tuple[torch.Tensor, ...]:
        s = len(self.c)
        offset = (g - self._start) * s
        if not 0 <= offset < len(self._chunk):  # (no chunk yet: the empty one)
            self._load(g)
            offset = (g - self._start) * s
        return self._chunk[offset : offset + s]

    def _load(self, g: int) -> None:
        per = self._per_chunk
        start = g - g % per
        count = min(per, len(self) - start)
        t = self.t
        if not t.requires_grad and len(self) * len(self.c) <= _CACHED_EVALUATIONS:
            self._start = 0
            self._chunk = _small_grid_times(self.grid, self.c, self.reverse, t.dtype, t.device)
            return
        index, frac = _fractions(self.grid, self.c, start, count, self.reverse)
        if t.requires_grad:
            idx = torch.tensor(index, device=t.device)
            fr = t.new_tensor(frac)
            t_a = t[:-1][idx]
            values = torch.addcmul(t_a, fr, t[1:][idx] - t_a)
        else:
            ts = self.grid.times
            host = [ts[i] + f * (ts[i + 1] - ts[i]) for i, f in zip(index, frac)]
            values = t.new_tensor(host)
        self._start, self._chunk = start, values.unbind(0)


@functools.lru_cache(maxsize=16)
def _small_grid_times(
    grid: Steps, c: tuple[float, ...], reverse: bool, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    index, frac = _fractions(grid, c, 0, grid.offsets[-1], reverse)
    ts = grid.times
    host = [ts[i] + f * (ts[i + 1] - ts[i]) for i, f in zip(index, frac)]
    return torch.tensor(host, dtype=dtype, device=device).unbind(0)


class SegmentTimes:
    """The stage times of steps ``first..`` of one interval, differentiable with respect to
    ``t`` (built afresh per segment, so that each segment's graph is back-propagated once)."""

    __slots__ = ("first", "s", "values")

    def __init__(self, first: int, s: int, values: tuple[torch.Tensor, ...]) -> None:
        self.first, self.s, self.values = first, s, values

    def of(self, g: int) -> tuple[torch.Tensor, ...]:
        offset = (g - self.first) * self.s
        return self.values[offset : offset + self.s]


def step_sizes(t: torch.Tensor, grid: Steps) -> list[torch.Tensor | Callable[[int], torch.Tensor]]:
    """Each interval's step size as a 0-dim tensor differentiable with respect to ``t`` (equal
    steps), or a function of the global step index giving one (steps of their own sizes)."""
    if isinstance(grid, RecordedSteps):
        spans = (t[1:] - t[:-1]).unbind(0)
        return [_recorded_sizes(grid, i, span) for i, span in enumerate(spans)]
    n = t.new_tensor(grid.n_steps)
    return list(((t[1:] - t[:-1]) / n).unbind(0))


def _recorded_sizes(
    grid: RecordedSteps, i: int, span: torch.Tensor
) -> Callable[[int], torch.Tensor]:
    first = grid.offsets[i]
    return lambda g: span * grid.fractions(i, g - first)[2]


def interval_sizes(
    grid: Steps, t: torch.Tensor
) -> Sequence[float | torch.Tensor | Callable[[int], float | torch.Tensor]]:
    """The step size of each interval (a function of the global step index where its steps
    differ), as host floats, or differentiable in ``t`` where it requires grad."""
    if t.requires_grad:
        return step_sizes(t, grid)
    if isinstance(grid, TimeGrid):
        return grid.h
    return [grid.sizes(i) for i in range(len(grid.steps))]


def segment_times(
    t: torch.Tensor, grid: TimeGrid, c: Sequence[float], i: int, k0: int, k1: int
) -> tuple[torch.Tensor, SegmentTimes]:
    """Step size and stage times of steps ``k0..k1`` of interval ``i``, differentiable in ``t``
    (the stage times indexed by global step, like :class:`StageTimes`)."""
    n = grid.n_steps[i]
    h = (t[i + 1] - t[i]) / n
    frac = t.new_tensor([k + c_j for k in range(k0, k1) for c_j in c])
    values = tuple(torch.addcmul(t[i], frac, h).unbind(0))
    return h, SegmentTimes(grid.offsets[i] + k0, len(c), values)


class Leg(NamedTuple):
    """One leg of fixed steps: ``n`` steps from step ``g0`` of the pass's stage times, each of
    size ``h`` (or ``h(g)`` for step ``g``); ``interval`` names it for the hooks (the output
    interval it belongs to, or the step it is)."""

    interval: int
    g0: int
    n: int
    h: Step | Callable[[int], Step]


LegHook = Callable[[Leg, Any], Any]


class FixedSteps:
    """Fixed steps (equal, user-given or recorded; forward, or in reverse for a backward pass),
    leg by leg, as the loop drives them: every step is accepted as it comes, and a leg's steps
    run as one :class:`~torchode_adjoint.controllers.protocol.Run` that the executor may take in
    compiled chunks.

    Parameters
    ----------
    times : Times
        The pass's stage times (``times.of(g)``).
    legs : sequence of Leg
        In the order they are taken.
    enter, leave : callable, optional
        ``enter(leg, carry) -> carry`` before a leg's first step (an incoming gradient added),
        ``leave(leg, carry) -> carry`` after its last (an output kept).
    split_first : bool
        Take each leg's first step alone, as a
        :class:`~torchode_adjoint.controllers.protocol.Try` handed to the loop's ``accepted``
        hook (with its dense information where ``dense_first``): a step whose stages a mode
        reuses, or a replay that looks at every step.
    dense_first : bool
    """

    __slots__ = ("times", "legs", "enter", "leave", "split_first", "dense_first", "_i", "_j")

    def __init__(
        self,
        times: Times,
        legs: Sequence[Leg],
        *,
        enter: LegHook | None = None,
        leave: LegHook | None = None,
        split_first: bool = False,
        dense_first: bool = False,
    ) -> None:
        self.times, self.legs, self.enter, self.leave = times, legs, enter, leave
        self.split_first, self.dense_first = split_first, dense_first
        self._i = self._j = 0

    @property
    def leg(self) -> Leg:
        """The leg being taken."""
        return self.legs[self._i]

    def _parts(self, leg: Leg) -> int:
        if self.split_first:
            return 1 + (leg.n > 1) if leg.n else 0
        return 1 if leg.n else 0

    def _begin(self, carry: Any) -> Any:
        # Enter the next leg with steps (a leg without steps is entered and left at once).
        while self._i < len(self.legs):
            leg = self.legs[self._i]
            if self.enter is not None:
                carry = self.enter(leg, carry)
            if self._parts(leg):
                return carry
            if self.leave is not None:
                carry = self.leave(leg, carry)
            self._i += 1
        return carry

    def start(self, carry: Any) -> Any:
        self._i = self._j = 0
        return self._begin(carry)

    def plan(self) -> Run | Try | None:
        if self._i >= len(self.legs):
            return None
        leg = self.legs[self._i]
        if not self.split_first:
            return Run(leg.h, self.times, leg.g0, leg.n)
        if self._j == 0:
            h = leg.h(leg.g0) if callable(leg.h) else leg.h
            return Try(h, self.times.of(leg.g0), self.dense_first)
        return Run(leg.h, self.times, leg.g0 + 1, leg.n - 1)

    def judge(self, carry: Any, out: Stepped) -> bool:
        return True

    def passed(self, carry: Any) -> Any:
        if self._i >= len(self.legs):  # stopped
            return carry
        leg = self.legs[self._i]
        self._j += 1
        if self._j < self._parts(leg):
            return carry
        if self.leave is not None:
            carry = self.leave(leg, carry)
        self._i, self._j = self._i + 1, 0
        return self._begin(carry)

    def stop(self) -> None:
        """End the pass after the step being taken (a replay that found what it looked for)."""
        self._i = len(self.legs)
