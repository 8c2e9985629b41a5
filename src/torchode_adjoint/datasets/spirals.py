"""Noisy 2-D spirals observed at irregular times: the Neural ODE paper's time-series task.

Chen et al. (2018), section 5.1, train a latent ODE on 1,000 two-dimensional spirals, half of
them clockwise, each starting at a different point and sampled at 100 equally spaced times; each
spiral is observed at a random subset of those times (without replacement) and the model
predicts the whole trajectory. The generator here follows that description (the paper does not
give the spirals' formula): Archimedean spirals ``r = r0 + 0.5 (theta - theta0)`` over one and a
quarter turns, a random start angle ``theta0`` and start radius ``r0``, counter-clockwise or
mirrored, Gaussian noise on the observations. Seeded; nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Spirals", "make_spirals", "observe"]


@dataclass(frozen=True)
class Spirals:
    """A set of spirals on one time grid.

    Attributes
    ----------
    times : Tensor, shape (T,)
        The equally spaced times, from 0.
    clean : Tensor, shape (N, T, 2)
        The noise-free trajectories (the targets of the predictive RMSE).
    noisy : Tensor, shape (N, T, 2)
        The trajectories with observation noise (what a model sees).
    clockwise : Tensor, shape (N,), bool
    """

    times: torch.Tensor
    clean: torch.Tensor
    noisy: torch.Tensor
    clockwise: torch.Tensor

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    def subset(self, index: torch.Tensor) -> Spirals:
        """The spirals at ``index``."""
        return Spirals(self.times, self.clean[index], self.noisy[index], self.clockwise[index])


def make_spirals(
    n: int = 1000,
    n_times: int = 100,
    *,
    noise: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Spirals:
    """``n`` spirals sampled at ``n_times`` equally spaced times over one and a quarter turns.

    Parameters
    ----------
    n : int, default 1000
    n_times : int, default 100
    noise : float, default 0.1
        Standard deviation of the Gaussian observation noise.
    seed : int, default 0
    dtype : torch.dtype, default float32

    Raises
    ------
    ValueError
        For ``n`` or ``n_times`` below 1 or 2, or a negative ``noise``.
    """
    if n < 1 or n_times < 2:
        raise ValueError(f"`n` must be >= 1 and `n_times` >= 2, got n={n}, n_times={n_times}.")
    if not noise >= 0.0:
        raise ValueError(f"`noise` must be a non-negative standard deviation, got {noise!r}.")
    g = torch.Generator().manual_seed(seed)
    turns = 2.5 * math.pi
    times = torch.linspace(0.0, turns, n_times, dtype=torch.float64)
    theta0 = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 * math.pi
    r0 = 0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)
    clockwise = torch.rand(n, generator=g) < 0.5
    angle = theta0 + times
    radius = r0 + 0.5 * times
    x, y = radius * torch.cos(angle), radius * torch.sin(angle)
    x = torch.where(clockwise[:, None], -x, x)  # mirrored: turning the other way
    clean = torch.stack([x, y], dim=-1) / 3.0  # about unit scale
    noisy = clean + noise * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return Spirals(times.to(dtype), clean.to(dtype), noisy.to(dtype), clockwise)


def observe(n: int, n_times: int, n_obs: int, *, seed: int = 0) -> torch.Tensor:
    """For each of ``n`` spirals, ``n_obs`` of the ``n_times`` time indices drawn without
    replacement, sorted: a LongTensor of shape (n, n_obs).

    Raises
    ------
    ValueError
        If ``n_obs`` is not in 1..``n_times``.
    """
    if not 1 <= n_obs <= n_times:
        raise ValueError(f"`n_obs` must be in 1..{n_times}, got {n_obs}.")
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(n, n_times, generator=g)
    return keys.argsort(dim=1)[:, :n_obs].sort(dim=1).values


def solve_rows(times: torch.Tensor, start: float, pad: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample output times that start at ``start`` and hold each sample's observation
    times (``times``, shape (n, k), sorted), for a per-sample solve: shape (n, k + 1), and the
    column of each observation in its row, shape (n, k).

    A row is ``[start, times...]``; where a sample's first observation is at ``start`` itself,
    the row is its observations and one time ``pad`` after the last (a row's times are strictly
    increasing, and every row has the same length).
    """
    at_start = times[:, :1] == start
    ahead = torch.cat([torch.full_like(times[:, :1], start), times], dim=1)
    behind = torch.cat([times, times[:, -1:] + pad], dim=1)
    rows = torch.where(at_start, behind, ahead)
    columns = torch.arange(times.shape[1], device=times.device) + (~at_start).long()
    return rows, columns
