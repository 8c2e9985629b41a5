"""Run torchdiffeq's own tests against this library through ``torchdiffeq_shim``.

    git clone https://github.com/rtqichen/torchdiffeq /tmp/torchdiffeq
    python benchmarks/torchdiffeq_suite.py --tests /tmp/torchdiffeq/tests \\
        --output benchmarks/results/torchdiffeq_suite_cpu

torchdiffeq's test files (not part of this repository, nor of torchdiffeq's wheel) import
``torchdiffeq`` and their ``problems`` module; here ``torchdiffeq`` is the shim, and the method
lists of ``problems`` are cut to the methods the shim maps (the ones left out are listed in the
report, with the test files that need features this library does not have: callable
norms). Every sub-test's outcome is recorded; the report (Markdown and JSON) lists the
failures with their messages.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import unittest
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks import torchdiffeq_shim  # noqa: E402
from torchode_adjoint.runs import atomic_write_text  # noqa: E402

#: The test modules run, and those left out with the reason.
MODULES = ("odeint_tests", "api_tests", "gradient_tests", "norm_tests", "event_tests")
LEFT_OUT: dict[str, str] = {}


class _Recorder(unittest.TestResult):
    """Every test's and sub-test's outcome, with the failure's last line."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []

    def _row(self, test: Any, outcome: str, err: Any = None) -> None:
        message = ""
        if err is not None:
            message = self._exc_info_to_string(err, test).strip().splitlines()[-1][:300]
        self.rows.append({"test": test.id(), "outcome": outcome, "message": message})

    def addSuccess(self, test: Any) -> None:  # noqa: N802 (unittest's name)
        super().addSuccess(test)
        self._row(test, "pass")

    def addFailure(self, test: Any, err: Any) -> None:  # noqa: N802
        super().addFailure(test, err)
        self._row(test, "fail", err)

    def addError(self, test: Any, err: Any) -> None:  # noqa: N802
        super().addError(test, err)
        self._row(test, "error", err)

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:  # noqa: N802
        super().addSubTest(test, subtest, err)
        if err is None:
            self._row(subtest, "pass")
        else:
            failed = issubclass(err[0], test.failureException)
            self._row(subtest, "fail" if failed else "error", err)


def _install(tests: Path) -> list[str]:
    """The shim as ``torchdiffeq`` and ``problems`` with the shim's methods; the methods cut."""
    sys.modules["torchdiffeq"] = torchdiffeq_shim  # type: ignore[assignment]
    sys.path.insert(0, str(tests))
    problems = importlib.import_module("problems")
    known = set(torchdiffeq_shim.available_solvers()) | set(torchdiffeq_shim.SOLVER_NAMES)
    cut: list[str] = []
    for name in dir(problems):
        if name.endswith("METHODS") and isinstance(getattr(problems, name), tuple):
            methods = getattr(problems, name)
            cut += [m for m in methods if m not in known and m not in cut]
            setattr(problems, name, tuple(m for m in methods if m in known))
    return cut


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tests", type=Path, required=True, help="torchdiffeq's tests/ folder")
    p.add_argument("--output", type=Path, default=HERE / "results" / "torchdiffeq_suite_cpu")
    args = p.parse_args(argv)
    if not (args.tests / "problems.py").exists():
        p.error(f"--tests {args.tests} has no problems.py: pass torchdiffeq's tests/ folder")
    cut = _install(args.tests)
    recorder = _Recorder()
    started = time.perf_counter()
    for name in MODULES:
        suite = unittest.defaultTestLoader.loadTestsFromModule(importlib.import_module(name))
        suite.run(recorder)
    seconds = time.perf_counter() - started
    rows = recorder.rows
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(rows, indent=1), args.output / "results.json")
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("pass", "fail", "error")}
    lines = [
        "# torchdiffeq's tests through the shim",
        "",
        f"`python benchmarks/torchdiffeq_suite.py --tests <torchdiffeq>/tests`; "
        f"{platform.processor() or platform.machine()}, PyTorch {torch.__version__}, "
        f"{seconds:.0f} s.",
        "",
        f"Modules: {', '.join(MODULES)}. Left out: "
        + ("; ".join(f"{k} ({v})" for k, v in LEFT_OUT.items()) or "none")
        + f". Methods cut from `problems` (no counterpart here): {', '.join(cut) or 'none'}.",
        "",
        f"Outcomes (tests and sub-tests): {counts['pass']} passed, {counts['fail']} failed, "
        f"{counts['error']} raised.",
        "",
        "| test | outcome | message |",
        "|---|---|---|",
    ]
    lines += [f"| {r['test']} | {r['outcome']} | {r['message'].replace('|', '/')} |"
              for r in rows if r["outcome"] != "pass"]  # fmt: skip
    atomic_write_text("\n".join(lines) + "\n", args.output / "report.md")
    print("\n".join(lines[:9]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
