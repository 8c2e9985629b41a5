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
