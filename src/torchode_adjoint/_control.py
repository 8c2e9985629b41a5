"""Error control: the step-size controller of error-controlled steps, and the first step.

An embedded pair's step returns an error estimate ``err`` beside the new state. The controller
measures it in the norm

    ratio = RMS_i( err_i / (atol + rtol * max(|y0_i|, |y1_i|)) )

(Hairer, Norsett & Wanner, *Solving ODEs I*, II.4), accepts the step when ``ratio <= 1``, and
proposes the next step size with a PI controller (Hairer & Wanner, *Solving ODEs II*, IV.2;
Gustafsson 1991)::

    h_next = h * clip(safety * ratio**(-beta1/q) * previous**(beta2/q), factor_min, factor_max)

with ``q`` one more than the embedded method's order. The step-size decisions are made on the
host (one synchronisation per step, for ``ratio``) and are not differentiated.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ErrorControl", "error_ratio", "initial_step"]


def _positive(value: object, name: str, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive number, got {value!r}; pass e.g. {example}.")
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(
            f"`{name}` must be a positive finite number, got {value!r}; pass e.g. {example}."
        )
    return v


@dataclass(frozen=True)
class ErrorControl:
    """The settings of error-controlled steps (``rtol=``, ``atol=`` on ``odeint``).

    Parameters
    ----------
    rtol, atol : float
        Relative and absolute tolerance of the local error (see the module docstring).
    safety : float, default 0.9
        The controller aims at ``safety`` times the largest step the estimate allows.
    factor_min, factor_max : float, default 0.2 and 10.0
        The range of one step-size change.
    beta1, beta2 : float, default 1.0 and 0.0
        The PI controller's exponents, divided by ``q``. The default is the classical I
        controller (diffrax's ``PIDController`` default, and torchdiffeq's); Hairer & Wanner's
        PI controller is ``beta1=0.7, beta2=0.4``.
    max_step : float, default inf
        The largest step size (``step=`` given with tolerances).
    min_step : float, default 0
        Steps below ``min_step`` (or below what the times' precision resolves) raise.
    max_steps : int, default 10,000,000
        The most steps one solve may try (``max_steps=``).
    interpolate : bool, default True
        Step past output times and interpolate the solution there (dense output) where the
        pair has an interpolant and the mode allows it; False steps to every output time.
    """

    rtol: float
    atol: float
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    beta1: float = 1.0
    beta2: float = 0.0
    max_step: float = math.inf
    min_step: float = 0.0
    max_steps: int = 10_000_000
    interpolate: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "rtol", _positive(self.rtol, "rtol", "`rtol=1e-5`"))
        object.__setattr__(self, "atol", _positive(self.atol, "atol", "`atol=1e-7`"))

    def factor(self, ratio: float, previous: float, q: int) -> float:
        """The next step size over this one's, from this step's and the last accepted step's
        error ratios (``q``: the embedded order plus one)."""
        if ratio == 0.0:
            return self.factor_max
        if not math.isfinite(ratio):
            return self.factor_min
        f = self.safety * ratio ** (-self.beta1 / q) * max(previous, 1e-4) ** (self.beta2 / q)
        return min(self.factor_max, max(self.factor_min, f))


def error_ratio(
    errors: Sequence[torch.Tensor],
    before: Sequence[torch.Tensor],
    after: Sequence[torch.Tensor],
    rtol: float,
    atol: float,
) -> torch.Tensor:
    """The RMS of ``err / (atol + rtol * max(|y0|, |y1|))`` over every element of the parts
    given (a 0-dim tensor: the caller reads it on the host once)."""
    total = None
    count = 0
    for e, y0, y1 in zip(errors, before, after):
        scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)
        s = (e / scale).abs().square().sum()
        total = s if total is None else total + s
        count += e.numel()
    assert total is not None
    return (total / max(count, 1)).sqrt()


def initial_step(
    f: object,
    t0: torch.Tensor,
    y0: torch.Tensor,
    f0: torch.Tensor,
    order: int,
    rtol: float,
    atol: float,
    direction: float,
) -> float:
    """Hairer's starting step size (*Solving ODEs I*, II.4): from the sizes of ``y0``, ``f0``
    and of one more evaluation's change; one evaluation of ``f`` and two host reads."""
    scale = atol + y0.abs() * rtol
    d0 = float(torch.linalg.vector_norm(y0 / scale) / math.sqrt(max(y0.numel(), 1)))
    d1 = float(torch.linalg.vector_norm(f0 / scale) / math.sqrt(max(y0.numel(), 1)))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    y1 = y0 + (direction * h0) * f0
    f1 = f(t0 + direction * h0, y1)  # type: ignore[operator]
    d2 = float(torch.linalg.vector_norm((f1 - f0) / scale) / math.sqrt(max(y0.numel(), 1))) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100.0 * h0, h1)
