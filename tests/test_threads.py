"""The thread default of the example and the benchmarks: one torch thread per idle core."""

from __future__ import annotations

import os

import pytest

from torchode_adjoint import measure


@pytest.mark.parametrize(
    ("cores", "load", "expected"),
    [(2, 0.1, 2), (2, 1.2, 1), (2, 3.7, 1), (16, 5.4, 11), (16, 0.0, 16), (1, 0.0, 1)],
)
def test_auto_takes_one_thread_per_idle_core(monkeypatch, cores, load, expected) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(measure, "_busy_cores", lambda: load)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # not what it reads
    assert measure.idle_cpu_threads() == expected
    assert measure.parse_threads("auto") == expected


@pytest.mark.parametrize(("cores", "load", "expected"), [(2, 0.1, 2), (2, 1.2, 1), (16, 5.4, 11)])
def test_without_proc_stat_auto_falls_back_to_the_load_average(
    monkeypatch, cores, load, expected
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(measure, "_busy_cores", lambda: None)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert measure.idle_cpu_threads() == expected
    assert measure.parse_threads("auto") == expected


def test_without_a_load_average_auto_takes_every_core(monkeypatch) -> None:
    def unavailable() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(measure, "_busy_cores", lambda: None)
    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert measure.idle_cpu_threads() == 3


def test_a_number_of_threads_is_taken_as_it_is() -> None:
    assert measure.parse_threads("3") == 3


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_a_bad_thread_count_names_the_option(value: str) -> None:
    with pytest.raises(ValueError, match="--threads must be 'auto' or a positive int"):
        measure.parse_threads(value)


def test_busy_cores_reads_the_machine_now() -> None:
    busy = measure._busy_cores(0.05)
    if busy is None:
        pytest.skip("no /proc/stat on this platform")
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-9


def test_use_threads_sets_and_prints_the_choice_once(monkeypatch, capsys) -> None:
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(measure, "idle_cpu_threads", lambda: 1)
    try:
        assert measure.use_threads("auto") == 1
        assert torch.get_num_threads() == 1
        assert capsys.readouterr().out == "torch CPU threads: 1 (auto: one per idle core)\n"
        with pytest.raises(ValueError, match="--threads must be 'auto' or a positive int"):
            measure.use_threads("0")
    finally:
        torch.set_num_threads(before)


def _scripts() -> list:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for folder in ("examples", "benchmarks"):
        for path in sorted((root / folder).glob("*.py")):
            text = path.read_text()
            if "def main(" in text and "argparse" in text:
                found.append(path)
    return found


@pytest.mark.parametrize("path", _scripts(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_and_benchmark_takes_threads_auto_by_default(path) -> None:
    # One policy: the shared option (default auto), or THREADS_HELP's parser with "auto".
    text = path.read_text()
    shared = "add_threads_argument(" in text
    own = '"--threads",\n        default="auto",\n        help=THREADS_HELP' in text
    # bitwise.py compares results bit for bit across runs (a thread count changes reductions);
    # torchdiffeq_suite.py runs torchdiffeq's tests in pytest.
    exempt = path.name in {"bitwise.py", "torchdiffeq_suite.py"}
    assert shared or own or exempt, f"{path.name} has no --threads auto"
    assert "set_num_threads(1)" not in text or path.name == "reversible.py"  # its RSS probe
