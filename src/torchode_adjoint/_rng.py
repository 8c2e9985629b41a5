"""The random-number state a gradient mode keeps to replay the forward pass's draws."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["RngState"]


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
