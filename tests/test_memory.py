"""Saved-for-backward bytes: flat in the number of steps for the adjoint, linear for backprop."""

from __future__ import annotations

import torch
from problems import MLPDynamics

from torchode_adjoint import Checkpoint, odeint
from torchode_adjoint.measure import saved_tensor_bytes


def saved_bytes(adjoint: bool, n_steps: int) -> int:
    f = MLPDynamics(dim=8, hidden=32)
    y0 = torch.randn(16, 8, requires_grad=True)
    total = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sol = odeint(
            f, y0, torch.tensor([0.0, 1.0]), solver="rk4", step=1.0 / n_steps, adjoint=adjoint
        )
    sol[-1].sum().backward()  # the graph is usable
    return total


def test_adjoint_saved_bytes_are_the_same_at_10_and_1000_steps() -> None:
    assert saved_bytes(True, 10) == saved_bytes(True, 1000)


def test_backprop_saved_bytes_grow_linearly_with_steps() -> None:
    b10, b100 = saved_bytes(False, 10), saved_bytes(False, 100)
    assert b100 > 9 * b10
    assert saved_bytes(True, 100) < b10


def _saved(mode: object, n: int, **kw) -> int:
    f = MLPDynamics(dim=8, hidden=32)
    y0 = torch.randn(16, 8, requires_grad=True)
    with saved_tensor_bytes() as saved:
        sol = odeint(
            f, y0, torch.tensor([0.0, 1.0]), solver="heun", step=1.0 / n, adjoint=mode, **kw
        )
    sol[-1].sum().backward()
    return saved.bytes


def test_checkpoint_memory_grows_by_one_state_per_kept_step() -> None:
    state = 16 * 8 * 4
    for every in (1, 5):
        b100 = _saved(Checkpoint(every=every), 100)
        b200 = _saved(Checkpoint(every=every), 200)
        assert b200 - b100 == (100 // every) * state
    assert _saved(Checkpoint(every=10), 100) < _saved("backprop", 100) / 10


def test_reversible_memory_is_flat_in_the_number_of_steps() -> None:
    assert _saved("reversible", 10) == _saved("reversible", 1000)
