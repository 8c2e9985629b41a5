"""Everything around one call of the user's dynamics: counting, checking, BatchNorm freezing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["NFECounter", "Dynamics", "frozen_batchnorm"]

DynamicsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class NFECounter:
    """Numbers of dynamics evaluations of the last forward and backward pass.

    Pass one to :func:`~torchode_adjoint.odeint` as ``nfe=``; it is reset and filled by the call
    and, for the gradient modes that evaluate the dynamics again, by the backward pass.

    Attributes
    ----------
    forward : int
        Evaluations made by the forward pass (steps x stages).
    backward : int
        Evaluations made by the backward pass (0 for backprop, which reuses the stored graph).
    """

    forward: int = 0
    backward: int = 0


class Dynamics:
    """The user's ``f(t, y)`` with an evaluation counter and a check of its first output.

    The first call checks that ``f`` returns a tensor with the state's shape and dtype; later
    calls only count.
    """

    __slots__ = ("func", "nfe", "_checked")

    def __init__(self, func: DynamicsFn, *, check: bool = True) -> None:
        self.func = func
        self.nfe = 0
        self._checked = not check

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        out = self.func(t, y)
        if not self._checked:
            _check_output(out, y)
            self._checked = True
        return out


def _check_output(out: object, y: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"`func` must return a Tensor (dy/dt), got {type(out).__name__}; return a tensor with "
            f"the state's shape {tuple(y.shape)}."
        )
    if out.shape != y.shape:
        raise ValueError(
            f"`func` must return dy/dt with the state's shape {tuple(y.shape)}, got "
            f"{tuple(out.shape)}; make the dynamics map the state to a tensor of the same shape."
        )
    if out.dtype != y.dtype:
        raise TypeError(
            f"`func` must return dy/dt with the state's dtype {y.dtype}, got {out.dtype}; cast "
            "the output or build the dynamics in the state's dtype."
        )


@contextlib.contextmanager
def frozen_batchnorm(func: object) -> Iterator[None]:
    """Re-evaluate ``func`` without touching any BatchNorm buffer.

    Inside the context, every BatchNorm module of ``func`` that is in training mode still
    normalises with the batch statistics (so a re-evaluation computes what the forward pass
    computed) but updates neither ``running_mean``/``running_var`` nor ``num_batches_tracked``:
    with ``track_running_stats`` off in training mode, ``torch.nn.functional.batch_norm`` gets no
    running buffers at all. Modules in eval mode read their running statistics as usual.
    """
    if not isinstance(func, nn.Module):
        yield
        return
    frozen = [
        m
        for m in func.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True
