"""Batch normalisation whose running statistics depend on the evaluation time.

A BatchNorm inside the dynamics of an ODE is applied at every evaluation time, and the state's
distribution changes with time. A plain ``nn.BatchNorm`` keeps one set of running statistics for
all of them, so in eval mode it normalises the state at ``t = 0.5`` with statistics averaged over
every time seen in training. The layers here keep running statistics per evaluation time, in the
spirit of Temporal Adaptive Batch Normalization (Zheng et al., NeurIPS 2024) and of per-step
statistics in recurrent networks (Cooijmans et al. 2016):

- Training: normalise with the batch statistics, as BatchNorm does. A time seen for the first
  time gets its own slot (while free slots remain); a time already recorded updates its own
  slot; once every slot is taken, a new time's statistics update the two recorded times around
  it, weighted as linear interpolation (TA-BN's rule).
- Eval: a recorded time uses its own statistics exactly; another time interpolates linearly
  between the two recorded times around it; a time outside the recorded range uses the nearest
  recorded time.

Fixed-step solvers evaluate at a finite set of stage times, so with enough slots every stage
time has its own statistics and eval mode uses exactly them. All bookkeeping runs on the tensor's
device without host synchronisation.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from ._warnings import user_stacklevel

__all__ = [
    "TemporalBatchNormBase",
    "TemporalBatchNorm1d",
    "TemporalBatchNorm2d",
    "TemporalBatchNorm3d",
]


class TemporalBatchNormBase(nn.Module):
    """The implementation shared by the 1d, 2d and 3d layers; see :class:`TemporalBatchNorm2d`."""

    _input_dims: tuple[int, ...] = ()
    # Registered in __init__ (buffers and parameters); declared for the type checker.
    times: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        *,
        max_times: int = 64,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"`num_features` must be a positive int (the channel count C), got "
                f"{num_features!r}."
            )
        if isinstance(max_times, bool) or not isinstance(max_times, int) or max_times < 1:
            raise ValueError(
                f"`max_times` must be a positive int, got {max_times!r}; pass at least the number "
                "of distinct stage times of the solve, e.g. `max_times=64`."
            )
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, (int, float))
            or not (0.0 < float(momentum) <= 1.0)
        ):
            raise ValueError(
                f"`momentum` must be a number in (0, 1], got {momentum!r}; the cumulative average "
                "of nn.BatchNorm (`momentum=None`) is not supported here."
            )
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"`eps` must be a positive number, got {eps!r}.")
        self.num_features = num_features
        self.max_times = max_times
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        # Fixed shapes (max_times slots, NaN = free), so that state_dict, .to(), DDP's buffer
        # broadcast and weights_only loading work exactly as for nn.BatchNorm.
        self.register_buffer(
            "times", torch.full((max_times,), float("nan"), device=device, dtype=dtype)
        )
        self.register_buffer(
            "running_mean", torch.zeros(max_times, num_features, device=device, dtype=dtype)
        )
        self.register_buffer(
            "running_var", torch.ones(max_times, num_features, device=device, dtype=dtype)
        )
        self.register_buffer(
            "num_batches_tracked",
            torch.zeros(max_times, dtype=torch.long, device=device),
        )

    def with_shared_affine(self) -> TemporalBatchNormBase:
        """A layer of the same kind with its own running statistics and this layer's affine
        parameters (the same ``weight`` and ``bias`` objects).

        For a normalisation applied more than once per evaluation of the dynamics (one norm
        shared by two convolutions): each application sees another distribution, so each needs
        its own statistics, while the shared affine keeps the parameter count.
        """
        twin = type(self)(
            self.num_features,
            max_times=self.max_times,
            eps=self.eps,
            momentum=self.momentum,
            affine=self.affine,
            track_running_stats=self.track_running_stats,
            device=self.times.device,
            dtype=self.running_mean.dtype,
        )
        if self.affine:
            twin.weight, twin.bias = self.weight, self.bias
        return twin

    def reset_running_stats(self) -> None:
        """Forget every recorded time and its statistics."""
        self.times.fill_(float("nan"))
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def warn_if_too_few_slots(self, needed: int, capped: bool = False) -> None:
        """Warn once (per layer) that a solve needs ``needed`` distinct times, more than
        ``max_times``: the times beyond the slots update interpolated statistics instead of
        their own. ``capped``: counting stopped at ``needed``."""
        if needed <= self.max_times or getattr(self, "_warned_slots", False):
            return
        self._warned_slots = True
        count = f"at least {needed:,}" if capped else f"{needed:,}"
        warnings.warn(
            f"{type(self).__name__} has `max_times={self.max_times}` slots for running statistics, "
            f"and a solve evaluates the dynamics at {count} distinct times: the times beyond "
            "the slots share interpolated statistics instead of their own. Pass "
            f"`max_times={needed if not capped else 2 * needed}` or more, or solve with fewer "
            "steps. Warned once per layer.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    def recorded_times(self) -> list[float]:
        """The times that have their own statistics, sorted (one host sync)."""
        values = self.times[~torch.isnan(self.times)]
        return sorted(values.tolist())

    def statistics_at(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """The running mean and variance eval mode uses at time ``t``, each of shape (C,).

        Exact at a recorded time; linear interpolation between the recorded times around ``t``;
        the nearest recorded time outside their range; mean 0 and variance 1 (nn.BatchNorm's
        initial values) before any time was recorded.
        """
        w = self._interpolation_weights(self._time(t))
        seen = w.sum()
        mean = w @ self.running_mean
        # Before any time is recorded, the weights are all zero: BatchNorm's initial (0, 1).
        var = w @ self.running_var + (1.0 - seen)
        return mean, var

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` with the statistics of time ``t``.

        Parameters
        ----------
        t : Tensor (0-dim) or float
            The evaluation time, as the solver passes it to the dynamics.
        x : Tensor, shape (B, C, ...)

        Returns
        -------
        Tensor, the shape of ``x``
        """
        if x.dim() not in self._input_dims:
            raise ValueError(
                f"{type(self).__name__} expects an input with "
                f"{' or '.join(map(str, self._input_dims))} dimensions (B, C, ...), got shape "
                f"{tuple(x.shape)}."
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got {x.shape[1]} channels in an input "
                f"of shape {tuple(x.shape)}."
            )
        if not self.training and self.track_running_stats:
            mean, var = self.statistics_at(t)
            if not (mean.requires_grad or var.requires_grad):
                return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
            # A time that requires grad moves the interpolated statistics: the fused kernel does
            # not differentiate its statistics, so spell the normalisation out.
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
            if self.weight is not None and self.bias is not None:  # affine: both or neither
                out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
            return out
        if not self.track_running_stats:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # One fused kernel normalises with the batch statistics and, with momentum 1, writes those
        # statistics (the variance unbiased, as BatchNorm's running update uses) into scratch
        # buffers; the per-time update below then mixes them into the slots.
        batch_mean = torch.zeros_like(self.running_mean[0])
        batch_var = torch.ones_like(self.running_var[0])
        out = F.batch_norm(x, batch_mean, batch_var, self.weight, self.bias, True, 1.0, self.eps)
        with torch.no_grad():
            self._update(self._time(t).detach(), batch_mean, batch_var)
        return out

    def _time(self, t: torch.Tensor | float) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            if t.numel() != 1:
                raise ValueError(
                    f"`t` must be a scalar time, got a tensor of shape {tuple(t.shape)}; call the "
                    "layer as `norm(t, x)` with the dynamics' own `t`."
                )
            return t.reshape(()).to(self.times.dtype)
        return torch.tensor(float(t), dtype=self.times.dtype, device=self.times.device)

    def _tolerance(self, t: torch.Tensor) -> torch.Tensor:
        # Stage times built by different code paths (forward, reversed adjoint) differ by ulps.
        eps = torch.finfo(self.times.dtype).eps
        return torch.clamp(t.detach().abs(), min=1.0) * max(64 * eps, 1e-9)

    def _interpolation_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Weights over the slots, shape (max_times,), summing to 1 (0 when none recorded).

        The statistics are piecewise linear in ``t`` between recorded times and constant outside
        their range; the weights are differentiable in ``t``. At a recorded time the value is that
        time's statistics and the derivative is the mean of the slopes on either side (what a
        central difference sees), not the zero slope of a one-hot selection.
        """
        times = self.times
        recorded = ~torch.isnan(times)
        d = t.detach() - times  # > 0: slot below t
        tol = self._tolerance(t)
        big = torch.full_like(times, float("inf"))
        match = recorded & (d.abs() <= tol)
        below = recorded & (d > tol)
        above = recorded & (d < -tol)
        has_lo, has_hi, has_match = below.any(), above.any(), match.any()
        lo = torch.where(below, d, big).argmin()
        hi = torch.where(above, -d, big).argmin()
        m = match.to(torch.uint8).argmax()
        # At a recorded time: the mean of the segments to its left and right (a segment of zero
        # length, constant, past the first or last recorded time).
        left = self._segment(t, torch.where(has_lo, lo, m), m)
        right = self._segment(t, m, torch.where(has_hi, hi, m))
        at_recorded = 0.5 * (left + right)
        # Between recorded times: their segment; outside the range: the nearest (constant).
        a = torch.where(has_lo, lo, hi)
        b = torch.where(has_hi, hi, lo)
        between = self._segment(t, a, b)
        w = torch.where(has_match, at_recorded, between)
        return w * recorded.any().to(times.dtype)

    def _segment(self, t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Linear-interpolation weights at ``t`` on the segment from slot ``a`` to slot ``b``."""
        times = self.times
        # gather, not times[a]: a tensor index that torch.compile can trace without a sync.
        t_a, t_b = times.gather(0, torch.stack([a, b])).unbind(0)
        span = t_b - t_a
        ok = span.abs() > 0
        w_b = torch.where(ok, (t - t_a) / torch.where(ok, span, torch.ones_like(span)), 0.0 * t)
        slots = torch.arange(times.shape[0], device=times.device)
        one_a = (slots == a).to(times.dtype)
        one_b = (slots == b).to(times.dtype)
        return (1.0 - w_b) * one_a + w_b * one_b

    def _update(self, t: torch.Tensor, batch_mean: torch.Tensor, batch_var: torch.Tensor) -> None:
        times = self.times
        recorded = ~torch.isnan(times)
        match = recorded & ((times - t).abs() <= self._tolerance(t))
        free = ~recorded
        slots = torch.arange(times.shape[0], device=times.device)
        # argmax of a bool mask: the first True slot.
        i_match = match.to(torch.uint8).argmax()
        i_free = free.to(torch.uint8).argmax()
        has_match, has_free = match.any(), free.any()
        own = torch.where(has_match, i_match, i_free)
        claim = (~has_match) & has_free & (slots == i_free)
        interpolate = (~has_match) & (~has_free)
        w = torch.where(
            interpolate,
            self._interpolation_weights(t),
            (slots == own).to(times.dtype),
        )
        times.copy_(torch.where(claim, t, times))
        m = (self.momentum * w).unsqueeze(1)
        # The same arithmetic as BatchNorm's running update where the weight is 1.
        self.running_mean.mul_(1.0 - m).add_(m * batch_mean)
        self.running_var.mul_(1.0 - m).add_(m * batch_var)
        self.num_batches_tracked.add_((w > 0).to(torch.long))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, max_times={self.max_times}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )


