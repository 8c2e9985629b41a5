"""Per-sample passes: the one loop driven by a per-sample controller.

A pass (:func:`sample_pass`) runs :func:`~torchode_adjoint._executor.run_steps` with a
:class:`~torchode_adjoint.controllers.per_sample.SampleSteps` (or, replaying a pass,
:class:`~torchode_adjoint.controllers.per_sample.ReplaySteps`) and one hook for every accepted
try: the samples that accepted take the step (``torch.where`` on the batch; the others keep their
carry), and each output time a sample reached is written into :class:`SampleOutputs`: the state
where the step ended on it, else the method's interpolant at the sample's own ``theta``. The
writes are indexed per sample on the device (no host read); how many output times one try
passed at most is read with the step's other decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._dynamics import NFECounter
from ._executor import Executor, StepCallbacks, run_steps
from .controllers.error import ErrorControl
from .controllers.fixed import TimeGrid
from .controllers.per_sample import (
    ReplaySteps,
    SampleCounts,
    SampleStep,
    SampleSteps,
    SampleTimes,
    first_steps,
    sample_ratio,
    sample_view,
)
from .solvers.protocol import Method, Stepped

__all__ = [
    "SampleOutputs",
    "SampleRecord",
    "merge",
    "sample_pass",
    "integrate_samples",
    "state_ratio",
]


def merge(accept: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where a sample accepted, ``old`` elsewhere, tensor by tensor of a carry."""
    if isinstance(new, tuple):
        return tuple(merge(accept, n, o) for n, o in zip(new, old))
    return torch.where(sample_view(accept, new), new, old)


class SampleOutputs:
    """The states at each sample's output times, written as the samples reach them.

    ``values`` has shape ``(B, T, *state)``; column 0 is the initial state. Each write puts one
    value per sample at its own column (``torch.where`` keeps the samples that reached none), so
    the buffer stays differentiable under autograd and no host read is needed.
    """

    def __init__(self, y0: torch.Tensor, count: int, first: torch.Tensor | None = None) -> None:
        batch = y0.shape[0]
        self.values = y0.new_zeros((batch, count, *y0.shape[1:]))
        if first is not None:
            self.values[:, 0] = first
        self.rows = torch.arange(batch, device=y0.device)
        self.count = count

    def write(self, column: torch.Tensor, valid: torch.Tensor, value: torch.Tensor) -> None:
        """Put ``value[b]`` at ``(b, column[b])`` where ``valid[b]``."""
        index = (self.rows, column.clamp(max=self.count - 1))
        kept = self.values[index]
        self.values.index_put_(index, torch.where(sample_view(valid, value), value, kept))

    def states(self) -> list[torch.Tensor]:
        """The states at each output column after the first: ``T - 1`` tensors ``(B, ...)``."""
        return list(self.values[:, 1:].unbind(1))


