"""Continuous normalising flows of the Neural ODE paper, and the planar flow they are compared with.

Chen et al. (2018), section 4: a CNF transports samples by ``dz/dt = f(t, z)`` and their log
density by ``d log q / dt = -tr(df/dz)``. With ``f`` a sum of ``M`` terms
``u_m(t) tanh(w_m(t) . z + b_m(t))`` (parameters given by a small network of ``t``, as the paper's
gated hypernetwork does) the trace is exact and cheap:
``tr(df/dz) = sum_m (u_m . w_m) (1 - tanh^2(w_m . z + b_m))``. The planar flow (Rezende & Mohamed
2015) applies ``K`` layers ``z + u tanh(w . z + b)``, with ``log|det| = log|1 + u . psi|``.
The 2-D target densities ``p(z) ~ exp(-U(z))`` are Rezende & Mohamed's, which the paper's
Figure 4 uses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CNFDynamics", "PlanarFlow", "TARGETS", "standard_normal_log_prob"]


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` per row."""
    return -0.5 * (z**2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


class CNFDynamics(nn.Module):
    """``(z, log q) -> (f(t, z), -tr(df/dz))`` with ``f`` a sum of ``terms`` tanh units whose
    weights are produced from ``t`` by a network with ``hidden`` units.

    Parameters
    ----------
    terms : int
        ``M``, the number of units (the paper's width, compared with ``K`` planar layers).
    dim : int, default 2
    hidden : int, default 32
    trace : {"exact", "hutchinson"}, default "exact"
        The exact trace above, or FFJORD's (Grathwohl et al. 2019) unbiased estimate
        ``e . (df/dz) e`` by one vector--Jacobian product, with the noise ``e`` set by
        :meth:`draw_noise` before each solve and held fixed during it (the estimator of
        dynamics whose trace has no closed form).
    """

    def __init__(self, terms: int, dim: int = 2, hidden: int = 32, trace: str = "exact") -> None:
        super().__init__()
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"`trace` must be 'exact' or 'hutchinson', got {trace!r}.")
        self.terms, self.dim, self.trace = terms, dim, trace
        self.noise: torch.Tensor | None = None
        self.hyper = nn.Sequential(
            nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, terms * (2 * dim + 1))
        )

    def weights(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``w`` (M, dim), ``u`` (M, dim) and ``b`` (M,) at time ``t``."""
        p = self.hyper(t.reshape(1, 1)).reshape(self.terms, 2 * self.dim + 1)
        return p[:, : self.dim], p[:, self.dim : 2 * self.dim], p[:, -1]

    def draw_noise(self, like: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Draw the Hutchinson estimator's Rademacher noise for a solve of states ``like``."""
        signs = torch.randint(0, 2, like.shape, generator=generator, dtype=like.dtype)
        self.noise = (2 * signs - 1).to(like.device)

    def forward(
        self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z, _ = state
        w, u, b = self.weights(t)
        if self.trace == "hutchinson":
            return self._hutchinson(z, w, u, b)
        h = torch.tanh(z @ w.T + b)  # (B, M)
        dz = h @ u
        trace = ((1 - h**2) * (u * w).sum(dim=1)).sum(dim=1)
        return dz, -trace

    def _hutchinson(
        self, z: torch.Tensor, w: torch.Tensor, u: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.noise is None or self.noise.shape != z.shape:
            raise RuntimeError(
                "the Hutchinson trace needs its noise for this batch: call "
                "`dynamics.draw_noise(z0)` before each solve."
            )
        with torch.enable_grad():
            x = z if z.requires_grad else z.detach().requires_grad_(True)
            dz = torch.tanh(x @ w.T + b) @ u
            (e_jac,) = torch.autograd.grad(dz, x, self.noise, create_graph=True)
        return dz, -(e_jac * self.noise).sum(dim=1)


class PlanarFlow(nn.Module):
    """``K`` planar layers ``z + u_hat tanh(w . z + b)`` with ``u_hat`` constrained so that each
    layer is invertible (``w . u_hat >= -1``)."""

    def __init__(self, layers: int, dim: int = 2) -> None:
        super().__init__()
        self.w = nn.Parameter(0.1 * torch.randn(layers, dim))
        self.u = nn.Parameter(0.1 * torch.randn(layers, dim))
        self.b = nn.Parameter(torch.zeros(layers))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformed samples and ``sum log|det J|`` per row."""
        logdet = z.new_zeros(z.shape[0])
        for k in range(self.w.shape[0]):
            w, u, b = self.w[k], self.u[k], self.b[k]
            wu = w @ u
            u_hat = u + (nn.functional.softplus(wu) - 1 - wu) * w / (w @ w + 1e-8)
            a = torch.tanh(z @ w + b)
            psi = (1 - a**2)[:, None] * w
            logdet = logdet + torch.log((1 + psi @ u_hat).abs() + 1e-8)
            z = z + a[:, None] * u_hat
        return z, logdet


def _u1(z: torch.Tensor) -> torch.Tensor:
    r = z.norm(dim=1)
    a = torch.exp(-0.5 * ((z[:, 0] - 2) / 0.6) ** 2)
    c = torch.exp(-0.5 * ((z[:, 0] + 2) / 0.6) ** 2)
    return 0.5 * ((r - 2) / 0.4) ** 2 - torch.log(a + c + 1e-30)


def _w1(z: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * z[:, 0] / 4)


def _u2(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2


def _u3(z: torch.Tensor) -> torch.Tensor:
    w2 = 3 * torch.exp(-0.5 * ((z[:, 0] - 1) / 0.6) ** 2)
    a = torch.exp(-0.5 * ((z[:, 1] - _w1(z)) / 0.35) ** 2)
    c = torch.exp(-0.5 * ((z[:, 1] - _w1(z) + w2) / 0.35) ** 2)
    return -torch.log(a + c + 1e-30)


TARGETS = {"ring": _u1, "wave": _u2, "split_wave": _u3}
"""Rezende & Mohamed's (2015) energies ``U(z)``, ``p(z) ~ exp(-U(z))``."""
