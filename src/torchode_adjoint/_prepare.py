"""One preparation step for every solve: validate the inputs once and build the :class:`SolveSpec`.

:func:`~torchode_adjoint.odeint`, :class:`~torchode_adjoint.ODEBlock` and
:func:`~torchode_adjoint.check_gradients` all go through :func:`prepare`; nothing after it
validates again.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from ._compiled import Compile, CompileFallbackWarning
from ._dynamics import NFECounter, module_tensors, training_norms
from ._executor import Executor
from ._spec import SolveSpec
from ._structure import State, StateStructure
from ._temporal_norm import TemporalBatchNormBase
from ._warnings import user_stacklevel
from .controllers.error import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    ErrorControl,
    PIController,
    Tolerance,
    warn_unreachable_rtol,
)
from .controllers.fixed import (
    DEFAULT_MAX_STEPS,
    DEFAULT_STEP,
    Steps,
    StepTo,
    TimeGrid,
    distinct_stage_times,
    make_grid,
)
from .controllers.per_sample import check_row, check_sample_times
from .modes.adjoint import ContinuousAdjoint
from .modes.base import Backprop, GradientMode
from .modes.checkpoint import Checkpoint
from .modes.reversible import Reversible
from .solvers.methods import is_heun, tableau_of
from .solvers.registry import Solver, available_solvers, get_solver
from .solvers.tableau import ButcherTableau

__all__ = [
    "ModeName",
    "GRADIENT_MODES",
    "SolveConfig",
    "make_config",
    "Prepared",
    "prepare",
    "resolve_mode",
    "check_step",
    "check_times",
    "check_max_steps",
    "check_compile",
    "reject_foreign_options",
]

ModeName = Literal["backprop", "adjoint", "checkpoint", "reversible"]
# The shorthands and the mode each stands for (with its default options).
_SHORTHANDS: dict[str, type[GradientMode]] = {
    cls.name: cls for cls in (Backprop, ContinuousAdjoint, Checkpoint, Reversible)
}
GRADIENT_MODES: tuple[str, ...] = tuple(_SHORTHANDS)


def resolve_mode(
    adjoint: bool | str | GradientMode, checkpoint_every: int | None = None
) -> GradientMode:
    """Normalise the ``adjoint`` argument to a :class:`GradientMode` object.

    ``True`` is :class:`ContinuousAdjoint`, ``False`` is :class:`Backprop`, a name is its mode
    with default options, a mode object is returned as it is. ``checkpoint_every`` (deprecated)
    turns ``"checkpoint"`` into ``Checkpoint(every=checkpoint_every)``.

    Raises
    ------
    ValueError
        For an unknown name or another type, or ``checkpoint_every`` with another mode.
    """
    if isinstance(adjoint, GradientMode):
        mode = adjoint
    elif adjoint is True or adjoint is False:
        mode = ContinuousAdjoint() if adjoint else Backprop()
    elif isinstance(adjoint, str) and adjoint in _SHORTHANDS:
        mode = _SHORTHANDS[adjoint]()
    else:
        raise ValueError(
            f"`adjoint` must be True, False, one of {list(GRADIENT_MODES)} or a gradient mode "
            f"such as `Checkpoint(every=4)`, got {adjoint!r}."
        )
    if checkpoint_every is not None:
        warnings.warn(
            "`checkpoint_every=k` is deprecated; pass `adjoint=Checkpoint(every=k)`.",
            DeprecationWarning,
            stacklevel=user_stacklevel(),
        )
        if not isinstance(mode, Checkpoint):
            raise ValueError(
                f"`checkpoint_every` applies to the checkpointed mode only, got it with "
                f"adjoint={mode.name!r}; pass `adjoint=Checkpoint(every={checkpoint_every!r})`."
            )
        try:
            mode = Checkpoint(every=checkpoint_every)
        except ValueError as err:
            raise ValueError(str(err).replace("`every`", "`checkpoint_every`")) from None
    return mode


def check_step(step: object) -> float | None:
    """Validate ``step`` (a positive finite number or None) and return it as a float or None."""
    if step is None:
        return None
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_complex():
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(
            f"`step` must be a positive number or None, got {type(step).__name__}; pass the "
            "largest step size, e.g. `step=0.1`."
        )
    value = float(step)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(
            f"`step` must be a positive finite number, got {value!r}; pass the largest step "
            "size, e.g. `step=0.1`, or `step=None` for one step per interval of `t`."
        )
    return value


def check_max_steps(value: object) -> int:
    """Validate ``max_steps`` (a positive int)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"`max_steps` must be a positive int, got {value!r}.")
    return int(value)


