"""The random-number state a gradient mode keeps to replay the forward pass's draws."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["RngState", "SeededDraws"]


@dataclass(frozen=True)
class RngState:
    """The random-number state of the CPU and, for a CUDA state, of its device."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @staticmethod
    def capture(device: torch.device) -> RngState:
        """The current state (the CPU generator's, and the device's for CUDA)."""
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return RngState(torch.get_rng_state(), cuda)

    def same_as(self, other: RngState) -> bool:
        """Whether no random number was drawn between the two captures."""
        if not torch.equal(self.cpu, other.cpu):
            return False
        return self.cuda is None or other.cuda is None or torch.equal(self.cuda, other.cuda)

    @contextlib.contextmanager
    def replayed(self, device: torch.device) -> Iterator[None]:
        """Run the block with this state, then restore the state from before it."""
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, device)
            yield


class SeededDraws:
    """Random draws of the dynamics made replayable in any order, at constant memory.

    The first evaluation runs on the caller's generator, with its state kept. If it drew random
    numbers, a base seed is drawn, and every later evaluation ``e`` runs on a generator seeded
    with ``base + e`` (the caller's generator untouched by it); a backward pass that evaluates
    the dynamics again sets :attr:`index` and gets the same draws, whatever the order. If it drew
    nothing, later evaluations run as they are.

    Attributes
    ----------
    index : int
        The index of the next evaluation (advanced by each).
    active : bool or None
        None before the first evaluation, then whether the dynamics draw.
    alias : callable or None
        ``alias(e)``: the evaluation whose draws evaluation ``e`` repeats (a method whose two
        evaluations at one time must see the same draws); None: each its own.
    """

    __slots__ = ("device", "index", "active", "first", "base", "alias")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.index = 0
        self.active: bool | None = None
        self.first: RngState | None = None
        self.base = 0
        self.alias: Callable[[int], int] | None = None

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Run one evaluation of the dynamics under its replayable random state."""
        index, self.index = self.index, self.index + 1
        if self.alias is not None:
            index = self.alias(index)
        if self.active is None:
            before = RngState.capture(self.device)
            yield
            self.active = not before.same_as(RngState.capture(self.device))
            if self.active:
                self.first = before
                # Drawn after the first evaluation's draws: the caller's generator moves on.
                self.base = int(torch.randint(0, 2**62, (1,)).item())
            return
        if not self.active:
            yield
            return
        if index == 0:
            assert self.first is not None
            with self.first.replayed(self.device):
                yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            seed = (self.base + index) % 2**63
            torch.default_generator.manual_seed(seed)
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
            yield
