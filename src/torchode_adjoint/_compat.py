"""The one place that touches PyTorch's private APIs or differences between its versions.

Everything else in the package calls these functions; ``tests/test_compat.py`` fails if another
module reaches into ``torch._C`` or another private ``torch._`` name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "functorch_transforms_active",
    "saved_tensor_hooks_active",
    "autocast_state",
    "foreach_add_",
    "memory_timeline",
    "BatchNormBase",
    "vector_jacobian_product",
]


BatchNormBase = torch.nn.modules.batchnorm._BatchNorm
"""The base class of ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` (private in torch)."""


def functorch_transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, vmap, ...) is running this code."""
    return bool(torch._C._are_functorch_transforms_active())


def saved_tensor_hooks_active() -> bool:
    """Whether ``torch.autograd.graph.saved_tensors_hooks`` are installed (``torch.func``
    does not support them)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """Whether autocast is on for ``device_type``, and its dtype."""
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def foreach_add_(
    tensors: Sequence[torch.Tensor], others: Sequence[torch.Tensor], alpha: float
) -> None:
    """``t += alpha * o`` for every pair, in one fused kernel launch where torch has it."""
    torch._foreach_add_(list(tensors), list(others), alpha=alpha)


def memory_timeline(prof: Any) -> list[tuple[str, str, int]] | None:
    """The ``(action, device type, bytes)`` events of a ``torch.profiler.profile`` run with
    ``profile_memory=True`` (action ``"create"``, ``"destroy"`` or another name); None where
    this torch has no memory timeline (a private API)."""
    try:
        from torch.profiler._memory_profiler import Action

        timeline = prof._memory_profile().timeline
    except Exception:  # noqa: BLE001 - a private API: any failure means "not available"
        return None
    names = {Action.CREATE: "create", Action.DESTROY: "destroy"}
    return [(names.get(a, "other"), key.device.type, size) for _, a, (key, _), size in timeline]


def vector_jacobian_product(
    output: torch.Tensor, inputs: Sequence[torch.Tensor], v: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(output, inputs, v, allow_unused=True)``, without its per-call
    argument processing where the call is the plain case.

    ``torch.autograd.grad`` normalises and validates its arguments on every call (``_make_grads``
    compares shapes symbolically): about 18 us of the ~49 us of a backward Euler step of a
    2-element system. For one plain tensor output with a graph and a vector of its shape, dtype
    and device, the autograd engine is called as ``grad`` itself calls it (private:
    ``torch.autograd.graph._engine_run_backward``); anything else takes ``torch.autograd.grad``,
    with its checks and messages.
    """
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if (
        run is None
        or type(output) is not torch.Tensor
        or output.grad_fn is None
        or v.shape != output.shape
        or v.dtype != output.dtype
        or v.device != output.device
    ):
        return torch.autograd.grad(output, inputs, v, allow_unused=True)
    return run((output,), (v,), False, False, tuple(inputs), True, accumulate_grad=False)
