"""``odeint``: validate every input once, resolve the solver, build the grid, dispatch."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import nn

from ._adjoint import solve_adjoint
from ._checkpoint import solve_checkpoint
from ._dynamics import Dynamics, NFECounter, warn_time_shared_statistics
from ._grid import make_grid
from ._reversible import solve_reversible
from ._solvers import get_solver
from ._spec import SolveSpec
from ._stepping import integrate
from ._tableau import ButcherTableau

__all__ = [
    "odeint",
    "solve_states",
    "GradientMode",
    "GRADIENT_MODES",
    "resolve_mode",
    "check_step",
    "check_times",
    "solver_for",
]

GradientMode = Literal["backprop", "adjoint", "checkpoint", "reversible"]
Solver = Callable[
    [SolveSpec, torch.Tensor, torch.Tensor, Sequence[torch.Tensor]], list[torch.Tensor]
]


def _solve_backprop(
    spec: SolveSpec, y0: torch.Tensor, t: torch.Tensor, params: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Backpropagation through the solver's operations.

    Gradient: exact for the discretised forward pass. Memory: every stage's activations of the
    dynamics, growing linearly with the number of steps.
    """
    f = Dynamics(spec.func)
    states = integrate(f, y0, t, spec.grid, spec.tableau, check_finite=spec.check_finite)
    spec.counter.forward, spec.counter.backward = f.nfe, 0
    return states


# One entry per gradient mode, all with the internal signature
# (spec, y0, t, params) -> the states at t[1:].
# `needs_params` says whether the mode must be told the parameters explicitly.
_MODES: dict[str, tuple[Solver, bool]] = {
    "backprop": (_solve_backprop, False),
    "adjoint": (solve_adjoint, True),
    "checkpoint": (solve_checkpoint, True),
    "reversible": (solve_reversible, True),
}
GRADIENT_MODES: tuple[str, ...] = tuple(_MODES)


def solver_for(mode: str) -> Solver:
    """The internal solve function of a gradient-mode name (from :func:`resolve_mode`)."""
    return _MODES[mode][0]


def resolve_mode(adjoint: bool | str) -> str:
    """Normalise the ``adjoint`` argument to a gradient-mode name.

    ``True`` is ``"adjoint"``, ``False`` is ``"backprop"``; names are returned as they are.

    Raises
    ------
    ValueError
        For an unknown name or another type.
    """
    if adjoint is True:
        return "adjoint"
    if adjoint is False:
        return "backprop"
    if isinstance(adjoint, str) and adjoint in _MODES:
        return adjoint
    raise ValueError(
        f"`adjoint` must be True, False or one of {list(GRADIENT_MODES)}, got {adjoint!r}."
    )


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


