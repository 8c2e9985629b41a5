"""The one place that touches PyTorch's private APIs or differences between its versions.

Everything else in the package calls these functions; ``tests/test_compat.py`` fails if another
module reaches into ``torch._C`` or another private ``torch._`` name.
"""

from __future__ import annotations

import torch

__all__ = [
    "functorch_transforms_active",
    "saved_tensor_hooks_active",
    "autocast_state",
]


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