def check_compile(compile: object) -> Compile | None:
    """Normalise ``compile`` (a bool or :class:`~torchode_adjoint.Compile`) to options or None."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return Compile()
    if isinstance(compile, Compile):
        return compile
    raise TypeError(
        f"`compile` must be True, False or `torchode_adjoint.Compile(...)`, got {compile!r}; "
        "pass `compile=True` for the compiled step."
    )


# torchdiffeq's keywords, and what this library does instead.
_FOREIGN_OPTIONS = {
    "method": "pass `solver=` (e.g. `solver='dopri5'` with `rtol=`/`atol=`, or a fixed-step "
    "method such as `solver='rk4'` with `step=`)",
    "options": "pass `step=h` for torchdiffeq's `options={'step_size': h}`, and `step=` as the "
    "largest step of an error-controlled solve; `step_t=`, `jump_t=` for its 'step_t', "
    "'jump_t'; `controller=PIController(norm=f)` for its 'norm'",
    "event_fn": "events are solved by `odeint_event(func, y0, t0, event_fn=...)`, which returns "
    "(event_t, solution) as torchdiffeq's event handling mode does",
    "adjoint_params": "pass `params=` (an nn.Module's own parameters are found by themselves)",
    "adjoint_rtol": "pass `adjoint=ContinuousAdjoint(rtol=..., atol=...)`",
    "adjoint_atol": "pass `adjoint=ContinuousAdjoint(rtol=..., atol=...)`",
    "adjoint_method": "the continuous adjoint uses the forward's `solver=`",
    "adjoint_options": "the continuous adjoint's backward steps follow the forward's `step=` or "
    "tolerances; its norm is `adjoint=ContinuousAdjoint(norm='seminorm')` (the default), "
    "`norm='full'` or a function of the scaled errors",
}


def reject_foreign_options(options: dict[str, object], where: str) -> None:
    """Raise a TypeError for keyword arguments this library does not take, with what to pass
    instead where it is one of torchdiffeq's."""
    if not options:
        return
    name = next(iter(options))
    hint = _FOREIGN_OPTIONS.get(name)
    if hint is None:
        raise TypeError(f"{where}() got an unexpected keyword argument {name!r}.")
    raise TypeError(
        f"{where}() does not take torchdiffeq's `{name}=`: {hint}. The differences are listed "
        "on the docs' page 'Coming from torchdiffeq'."
    )


def _check_y0(y0: object) -> torch.Tensor:
    if not isinstance(y0, torch.Tensor):
        raise TypeError(
            f"`y0` must be a tensor or a tuple, list or dict of tensors, got "
            f"{type(y0).__name__}; wrap numbers with `torch.as_tensor(y0, dtype=torch.float32)`."
        )
    if not y0.is_floating_point():
        raise TypeError(
            f"`y0` must be a floating-point tensor, got dtype {y0.dtype}; cast it, e.g. "
            "`y0.float()`."
        )
    return y0


def check_times(t: object, y0: torch.Tensor, minimum: int = 2) -> tuple[torch.Tensor, list[float]]:
    """Return ``t`` in ``y0``'s dtype (differentiably) and its host values (at least
    ``minimum`` times)."""
    if not isinstance(t, torch.Tensor):
        if isinstance(t, Sequence) and not isinstance(t, str):
            if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in t):
                raise TypeError(f"`t` must hold real numbers, got {t!r}.")
            t = torch.tensor([float(v) for v in t], dtype=y0.dtype, device=y0.device)
        else:
            raise TypeError(
                f"`t` must be a 1-D tensor of times, got {type(t).__name__}; pass e.g. "
                "`t=torch.tensor([0.0, 1.0])`."
            )
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"`t` must hold real times, got dtype {t.dtype}.")
    if t.device != y0.device:
        raise ValueError(
            f"`t` must be on the same device as `y0` ({y0.device}), got {t.device}; move it "
            f"with `t.to({str(y0.device)!r})`."
        )
    if t.dim() != 1:
        raise ValueError(
            f"`t` must be a 1-D tensor of output times, got shape {tuple(t.shape)}; pass e.g. "
            "`t=torch.tensor([0.0, 1.0])`."
        )
    if t.numel() < minimum:
        raise ValueError(
            f"`t` must hold at least two times (start and end), got {t.numel()}; pass e.g. "
            "`t=torch.tensor([t0, t1])`."
        )
    t_cast = t.to(y0.dtype)
    host = t_cast.detach().cpu().tolist()
    check_row(host, "`t`", y0.dtype)
    return t_cast, host


