"""Side-by-side timing: alternate the candidates after a warm-up and take medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def alternating_medians(
    candidates: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of each candidate, run in turn (A, B, C, A, B, C, ...) after a warm-up.

    Alternating spreads the machine's drift (other jobs, frequency changes) over all candidates
    instead of biasing whichever ran last.
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            _sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
