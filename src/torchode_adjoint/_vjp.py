"""One evaluation of the dynamics with its vector--Jacobian product, shared by the gradient modes.

The adjoint and the reversible mode evaluate ``f`` at a state during the backward pass and need
``v^T df/dy``, ``v^T df/dtheta`` and ``v^T df/dt`` together: one reverse pass gives all three,
with parameter gradients already summed over the batch. One routine in two forms: eager
(:func:`dynamics_vjp`, PyTorch's autograd engine, which any dynamics support) and traceable
(:func:`traceable_vjp`, ``torch.func.vjp`` over the module's named parameters, which
``torch.compile`` can trace into a compiled step).
"""

from __future__ import annotations

import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ._compat import foreach_add_, saved_tensor_hooks_active, vector_jacobian_product
from ._compiled import Compile, CompileFallbackWarning, cast
from ._warnings import user_stacklevel

__all__ = [
    "VJP",
    "ProductsEvaluator",
    "dynamics_vjp",
    "accumulate_",
    "ParamNames",
    "parameter_names",
    "vjp_names",
    "traceable_vjp",
]


@dataclass(frozen=True)
class VJP:
    """The result of :func:`dynamics_vjp`.

    Attributes
    ----------
    value : Tensor
        ``f(t, y)``, detached.
    y : Tensor
        ``v^T df/dy`` (zeros when ``f`` does not depend on ``y``).
    params : tuple of (Tensor or None)
        ``v^T df/dtheta`` per parameter (None when unused or not asked for).
    t : Tensor or None
        ``v^T df/dt`` (None when not asked for or ``f`` does not depend on ``t``).
    """

    value: torch.Tensor
    y: torch.Tensor
    params: tuple[torch.Tensor | None, ...]
    t: torch.Tensor | None


def dynamics_vjp(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    t: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    want_t: bool,
) -> VJP:
    """Evaluate ``f(t, y)`` on a detached copy of ``y`` and take one VJP with ``v``.

    Parameters
    ----------
    f : callable
    t : Tensor, 0-dim
    y : Tensor
    v : Tensor, y's shape
    params : sequence of Tensor
        The parameters to differentiate (empty to skip them).
    want_t : bool
        Whether to differentiate with respect to ``t`` too.
    """
    y_leaf = y.detach().requires_grad_(True)
    tau = t.detach().requires_grad_(True) if want_t else t
    out = f(tau, y_leaf)
    inputs = [y_leaf, *params, *((tau,) if want_t else ())]
    if not out.requires_grad:  # depends on none of them (e.g. on t alone, t not differentiated)
        return VJP(value=out, y=torch.zeros_like(y), params=(None,) * len(params), t=None)
    grads = vector_jacobian_product(out, inputs, v)
    g_y = grads[0] if grads[0] is not None else torch.zeros_like(y)
    return VJP(
        value=out.detach(),
        y=g_y,
        params=tuple(grads[1 : 1 + len(params)]),
        t=grads[-1] if want_t else None,
    )


def accumulate_(
    accs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], alpha: float = 1.0
) -> None:
    """``acc += alpha * grad`` for every pair with a gradient, in one fused foreach call."""
    pairs = [(acc, g) for acc, g in zip(accs, grads) if g is not None]
    if len(pairs) == 1:  # one kernel either way; the plain call has less dispatch overhead
        pairs[0][0].add_(pairs[0][1], alpha=alpha)
    elif pairs:
        foreach_add_([p[0] for p in pairs], [p[1] for p in pairs], alpha=alpha)


#: Per parameter to differentiate, the names under which the module holds it: one per module
#: that holds it (weights tied between two layers have two), not one per path to a module (a
#: layer applied twice, registered under two names, has one).
ParamNames = tuple[tuple[str, ...], ...]