def _resolve_params(
    func: object, params: Iterable[torch.Tensor] | None, mode: GradientMode
) -> list[torch.Tensor]:
    extra: list[torch.Tensor] = []
    if params is not None:
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "`params` must be an iterable of tensors, got a single Tensor; pass `params=[p]`."
            )
        extra = list(params)
        for i, p in enumerate(extra):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"`params` must hold tensors, got {type(p).__name__} at index {i}.")
    if isinstance(func, nn.Module):
        # The module's own tensors, then any extra ones the caller declares.
        out = module_tensors(func)
        seen = {id(p) for p in out}
        return out + [p for p in extra if p.requires_grad and id(p) not in seen]
    if params is None and mode.needs_params:
        raise ValueError(
            f"`params` is required with `adjoint={mode.name!r}` when `func` is not an nn.Module: "
            "the gradient mode cannot see the tensors a function closes over and would "
            "silently return no gradient for them. Pass `params=module.parameters()` (or "
            "`params=()` if there are none), or make `func` an nn.Module."
        )
    return [p for p in extra if p.requires_grad]


@dataclass(frozen=True)
class SolveConfig:
    """The settings of a solve that do not depend on its tensors, validated together.

    An :class:`~torchode_adjoint.ODEBlock` builds one in ``__init__`` and reuses it every call.
    """

    tableau: Solver
    step: float | None
    mode: GradientMode
    check_finite: bool
    max_steps: int
    executor: Executor
    control: ErrorControl | None = None
    layout: StepTo | None = None

    @property
    def compile(self) -> Compile | None:
        """The compiled path's options (None: eager)."""
        return self.executor.options

    def grid(self, times: Sequence[float], dtype: torch.dtype) -> Steps:
        """The fixed steps over the output ``times``: the user's layout, else equal steps of
        at most ``step`` (for error control, one record per interval the solve refines)."""
        if self.layout is not None:
            return self.layout.layout(times, dtype, max_steps=self.max_steps)
        return make_grid(times, self.step, torch.finfo(dtype).eps, max_steps=self.max_steps)


def make_config(
    *,
    solver: str | ButcherTableau = "euler",
    step: float | None = DEFAULT_STEP,
    adjoint: bool | str | GradientMode = True,
    check_finite: bool = True,
    checkpoint_every: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    compile: bool | Compile = False,
    rtol: Tolerance | None = None,
    atol: Tolerance | None = None,
    dense_output: bool = True,
    step_t: Sequence[float] | torch.Tensor | None = None,
    jump_t: Sequence[float] | torch.Tensor | None = None,
    controller: PIController | StepTo | None = None,
) -> SolveConfig:
    """Validate the settings: solver, step, mode (and its pairing with the solver), limits,
    and the tolerances of error-controlled steps."""
    mode = resolve_mode(adjoint, checkpoint_every)
    tableau = get_solver(solver)
    mode.check_solver(tableau)
    layout = _step_layout(controller, step, rtol, atol)
    control = None
    if layout is None:
        control = _error_control(tableau, mode, step, rtol, atol, check_max_steps(max_steps))
    if control is not None and not dense_output:
        control = dataclasses.replace(control, interpolate=False)
    control = _stop_times(control, mode, step_t, jump_t)
    if layout is None:
        control = _with_controller(control, cast(PIController | None, controller))
    if control is None and isinstance(mode, ContinuousAdjoint):
        _no_backward_control(mode)
    # Only Heun's own tableau: an embedded pair with Heun's weights (adaptive_heun) never had
    # the old meaning.
    if mode.name == "reversible" and is_heun(tableau) and not getattr(tableau, "adaptive", False):
        warnings.warn(
            "`solver='heun'` with `adjoint='reversible'` now integrates Heun's method made "
            "reversible by McCallum & Foster's coupling (two evaluations per step, order 2); "
            "it used to mean the reversible Heun method (one evaluation per step), which is "
            "now `solver='reversible_heun'`.",
            FutureWarning,
            stacklevel=user_stacklevel(),
        )
    options = check_compile(compile)
    method = mode.method_for(tableau, error_control=control is not None)
    if options is not None and not method.compilable:
        warnings.warn(
            "compile=True with `Reversible()`: each step's coupling is chosen from the step's "
            "contraction and read on the host, so these steps run eagerly (same results); "
            "pass a fixed `Reversible(coupling=0.999)` to compile them.",
            CompileFallbackWarning,
            stacklevel=user_stacklevel(),
        )
    return SolveConfig(
        tableau=tableau,
        step=None if control is not None or layout is not None else check_step(step),
        mode=mode,
        check_finite=bool(check_finite),
        max_steps=check_max_steps(max_steps),
        executor=Executor(method, options),
        control=control,
        layout=layout,
    )