class TemporalBatchNorm1d(TemporalBatchNormBase):
    """:class:`TemporalBatchNorm2d` for inputs of shape (B, C) or (B, C, L)."""

    _input_dims = (2, 3)


class TemporalBatchNorm2d(TemporalBatchNormBase):
    """Batch normalisation with running statistics per evaluation time, for (B, C, H, W) inputs.

    Use it inside the dynamics of an ODE block in place of ``nn.BatchNorm2d``, called as
    ``norm(t, x)`` with the ``t`` the solver passes to the dynamics. In training it normalises
    with the batch statistics exactly as ``nn.BatchNorm2d`` does; the running statistics it keeps
    are per evaluation time, so that eval mode normalises the state at each time with the
    statistics of that time rather than an average over all times.

    Parameters
    ----------
    num_features : int
        Channels ``C``.
    max_times : int, default 64
        Slots for recorded times. A fixed-step solve with ``n`` steps of an ``s``-stage method
        visits at most ``n * s + 1`` distinct times (Euler with step 0.5 over [0, 1]: 2; RK4
        with step 0.1: 21); with at least that many slots every stage time has its own exact
        statistics. Beyond it, new times update their recorded neighbours by interpolation.
    eps : float, default 1e-5
    momentum : float, default 0.1
        As in ``nn.BatchNorm2d``, per slot.
    affine : bool, default True
        A learnable per-channel scale and shift, shared by all times (so the parameter count is
        that of ``nn.BatchNorm2d``).
    track_running_stats : bool, default True
        False: always normalise with the batch statistics, as ``nn.BatchNorm2d`` does.

    Attributes
    ----------
    times : Tensor, shape (max_times,)
        The recorded times; NaN marks a free slot.
    running_mean, running_var : Tensor, shape (max_times, C)
    num_batches_tracked : Tensor, shape (max_times,), long
        Updates received per slot.

    Notes
    -----
    The statistics at a time ``t`` between recorded times ``t_a < t < t_b`` in eval mode are
    ``mu(t) = (1 - w) mu_a + w mu_b`` and ``var(t) = (1 - w) var_a + w var_b`` with
    ``w = (t - t_a) / (t_b - t_a)``; outside ``[min, max]`` of the recorded times the nearest
    one is used. A time within a few ulps (relative ``max(64 eps, 1e-9)``) of a recorded one is
    that time.

    Time-dependent affine parameters (TA-BN interpolates them too) would add ``2 C`` parameters
    per slot; the shared affine keeps a dynamics' parameter count independent of the solver and
    step, and the 50-epoch CIFAR-10 runs reached their accuracy without it.

    The backward re-evaluation of every gradient mode leaves all buffers untouched (see
    :func:`~torchode_adjoint.odeint`). Under ``DistributedDataParallel`` the buffers are
    broadcast from rank 0 as for BatchNorm; batch statistics are per process (there is no
    ``SyncBatchNorm`` counterpart, and ``convert_sync_batchnorm`` leaves this layer as it is).

    Examples
    --------
    >>> import torch
    >>> from torchode_adjoint import TemporalBatchNorm2d
    >>> norm = TemporalBatchNorm2d(4)
    >>> x = torch.randn(8, 4, 3, 3)
    >>> _ = norm(torch.tensor(0.0), x), norm(torch.tensor(0.5), 2 * x + 1)
    >>> norm.recorded_times()
    [0.0, 0.5]
    >>> norm.eval()(torch.tensor(0.25), x).shape
    torch.Size([8, 4, 3, 3])
    """

    _input_dims = (4,)


class TemporalBatchNorm3d(TemporalBatchNormBase):
    """:class:`TemporalBatchNorm2d` for inputs of shape (B, C, D, H, W)."""

    _input_dims = (5,)