def parameter_names(func: object, params: Sequence[torch.Tensor]) -> ParamNames | None:
    """The names under which ``func`` holds ``params`` as parameters, for
    ``torch.func.functional_call``; None (with a warning: the backward pass then runs eagerly)
    if one of them is not a parameter of ``func``."""
    names: ParamNames | None = None if params else ()
    if isinstance(func, nn.Module):
        # By storage, not identity: saved tensors can come back from autograd as new Python
        # objects (under saved-tensor hooks, for instance).
        by_storage: dict[tuple[Any, ...], list[str]] = {}
        slots: set[tuple[int, str]] = set()
        for name, p in func.named_parameters(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            slot = (id(func.get_submodule(owner)), attr)
            if slot not in slots:  # swapping one module's attribute twice would lose it
                slots.add(slot)
                by_storage.setdefault(_storage_key(p), []).append(name)
        found = tuple(tuple(by_storage.get(_storage_key(p), ())) for p in params)
        names = None if () in found else found
    if names is None:
        warnings.warn(
            "the compiled backward step differentiates the parameters of an nn.Module only; "
            "these dynamics have other tensors to differentiate (tensor attributes, or "
            "`params=`), so the backward pass runs eagerly (same results, eager speed).",
            CompileFallbackWarning,
            stacklevel=user_stacklevel(),
        )
    return names


def vjp_names(
    options: Compile | None, func: object, params: Sequence[torch.Tensor]
) -> ParamNames | None:
    """The parameter names for a compiled ``torch.func`` VJP of ``func``, or None where the
    backward pass runs its eager VJP: no compiled path, saved-tensor hooks active (which
    ``torch.func`` does not support), or tensors that are not parameters of ``func``."""
    if options is None or saved_tensor_hooks_active():
        return None
    return parameter_names(func, params)


def _storage_key(p: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype, torch.device]:
    return (p.data_ptr(), tuple(p.shape), p.dtype, p.device)


def functional(
    func: nn.Module | Callable[..., Any], names: ParamNames
) -> Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]:
    """``g(t, y, params)``: ``func(t, y)`` with the parameters ``names`` replaced by ``params``."""
    f = cast(func)
    if not names:
        return lambda t, y, params: f(t, y)

    def g(t: torch.Tensor, y: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # Tied weights named explicitly: functional_call's own search for them reads tensor
        # storages, which torch.func's wrapped tensors lack under torch.compile (PyTorch 2.13:
        # "Cannot access storage of TensorWrapper", for any layer used twice).
        swap = {name: p for aliases, p in zip(names, params) for name in aliases}
        # `names` are found on a module only (vjp_names): func is one here.
        module = typing.cast(nn.Module, func)
        out = torch.func.functional_call(module, swap, (t, y), tie_weights=False)
        return out if out.dtype == y.dtype else out.to(y.dtype)

    return g


def traceable_vjp(
    func: nn.Module | Callable[..., Any],
    t: torch.Tensor,
    y: torch.Tensor,
    v: torch.Tensor,
    names: ParamNames,
    params: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """``f(t, y)`` and ``v^T df/dy``, ``v^T df/dtheta``, ``v^T df/dt`` by ``torch.func.vjp``:
    :func:`dynamics_vjp`'s traceable form (``torch.compile`` traces it, unlike the autograd
    engine), for the parameters held by ``func`` under ``names``."""
    # torch's stubs type vjp's result as a pair of a pair; it is (value, pullback).
    value, pull = torch.func.vjp(functional(func, names), t, y, params)  # type: ignore[misc]
    g_t, g_y, g_p = pull(v)
    return value, g_y, g_p, g_t


class ProductsEvaluator:
    """What an evaluator of vector--Jacobian products over the user's dynamics (the continuous
    adjoint's augmented method, the reversible mode's backward step) shows the executor: the
    wrapped :class:`~torchode_adjoint._dynamics.Dynamics`' ``func`` (what graphs compile),
    ``checked`` and ``nfe`` (forwarded to it); a compiled graph differentiates inside itself
    (``differentiable_graph`` False). Subclasses set ``dynamics``, ``compile_ok`` and
    ``graph_inputs``, the latter from :meth:`graph_parameters`."""

    __slots__ = ()

    differentiable_graph: ClassVar[bool] = False
    dynamics: Any

    @property
    def func(self) -> Any:
        return self.dynamics.func

    @property
    def checked(self) -> bool:
        return bool(self.dynamics.checked)

    @property
    def nfe(self) -> int:
        return int(self.dynamics.nfe)

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.dynamics.nfe = value

    def graph_parameters(
        self, options: Compile | None, params: tuple[torch.Tensor, ...]
    ) -> tuple[ParamNames, tuple[torch.Tensor, ...]] | None:
        """The parameters' names and detached tensors a compiled graph binds; None where no
        graph can run (eager, or parameters the dynamics do not name)."""
        if options is None:
            return None
        names = vjp_names(options, self.dynamics.func, params)
        return None if names is None else (names, tuple(p.detach() for p in params))