def _step_layout(controller: object, step: object, rtol: object, atol: object) -> StepTo | None:
    """The user's step times (``controller=StepTo(...)``), checked against the settings that
    would also size the steps; None for any other controller."""
    if not isinstance(controller, StepTo):
        return None
    if rtol is not None or atol is not None:
        raise ValueError(
            f"`controller={controller!r}` takes fixed steps at the given times, and `rtol`/`atol` "
            "ask for error-controlled steps: pass one or the other (with tolerances, "
            "`step_t=` makes error-controlled steps end on given times)."
        )
    if step is not DEFAULT_STEP:
        raise ValueError(
            f"`controller={controller!r}` lays out the steps, and `step={step!r}` asks for equal "
            "steps: pass one or the other."
        )
    return controller


def _error_control(
    solver: Solver, mode: GradientMode, step: object, rtol: object, atol: object, max_steps: int
) -> ErrorControl | None:
    """The error control asked for with ``rtol``/``atol`` (None: fixed steps), or implied by
    naming an embedded pair without ``step``, ``rtol`` or ``atol`` (default tolerances, fitted
    to the state's dtype in :func:`prepare`)."""
    tableau = tableau_of(solver)
    if rtol is None and atol is None:
        if step is DEFAULT_STEP and tableau is not None and tableau.adaptive:
            return ErrorControl(
                rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL, max_steps=max_steps, default_tolerances=True
            )
        return None
    if tableau is None or not tableau.adaptive:
        pairs = [n for n in available_solvers() if getattr(get_solver(n), "adaptive", False)]
        raise ValueError(
            f"`rtol`/`atol` ask for error-controlled steps, which need an embedded pair; "
            f"`solver={solver.name!r}` has no error estimate. Pass one of {pairs} (e.g. "
            "`solver='dopri5'`), or drop the tolerances and pass `step=` for fixed steps."
        )
    largest = math.inf if step is DEFAULT_STEP or step is None else check_step(step)
    return ErrorControl(
        rtol=1e-7 if rtol is None else rtol,  # type: ignore[arg-type]
        atol=1e-9 if atol is None else atol,  # type: ignore[arg-type]
        max_step=math.inf if largest is None else largest,
        max_steps=max_steps,
    )


def _control_for(
    control: ErrorControl | None, structure: StateStructure | None
) -> ErrorControl | None:
    """The error control of a state: for a structured one, its norm taken part by part (with
    the tolerances per part where they are given so)."""
    if control is None:
        return None
    if structure is None:
        for name in ("rtol", "atol"):
            if not isinstance(getattr(control, name), float):
                raise ValueError(
                    f"`{name}` is given per part ({getattr(control, name)!r}), and `y0` is one "
                    f"tensor; pass one number, e.g. `{name}=1e-6`, or a tuple or dict of "
                    "tensors as `y0`."
                )
        return control
    return control.for_parts(structure.parts(), structure.per_part, structure.unflatten)


