"""The compiled path: each solver step and each backward step as one ``torch.compile`` graph.

Eager PyTorch pays launch and Python costs for every small op of a step (each stage's layers,
each combination, each vector--Jacobian product). With ``compile=True`` the per-step work is
compiled once, so that the stages and their combinations fuse:

- the forward step (any explicit Runge--Kutta tableau; also the step that backprop records and
  that checkpointing re-runs, whose backward graph AOTAutograd compiles),
- the continuous adjoint's backward step (its augmented method, run by the same executor):
  every stage's evaluation and its VJP with respect to the state, the parameters and the time,
  with the weighted accumulation,
- the reversible methods' forward steps.

Times and step sizes enter as 0-dim tensors, so a new time or step size never recompiles; the
host syncs per call are those of the eager path. The first step of every pass runs eagerly:
it checks the dynamics' output (the same errors as the eager path), runs the backward pass's
captured-tensor probe and finds out whether the dynamics draw random numbers. Dynamics that do
(dropout in training mode) stay eager for the whole pass, because a compiled graph does not
draw the eager generator's numbers and the gradient modes replay those draws.

Where ``torch.compile`` fails, the step falls back to the eager code with one warning naming the
error, and stays eager for dynamics of that class afterwards. Under ``torch.func`` transforms
and saved-tensor hooks the eager steps run without an attempt.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._structure import StructuredDynamics
from ._warnings import user_stacklevel

__all__ = ["Compile", "CompiledFunction", "CompileFallbackWarning", "cast"]


class CompileFallbackWarning(UserWarning):
    """``torch.compile`` failed for a step, or cannot run it (a coupling read on the host at
    every step); the eager step is used instead (same results)."""


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
        guards and wrappers: 20-100 us measured on a 2-core CPU), which more steps per graph share;
        compile time grows with the graph. A rest of fewer steps runs one step per graph.

    Notes
    -----
    Each step function compiles once per dynamics class (or function), state shape, dtype and
    grad mode, up to 16 such signatures per class; further ones (a 17th batch size) run eagerly
    with one :class:`CompileFallbackWarning`. New times and step sizes never recompile.
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
    """A pure step function and its ``torch.compile`` versions, with the eager fallback.

    Each call signature (the dynamics' class, the tensor arguments' shapes, dtypes, devices and
    ``requires_grad``, and the grad mode) gets its own copy of the function's code object:
    ``torch.compile`` keeps its cache of graphs, and its limit on recompilations, per code
    object, so that several blocks, batch sizes and the training and evaluation passes never
    evict one another. At most :data:`MAX_SIGNATURES` are compiled per dynamics class; further
    ones run eagerly, with one warning.
    """

    __slots__ = ("eager", "options", "_graphs", "_failed", "_verified", "_over")

    def __init__(self, fn: Callable[..., Any], options: Compile) -> None:
        self.eager = fn
        self.options = options
        # Keyed by (kind, signature...): the first item says what the graph was compiled for.
        self._graphs: dict[tuple[Hashable, ...], Callable[..., Any]] = {}
        # Dynamics classes this function failed to compile for (a failure is one of PyTorch's
        # for what the class computes: its next instance, e.g. a deep copy, would fail again),
        # (signature, module id) pairs it ran compiled for, and the classes over the limit.
        self._failed: set[Hashable] = set()
        self._verified: set[tuple[Hashable, int]] = set()
        self._over: set[Hashable] = set()

    def __call__(self, func: object, *args: Any) -> Any:
        kind = _kind(func)
        if kind in self._failed:
            return self._eager(func, args)
        if not torch.is_grad_enabled():
            # Nothing is recorded: whether an input requires grad does not matter, and one graph
            # (one signature, one set of guards) serves both.
            args = tuple(
                a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args
            )
        key = _signature(kind, args)
        compiled = self._graphs.get(key)
        if compiled is None:
            compiled = self._new_graph(key, kind)
            if compiled is None:
                return self._eager(func, args)
        # A compilation that fails after tracing `torch.func.functional_call` can leave the
        # swapped-in tensors on the module (seen with PyTorch 2.13): keep the module's tensors on
        # the first (compiling) call, to put them back. Modules only: a function has no tensors,
        # and its identity can be new at every solve.
        first = isinstance(func, nn.Module) and (key, id(func)) not in self._verified
        saved = _module_tensors(func) if first else None
        try:
            out = compiled(func, *args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: try the eager code
            _restore(saved)
            out = self._eager(func, args)  # a user error raises here, as in eager mode
            self._failed.add(kind)
            warnings.warn(
                f"torch.compile failed for the solver step `{self.eager.__name__}` with the "
                f"dynamics {_name(kind)}, which run it eagerly from now on (same results, eager "
                f"speed): {_reason(err)}",
                CompileFallbackWarning,
                stacklevel=user_stacklevel(),
            )
            return out
        if first:
            self._verified.add((key, id(func)))
        return out

    def _new_graph(self, key: tuple[Hashable, ...], kind: Hashable) -> Callable[..., Any] | None:
        """A fresh compiled copy of the step for a new signature; None over the limit."""
        if sum(1 for k in self._graphs if k[0] == kind) >= MAX_SIGNATURES:
            if kind not in self._over:
                self._over.add(kind)
                warnings.warn(
                    f"the solver step `{self.eager.__name__}` was compiled for "
                    f"{MAX_SIGNATURES} different state shapes, dtypes or grad modes with the "
                    f"dynamics {_name(kind)}; new ones run eagerly (same results, eager speed). "
                    "Use a few fixed batch sizes (e.g. drop or pad the last batch), or "
                    "compile=False.",
                    CompileFallbackWarning,
                    stacklevel=user_stacklevel(),
                )
            return None
        fn = self.eager
        fresh = types.FunctionType(
            fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
        )
        compiled: Callable[..., Any] = torch.compile(
            fresh,
            backend=self.options.backend,
            mode=self.options.mode,
            fullgraph=True,
            dynamic=False,
        )
        self._graphs[key] = compiled
        return compiled

    def _eager(self, func: object, args: tuple[Any, ...]) -> Any:
        # After a failed compilation, even the eager torch.func.functional_call was seen to leave
        # its tensors on the module: check and restore around every eager call.
        saved = _module_tensors(func)
        try:
            return self.eager(func, *args)
        finally:
            _restore(saved)


#: Compiled signatures (shapes, dtypes, grad modes) per step function and dynamics class.
MAX_SIGNATURES = 16


def _signature(kind: Hashable, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a compiled graph is specialised for, beyond the module's own state: the dynamics'
    class, each tensor argument's shape, dtype, device and ``requires_grad``, the grad mode."""
    return (
        kind,
        torch.is_grad_enabled(),
        *(
            (a.shape, a.dtype, a.device, a.requires_grad)
            for a in args
            if isinstance(a, torch.Tensor)
        ),
    )


