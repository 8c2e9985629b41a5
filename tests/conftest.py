"""Shared fixtures: float64, seeded generators and hypothesis profiles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=60)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPE = torch.float64

# One intra-op thread: the suite's tests are small, and with torch's default (one per core) their
# time depended on the machine's other load by up to 50x (10 min 35 s beside one busy process
# against 5 min 21 s at one thread). Subprocesses the tests start inherit it.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator, fresh for every test."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