def _with_controller(
    control: ErrorControl | None, controller: PIController | None
) -> ErrorControl | None:
    """The error control with the step-size controller's settings."""
    if controller is None:
        return control
    if not isinstance(controller, PIController):
        raise TypeError(
            f"`controller` must be a `torchode_adjoint.PIController` (error-controlled steps) "
            f"or `StepTo` (fixed steps at given times), got {type(controller).__name__}; pass "
            "e.g. `controller=PIController(beta1=0.7, beta2=0.4)`."
        )
    if control is None:
        raise ValueError(
            "`controller` sets how error-controlled steps are sized, and this solve takes fixed "
            "steps: pass `rtol`/`atol` with an embedded pair (e.g. `solver='dopri5'`)."
        )
    fields = (
        "beta1", "beta2", "safety", "factor_min", "factor_max", "first_step", "min_step", "norm"
    )  # fmt: skip
    return dataclasses.replace(control, **{k: getattr(controller, k) for k in fields})


def _no_backward_control(mode: ContinuousAdjoint) -> None:
    """Refuse the adjoint's own error control where the forward takes fixed steps (its backward
    pass takes the forward's steps in reverse, so the settings would do nothing)."""
    given = [n for n in ("rtol", "atol") if getattr(mode, n) is not None]
    if callable(mode.norm):
        given.append("norm")
    if given:
        raise ValueError(
            f"`ContinuousAdjoint({given[0]}=...)` sets the backward pass's error control, and this "
            "solve takes fixed steps (its backward pass takes the same steps in reverse): drop "
            "it, or pass `rtol`/`atol` with an embedded pair (e.g. `solver='dopri5'`)."
        )


