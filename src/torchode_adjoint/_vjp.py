"""One evaluation of the dynamics with its vector--Jacobian product, shared by the gradient modes.

The adjoint and the reversible mode evaluate ``f`` at a state during the backward pass and need
``v^T df/dy``, ``v^T df/dtheta`` and ``v^T df/dt`` together: one ``torch.autograd.grad`` call
gives all three, with parameter gradients already summed over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._compat import foreach_add_, vector_jacobian_product

__all__ = ["VJP", "dynamics_vjp", "accumulate_"]


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