class SampleRecord:
    """What a replaying backward pass needs of a per-sample forward: its accepted tries (with
    their stage times) and its carry before every ``every``-th of them."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps: list[SampleStep] = []
        self.carries: list[Any] = []

    def before(self, carry: Any) -> None:
        """Called with the carry before each accepted try is merged."""
        if len(self.steps) % self.every == 0:
            self.carries.append(carry)


def sample_pass(
    executor: Executor,
    f: Any,
    carry: Any,
    controller: SampleSteps | ReplaySteps,
    times: SampleTimes,
    outputs: SampleOutputs | None,
    *,
    interpolate: bool,
    record: SampleRecord | None = None,
    on_step: Callable[[SampleStep, Any, Stepped, Any], Any] | None = None,
) -> Any:
    """One per-sample pass through the one loop; the last carry.

    After each accepted try the samples that accepted take the step, the outputs they reached
    are written into ``outputs`` (the interpolant at their own times where ``interpolate``, else
    the state the step ended on), ``record`` keeps the try, and ``on_step(taken, before, out,
    merged)`` returns the carry to go on from (an adjoint's incoming gradients).
    """
    method = executor.method
    count = times.count

    def accepted(before: Any, out: Stepped, token: Any) -> Any:
        taken = controller.taken
        assert taken is not None
        if record is not None:
            record.before(before)
            record.steps.append(taken)
        merged = merge(taken.accept, out[0], before)
        if outputs is not None:
            inside = interpolate and taken.inside
            _write(outputs, method, times, taken, before, out, merged, inside, count)
        if on_step is not None:
            merged = on_step(taken, before, out, merged)
        return merged

    return run_steps(executor, f, carry, controller, accepted=accepted)


def _write(
    outputs: SampleOutputs,
    method: Method,
    times: SampleTimes,
    taken: SampleStep,
    before: Any,
    out: Stepped,
    merged: Any,
    interpolate: bool,
    count: int,
) -> None:
    y_new = method.output(merged)
    for k in range(taken.most):
        column = taken.first_out + k
        valid = taken.n_out > k
        value = y_new
        if interpolate:
            on = times.t.gather(1, column.clamp(max=count - 1)[:, None])[:, 0]
            h = taken.h
            theta = (on - taken.t_old) / torch.where(h == 0, torch.ones_like(h), h)
            inside = method.interpolate(
                before, sample_view(h, y_new), out[2], sample_view(theta, y_new)
            )
            value = torch.where(sample_view(on == taken.t_new, y_new), y_new, inside)
        outputs.write(column, valid, value)


def state_ratio(control: ErrorControl) -> Callable[[Any, Stepped], torch.Tensor]:
    """Each sample's error ratio of a try of a method on the state
    (:func:`~torchode_adjoint.controllers.per_sample.sample_ratio`)."""

    def ratio(carry: Any, out: Stepped) -> torch.Tensor:
        y0 = carry[0] if isinstance(carry, tuple) else carry
        y1 = out[0][0] if isinstance(out[0], tuple) else out[0]
        return sample_ratio(out[1], y0, y1, control)

    return ratio


def integrate_samples(
    f: Any,
    y0: torch.Tensor,
    times: SampleTimes,
    executor: Executor,
    control: ErrorControl | None,
    grid: Callable[[Sequence[float]], TimeGrid],
    *,
    check_finite: bool,
    counter: NFECounter,
    record: SampleRecord | None = None,
    max_steps: int = 10_000_000,
) -> list[torch.Tensor]:
    """The states at each sample's output times after the first (``T - 1`` tensors of shape
    ``(B, ...)``), each sample on its own steps: error-controlled per sample with ``control``,
    else the equal steps ``grid`` lays out on each sample's times."""
    if StepCallbacks.of(getattr(f, "func", f)) is not None:
        raise ValueError(
            "the dynamics define `callback_step`/`callback_accept_step`, which are called with "
            "one time and one step size; per-sample output times (a 2-D `t`) give each sample "
            "its own: pass a 1-D `t`, or remove the callbacks."
        )
    method = executor.method
    t0 = sample_view(times.t[:, 0], y0)
    carry = method.init(f, y0, t0)
    if control is None:
        controller = SampleSteps(times, method.nodes, y0, grid=grid, max_steps=max_steps)
        interpolate = False
    else:
        order = method.error_order
        assert order is not None
        derivative = method.derivative(carry)
        f0 = derivative if derivative is not None else f(t0, y0)
        h0 = first_steps(f, t0, y0, f0, times.direction, control, order)
        interpolate = control.interpolate and method.interpolates
        controller = SampleSteps(
            times, method.nodes, y0, control=control, error_order=order, h0=h0,
            dense=interpolate, ratio=state_ratio(control), max_steps=control.max_steps,
            retake=torch.is_grad_enabled(),
        )  # fmt: skip
    outputs = SampleOutputs(y0, times.count, y0)
    sample_pass(
        executor, f, carry, controller, times, outputs, interpolate=interpolate, record=record
    )
    _count(counter, controller.counts, control is not None)
    states = outputs.states()
    if check_finite:
        check_samples_finite(outputs.values, times)
    return states


def _count(counter: NFECounter, counts: SampleCounts, controlled: bool) -> None:
    counter.samples = counts
    if controlled:
        counter.accepted = int(counts.accepted.sum())
        counter.rejected = int(counts.rejected.sum())


def check_samples_finite(values: torch.Tensor, times: SampleTimes, what: str = "state") -> None:
    """Raise naming the first sample (and its first output time) where ``values`` (``(B, T,
    ...)``) is not finite; one host read."""
    finite = torch.isfinite(values.detach()).reshape(values.shape[0], values.shape[1], -1).all(2)
    if bool(finite.all()):
        return
    b = int((~finite).any(1).nonzero()[0, 0])
    j = int((~finite[b]).nonzero()[0, 0])
    where = (
        f"by its output time t[{b}, {j}] = {times.host[b][j]:.6g}"
        if what == "state"
        else "in the backward pass (a NaN or infinite dL/dy of that sample from the loss makes "
        "it so too)"
    )
    raise RuntimeError(
        f"the {what} of sample {b} became NaN or infinite {where}: reduce `step` or tighten "
        "`rtol`/`atol`, or check the dynamics of that sample (pass `check_finite=False` to "
        "return it unchecked)."
    )
