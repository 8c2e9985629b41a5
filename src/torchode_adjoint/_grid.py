"""The time grid: steps per output interval and their sizes, computed once on the host."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["TimeGrid", "make_grid", "regrid", "stage_times", "step_sizes"]

# Step counts are ceil(|dt| / step) up to this many ulps of the state's dtype, so that an
# interval of 1.1 with step 0.1 gives 11 steps although 1.1 / 0.1 rounds to 11.000000000000002
# (float64) or 11.0000002 (float32).
_ULPS = 16


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
    """

    times: tuple[float, ...]
    n_steps: tuple[int, ...]
    h: tuple[float, ...]


def make_grid(times: list[float], step: float | None, eps: float) -> TimeGrid:
    """Build the grid for host times already validated as strictly monotonic.

    Parameters
    ----------
    times : list of float
        Output times, length >= 2.
    step : float or None
        The largest step size; None takes one step per interval.
    eps : float
        Machine epsilon of the dtype the times are used in.
    """
    n_steps = []
    for t_a, t_b in zip(times[:-1], times[1:]):
        if step is None:
            n_steps.append(1)
            continue
        ratio = abs(t_b - t_a) / step
        n_steps.append(max(1, math.ceil(ratio * (1.0 - _ULPS * eps))))
    h = tuple((t_b - t_a) / n for t_a, t_b, n in zip(times[:-1], times[1:], n_steps))
    return TimeGrid(times=tuple(times), n_steps=tuple(n_steps), h=h)


def _fractions(
    grid: TimeGrid, c: tuple[float, ...], reverse: bool
) -> tuple[list[int], list[float]]:
    index, frac = [], []
    intervals = list(enumerate(grid.n_steps))
    for i, n in reversed(intervals) if reverse else intervals:
        steps = range(n - 1, -1, -1) if reverse else range(n)
        for k in steps:
            for c_j in c:
                index.append(i)
                frac.append(((k + 1 - c_j) if reverse else (k + c_j)) / n)
    return index, frac


def stage_times(
    t: torch.Tensor, grid: TimeGrid, c: tuple[float, ...], *, reverse: bool = False
) -> tuple[torch.Tensor, ...]:
    """All stage times of the integration as 0-dim tensors in ``t``'s dtype and device.

    The time of stage ``j`` of step ``k`` in interval ``i`` is
    ``t[i] + (k + c_j) / n_i * (t[i+1] - t[i])``. With ``reverse=True`` the sequence runs
    backwards through the intervals and steps (for the adjoint, which starts each step at its
    end) and the stage times are ``t[i] + (k + 1 - c_j) / n_i * (t[i+1] - t[i])``.

    When ``t`` requires grad the times are computed from it by one vectorised, differentiable op;
    otherwise they are computed on the host from ``grid.times`` and cached per grid, tableau,
    dtype and device, so that repeated calls (an ``ODEBlock`` in a training loop) build nothing.

    Parameters
    ----------
    t : Tensor, shape (T,)
        Output times in the state's dtype and device; their values equal ``grid.times``.
    grid : TimeGrid
    c : tuple of float
        The tableau's nodes.
    reverse : bool, default False

    Returns
    -------
    tuple of Tensor
        ``sum(grid.n_steps) * len(c)`` scalars, in the order the integration visits them.
    """
    if not t.requires_grad:
        return _host_stage_times(grid, c, reverse, t.dtype, t.device)
    index, frac = _fractions(grid, c, reverse)
    idx = torch.tensor(index, device=t.device)
    fr = torch.tensor(frac, dtype=t.dtype, device=t.device)
    t_a = t[:-1][idx]
    return torch.addcmul(t_a, fr, t[1:][idx] - t_a).unbind(0)


@functools.lru_cache(maxsize=32)
def _host_stage_times(
    grid: TimeGrid, c: tuple[float, ...], reverse: bool, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    index, frac = _fractions(grid, c, reverse)
    ts = grid.times
    values = [ts[i] + f * (ts[i + 1] - ts[i]) for i, f in zip(index, frac)]
    return torch.tensor(values, dtype=dtype, device=device).unbind(0)


def step_sizes(t: torch.Tensor, grid: TimeGrid) -> list[torch.Tensor]:
    """Each interval's step size as a 0-dim tensor, differentiable with respect to ``t``."""
    n = torch.tensor(grid.n_steps, dtype=t.dtype, device=t.device)
    return list(((t[1:] - t[:-1]) / n).unbind(0))


def regrid(grid: TimeGrid, times: list[float]) -> TimeGrid:
    """The same step counts over new output times (for finite differences in the times)."""
    h = tuple((t_b - t_a) / n for t_a, t_b, n in zip(times[:-1], times[1:], grid.n_steps))
    return TimeGrid(times=tuple(times), n_steps=grid.n_steps, h=h)
