"""The compiled path: each solver step and each backward step as one ``torch.compile`` graph.

Eager PyTorch pays launch and Python costs for every small op of a step (each stage's layers,
each combination, each vector--Jacobian product). With ``compile=True`` the per-step work is
compiled once, so that the stages and their combinations fuse:

- the forward step (any explicit Runge--Kutta tableau; also the step that backprop records and
  that checkpointing re-runs, whose backward graph AOTAutograd compiles),
- the continuous adjoint's backward step: every stage's evaluation and its VJP with respect to
  the state, the parameters and the time, with the weighted accumulation,
- the reversible Heun step and the reversible mode's backward VJP.

Times and step sizes enter as 0-dim tensors, so a new time or step size never recompiles; the
host syncs per call are those of the eager path. The first step of every pass runs eagerly:
it checks the dynamics' output (the same errors as the eager path), runs the backward pass's
captured-tensor probe and finds out whether the dynamics draw random numbers. Dynamics that do
(dropout in training mode) stay eager for the whole pass, because a compiled graph does not
draw the eager generator's numbers and the gradient modes replay those draws.

Where ``torch.compile`` fails, the step falls back to the eager code with one warning naming the
error, and that compiled function stays eager afterwards.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Compile", "CompiledFunction", "CompileFallbackWarning", "parameter_names", "cast"]


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` failed for a step; the eager step is used instead (same results)."""


@dataclass(frozen=True)
class Compile:
    """Options of the compiled path: ``compile=True`` is ``Compile()``.

    Parameters
    ----------
    backend : str or callable, default "inductor"
        The ``torch.compile`` backend. ``"aot_eager"`` traces and runs the same graphs without
        generating kernels (quick to compile; for checking the path, not for speed).
    mode : str or None, default None
        The ``torch.compile`` mode, e.g. ``"max-autotune-no-cudagraphs"``.
    steps : int, default 1
        Solver steps per compiled graph. Each call of a compiled graph has a fixed cost (its
        guards and wrappers; about 20-60 us on a 2-core CPU), which more steps per graph share;
        compile time grows with the graph. A rest of fewer steps runs one step per graph.
    """

    backend: str | Callable[..., Any] = "inductor"
    mode: str | None = None
    steps: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(
                f"`steps` must be a positive int (solver steps per compiled graph), got "
                f"{self.steps!r}; pass e.g. `Compile(steps=4)`."
            )

    def function(self, key: Hashable, make: Callable[[], Callable[..., Any]]) -> CompiledFunction:
        """The compiled version of ``make()``, built once per ``key`` and equal options (so
        blocks with the same settings share their graphs)."""
        fn = _FUNCTIONS.get((self, key))
        if fn is None:
            fn = _FUNCTIONS[(self, key)] = CompiledFunction(make(), self)
        return fn


_FUNCTIONS: dict[tuple[Compile, Hashable], CompiledFunction] = {}


class CompiledFunction:
    """A pure step function and its ``torch.compile`` version, with the eager fallback.

    Each instance compiles its own copy of the function's code object: ``torch.compile`` keeps
    its cache of graphs (and its limit on recompilations) per code object, so every tableau and
    every set of options gets its own.
    """

    __slots__ = ("eager", "compiled", "failed")

    def __init__(self, fn: Callable[..., Any], options: Compile) -> None:
        self.eager = fn
        fresh = types.FunctionType(
            fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
        )
        self.compiled: Callable[..., Any] = torch.compile(
            fresh, backend=options.backend, mode=options.mode, fullgraph=True, dynamic=False
        )
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: try the eager code
            out = self.eager(*args)  # an error of the user's code raises here, as in eager mode
            self.failed = True
            warnings.warn(
                f"torch.compile failed for the solver step `{self.eager.__name__}` and the eager "
                f"step is used instead (same results, eager speed): {type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}",
                CompileFallbackWarning,
                stacklevel=2,
            )
            return out


def cast(func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """``func`` with its output cast to the state's dtype (autocast; see ``Dynamics``)."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = func(t, y)
        return out if out.dtype == y.dtype else out.to(y.dtype)

    return f


def parameter_names(func: object, params: Sequence[torch.Tensor]) -> tuple[str, ...] | None:
    """The names under which ``func`` holds ``params`` as parameters, for
    ``torch.func.functional_call``; None (with a warning: the backward pass then runs eagerly)
    if one of them is not a parameter of ``func``."""
    names: tuple[str, ...] | None = None if params else ()
    if isinstance(func, nn.Module):
        by_id = {id(p): name for name, p in func.named_parameters()}
        found = tuple(by_id.get(id(p), "") for p in params)
        names = None if "" in found else found
    if names is None:
        warnings.warn(
            "the compiled backward step differentiates the parameters of an nn.Module only; "
            "these dynamics have other tensors to differentiate (tensor attributes, or "
            "`params=`), so the backward pass runs eagerly (same results, eager speed).",
            CompileFallbackWarning,
            stacklevel=2,
        )
    return names


def functional(
    func: nn.Module | Callable[..., Any], names: tuple[str, ...]
) -> Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]:
    """``g(t, y, params)``: ``func(t, y)`` with the parameters ``names`` replaced by ``params``."""
    f = cast(func)
    if not names:
        return lambda t, y, params: f(t, y)

    def g(t: torch.Tensor, y: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = torch.func.functional_call(func, dict(zip(names, params)), (t, y))
        return out if out.dtype == y.dtype else out.to(y.dtype)

    return g


def vjp(
    func: nn.Module | Callable[..., Any],
    t: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    names: tuple[str, ...],
    params: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """``f(t, y)`` and ``v^T df/dy``, ``v^T df/dtheta``, ``v^T df/dt`` by ``torch.func.vjp``
    (traceable by ``torch.compile``, unlike ``torch.autograd.grad``)."""
    value, pull = torch.func.vjp(functional(func, names), t, y, params)
    g_t, g_y, g_p = pull(v)
    return value, g_y, g_p, g_t
