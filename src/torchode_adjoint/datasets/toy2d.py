"""2-D point clouds for maximum-likelihood density estimation: two moons and concentric rings.

The Neural ODE paper (Chen et al. 2018, section 4.2 and Figure 6) trains continuous normalising
flows by maximum likelihood on samples of such 2-D data sets and shows the transformation from
noise to data. Seeded; nothing is downloaded.
"""

from __future__ import annotations

import math

import torch

__all__ = ["DATASETS", "two_moons", "rings"]


def two_moons(n: int, *, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """``n`` points on two interleaved half circles (radius 1, the lower one shifted by
    ``(1, -0.5)``), with Gaussian noise of scale ``noise``, centred and scaled to unit spread
    along x. Shape ``(n, 2)``, float32."""
    if n < 2:
        raise ValueError(f"`n` must be at least 2, got {n}.")
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    a = torch.rand(half, generator=g) * math.pi
    b = torch.rand(n - half, generator=g) * math.pi
    upper = torch.stack([torch.cos(a), torch.sin(a)], dim=1)
    lower = torch.stack([1 - torch.cos(b), 0.5 - torch.sin(b)], dim=1)
    x = torch.cat([upper, lower]) + noise * torch.randn(n, 2, generator=g)
    x = x - torch.tensor([0.5, 0.25])
    return (x * 2.0)[torch.randperm(n, generator=g)]


def rings(n: int, *, radii: tuple[float, ...] = (1.0, 2.0, 3.0), noise: float = 0.08,
          seed: int = 0) -> torch.Tensor:  # fmt: skip
    """``n`` points on concentric circles of ``radii`` (in proportion to their length), with
    Gaussian radial noise of scale ``noise``. Shape ``(n, 2)``, float32."""
    if n < len(radii):
        raise ValueError(f"`n` must be at least the number of rings ({len(radii)}), got {n}.")
    g = torch.Generator().manual_seed(seed)
    weights = torch.tensor(radii) / sum(radii)
    ring = torch.multinomial(weights, n, replacement=True, generator=g)
    r = torch.tensor(radii)[ring] + noise * torch.randn(n, generator=g)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    return torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)


DATASETS = {"two_moons": two_moons, "rings": rings}
"""The data sets by name: ``DATASETS[name](n, seed=...)``."""