def check_checkpoint_every(value: object) -> int:
    """Validate ``checkpoint_every`` (a positive int)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`checkpoint_every` must be a positive int, got {value!r}; pass e.g. "
            "`checkpoint_every=1` to keep every step's state, or 10 for every tenth."
        )
    return value


def _check_y0(y0: object) -> torch.Tensor:
    if not isinstance(y0, torch.Tensor):
        raise TypeError(
            f"`y0` must be a floating-point torch.Tensor, got {type(y0).__name__}; wrap it with "
            "`torch.as_tensor(y0, dtype=torch.float32)`."
        )
    if not y0.is_floating_point():
        raise TypeError(
            f"`y0` must be a floating-point tensor, got dtype {y0.dtype}; cast it, e.g. "
            "`y0.float()`."
        )
    return y0


def check_times(t: object, y0: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Return ``t`` in ``y0``'s dtype (differentiably) and its host values."""
    if not isinstance(t, torch.Tensor):
        if isinstance(t, Sequence) and not isinstance(t, str):
            t = torch.tensor(t, dtype=y0.dtype, device=y0.device)
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
    if t.numel() < 2:
        raise ValueError(
            f"`t` must hold at least two times (start and end), got {t.numel()}; pass e.g. "
            "`t=torch.tensor([t0, t1])`."
        )
    t_cast = t.to(y0.dtype)
    host = t_cast.detach().cpu().tolist()
    if not all(math.isfinite(v) for v in host):
        raise ValueError(f"`t` must hold finite times, got {host}.")
    diffs = [b - a for a, b in zip(host[:-1], host[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        raise ValueError(
            f"`t` must be strictly increasing or strictly decreasing (no repeated times, in "
            f"{y0.dtype}), got {host}."
        )
    return t_cast, host


def _resolve_params(
    func: object, params: Iterable[torch.Tensor] | None, needs_params: bool, mode: str
) -> list[torch.Tensor]:
    if params is None:
        if isinstance(func, nn.Module):
            return [p for p in func.parameters() if p.requires_grad]
        if needs_params:
            raise ValueError(
                f"`params` is required with `adjoint={mode!r}` when `func` is not an nn.Module: "
                "the gradient mode cannot see the tensors a function closes over and would "
                "silently return no gradient for them. Pass `params=module.parameters()` (or "
                "`params=()` if there are none), or make `func` an nn.Module."
            )
        return []
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "`params` must be an iterable of tensors, got a single Tensor; pass `params=[p]`."
        )
    out = list(params)
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"`params` must hold tensors, got {type(p).__name__} at index {i}.")
    return [p for p in out if p.requires_grad]


def odeint(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t: torch.Tensor | Sequence[float],
    *,
    solver: str | ButcherTableau = "euler",
    step: float | None = 0.1,
    adjoint: bool | GradientMode = True,
    params: Iterable[torch.Tensor] | None = None,
    check_finite: bool = True,
    nfe: NFECounter | None = None,
    checkpoint_every: int = 1,
) -> torch.Tensor:
    """Integrate ``dy/dt = func(t, y)`` with a fixed-step explicit Runge--Kutta method.

    Each interval ``[t[i], t[i+1]]`` is split into ``n_i = ceil(|t[i+1] - t[i]| / step)`` equal
    steps (up to a few ulps of the dtype, so 1.1 / 0.1 gives 11 steps). A method with ``s``
    stages costs ``s`` evaluations of ``func`` per step.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
        ``t`` arrives as a 0-dim tensor with ``y0``'s dtype and device; the result must have
        ``y``'s shape and dtype.
    y0 : Tensor, shape (...)
        Initial state, any shape (a batch is usually the first dimension), floating point.
    t : Tensor, shape (T,), T >= 2
        Output times, strictly increasing or strictly decreasing, on ``y0``'s device. They are
        used in ``y0``'s dtype; their gradient flows back in their own dtype.
    solver : str or ButcherTableau, default "euler"
        A name from :func:`~torchode_adjoint.available_solvers` or a tableau.
    step : float or None, default 0.1
        The largest step size. ``None`` takes exactly one step per interval of ``t``.
    adjoint : bool or {"backprop", "adjoint", "checkpoint", "reversible"}, default True
        The gradient mode.

        - ``True``/``"adjoint"``: the continuous adjoint of Chen et al. (2018). Approximate
          gradient (error O(step^p) against the discrete one); memory independent of the number
          of steps; backward costs one evaluation and VJP per stage.
        - ``False``/``"backprop"``: backpropagation through the solver. Exact gradient of the
          discretised solution; memory linear in the number of steps (every activation).
        - ``"checkpoint"``: the checkpointed discrete adjoint. Exact (backprop's gradient to
          round-off); memory one state per ``checkpoint_every`` steps plus one segment's
          activations; backward re-runs every step once.
        - ``"reversible"``: the reversible Heun method (needs ``solver="heun"``; order 2, one
          evaluation per step). Exact for its discretisation; memory independent of the number
          of steps; backward reconstructs each state algebraically.
    params : iterable of Tensor, optional
        The tensors the adjoint differentiates. Default: ``func.parameters()`` that require grad
        when ``func`` is an ``nn.Module``. Required with the adjoint when ``func`` is not a
        module (use ``params=()`` for none).
    check_finite : bool, default True
        Raise a RuntimeError naming the time at which the state first became NaN or infinite.
        Costs one device-to-host sync per call, never one per step.
    nfe : NFECounter, optional
        Filled with the numbers of evaluations of ``func`` in the forward and backward pass.
    checkpoint_every : int, default 1
        With ``adjoint="checkpoint"``: keep the state every this many steps (the memory/time
        dial: fewer states kept, longer segments re-run with their activations).

    Returns
    -------
    Tensor, shape (T, ...)
        The state at each time of ``t``; row 0 is ``y0``.

    Raises
    ------
    TypeError
        ``func`` not callable, ``y0`` not a floating tensor, ``t`` or ``params`` of a wrong type,
        ``func`` returning another dtype.
    ValueError
        Bad ``step`` or ``t`` (fewer than two points, not 1-D, not strictly monotonic, another
        device), unknown ``solver`` or ``adjoint``, missing ``params``, ``func`` returning another
        shape.
    RuntimeError
        When the state becomes non-finite (with ``check_finite=True``).

    Notes
    -----
    torchdiffeq's fixed-grid solvers build one global grid with ``step_size`` and interpolate the
    outputs, shortening the last step; here every interval gets its own equal steps, so each
    output time is hit exactly. torchdiffeq returns ``y0`` for a single time; here that is an
    error.

    Examples
    --------
    >>> import torch
    >>> from torchode_adjoint import odeint
    >>> y = odeint(lambda t, y: -y, torch.ones(3), torch.tensor([0.0, 1.0]), solver="rk4",
    ...            params=())
    >>> round(y[-1, 0].item(), 4)
    0.3679
    """
    warn_time_shared_statistics(func)
    return torch.stack(
        [
            y0,
            *solve_states(
                func,
                y0,
                t,
                solver=solver,
                step=step,
                adjoint=adjoint,
                params=params,
                check_finite=check_finite,
                nfe=nfe,
                checkpoint_every=checkpoint_every,
            ),
        ]
    )


def solve_states(
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: torch.Tensor,
    t: torch.Tensor | Sequence[float],
    *,
    solver: str | ButcherTableau = "euler",
    step: float | None = 0.1,
    adjoint: bool | GradientMode = True,
    params: Iterable[torch.Tensor] | None = None,
    check_finite: bool = True,
    nfe: NFECounter | None = None,
    checkpoint_every: int = 1,
) -> list[torch.Tensor]:
    """:func:`odeint` without the final stack: the states at ``t[1:]`` as a list.

    Validates every input and dispatches to the gradient mode; :class:`ODEBlock` uses it to
    return the final state without copying ``y0`` and ``y(t1)`` into a stacked tensor.
    """
    if not callable(func):
        raise TypeError(f"`func` must be callable as func(t, y), got {type(func).__name__}.")
    mode = resolve_mode(adjoint)
    solve, needs_params = _MODES[mode]
    y0 = _check_y0(y0)
    step_value = check_step(step)
    tableau = get_solver(solver)
    t_cast, host = check_times(t, y0)
    param_list = _resolve_params(func, params, needs_params, mode)
    grid = make_grid(host, step_value, torch.finfo(y0.dtype).eps)
    counter = nfe if nfe is not None else NFECounter()
    counter.forward = counter.backward = 0
    spec = SolveSpec(
        func=func,
        tableau=tableau,
        grid=grid,
        check_finite=bool(check_finite),
        counter=counter,
        checkpoint_every=check_checkpoint_every(checkpoint_every),
    )
    return solve(spec, y0, t_cast, param_list)
