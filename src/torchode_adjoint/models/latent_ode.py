"""The latent ODE of Chen et al. (2018), section 5.1, and the RNN baseline it is compared with.

An RNN encoder reads the observations backwards in time (each with the time gap to the next)
and gives ``q(z0) = N(mean, exp(logvar))``; a latent state ``z0`` drawn from it is integrated by
a neural ODE to every time of interest and decoded to the observation space. Trained by the
ELBO: Gaussian log-likelihood of the observations plus the KL divergence to ``N(0, I)``. The
baseline reads the observations the same way and decodes with a GRU run over the times of
interest (input: the time gap), at the same sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["Encoder", "LatentDynamics", "LatentODE", "RNNBaseline", "gaussian_elbo"]


class Encoder(nn.Module):
    """A GRU over the observations in reverse time order; input: the value and the time gap."""

    def __init__(self, obs_dim: int = 2, hidden: int = 25, out: int = 8) -> None:
        super().__init__()
        self.cell = nn.GRUCell(obs_dim + 1, hidden)
        self.out = nn.Linear(hidden, out)
        self.hidden = hidden

    def forward(self, times: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``times`` (B, n), ``values`` (B, n, obs_dim) -> (B, out)."""
        h = values.new_zeros(values.shape[0], self.hidden)
        n = values.shape[1]
        for k in range(n - 1, -1, -1):
            gap = (times[:, k + 1] - times[:, k]) if k + 1 < n else torch.zeros_like(times[:, k])
            h = self.cell(torch.cat([values[:, k], gap[:, None]], dim=1), h)
        return self.out(h)


class LatentDynamics(nn.Module):
    """``dz/dt = MLP(z)`` (ELU), the latent ODE's vector field."""

    def __init__(self, latent_dim: int = 4, hidden: int = 20) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
            nn.Linear(hidden, latent_dim),
        )  # fmt: skip

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class LatentODE(nn.Module):
    """Encoder, latent dynamics and decoder; ``solve(dynamics, z0, times)`` integrates.

    Parameters
    ----------
    obs_dim, latent_dim, rnn_hidden, ode_hidden, decoder_hidden : int
        Sizes (the paper's: 2, 4, 25, 20, 20).
    """

    def __init__(
        self,
        obs_dim: int = 2,
        latent_dim: int = 4,
        rnn_hidden: int = 25,
        ode_hidden: int = 20,
        decoder_hidden: int = 20,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(obs_dim, rnn_hidden, 2 * latent_dim)
        self.dynamics = LatentDynamics(latent_dim, ode_hidden)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, decoder_hidden), nn.ReLU(), nn.Linear(decoder_hidden, obs_dim)
        )
        self.latent_dim = latent_dim

    def forward(
        self,
        times: torch.Tensor,
        values: torch.Tensor,
        grid: torch.Tensor,
        solve: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        sample: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions on ``grid`` (B, T, obs_dim), and ``q(z0)``'s mean and log-variance."""
        mean, logvar = self.encoder(times, values).chunk(2, dim=1)
        z0 = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        z = solve(self.dynamics, z0, grid)  # (T, B, latent)
        return self.decoder(z).transpose(0, 1), mean, logvar


class RNNBaseline(nn.Module):
    """The RNN the paper compares with: the same encoder, a GRU decoder over the target times."""

    def __init__(self, obs_dim: int = 2, hidden: int = 25) -> None:
        super().__init__()
        self.encoder = Encoder(obs_dim, hidden, hidden)
        self.cell = nn.GRUCell(1, hidden)
        self.out = nn.Linear(hidden, obs_dim)

    def forward(
        self, times: torch.Tensor, values: torch.Tensor, grid: torch.Tensor, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, None, None]:
        h = torch.tanh(self.encoder(times, values))
        outs = [self.out(h)]
        for k in range(1, grid.shape[0]):
            gap = (grid[k] - grid[k - 1]).expand(values.shape[0], 1)
            h = self.cell(gap, h)
            outs.append(self.out(h))
        return torch.stack(outs, dim=1), None, None


def gaussian_elbo(
    pred: torch.Tensor,
    target: torch.Tensor,
    mean: torch.Tensor | None,
    logvar: torch.Tensor | None,
    noise_std: float,
) -> torch.Tensor:
    """The negative ELBO per spiral: Gaussian negative log-likelihood of ``target`` under
    ``pred`` with ``noise_std``, summed over points, plus ``KL(q(z0) || N(0, I))`` (without
    ``mean``, the likelihood alone: the RNN baseline's loss)."""
    nll = (
        0.5 * ((pred - target) / noise_std) ** 2 + math.log(noise_std) + 0.5 * math.log(2 * math.pi)
    )
    loss = nll.sum(dim=(1, 2))
    if mean is not None and logvar is not None:
        loss = loss + 0.5 * (mean**2 + logvar.exp() - 1.0 - logvar).sum(dim=1)
    return loss.mean()