def _name(kind: Hashable) -> str:
    if isinstance(kind, tuple):  # (the user's dynamics, a structured state)
        return _name(kind[0])
    if isinstance(kind, types.CodeType):
        return f"`{kind.co_name}`"
    return f"of class {getattr(kind, '__name__', kind)}"


def _kind(func: object) -> Hashable:
    """What a signature and a failure are kept for: a module's class, a function's code (a
    lambda made anew for every solve, or a bound method, which is a new object at every
    attribute access, is the same kind each time), or another callable's class."""
    if isinstance(func, StructuredDynamics):  # the user's dynamics, on this structure
        return (_kind(func.dynamics), func.structure)
    if isinstance(func, nn.Module):
        return type(func)  # type: ignore[return-value]  # torch's stubs: Module.__hash__ is typed unhashable
    code = getattr(func, "__code__", None)
    return code if isinstance(code, types.CodeType) else type(func)  # type: ignore[return-value]


def _reason(err: BaseException) -> str:
    """The innermost error's type and first line (a backend failure wraps the real one)."""
    inner = getattr(err, "inner_exception", None) or err.__cause__ or err
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}"


def _module_tensors(func: object) -> list[tuple[dict[str, Any], str, Any]] | None:
    if not isinstance(func, nn.Module):
        return None
    return [
        (store, name, value)
        for m in func.modules()
        for store in (m._parameters, m._buffers)
        for name, value in store.items()
    ]


def _restore(saved: list[tuple[dict[str, Any], str, Any]] | None) -> None:
    for store, name, value in saved or ():
        if store.get(name) is not value:
            store[name] = value


def cast(func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """``func`` with its output cast to the state's dtype (autocast; see ``Dynamics``)."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = func(t, y)
        return out if out.dtype == y.dtype else out.to(y.dtype)

    return f
