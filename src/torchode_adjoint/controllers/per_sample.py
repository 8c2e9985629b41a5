"""Per-sample step controllers: every sample of a batch with its own times, steps and error.

With output times ``t`` of shape ``(B, T)`` each sample ``b`` of the batch (the first dimension
of the state) is solved on its own row ``t[b]``: its own span (increasing or decreasing), its own
step sizes, its own accept or reject and its own counters. The batch still steps together, one
evaluation of the dynamics for all samples per stage, with a step size per sample (a tensor of
shape ``(B, 1, ..., 1)``, broadcast against the state); a sample whose step is rejected, or that
has reached its last time, keeps its state (the step's result is discarded where it is masked
out). The loop reads the host once per step for the whole batch, never per sample: whether any
sample accepted, whether any is still going, how many output times one step passed at most, and
whether a step was too small.

Two controllers drive the one loop (:func:`~torchode_adjoint._executor.run_steps`):

- :class:`SampleSteps`: the steps of a pass, error-controlled per sample (each sample's error
  norm, I/PI step-size rule and first step) or fixed (each sample's output intervals cut into
  equal steps of at most ``step``, as for a shared ``t``);
- :class:`ReplaySteps`: the steps a pass took, replayed (a checkpointed backward pass).

After each accepted try, ``controller.taken`` is the :class:`SampleStep` the loop's hook merges
and records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..solvers.protocol import Stepped
from .error import FLOOR, STRETCH, ErrorControl, _tolerance_of
from .fixed import TimeGrid
from .protocol import Try

__all__ = [
    "SampleTimes",
    "SampleStep",
    "SampleCounts",
    "SampleSteps",
    "ReplaySteps",
    "check_sample_times",
    "check_row",
    "sample_view",
    "sample_rms",
    "sample_ratio",
    "first_steps",
]


def sample_view(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` of shape ``(B,)`` viewed as ``(B, 1, ..., 1)`` to broadcast against ``like``."""
    return x.view(x.shape[0], *([1] * (like.dim() - 1)))


def sample_rms(x: torch.Tensor) -> torch.Tensor:
    """The RMS of each sample (over every dimension but the first): shape ``(B,)``."""
    flat = x.reshape(x.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1) / math.sqrt(max(flat.shape[1], 1))


def sample_ratio(
    err: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, control: ErrorControl
) -> torch.Tensor:
    """Each sample's error ratio (shape ``(B,)``): the RMS of ``err / (atol + rtol * max(|y0|,
    |y1|))`` over the sample, or, for a structured state (``control.parts``), over each part
    with its own tolerances, the largest part's value counting (as a shared solve's norm)."""
    rtol = _tolerance_of(control.rtol, y0, control)
    atol = _tolerance_of(control.atol, y0, control)
    scaled = err / (atol + rtol * torch.maximum(y0.abs(), y1.abs()))
    if not control.parts:
        return sample_rms(scaled)
    return torch.stack([sample_rms(scaled[:, o : o + n]) for o, n in control.parts]).amax(0)


@dataclass(frozen=True, eq=False)
class SampleTimes:
    """Output times per sample, validated.

    Attributes
    ----------
    t : Tensor, shape (B, T)
        The times in the state's dtype, detached.
    host : list of list of float
        The same on the host (read once, when the times are checked).
    """

    t: torch.Tensor
    host: list[list[float]]

    @property
    def batch(self) -> int:
        """The number of samples."""
        return int(self.t.shape[0])

    @property
    def count(self) -> int:
        """The number of output times per sample."""
        return int(self.t.shape[1])

    @property
    def direction(self) -> torch.Tensor:
        """``+1`` for a sample integrated forwards in time, ``-1`` backwards: shape ``(B,)``."""
        return torch.sign(self.t[:, -1] - self.t[:, 0])

    def reversed(self) -> SampleTimes:
        """Each sample's times from its last to its first (a backward pass)."""
        return SampleTimes(self.t.flip(1), [row[::-1] for row in self.host])