def _times_list(value: object, name: str) -> tuple[float, ...]:
    """``step_t``/``jump_t`` as host floats (a 1-D tensor or a sequence of real numbers)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.is_complex():
            raise ValueError(f"`{name}` must be a 1-D tensor or a list of times, got shape "
                             f"{tuple(value.shape)} of {value.dtype}.")  # fmt: skip
        values = value.detach().reshape(-1).cpu().tolist()
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
    else:
        raise TypeError(f"`{name}` must be a list or 1-D tensor of times, got "
                        f"{type(value).__name__}; pass e.g. `{name}=[1.0]`.")  # fmt: skip
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"`{name}` must hold finite real times, got {v!r}.")
    return tuple(sorted({float(v) for v in values}))


def _stop_times(
    control: ErrorControl | None, mode: GradientMode, step_t: object, jump_t: object
) -> ErrorControl | None:
    """The error control with the times its steps must end on (torchdiffeq's options)."""
    if step_t is None and jump_t is None:
        return control
    if control is None:
        raise ValueError(
            "`step_t`/`jump_t` are times error-controlled steps must end on, and this solve "
            "takes fixed steps: pass `rtol`/`atol` with an embedded pair (e.g. "
            "`solver='dopri5'`), or, with fixed steps, add the times to `t`."
        )
    jumps = () if jump_t is None else _times_list(jump_t, "jump_t")
    if jumps and mode.replays_steps:
        raise ValueError(
            f"`jump_t` evaluates the dynamics anew just after each jump, which "
            f"`adjoint={mode.name!r}` cannot replay; pass the times as `step_t` (steps end "
            "there) and let the dynamics give the value of the later side at the jump time "
            "itself, or use `adjoint=False` or `adjoint=True`."
        )
    steps = () if step_t is None else _times_list(step_t, "step_t")
    return dataclasses.replace(control, step_times=steps, jump_times=jumps)


def _with_stops(
    t: torch.Tensor, host: list[float], control: ErrorControl | None
) -> tuple[torch.Tensor, list[float], list[int] | None]:
    """The output times with the stop times (``step_t``, ``jump_t``) inside them merged in
    (differentiable in ``t``), and the positions of the output times among them (None: no
    stop time falls strictly inside and off the output times)."""
    if control is None or not (control.step_times or control.jump_times):
        return t, host, None
    lo, hi = min(host[0], host[-1]), max(host[0], host[-1])
    given = set(host)
    inner = sorted({s for s in (*control.step_times, *control.jump_times)
                    if lo < s < hi and s not in given})  # fmt: skip
    if not inner:
        return t, host, None
    union = sorted(given | set(inner), reverse=host[-1] < host[0])
    where = {v: i for i, v in enumerate(host)}
    where.update({v: len(host) + j for j, v in enumerate(inner)})
    pool = torch.cat([t, t.new_tensor(inner)])
    merged = pool[torch.tensor([where[v] for v in union], device=t.device)]
    position = {v: i for i, v in enumerate(union)}
    return merged, union, [position[v] for v in host]


@dataclass(frozen=True)
class Prepared:
    """The validated inputs of one solve: the spec and the tensors the mode is applied to."""

    spec: SolveSpec
    mode: GradientMode
    y0: torch.Tensor
    t: torch.Tensor
    params: list[torch.Tensor]
    structure: StateStructure | None = None
    keep: list[int] | None = None  # the output times' positions among ``t`` (with stop times)

    def solve(self) -> list[torch.Tensor]:
        """The states at the output times after the first, differentiable as the mode
        promises."""
        states = self.mode.solve(self.spec, self.y0, self.t, self.params)
        if self.keep is None:
            return states
        return [states[k - 1] for k in self.keep[1:]]


def prepare(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: State,
    t: torch.Tensor | Sequence[float],
    config: SolveConfig,
    *,
    params: Iterable[torch.Tensor] | None = None,
    nfe: NFECounter | None = None,
) -> Prepared:
    """Validate the tensors of one solve against ``config`` and build its spec and grid.

    A state that is not one real tensor (a tuple, list or dict of tensors, or a complex tensor)
    is flattened into one real vector here and ``func`` wrapped to match (see
    :mod:`._structure`); ``Prepared.structure`` maps the solution back.
    """
    if not callable(func):
        raise TypeError(f"`func` must be callable as func(t, y), got {type(func).__name__}.")
    param_list = _resolve_params(func, params, config.mode)
    if isinstance(t, torch.Tensor) and t.dim() == 2:
        return _prepare_samples(func, y0, t, config, param_list, nfe)
    structure = StateStructure.of(y0)
    if structure is not None:
        func, y0 = structure.wrap(func), structure.flatten(y0)
    y0 = _check_y0(y0)
    t_cast, host = check_times(t, y0)
    t_cast, host, keep = _with_stops(t_cast, host, config.control)
    grid = config.grid(host, y0.dtype)
    counter = nfe if nfe is not None else NFECounter()
    counter.reset()
    spec = SolveSpec(
        func=func,
        grid=grid,
        check_finite=config.check_finite,
        counter=counter,
        executor=config.executor,
        control=_control_for(config.control, structure),
    )
    return Prepared(
        spec=_fitted(spec, y0.dtype),
        mode=config.mode,
        y0=y0,
        t=t_cast,
        params=param_list,
        structure=structure,
        keep=keep,
    )


def _prepare_samples(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: State,
    t: torch.Tensor,
    config: SolveConfig,
    params: list[torch.Tensor],
    nfe: NFECounter | None,
) -> Prepared:
    """:func:`prepare` for per-sample output times (``t`` of shape ``(B, T)``)."""
    structure = StateStructure.of(y0)
    if structure is not None:
        batch = t.shape[0] if t.dim() == 2 else None
        if structure.batch != (batch,):
            raise ValueError(
                f"per-sample output times `t` of shape {tuple(t.shape)} need every part of the "
                f"state `y0` to have the batch ({batch} samples) as its first dimension, got "
                f"{structure!r}; give each part the batch first, or pass a 1-D `t`."
            )
        func, y0 = structure.wrap(func), structure.flatten(y0)
    y0 = _check_y0(y0)
    if t.device != y0.device:
        raise ValueError(
            f"`t` must be on the same device as `y0` ({y0.device}), got {t.device}; move it "
            f"with `t.to({str(y0.device)!r})`."
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"`t` must hold real times, got dtype {t.dtype}.")
    samples = check_sample_times(t, y0)
    control = _control_for(config.control, structure)
    if config.layout is not None or (
        control is not None and (control.step_times or control.jump_times)
    ):
        raise ValueError(
            "per-sample output times (a 2-D `t`) take equal steps or error-controlled ones; "
            "`controller=StepTo(...)`, `step_t=` and `jump_t=` lay out steps shared by the "
            "batch: pass a 1-D `t` with them."
        )
    if control is not None and control.norm is not None:
        raise ValueError(
            "per-sample output times (a 2-D `t`) measure each sample's error by its RMS; "
            "`PIController(norm=...)` is not supported with them: leave `norm` out."
        )
    if any(isinstance(m, TemporalBatchNormBase) for m in training_norms(func)):
        raise ValueError(
            "a TemporalBatchNorm in training mode keeps statistics per evaluation time, and "
            "per-sample output times (a 2-D `t`) evaluate each sample at its own times: use "
            "`nn.GroupNorm` in the dynamics, or a 1-D `t`."
        )
    dtype = y0.dtype

    def layout(row: Sequence[float]) -> TimeGrid:
        return make_grid(row, config.step, torch.finfo(dtype).eps, max_steps=config.max_steps)

    if control is None:  # every sample's steps laid out (and counted) before any is taken
        grid = [layout(row) for row in samples.host][0]  # (the first's stands for the spec)
    else:
        grid = make_grid(samples.host[0], None, torch.finfo(dtype).eps)
    counter = nfe if nfe is not None else NFECounter()
    counter.reset()
    spec = SolveSpec(
        func=func,
        grid=grid,
        check_finite=config.check_finite,
        counter=counter,
        executor=config.executor,
        control=control,
        samples=samples,
        layout=layout,
    )
    return Prepared(
        spec=_fitted(spec, dtype),
        mode=config.mode,
        y0=y0,
        t=samples.t,
        params=params,
        structure=structure,
    )


def _fitted(spec: SolveSpec, dtype: torch.dtype) -> SolveSpec:
    """``spec`` with the default tolerances fitted to ``dtype``, or a warning where the
    user's ``rtol`` is below what ``dtype`` resolves."""
    control = spec.control
    if control is not None and control.default_tolerances:
        return dataclasses.replace(spec, control=control.for_dtype(dtype))
    if control is not None:
        warn_unreachable_rtol(control, dtype)
    return spec


@torch.compiler.disable  # (its `reason=` needs a newer PyTorch than the oldest supported)
def solve(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: State,
    t: torch.Tensor | Sequence[float],
    config: SolveConfig,
    *,
    params: Iterable[torch.Tensor] | None = None,
    nfe: NFECounter | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], StateStructure | None]:
    """:func:`prepare` and solve: the validated (flat) ``y0``, the (flat) states at ``t[1:]``,
    and the structure that maps them back (None for a state that is one real tensor).

    Opaque to an outer ``torch.compile`` (of a network holding a block): Dynamo does not trace
    the validation, the host-side grid and the Python stepping loop, which would only break the
    graph inside them; the solve is one graph break, its own steps compile with ``compile=True``.
    """
    if _one_time(t):  # the solution at the one time asked for is y0: nothing to integrate
        structure = StateStructure.of(y0)
        flat = _check_y0(structure.flatten(y0) if structure is not None else y0)
        check_times(t, flat, minimum=1)
        if nfe is not None:
            nfe.reset()
        return flat, [], structure
    prepared = prepare(func, y0, t, config, params=params, nfe=nfe)
    _check_temporal_slots(prepared.spec)
    return prepared.y0, prepared.solve(), prepared.structure


def _one_time(t: object) -> bool:
    if isinstance(t, torch.Tensor):
        return t.dim() == 1 and t.numel() == 1
    return isinstance(t, Sequence) and not isinstance(t, str) and len(t) == 1


def _check_temporal_slots(spec: SolveSpec) -> None:
    """Warn when a temporal BatchNorm in training mode has fewer time slots than the solve
    has distinct stage times (host arithmetic on the grid: no device sync)."""
    norms = [m for m in training_norms(spec.func) if isinstance(m, TemporalBatchNormBase)]
    if not norms:
        return
    if spec.control is not None:
        raise ValueError(
            "a TemporalBatchNorm in training mode keeps statistics per evaluation time, and "
            "error-controlled steps (`rtol`/`atol`) choose their times as they go: its slots "
            "cannot be laid out. Use fixed steps (`step=`) while training with it, or "
            "`nn.GroupNorm` in the dynamics."
        )
    cap = 4 * max(m.max_times for m in norms) + 1
    needed, capped = distinct_stage_times(spec.grid, spec.method.nodes, cap)
    for m in norms:
        m.warn_if_too_few_slots(needed, capped)
