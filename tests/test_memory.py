"""Saved-for-backward bytes: flat in the number of steps for the adjoint, linear for backprop."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
import torch
from problems import MLPDynamics, peak_rss_kib

import torchode_adjoint
from torchode_adjoint import Checkpoint, Reversible, odeint
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
            f, y0, torch.tensor([0.0, 1.0]), solver="rk4", step=1.0 / n, adjoint=mode, **kw
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


def _reversible_solve(solver: str, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A solve with every input learnable (state, parameter, both times); coupling 1 - 1/n
    keeps the reconstruction's round-off bounded at any n."""
    y0 = torch.ones(2, requires_grad=True)
    k = torch.tensor(0.5, requires_grad=True)
    t = torch.tensor([0.0, 1.0], requires_grad=True)
    sol = odeint(
        lambda t, y: -k * y,
        y0,
        t,
        solver=solver,
        step=1.0 / n,
        adjoint=Reversible(coupling=1.0 - 1.0 / n),
        params=[k],
    )
    return sol[-1].sum(), [y0, k, t]


@pytest.mark.parametrize("solver", ["euler", "reversible_heun"])
def test_the_reversible_backward_keeps_nothing_per_step_on_the_host(solver: str) -> None:
    # What the package's own code holds on the host (lists, tuples, dicts, tensor objects) at
    # the backward pass's last evaluation, at t0, when anything kept per step is all there:
    # a list entry per step would add hundreds of KB from 2,100 to 6,300 steps. (Stage times are
    # built 2,048 evaluations at a time: both runs hold one full chunk.)
    package = tracemalloc.Filter(True, str(Path(torchode_adjoint.__file__).parent / "*"))
    held = []
    for n in (2_100, 6_300):
        y0 = torch.ones(2, requires_grad=True)
        k = torch.tensor(0.5, requires_grad=True)
        t = torch.tensor([0.0, 1.0], requires_grad=True)
        seen: list[int] = []

        def f(time: torch.Tensor, y: torch.Tensor, seen=seen, k=k) -> torch.Tensor:
            if tracemalloc.is_tracing() and float(time.detach()) == 0.0:
                snapshot = tracemalloc.take_snapshot().filter_traces([package])
                seen.append(sum(s.size for s in snapshot.statistics("filename")))
            return -k * y

        mode = Reversible(coupling=1.0 - 1.0 / n)
        sol = odeint(f, y0, t, solver=solver, step=1.0 / n, adjoint=mode, params=[k])
        tracemalloc.start()
        sol[-1].sum().backward()
        tracemalloc.stop()
        assert len(seen) == 1 and all(x.grad is not None for x in (y0, k, t))
        held.append(seen[0])
    assert held[1] < held[0] + 64 * 1024, held


def test_reversible_saved_bytes_are_flat_with_learnable_times() -> None:
    def saved(n: int) -> int:
        with saved_tensor_bytes() as s:
            loss, _ = _reversible_solve("rk4", n)
        loss.backward()
        return s.bytes

    assert saved(10) == saved(1000)


@pytest.mark.slow
def test_adjoint_peak_memory_is_flat_from_a_thousand_to_a_hundred_thousand_steps() -> None:
    peaks = [peak_rss_kib(n, "euler", "adjoint") for n in (1_000, 100_000)]
    assert peaks[1] < 1.05 * peaks[0], peaks


@pytest.mark.slow
def test_reversible_peak_memory_is_flat_from_a_thousand_to_thirty_thousand_steps() -> None:
    # Reversible Heun with learnable times (10^5 steps measured once for the docs; 3 x 10^4
    # here to keep the suite quick).
    peaks = [peak_rss_kib(n, "reversible_heun", "reversible", True) for n in (1_000, 30_000)]
    assert peaks[1] < 1.05 * peaks[0], peaks