def check_sample_times(t: torch.Tensor, y0: torch.Tensor) -> SampleTimes:
    """Validate output times of shape ``(B, T)`` against the state ``y0`` (batch first).

    Raises
    ------
    ValueError
        Naming ``t`` and the sample at fault: a batch size other than ``y0``'s first
        dimension, fewer than two times, non-finite times, a row not strictly monotonic.
    """
    if t.dim() != 2:
        raise ValueError(
            f"per-sample output times `t` must have shape (batch, times), got shape "
            f"{tuple(t.shape)}; pass a 1-D `t` shared by every sample, or one row per sample."
        )
    if y0.dim() == 0 or y0.shape[0] != t.shape[0]:
        batch = "a 0-dim state" if y0.dim() == 0 else f"batch {y0.shape[0]}"
        raise ValueError(
            f"per-sample output times `t` of shape {tuple(t.shape)} need one row per sample of "
            f"`y0` (its first dimension), but `y0` has shape {tuple(y0.shape)} ({batch}); pass "
            "`t` of shape (y0.shape[0], T)."
        )
    if t.shape[1] < 2:
        raise ValueError(
            f"per-sample output times `t` must hold at least two times per sample (start and "
            f"end), got shape {tuple(t.shape)}."
        )
    if t.requires_grad:
        raise ValueError(
            "gradients with respect to per-sample output times `t` are not computed (the "
            "per-sample steps are laid out from their values); pass `t.detach()`, or a 1-D "
            "`t` shared by the batch, whose gradient every mode computes."
        )
    t_cast = t.detach().to(y0.dtype)
    host: list[list[float]] = t_cast.cpu().tolist()
    for b, row in enumerate(host):
        check_row(row, f"`t[{b}]` (the times of sample {b})", y0.dtype)
    return SampleTimes(t_cast, host)


