"""torchdiffeq's ``odeint`` and ``odeint_adjoint`` on top of this library.

A script written for torchdiffeq runs on ``torchode_adjoint`` by importing this module in its
place (``benchmarks/torchdiffeq_suite.py`` runs torchdiffeq's own test files this way). Each
argument maps to this library's name (see the docs' page "Coming from torchdiffeq"):

- ``method`` -> ``solver`` (``None``: ``"dopri5"``; ``"heun2"`` -> ``"heun"``; ``"rk4"``, which
  is the 3/8 rule in torchdiffeq, -> ``"rk38"``);
- ``rtol``/``atol`` (defaults 1e-7/1e-9) -> ``rtol``/``atol`` for an embedded pair; a
  fixed-step method takes ``options["step_size"]`` as ``step`` (none: one step per interval
  of ``t``, as torchdiffeq);
- ``options["step_t"]``/``["jump_t"]`` -> ``step_t``/``jump_t``; ``options["norm"]`` ->
  ``controller=PIController(norm=...)``;
- ``options["grid_constructor"]`` (a fixed-step method) -> ``controller=StepTo(grid)`` with
  the grid it returns for ``(func, y0, t)``, called once: the continuous adjoint's backward
  pass takes the same steps in reverse. Output times off the grid are step ends here, where
  torchdiffeq interpolates linearly between grid points;
- ``odeint``: backprop (``adjoint=False``); ``odeint_adjoint``: the continuous adjoint with
  ``adjoint_rtol``/``adjoint_atol`` and ``adjoint_options["norm"]`` (``"seminorm"``, a
  function, which gets torchdiffeq's ``(t, y, adj_y, *adj_params)``, else the full norm:
  torchdiffeq's default), ``adjoint_params`` -> ``params`` (those that require grad);
- ``event_fn`` (``t`` of length 2: from ``t[0]`` towards ``t[1]``'s side until the event) and
  ``odeint_event`` -> ``odeint_event`` (``reverse_time`` where ``t[1] < t[0]``), the mode as
  above; ``options["interp"]`` is ignored (the event is located on the method's own step).

What this library does not have raises ``NotImplementedError`` naming it: other solvers
(implicit, Adams, ``scipy_solver``), events with ``grid_constructor``, other
options.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from torchode_adjoint import (
    ContinuousAdjoint,
    PIController,
    StepTo,
    available_solvers,
    get_solver,
)
from torchode_adjoint import odeint as _odeint
from torchode_adjoint import odeint_event as _odeint_event

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "SOLVER_NAMES"]

#: torchdiffeq's method names that differ from this library's solver names.
SOLVER_NAMES = {"heun2": "heun", "rk4": "rk38"}
_OPTIONS = {"step_size", "step_t", "jump_t", "norm", "perturb", "grid_constructor"}


def _solver(method: str | None) -> str:
    name = SOLVER_NAMES.get(method or "dopri5", method or "dopri5")
    if name not in available_solvers():
        raise NotImplementedError(f"torchdiffeq's method {method!r} has no counterpart here")
    return name


def _settings(
    method: str | None,
    rtol: float,
    atol: float,
    options: dict[str, Any] | None,
    problem: tuple[Any, Any, torch.Tensor],
) -> dict[str, Any]:
    options = dict(options or {})
    unknown = set(options) - _OPTIONS
    if unknown:
        raise NotImplementedError(f"options {sorted(unknown)} have no counterpart here")
    if options.get("perturb"):
        raise NotImplementedError("`perturb` has no counterpart here")
    solver = _solver(method)
    settings: dict[str, Any] = {"solver": solver}
    if getattr(get_solver(solver), "adaptive", False):
        settings.update(rtol=rtol, atol=atol)
        if options.get("norm") is not None:  # torchdiffeq's norm of the scaled error
            settings["controller"] = PIController(norm=options["norm"])
        for name in ("step_t", "jump_t"):
            if options.get(name) is not None:
                settings[name] = options[name]
    elif options.get("grid_constructor") is not None:
        if options.get("step_size") is not None:
            raise ValueError("`step_size` and `grid_constructor` are mutually exclusive")
        grid = options["grid_constructor"](*problem)
        settings["controller"] = StepTo(grid)
    else:
        settings["step"] = options.get("step_size")
    return settings


def odeint(
    func: Callable[..., Any],
    y0: Any,
    t: torch.Tensor,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    event_fn: Any = None,
) -> Any:
    """torchdiffeq's ``odeint``: backprop through the solver's steps."""
    params = list(func.parameters()) if isinstance(func, torch.nn.Module) else ()
    if event_fn is not None:
        settings = _settings(method, rtol, atol, _event_options(options), (func, y0, t))
        return _until_event(func, y0, t, event_fn, settings, False, params)
    return _odeint(func, y0, t, adjoint=False, params=params,
                   **_settings(method, rtol, atol, options, (func, y0, t)))  # fmt: skip


def _event_options(options: dict[str, Any] | None) -> dict[str, Any]:
    # torchdiffeq's fixed-step solvers locate an event on a linear or cubic interpolant
    # (`interp`); here it is located on the method's own step, whatever `interp` says.
    return {k: v for k, v in (options or {}).items() if k != "interp"}


def _until_event(
    func: Any, y0: Any, t: torch.Tensor, event_fn: Any, settings: dict[str, Any], mode: Any,
    params: Any,
) -> Any:  # fmt: skip
    """torchdiffeq's event handling mode: from ``t[0]`` towards ``t[1]``'s side until
    ``event_fn`` crosses zero; ``(event_t, solution)``."""
    if len(t) != 2:
        raise ValueError(f"len(t) must be 2 in event handling mode, got {len(t)}")
    if "controller" in settings:
        raise NotImplementedError("`grid_constructor` with events has no counterpart here")
    reverse = bool(t[1] < t[0])
    # torchdiffeq differentiates no tensor the condition reads (its issue #208); here every one
    # that requires grad gets its gradient.
    return _odeint_event(func, y0, t[0], event_fn=event_fn, reverse_time=reverse, adjoint=mode,
                         params=params, **settings)  # fmt: skip


def odeint_adjoint(
    func: Callable[..., Any],
    y0: Any,
    t: torch.Tensor,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    event_fn: Any = None,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_method: str | None = None,
    adjoint_options: dict[str, Any] | None = None,
    adjoint_params: Iterable[torch.Tensor] | None = None,
) -> Any:
    """torchdiffeq's ``odeint_adjoint``: the continuous adjoint."""
    if adjoint_method is not None and _solver(adjoint_method) != _solver(method):
        raise NotImplementedError("an `adjoint_method` other than the forward's")
    adjoint_options = dict(adjoint_options or {})
    norm = adjoint_options.pop("norm", None)
    if adjoint_options:
        raise NotImplementedError(f"adjoint_options {sorted(adjoint_options)}")
    if event_fn is not None:
        options = _event_options(options)
    settings = _settings(method, rtol, atol, options, (func, y0, t))
    if adjoint_params is None:
        adjoint_params = func.parameters() if isinstance(func, torch.nn.Module) else ()
    # torchdiffeq leaves out the parameters that do not require grad (and so does its norm).
    adjoint_params = [p for p in adjoint_params if p.requires_grad]
    if callable(norm) and (event_fn is not None or "rtol" not in settings):
        # Fixed steps: torchdiffeq ignores the norm, and so does this. Events: the backward
        # pass takes the search's steps, with no error control to measure.
        if event_fn is not None:
            raise NotImplementedError("a callable adjoint `norm` with events")
        norm = None
    mode = ContinuousAdjoint(
        rtol=adjoint_rtol if "rtol" in settings else None,
        atol=adjoint_atol if "atol" in settings else None,
        norm="seminorm" if norm == "seminorm" else "full" if norm is None else _adjoint_norm(norm),
    )
    if event_fn is not None:
        return _until_event(func, y0, t, event_fn, settings, mode, list(adjoint_params))
    return _odeint(func, y0, t, adjoint=mode, params=list(adjoint_params), **settings)


def _adjoint_norm(norm: Callable[..., Any]) -> Callable[..., Any]:
    """torchdiffeq's callable adjoint norm over this library's ``(y, a, g_t, *g_params)``: it
    takes ``(t, y, adj_y, *adj_params)``, a tuple state's parts in place of ``y`` and ``adj_y``."""

    def adjoint_norm(groups: tuple[Any, ...]) -> Any:
        y, a, g_t, *g_p = groups
        parts = (*y, *a) if isinstance(y, tuple) else (y, a)
        return norm((g_t, *parts, *g_p))

    return adjoint_norm


def odeint_event(
    func: Callable[..., Any],
    y0: Any,
    t0: torch.Tensor,
    *,
    event_fn: Any,
    reverse_time: bool = False,
    odeint_interface: Callable[..., Any] = odeint,
    **kwargs: Any,
) -> Any:
    """torchdiffeq's ``odeint_event``: ``odeint_interface`` (this shim's ``odeint`` or
    ``odeint_adjoint``) in event handling mode from ``t0``."""
    t0 = torch.as_tensor(t0).reshape(-1)
    t = torch.cat([t0, t0.detach() + (-1.0 if reverse_time else 1.0)])
    return odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)
