"""Error control: the step-size controller of error-controlled steps, and the first step.

An embedded pair's step returns an error estimate ``err`` beside the new state. The controller
measures it in the norm

    ratio = RMS_i( err_i / (atol + rtol * max(|y0_i|, |y1_i|)) )

(Hairer, Norsett & Wanner, *Solving ODEs I*, II.4) over each part of the state (one part for a
state that is one tensor; each tensor of a structured state, with its own tolerances where they
are given per part; the largest part's value counts, as torchdiffeq's mixed norm), accepts the
step when ``ratio <= 1``, and proposes the next step size with a PI controller (Hairer &
Wanner, *Solving ODEs II*, IV.2; Gustafsson 1991)::

    h_next = h * clip(safety * ratio**(-beta1/q) * previous**(beta2/q), factor_min, factor_max)

with ``q`` one more than the embedded method's order. The step-size decisions are made on the
host (one synchronisation per step, for ``ratio``) and are not differentiated.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._compat import functorch_transforms_active
from .._warnings import user_stacklevel
from ..solvers.protocol import Stepped
from .protocol import StepPath, Try

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "ErrorControl",
    "ErrorSteps",
    "PIController",
    "StepSizeController",
    "Tolerance",
    "ToleranceWarning",
    "error_ratio",
    "read_ratio",
    "refuse_vmap",
    "initial_step",
    "warn_unreachable_rtol",
]

#: The tolerances of an embedded pair named without ``step``, ``rtol`` or ``atol``:
#: torchdiffeq's, raised where the state's dtype cannot reach them (:meth:`ErrorControl.for_dtype`).
DEFAULT_RTOL = 1e-7
DEFAULT_ATOL = 1e-9

#: The smallest ``rtol`` a dtype can meet, in units of its machine epsilon (measured: float32
#: dopri5 met rtol 1e-6 = 8 eps and missed 1e-7 by 10x, 1e-9 by 900x).
RTOL_FLOOR_EPS = 4.0

#: A tolerance: one number, or one per part of a structured state (a tuple, list or dict shaped
#: like the state, with numbers for its tensors).
Tolerance = Any


def _positive(value: object, name: str, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive number, got {value!r}; pass e.g. {example}.")
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(
            f"`{name}` must be a positive finite number, got {value!r}; pass e.g. {example}."
        )
    return v


def _tolerance(value: object, name: str, example: str) -> Tolerance:
    """``value`` with its numbers as floats (validated positive), its containers kept."""
    if isinstance(value, Mapping):
        return {k: _tolerance(v, f"{name}[{k!r}]", example) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_tolerance(v, f"{name}[{i}]", example) for i, v in enumerate(value))
    return _positive(value, name, example)


def _text(value: Tolerance) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


@dataclass(frozen=True)
class PIController:
    """The step-size controller of error-controlled steps (``controller=`` on ``odeint`` and
    ``ODEBlock``); the tolerances are ``rtol=``/``atol=`` beside it.

    The next step is ``h * clip(safety * ratio**(-beta1/q) * previous**(beta2/q),
    factor_min, factor_max)``, with ``ratio`` this step's error ratio, ``previous`` the last
    accepted step's, and ``q`` the embedded order plus one; an accepted step never shrinks the
    next.

    Parameters
    ----------
    beta1, beta2 : float, default 1.0 and 0.0
        The exponents. The default is the I controller (diffrax's ``PIDController`` default,
        and torchdiffeq's); ``beta1=0.7, beta2=0.4`` is Hairer & Wanner's PI controller
        (*Solving ODEs II*, IV.2), smoother on problems whose step size oscillates.
    safety : float, default 0.9
    factor_min, factor_max : float, default 0.2 and 10.0
        The range of one step-size change (``0 < factor_min < 1 < factor_max``).
    first_step : float, optional
        The first step's size; default Hairer's algorithm (*Solving ODEs I*, II.4; one
        evaluation more).
    min_step : float, default 0.0
        A step size below which the solve raises (besides the times' resolution).
    norm : callable, optional
        The norm the scaled error is measured in, instead of the RMS over each part:
        ``norm(scaled) -> Tensor`` (a 0-dim tensor or a number) with ``scaled`` shaped like
        the state (a tensor, or the tuple, list or dict of a structured state) holding
        ``err / (atol + rtol * max(|y0|, |y1|))``; a step is accepted where it is at most 1.
        It also sizes the first step, and measures the state and the adjoint in the continuous
        adjoint's backward pass (torchdiffeq's ``options=dict(norm=...)``; diffrax's
        ``PIDController(norm=...)``). It is called on the host once per step, eagerly.
    """

    beta1: float = 1.0
    beta2: float = 0.0
    safety: float = 0.9
    factor_min: float = 0.2
    factor_max: float = 10.0
    first_step: float | None = None
    min_step: float = 0.0
    norm: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        for name in ("beta1", "safety", "factor_min", "factor_max"):
            _positive(getattr(self, name), f"PIController({name}=...)", "the default")
        b2 = self.beta2
        if isinstance(b2, bool) or not isinstance(b2, numbers.Real) or not 0.0 <= b2 < 10.0:
            raise ValueError(f"`PIController(beta2=...)` must be a number in [0, 10), got {b2!r}.")
        if not self.factor_min < 1.0 < self.factor_max:
            raise ValueError(
                "`PIController` needs factor_min < 1 < factor_max (a rejected step must shrink, "
                f"an accepted one may grow), got {self.factor_min!r} and {self.factor_max!r}."
            )
        if self.first_step is not None:
            _positive(self.first_step, "PIController(first_step=...)", "`first_step=1e-3`")
        ms = self.min_step
        if isinstance(ms, bool) or not isinstance(ms, numbers.Real) or not 0.0 <= ms < math.inf:
            raise ValueError(f"`PIController(min_step=...)` must be 0 or positive, got {ms!r}.")
        if self.norm is not None and not callable(self.norm):
            raise TypeError(
                f"`PIController(norm=...)` must be a function of the scaled error, got "
                f"{type(self.norm).__name__}; pass e.g. `norm=lambda e: e.abs().max()`."
            )


@dataclass(frozen=True)
class ErrorControl:
    """The settings of error-controlled steps (``rtol=``, ``atol=`` on ``odeint``).

    Parameters
    ----------
    rtol, atol : float, or one per part of a structured state
        Relative and absolute tolerance of the local error (see the module docstring): a
        number, or a tuple, list or dict shaped like the state with a number per tensor. Once
        the state is known (:meth:`for_parts`), a tuple of floats with one per part.
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
    parts : tuple of (offset, size), default ()
        The parts of the flat state's last dimension the norm is taken over one by one (set
        by :meth:`for_parts` for a structured state; empty: the state is one part).
    step_times : tuple of float, default ()
        Times a step must end on (torchdiffeq's ``step_t``), besides the output times.
    jump_times : tuple of float, default ()
        Times where the dynamics jump (torchdiffeq's ``jump_t``): a step ends there, and the
        derivative a first-same-as-last pair carries over is evaluated anew just after it.
    first_step : float, optional
        The first step's size (None: Hairer's algorithm).
    default_tolerances : bool, default False
        The tolerances are the defaults of a pair named without ``step``, ``rtol`` or ``atol``
        (fitted to the state's dtype by :meth:`for_dtype`).
    norm : callable, optional
        The user's norm of the scaled error, in the state's structure (``PIController(norm=)``);
        None: the RMS over each part.
    view : callable, optional
        The state's structure over a flat state (set by :meth:`for_parts`); None: the state
        is one tensor, integrated as it is.
    adjoint_norm : callable, optional
        The continuous adjoint's norm of its backward steps (``ContinuousAdjoint(norm=f)``):
        ``f((y, a, g_t, *g_params))`` of the scaled errors, ``y`` and ``a`` in the state's
        structure.
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
    parts: tuple[tuple[int, int], ...] = ()
    step_times: tuple[float, ...] = ()
    jump_times: tuple[float, ...] = ()
    first_step: float | None = None
    default_tolerances: bool = False
    norm: Callable[[Any], Any] | None = None
    view: Callable[[torch.Tensor], Any] | None = None
    adjoint_norm: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rtol", _tolerance(self.rtol, "rtol", "`rtol=1e-5`"))
        object.__setattr__(self, "atol", _tolerance(self.atol, "atol", "`atol=1e-7`"))

    def for_parts(
        self,
        parts: Sequence[tuple[int, int]],
        per_part: Any,
        view: Callable[[torch.Tensor], Any] | None = None,
    ) -> ErrorControl:
        """These settings for a state of ``parts`` (offset and size of each tensor in the
        flat state's last dimension); ``per_part(tolerance, name)`` lists a tolerance given
        per part in the parts' order (and raises where its shape is not the state's);
        ``view(flat)`` is the state's structure over a flat state (for a user's norm)."""
        rtol, atol = (
            v if isinstance(v, float) else tuple(float(x) for x in per_part(v, name))
            for v, name in ((self.rtol, "rtol"), (self.atol, "atol"))
        )
        return dataclasses.replace(self, rtol=rtol, atol=atol, parts=tuple(parts), view=view)

    def for_dtype(self, dtype: torch.dtype) -> ErrorControl:
        """The default tolerances fitted to ``dtype``: torchdiffeq's ``rtol=1e-7, atol=1e-9``
        where the dtype reaches them (float64), else the smallest power of ten at least
        :data:`RTOL_FLOOR_EPS` machine epsilons, with ``atol`` 100 times smaller (float32:
        1e-6 and 1e-8)."""
        floor = RTOL_FLOOR_EPS * torch.finfo(dtype).eps
        rtol = max(DEFAULT_RTOL, 10.0 ** math.ceil(math.log10(floor)))
        if rtol == self.rtol:
            return self
        return dataclasses.replace(self, rtol=rtol, atol=rtol * (DEFAULT_ATOL / DEFAULT_RTOL))

    def smallest(self) -> tuple[float, float]:
        """The smallest ``rtol`` and ``atol`` over the parts (for the first step's size and
        the parameter gradients of the adjoint's full norm)."""
        return tuple(  # type: ignore[return-value]
            v if isinstance(v, float) else min(v) for v in (self.rtol, self.atol)
        )

    def describe(self) -> str:
        """``"rtol=1e-05, atol=1e-07"``, for messages."""
        return f"rtol={_text(self.rtol)}, atol={_text(self.atol)}"

    def factor(self, ratio: float, previous: float, q: int) -> float:
        """The next step size over this one's, from this step's and the last accepted step's
        error ratios (``q``: the embedded order plus one)."""
        if ratio == 0.0:
            return self.factor_max
        if not math.isfinite(ratio):
            return self.factor_min
        f = self.safety * ratio ** (-self.beta1 / q) * max(previous, 1e-4) ** (self.beta2 / q)
        return min(self.factor_max, max(self.factor_min, f))


class StepSizeController:
    """The step-size controller of one error-controlled pass: sizes each step, accepts or
    rejects it from its error ratio, proposes the next size, and counts the steps.

    Every error-controlled loop (the forward passes and the continuous adjoint's backward)
    decides through one of these, so the rule is written once: the I/PI formula of
    :meth:`ErrorControl.factor`; after an accepted step the next never shrinks (as in diffrax
    and torchdiffeq), nor for having been cut short to end on a time; a rejected step shrinks
    from the size it tried.

    Parameters
    ----------
    control : ErrorControl
        The settings.
    error_order : int
        The embedded method's order (``q`` is one more).
    dtype : torch.dtype
        The times' dtype: a step below what it resolves at the current time raises.
    """

    __slots__ = ("control", "q", "dtype", "eps", "previous", "ratio", "accepted", "rejected")

    def __init__(self, control: ErrorControl, error_order: int, dtype: torch.dtype) -> None:
        self.control, self.q, self.dtype = control, int(error_order) + 1, dtype
        self.eps = torch.finfo(dtype).eps
        self.previous = self.ratio = 1.0
        self.accepted = self.rejected = 0

    def first_step(
        self, f: object, t0: torch.Tensor, y0: torch.Tensor, f0: torch.Tensor, direction: float
    ) -> float:
        """The first step's size: ``PIController(first_step=...)``, else Hairer's algorithm
        (:func:`initial_step`: one evaluation of ``f``), at most ``max_step``."""
        control = self.control
        user, view = control.norm, control.view or (lambda x: x)
        norm = None
        if user is not None:
            norm = lambda x: _norm_value(user(view(x)), "PIController(norm=...)", x)  # noqa: E731
        with torch.no_grad():
            h = control.first_step or initial_step(
                f, t0.detach(), y0.detach(), f0.detach(), self.q - 1, *control.smallest(),
                direction, norm,
            )  # fmt: skip
        return min(h, control.max_step)

    def restart(self) -> None:
        """Forget the last step's error (the steps of a new output interval, when every step
        ends on an output time)."""
        self.previous = self.ratio = 1.0

    def tried(self, h: float, remaining: float) -> tuple[float, bool]:
        """The step to try, at most ``max_step``, and whether it ends the span: a step that
        would leave a sliver of under 1 % of itself before the end takes the sliver too (a
        sliver may be below what the times resolve, and would cost a step of its own)."""
        hh = min(h, self.control.max_step)
        return hh, hh * STRETCH >= remaining

    def check_size(self, size: float, t_now: float, t_end: float) -> None:
        """Raise where ``size`` is below ``min_step`` or what the times resolve there."""
        control = self.control
        if size < max(control.min_step, FLOOR * self.eps * max(abs(t_now), abs(t_end))):
            _step_too_small(t_now, size, control, self.dtype, self.ratio)

    def judge(self, ratio: float, hh: float, size: float, t_now: float) -> tuple[bool, float]:
        """Accept or reject the step tried (``hh`` proposed, ``size`` taken) from its error
        ``ratio``; the next step's size. Raises after ``max_steps`` steps."""
        control = self.control
        self.ratio = ratio
        if self.accepted + self.rejected >= control.max_steps:
            raise RuntimeError(
                f"the error-controlled solve took more than `max_steps={control.max_steps:,}` "
                f"steps (at t = {t_now:.6g}, step {size:.3g}); loosen `rtol`/`atol`, check the "
                "dynamics for stiffness, or pass a larger `max_steps`."
            )
        if ratio <= 1.0:
            self.accepted += 1
            h = max(hh, size * control.factor(ratio, self.previous, self.q))
            self.previous = ratio
            return True, h
        self.rejected += 1
        return False, size * min(1.0, control.factor(ratio, self.previous, self.q))


PartsFn = Callable[[Any, Any, Any], tuple[Sequence[torch.Tensor], ...]]


class ErrorSteps:
    """Error-controlled steps along a path, as the loop drives them: each step is sized by
    ``sizer`` (what is left of ``path`` bounds it), laid out by ``path`` (its stage times and
    signed size), measured (``parts(before, after, error)``: the tensors the norm is taken
    over) with one host read, and accepted or rejected by ``sizer``. ``h`` is the next step
    size proposed (the first one to try, then what ``sizer`` proposes).

    Parameters
    ----------
    sizer : StepSizeController
    path : StepPath
    parts : callable
    h : float
    """

    __slots__ = ("sizer", "path", "parts", "h", "_trial", "_done")

    def __init__(self, sizer: StepSizeController, path: StepPath, parts: PartsFn, h: float) -> None:
        self.sizer, self.path, self.parts, self.h = sizer, path, parts, h
        self._trial: tuple[float, bool, float, float] = (h, False, h, 0.0)
        self._done = False

    def start(self, carry: Any) -> Any:
        return carry

    def plan(self) -> Try | None:
        if self._done:
            return None
        sizer, path = self.sizer, self.path
        hh, last = sizer.tried(self.h, path.remaining())
        size, t_now, t_end = path.try_step(hh, last)
        sizer.check_size(size, t_now, t_end)
        ts, h_step = path.stage_times()
        self._trial = (hh, last, size, t_now)
        return Try(h_step, ts)

    def judge(self, carry: Any, out: Stepped) -> bool:
        hh, _, size, t_now = self._trial
        errors, before, after = self.parts(carry, out[0], out[1])
        # The one host read of the step: accept or reject, and the next step size.
        ratio = read_ratio(errors, before, after, self.sizer.control)
        accept, self.h = self.sizer.judge(ratio, hh, size, t_now)
        return accept

    def passed(self, carry: Any) -> Any:
        carry, self._done = self.path.advance(self._trial[1], carry)
        return carry


def read_ratio(
    errors: Sequence[torch.Tensor],
    before: Sequence[torch.Tensor],
    after: Sequence[torch.Tensor],
    control: ErrorControl,
) -> float:
    """The step's error ratio on the host: the one synchronisation of an error-controlled step."""
    with torch.no_grad():
        # The first two groups have the state's layout (the state; the adjoint's state and
        # adjoint): they are measured part by part. Further groups are the adjoint's gradients.
        value = error_ratio(errors, before, after, control, split=2)
    try:
        return float(value)
    except RuntimeError as err:
        refuse_vmap(err)
        raise


def refuse_vmap(err: RuntimeError) -> None:
    """Raise the reason instead of PyTorch's message where a host read failed under vmap."""
    if functorch_transforms_active():  # vmap: a data-dependent decision is impossible
        raise RuntimeError(
            "error-controlled steps (`rtol`/`atol`) read each step's error on the host to "
            "accept or reject it, which `torch.func.vmap` cannot do; use fixed steps "
            "(`step=`) under vmap, or solve the batch as one state without vmap."
        ) from err


#: How much longer than proposed the step before an end may be, to end there.
STRETCH = 1.01

#: The smallest step, in units of the dtype's resolution at the current time: a step shorter
#: than one unit would not move the time.
FLOOR = 1.0


def _step_too_small(
    t_now: float, size: float, control: ErrorControl, dtype: torch.dtype, ratio: float
) -> None:
    if not math.isfinite(ratio):
        raise RuntimeError(
            f"the error-controlled step size fell to {size:.3g} at t = {t_now:.6g}: the error "
            f"estimate of the steps tried there was not finite ({ratio}), so the state or the "
            "dynamics overflowed or became NaN at that time (in float32 above about 3e38); "
            "check the dynamics for values that grow without bound there."
        )
    raise RuntimeError(
        f"the error-controlled step size fell to {size:.3g} at t = {t_now:.6g}, below what "
        f"{dtype} resolves there (or `min_step`): the error estimate could not be met with "
        f"{control.describe()}. Likely causes: a stiff problem (use a "
        "fixed small step or rescale time), a discontinuity in the dynamics (pass its time as "
        "an output time), a tolerance below the dtype's reach (float32 resolves about 1e-7: "
        "loosen `rtol`/`atol` or use float64), or a non-finite value in the dynamics."
    )


def error_ratio(
    errors: Sequence[torch.Tensor],
    before: Sequence[torch.Tensor],
    after: Sequence[torch.Tensor],
    control: ErrorControl,
    split: int | None = None,
) -> torch.Tensor:
    """The error ratio: the largest over the groups given (the state; the adjoint's state and
    adjoint, and with its full norm each gradient) of the RMS of
    ``err / (atol + rtol * max(|y0|, |y1|))``, the first ``split`` groups (default all) taken
    part by part (``control.parts``). A 0-dim tensor: the caller reads it on the host once."""
    split = len(errors) if split is None else split
    if control.norm is not None or control.adjoint_norm is not None:
        return _users_norm(errors, before, after, control, split)
    parts, (rtol_min, atol_min) = control.parts, control.smallest()
    worst: torch.Tensor | None = None
    for g, (e, y0, y1) in enumerate(zip(errors, before, after)):
        if g < split and parts:
            rtols = _per_part(control.rtol, len(parts))
            atols = _per_part(control.atol, len(parts))
            pieces = [
                (e.narrow(-1, o, n), y0.narrow(-1, o, n), y1.narrow(-1, o, n), r, a)
                for (o, n), r, a in zip(parts, rtols, atols)
            ]
        elif g < split:
            pieces = [(e, y0, y1, control.rtol, control.atol)]
        else:
            pieces = [(e, y0, y1, rtol_min, atol_min)]
        for e_, y0_, y1_, r, a in pieces:
            if e_.numel() == 0:
                continue
            scale = torch.maximum(y0_.abs(), y1_.abs()).mul_(r).add_(a)
            rms = (e_ / scale).abs().square().mean().sqrt()
            worst = rms if worst is None else torch.maximum(worst, rms)
    return worst if worst is not None else errors[0].new_zeros(())


def _per_part(value: float | tuple[float, ...], n: int) -> Sequence[float]:
    return (value,) * n if isinstance(value, float) else value


def _tolerance_of(
    value: float | tuple[float, ...], like: torch.Tensor, control: ErrorControl
) -> Any:
    """A tolerance over the flat state's last dimension: the number, or each part's value
    across its slots (padding slots get 1)."""
    if isinstance(value, float):
        return value
    row = like.new_ones(like.shape[-1])
    for (o, n), v in zip(control.parts, value):
        row[o : o + n] = v
    return row


def _users_norm(
    errors: Sequence[torch.Tensor],
    before: Sequence[torch.Tensor],
    after: Sequence[torch.Tensor],
    control: ErrorControl,
    split: int,
) -> torch.Tensor:
    """The error ratio in the user's norm (``PIController(norm=)``, ``ContinuousAdjoint(norm=f)``)
    of the scaled errors, the first ``split`` groups (the state's layout) handed over in the
    state's structure; without a state norm those are measured by the RMS over each part."""
    rtol_min, atol_min = control.smallest()
    scaled = []
    for g, (e, y0, y1) in enumerate(zip(errors, before, after)):
        r, a = (control.rtol, control.atol) if g < split else (rtol_min, atol_min)
        r, a = _tolerance_of(r, e, control), _tolerance_of(a, e, control)
        scaled.append(e / (torch.maximum(y0.abs(), y1.abs()) * r + a))
    view = control.view or (lambda x: x)
    if control.adjoint_norm is not None:
        value = control.adjoint_norm((*(view(s) for s in scaled[:split]), *scaled[split:]))
        return _norm_value(value, "ContinuousAdjoint(norm=...)", errors[0])
    values = [
        _norm_value(control.norm(view(s)), "PIController(norm=...)", s)  # type: ignore[misc]
        if g < split
        else s.detach().abs().square().mean().sqrt()
        for g, s in enumerate(scaled)
        if g < split or s.numel() > 0
    ]
    return torch.stack(values).amax() if len(values) > 1 else values[0]


def _norm_value(value: object, name: str, like: torch.Tensor) -> torch.Tensor:
    """A user's norm's value as a 0-dim tensor (on ``like``'s device), or an error naming
    the norm."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return like.new_tensor(float(value)).abs()
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.is_complex():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"`{name}` must return one real number (a 0-dim tensor), got {shape}; reduce over "
            "every element, e.g. `lambda e: e.abs().max()`."
        )
    return value.detach().reshape(()).abs().to(like.device)


def initial_step(
    f: object,
    t0: torch.Tensor,
    y0: torch.Tensor,
    f0: torch.Tensor,
    order: int,
    rtol: float,
    atol: float,
    direction: float,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Hairer's starting step size (*Solving ODEs I*, II.4): from the sizes of ``y0``, ``f0``
    and of one more evaluation's change, in ``norm`` (default the RMS) of the state scaled by
    the tolerances; one evaluation of ``f`` and two host reads."""
    if norm is None:
        norm = lambda x: torch.linalg.vector_norm(x) / math.sqrt(max(x.numel(), 1))  # noqa: E731
    scale = atol + y0.abs() * rtol
    d0 = float(norm(y0 / scale))
    d1 = float(norm(f0 / scale))
    if not (math.isfinite(d0) and math.isfinite(d1)):
        raise RuntimeError(
            f"the {'state' if not math.isfinite(d0) else 'derivative'} at t = {float(t0):.6g}, "
            "where the error-controlled solve starts, was not finite (NaN or infinite): the "
            "first step cannot be sized; check the initial state and the dynamics there."
        )
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    y1 = y0 + (direction * h0) * f0
    f1 = f(t0 + direction * h0, y1)  # type: ignore[operator]
    d2 = float(norm((f1 - f0) / scale)) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100.0 * h0, h1)


class ToleranceWarning(UserWarning):
    """``rtol`` is below what the state's dtype resolves: the solve cannot meet it.

    Silence it with ``warnings.filterwarnings("ignore", category=ToleranceWarning)``.
    """


def warn_unreachable_rtol(control: ErrorControl, dtype: torch.dtype) -> None:
    """Warn where ``control``'s smallest ``rtol`` is below what ``dtype`` resolves (the error
    controller then accepts steps whose round-off exceeds the tolerance, or never accepts)."""
    rtol = control.smallest()[0]
    eps = torch.finfo(dtype).eps
    floor = RTOL_FLOOR_EPS * eps
    if rtol < floor:
        warnings.warn(
            f"`rtol={rtol:g}` is below what {dtype} resolves (machine epsilon {eps:.2g}): the "
            f"error control cannot meet it and the result may be far less accurate than asked; "
            f"pass `rtol` of at least {floor:.1g}, or a float64 state.",
            ToleranceWarning,
            stacklevel=user_stacklevel(),
        )