def check_row(row: Sequence[float], name: str, dtype: torch.dtype) -> None:
    """Raise a ValueError naming ``name`` where the host times ``row`` are not finite or not
    strictly monotonic (in ``dtype``)."""
    if not all(math.isfinite(v) for v in row):
        raise ValueError(f"{name} must hold finite times, got {row}.")
    diffs = [q - p for p, q in zip(row[:-1], row[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError(
            f"{name} must be strictly increasing or strictly decreasing (no repeated times, in "
            f"{dtype}), got {row}."
        )


@dataclass(frozen=True, eq=False)
class SampleStep:
    """One try of the batch as the loop's hook merges and records it.

    Attributes
    ----------
    h : Tensor, shape (B,)
        The signed step each sample tried (0 where it had reached its last time).
    ts : tuple of Tensor
        The stage times, each of shape ``(B, 1, ..., 1)``.
    accept : Tensor, shape (B,), bool
        Which samples took the step (the others keep their state).
    t_old, t_new : Tensor, shape (B,)
        Each sample's time before and after the try.
    first_out : Tensor, shape (B,), int64
        Each sample's first output time not reached before the try.
    n_out : Tensor, shape (B,), int64
        How many output times the try reached (0 where rejected).
    most : int
        The largest of ``n_out`` (read on the host with the step's other decisions).
    unsafe : bool
        Whether a sample that rejected the try had a non-finite error (an overflow): its
        values would turn a gradient through the try into NaN (``0 * inf``), so a pass that
        differentiates the try takes it again with that sample's step set to zero.
    """

    h: torch.Tensor
    ts: tuple[torch.Tensor, ...]
    accept: torch.Tensor
    t_old: torch.Tensor
    t_new: torch.Tensor
    first_out: torch.Tensor
    n_out: torch.Tensor
    most: int
    unsafe: bool = False
    inside: bool = True
    """Whether an output time some sample reached lies inside its step (to interpolate), not
    on its end."""

    def masked(self) -> torch.Tensor:
        """The step with zero for the samples that rejected it (their stages are then
        evaluated at their own state)."""
        return torch.where(self.accept, self.h, torch.zeros_like(self.h))


@dataclass
class SampleCounts:
    """Per-sample counters of a per-sample pass (each of shape ``(B,)``, int64)."""

    accepted: torch.Tensor
    rejected: torch.Tensor


class _Sizer:
    """The I/PI rule of :class:`~torchode_adjoint.controllers.error.StepSizeController`, per
    sample on device tensors: an accepted step never shrinks the next, a rejected one shrinks
    from the size it tried."""

    def __init__(self, control: ErrorControl, error_order: int) -> None:
        self.control, self.q = control, int(error_order) + 1

    def factor(self, ratio: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        c, q = self.control, self.q
        # ratio 0 gives inf and an infinite ratio 0: the clamp makes them factor_max and
        # factor_min, as the host rule; a NaN ratio (an overflow) shrinks by factor_min.
        f = ratio.pow(-c.beta1 / q).mul_(c.safety)
        if c.beta2:
            f = f * previous.clamp(min=1e-4).pow(c.beta2 / q)
        return f.clamp_(c.factor_min, c.factor_max).nan_to_num_(nan=c.factor_min)


def first_steps(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    t0: torch.Tensor,
    y0: torch.Tensor,
    f0: torch.Tensor,
    direction: torch.Tensor,
    control: ErrorControl,
    error_order: int,
) -> torch.Tensor:
    """Hairer's starting step size (*Solving ODEs I*, II.4) of each sample (``(B,)``, positive):
    :func:`~torchode_adjoint.controllers.error.initial_step` per sample, with one evaluation of
    ``f`` for the batch; ``control.first_step`` where given."""
    rtol, atol = control.smallest()
    batch = y0.shape[0]
    if control.first_step is not None:
        h = torch.full((batch,), control.first_step, dtype=t0.dtype, device=t0.device)
        return h.clamp(max=control.max_step)
    with torch.no_grad():
        scale = atol + y0.abs() * rtol
        d0, d1 = sample_rms(y0 / scale), sample_rms(f0 / scale)
        bad = ~(torch.isfinite(d0) & torch.isfinite(d1))
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise RuntimeError(
                f"the state or its derivative of sample {b} at t = {float(t0.flatten()[b]):.6g}, "
                "where its error-controlled solve starts, was not finite (NaN or infinite): the "
                "first step cannot be sized; check the initial state and the dynamics there."
            )
        small = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = torch.where(small, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp(min=1e-300))
        step = sample_view(direction * h0, y0)
        f1 = f(t0 + sample_view(direction * h0, t0), y0 + step * f0)
        d2 = sample_rms((f1 - f0) / scale) / h0
        flat = (d1 <= 1e-15) & (d2 <= 1e-15)
        big = torch.maximum(d1, d2).clamp(min=1e-300)
        h1 = torch.where(
            flat, (h0 * 1e-3).clamp(min=1e-6), (0.01 / big).pow(1.0 / (error_order + 1))
        )
        h = torch.minimum(100.0 * h0, h1)
    return h.to(t0.dtype).clamp(max=control.max_step)


def _fixed_table(
    times: SampleTimes, grid: Callable[[Sequence[float]], TimeGrid], nodes: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, list[bool], list[list[int]]]:
    """Each sample's equal steps (its intervals laid out as a shared ``t``'s would be), as
    tables over the loop's steps: the signed sizes ``(K, B)``, the stage times ``(K, S, B)``
    (``t_i + (k + c_j) / n_i (t_{i+1} - t_i)``, as :class:`~.fixed.StageTimes`), which step
    ends an interval (host), and each sample's steps per interval."""
    grids = [grid(row) for row in times.host]
    steps = [list(g.n_steps) for g in grids]
    total = max(sum(n) for n in steps)
    h_rows, t_rows, ends = [], [], [False] * total
    for g in grids:
        hs, ts = [], []
        for i, n in enumerate(g.n_steps):
            a, b = g.times[i], g.times[i + 1]
            for k in range(n):
                hs.append(g.h[i])
                ts.append([a + (k + c) / n * (b - a) for c in nodes])
            ends[len(hs) - 1] = True
        pad = total - len(hs)
        h_rows.append(hs + [0.0] * pad)
        t_rows.append(ts + [[g.times[-1]] * len(nodes)] * pad)
    like = times.t
    h_table = like.new_tensor(h_rows).T.contiguous()
    t_table = like.new_tensor(t_rows).permute(1, 2, 0).contiguous()
    return h_table, t_table, ends, steps


def _end_mask(steps: Sequence[Sequence[int]], total: int, device: torch.device) -> torch.Tensor:
    """``(K, B)``: whether step ``k`` of sample ``b`` is the last of one of its intervals."""
    rows = []
    for n in steps:
        row, at = [False] * total, 0
        for m in n:
            at += m
            row[at - 1] = True
        rows.append(row)
    return torch.tensor(rows, device=device).T.contiguous()


class SampleSteps:
    """The steps of one per-sample pass, as the loop drives them (a
    :class:`~torchode_adjoint.controllers.protocol.LoopController`).

    Parameters
    ----------
    times : SampleTimes
        The rows the pass goes along (reversed for a backward pass).
    nodes : sequence of float
        The method's nodes (stage times ``t + c_j h``).
    like : Tensor
        The state (batch first): the shape the step sizes and times broadcast against.
    control : ErrorControl, optional
        Error-controlled steps; None for fixed ones (``grid``).
    error_order : int, optional
        The method's embedded order (error control).
    grid : callable, optional
        Fixed steps: a sample's host times to its equal steps (the solve's ``TimeGrid``).
    h0 : Tensor, shape (B,), optional
        The first step each sample tries (error control).
    dense : bool, default False
        Step past output times to each sample's last (the outputs are interpolated); False
        ends a step on every output time.
    ratio : callable, optional
        ``ratio(carry, out) -> (B,)``: each sample's error ratio of a try (error control).
    max_steps : int
        The most tries of the batch.
    retake : bool, default False
        The pass is differentiated: a try in which a sample that rejected overflowed is taken
        again, with that sample's step at zero, before it is accepted (see
        :attr:`SampleStep.unsafe`).
    """

    def __init__(
        self,
        times: SampleTimes,
        nodes: Sequence[float],
        like: torch.Tensor,
        *,
        control: ErrorControl | None = None,
        error_order: int | None = None,
        grid: Callable[[Sequence[float]], TimeGrid] | None = None,
        h0: torch.Tensor | None = None,
        dense: bool = False,
        ratio: Callable[[Any, Stepped], torch.Tensor] | None = None,
        max_steps: int = 10_000_000,
        retake: bool = False,
    ) -> None:
        self.times, self.nodes, self.like = times, tuple(nodes), like
        self.control, self.dense, self.ratio, self.max_steps = control, dense, ratio, max_steps
        self.retake = retake
        self._pending: SampleStep | None = None
        t = times.t
        batch = times.batch
        self.direction = times.direction
        self._signed = t * self.direction[:, None]
        self.t_now = t[:, 0].clone()
        self.t_end = t[:, -1]
        self.next_out = torch.ones(batch, dtype=torch.long, device=t.device)
        self._accepted = torch.zeros(batch, dtype=torch.long, device=t.device)
        self._tried = torch.zeros(batch, dtype=torch.long, device=t.device)
        self.tries = 0
        self._done = False
        self.taken: SampleStep | None = None
        self._trial: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._ts: tuple[torch.Tensor, ...] = ()
        self._resolution = FLOOR * torch.finfo(t.dtype).eps
        self._c = t.new_tensor(self.nodes)
        if control is None:
            assert grid is not None
            self._sizer = None
            self._h_table, self._t_table, self._ends, steps = _fixed_table(times, grid, self.nodes)
            self._end_mask = _end_mask(steps, len(self._ends), t.device)
        else:
            assert error_order is not None and h0 is not None and ratio is not None
            self._sizer = _Sizer(control, error_order)
            self.h_abs = h0
            self.previous = torch.ones_like(h0)

    @property
    def counts(self) -> SampleCounts:
        """Each sample's accepted and rejected steps so far."""
        return SampleCounts(self._accepted.clone(), self._tried - self._accepted)

    # -- the loop's protocol -------------------------------------------------------------
    def start(self, carry: Any) -> Any:
        return carry

    def plan(self) -> Try | None:
        pending = self._pending
        if pending is not None:  # the same try again, the overflowed samples' steps at zero
            return Try(sample_view(pending.masked(), self.like), pending.ts, dense=True)
        if self._done:
            return None
        if self._sizer is None:
            return self._plan_fixed()
        alive = self.t_now != self.t_end
        if self.dense:
            stop = self.t_end
        else:
            index = self.next_out.clamp(max=self.times.count - 1)[:, None]
            stop = self.times.t.gather(1, index)[:, 0]
        remaining = (stop - self.t_now).abs()
        hh = self.h_abs if math.isinf(self._max_step) else self.h_abs.clamp(max=self._max_step)
        last = hh * STRETCH >= remaining
        end = torch.where(last, stop, self.t_now + self.direction * hh)
        end = torch.where(alive, end, self.t_now)
        h = end - self.t_now
        self._trial = (h, h.abs(), end, alive)
        self._hh = hh
        self._ts = ts = self._stage_times(h)
        return Try(sample_view(h, self.like), ts, dense=self.dense)

    def judge(self, carry: Any, out: Stepped) -> bool:
        if self._pending is not None:  # the try taken again: decided already
            self.taken, self._pending = self._pending, None
            return True
        self.tries += 1
        if self.tries > self.max_steps:
            raise RuntimeError(
                f"the per-sample solve took more than `max_steps={self.max_steps:,}` steps of "
                "the batch; loosen `rtol`/`atol`, check the dynamics for stiffness, or pass a "
                "larger `max_steps`."
            )
        if self._sizer is None:
            return self._judge_fixed()
        assert self._trial is not None and self.ratio is not None
        _, size, end, alive = self._trial
        hh = self._hh
        with torch.no_grad():  # the step-size decisions are not differentiated
            ratio = self.ratio(carry, out)
        accept = alive & (ratio <= 1.0)
        factor = self._sizer.factor(ratio, self.previous)
        grown = torch.maximum(hh, size * factor)
        shrunk = size * factor.clamp(max=1.0)
        self.h_abs = torch.where(alive, torch.where(accept, grown, shrunk), self.h_abs)
        if self._sizer.control.beta2:  # the PI rule's memory of the last accepted ratio
            self.previous = torch.where(accept, ratio, self.previous)
        small = alive & (size < self._smallest(end))
        overflow = alive & ~torch.isfinite(ratio)  # (a non-finite ratio is never accepted)
        any_accept = self._move(end, accept, small, overflow)
        if any_accept and self.retake and self.taken is not None and self.taken.unsafe:
            self._pending = self.taken
            return False
        return any_accept

    def passed(self, carry: Any) -> Any:
        return carry

    # -- fixed steps -----------------------------------------------------------------------
    def _plan_fixed(self) -> Try | None:
        k = self.tries
        if k >= len(self._ends):
            return None
        h = self._h_table[k]
        self._ts = ts = tuple(sample_view(x, self.like) for x in self._t_table[k].unbind(0))
        end = self.t_now + h
        self._trial = (h, h, end, h != 0.0)
        return Try(sample_view(h, self.like), ts, dense=False)

    def _judge_fixed(self) -> bool:
        assert self._trial is not None
        k = self.tries - 1
        _, _, end, alive = self._trial
        if not self._ends[k]:
            self._move(end, alive, None, n_out=torch.zeros_like(self.next_out))
            return True
        # An interval's last step ends on its output time exactly (no sum of steps).
        index = self.next_out.clamp(max=self.times.count - 1)[:, None]
        on = self.times.t.gather(1, index)[:, 0]
        ends_here = self._end_mask[k] & alive
        self._move(torch.where(ends_here, on, end), alive, None, n_out=ends_here.long())
        return True

    # -- shared ----------------------------------------------------------------------------
    @property
    def _max_step(self) -> float:
        assert self.control is not None
        return self.control.max_step

    def _smallest(self, end: torch.Tensor) -> torch.Tensor:
        assert self.control is not None
        scale = torch.maximum(self.t_now.abs(), end.abs()) * self._resolution
        return scale.clamp(min=self.control.min_step)

    def _stage_times(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = torch.addcmul(self.t_now[None, :], self._c[:, None], h[None, :])
        return tuple(sample_view(x, self.like) for x in values.unbind(0))

    def _move(
        self,
        end: torch.Tensor,
        accept: torch.Tensor,
        small: torch.Tensor | None,
        overflow: torch.Tensor | None = None,
        *,
        n_out: torch.Tensor | None = None,
    ) -> bool:
        """Move the accepted samples to ``end``, and the outputs they reached (``n_out`` where
        the caller knows them: then no host read); the step's one host read. Returns whether
        any sample accepted."""
        t_old = self.t_now
        t_new = torch.where(accept, end, t_old)
        first = self.next_out
        if n_out is None:
            # Along each sample's direction: an output is reached where d t_j <= d t_new.
            reached = (self._signed <= (t_new * self.direction)[:, None]).sum(1)
            n_out = (reached - first).clamp(min=0)
        self.next_out = first + n_out
        self._accepted += accept
        self._tried += t_old != self.t_end
        most, any_accept, unsafe, inside = 1, True, False, False
        if self._sizer is not None:
            assert small is not None and overflow is not None
            going = t_new != self.t_end
            masks = [accept, going, small, overflow]
            if self.dense:  # an output passed inside a step, not on its end: interpolate
                on = self.times.t.gather(1, first.clamp(max=self.times.count - 1)[:, None])
                masks.append((n_out > 1) | ((n_out == 1) & (on[:, 0] != t_new)))
            flags = torch.stack(masks).any(1)
            read = torch.cat([flags.long(), n_out.max().view(1)]).tolist()
            any_accept, self._done, most = bool(read[0]), not read[1], int(read[-1])
            unsafe = bool(read[3])
            inside = self.dense and bool(read[4])
            if read[2]:
                self._too_small(small)
        assert self._trial is not None
        self.taken = SampleStep(
            h=self._trial[0],
            ts=self._ts,
            accept=accept,
            t_old=t_old,
            t_new=t_new,
            first_out=first,
            n_out=n_out,
            most=most,
            unsafe=unsafe,
            inside=inside,
        )
        self.t_now = t_new
        return any_accept

    def _too_small(self, small: torch.Tensor) -> None:
        assert self.control is not None
        b = int(small.nonzero()[0, 0])
        t_b = float(self.t_now[b])
        raise RuntimeError(
            f"the error-controlled step of sample {b} shrank below what its times resolve (or "
            f"`min_step={self.control.min_step:g}`) at t = {t_b:.6g}: its error cannot be "
            f"kept under {self.control.describe()}; loosen the tolerances, check the "
            "dynamics of that sample for a blow-up or stiffness, or solve in float64."
        )


class ReplaySteps:
    """The tries a per-sample pass took (its :attr:`SampleSteps.taken` records with their
    stage times), replayed as the loop drives them: each one accepted where it was, with a
    zero step for the samples that rejected it (the same values, and no overflow of a
    rejected step in the replay's graph)."""

    def __init__(self, records: Sequence[SampleStep], like: torch.Tensor) -> None:
        self.records, self.like, self.k = records, like, 0
        self.taken: SampleStep | None = None

    def start(self, carry: Any) -> Any:
        return carry

    def plan(self) -> Try | None:
        if self.k >= len(self.records):
            return None
        record = self.records[self.k]
        return Try(sample_view(record.masked(), self.like), record.ts, dense=True)

    def judge(self, carry: Any, out: Stepped) -> bool:
        self.taken = self.records[self.k]
        self.k += 1
        return True

    def passed(self, carry: Any) -> Any:
        return carry
