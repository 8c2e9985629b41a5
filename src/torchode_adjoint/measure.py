"""Measuring what a training step really costs: saved-for-backward bytes and peak memory.

Used by the CIFAR-10 example and the benchmark suite; not imported by
``import torchode_adjoint``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._compat import memory_timeline

__all__ = [
    "SavedBytes",
    "saved_tensor_bytes",
    "peak_memory_bytes",
    "state_dict_bytes",
    "idle_cpu_threads",
    "parse_threads",
    "THREADS_HELP",
    "add_threads_argument",
    "use_threads",
    "machine",
]

THREADS_HELP = (
    "torch CPU threads: a positive int, or auto: one per idle core, counting the cores busy "
    "machine-wide over a quarter of a second before the run (/proc/stat; elsewhere the 1-minute "
    "load average), at least 1, since threads oversubscribed beside other busy processes slow "
    "small ops down many times over"
)
"""The ``--threads`` help of the example and the benchmarks (what :func:`parse_threads` does)."""


def add_threads_argument(parser: Any) -> None:
    """The one ``--threads`` option of every example and benchmark: default ``auto``."""
    parser.add_argument("--threads", default="auto", help=THREADS_HELP)


def use_threads(value: str, *, quiet: bool = False) -> int:
    """Set torch's CPU threads from a ``--threads`` value and print the choice once.

    Raises
    ------
    ValueError
        Naming ``--threads`` and what to pass (see :func:`parse_threads`).
    """
    threads = parse_threads(value)
    torch.set_num_threads(threads)
    if not quiet:
        how = " (auto: one per idle core)" if value == "auto" else ""
        print(f"torch CPU threads: {threads}{how}", flush=True)
    return threads


def idle_cpu_threads() -> int:
    """One torch thread per idle core: the cores this process may run on minus the cores busy
    right now (rounded), at least one.

    "Right now" is the CPU time the whole machine spent busy over a quarter of a second
    (``/proc/stat``); where that is not available, the 1-minute load average, which lags: just
    after a ``pip install`` it still counts a busy core on an idle machine.

    Oversubscribed threads cost far more than idle cores: on a 2-core AMD EPYC machine the
    CIFAR-10 quick run (at its settings of 2026-11, BatchNorm and the continuous adjoint) took
    85 s with 2 threads and 154 s with one when idle, but 558 s with 2 threads and 131 s with
    one beside another busy process.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    busy = _busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # not available on this platform
            busy = 0.0
    return max(1, min(cores, cores - round(busy)))


def _busy_cores(window: float = 0.25) -> float | None:
    """Cores busy over the next ``window`` seconds, machine-wide, from ``/proc/stat``."""

    def sample() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle, os.cpu_count() or 1

    try:
        total0, idle0, _ = sample()
        time.sleep(window)
        total1, idle1, cpus = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0:
        return None
    return (elapsed - (idle1 - idle0)) / elapsed * cpus


def parse_threads(value: str) -> int:
    """The number of torch threads a ``--threads`` value asks for: ``"auto"`` is
    :func:`idle_cpu_threads`, otherwise a positive int.

    Raises
    ------
    ValueError
        Naming ``--threads`` and what to pass.
    """
    if value == "auto":
        return idle_cpu_threads()
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"--threads must be 'auto' or a positive int, got {value!r}")
    return threads


@dataclass
class SavedBytes:
    """Bytes of the tensors autograd saved for backward inside the context.

    Every pack is counted, including tensors that share storage with a parameter or input:
    an upper bound of what the graph keeps alive.
    """

    bytes: int = 0
    count: int = 0


@contextlib.contextmanager
def saved_tensor_bytes() -> Iterator[SavedBytes]:
    """Count the bytes saved for backward by the operations run inside the context.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(100, requires_grad=True)
    >>> with saved_tensor_bytes() as saved:
    ...     y = (x * x).sum()
    >>> saved.bytes  # x twice (both operands of the product), 400 bytes each
    800
    """
    stats = SavedBytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        stats.bytes += t.numel() * t.element_size()
        stats.count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield stats


def peak_memory_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes of tensors allocated while ``step()`` runs (above what existed before).

    On CUDA: ``torch.cuda.max_memory_allocated`` over the step minus the allocation before it.
    On CPU: the live-tensor timeline of ``torch.profiler`` with ``profile_memory=True`` (every
    tensor created and destroyed during the step, in order; the maximum of the running sum).
    The CPU path relies on the profiler's memory timeline, a private API; it returns None if that
    is unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    # The profiler's native library prints start/stop lines straight to the process's stdout
    # and stderr; keep them out of the caller's output.
    with (
        _native_output_silenced(),
        profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof,
    ):
        step()
    timeline = memory_timeline(prof)
    if timeline is None:  # pragma: no cover - depends on the torch version
        return None
    live = peak = 0
    for action, device_type, size in timeline:
        if device_type != device.type:
            continue
        if action == "create":
            live += size
        elif action == "destroy":
            live -= size
        peak = max(peak, live)
    return int(peak)


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """Redirect file descriptors 1 and 2 to /dev/null (Python's own streams are flushed first)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved: list[tuple[int, int]] = []
    try:
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(null.fileno(), fd)
    except OSError:  # pragma: no cover - no usable descriptors (an embedded interpreter)
        pass
    try:
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers, each shared tensor counted once.

    This is what the reference study reported as "memory": a model's size on disk, not the memory
    a training step uses.
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def machine() -> str:
    """The machine a measurement ran on, in words: the CPU's model name, the cores visible, the
    PyTorch build with its threads, and the GPU (or "no GPU")."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return (
        f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} with "
        f"{threads} thread{'s' if threads != 1 else ''}, {gpu}"
    )
