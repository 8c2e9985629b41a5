"""Eager speed against another commit, same machine, same run: medians and ratios.

    python -m benchmarks.speed_against --reference cb6c718 --output-dir benchmarks/results/speed_vs

A refactoring must not slow the library down. Both packages (``--reference`` exported with
``git archive``, and the working tree's) time the same workloads, each in a subprocess of its
own, in alternating rounds (so that a change of the machine's load hits both); each round takes
the median of ``--repeats`` timed calls, and the report gives, per workload, the median over the
rounds and the ratio current / reference, with the threads ``--threads`` sets. The workloads:
the error-controlled MLP of ``benchmarks/adaptive.py`` (dopri5, batch 512, float32) forward,
backprop step and continuous adjoint step; the same dynamics with 100 output times (dense
output); fixed rk4 steps; and the launch-bound case (a 2-dimensional linear system, rk4, 100
steps) under backprop and the continuous adjoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torchode_adjoint.measure import add_threads_argument, use_threads

from .bitwise import ROOT, export_src
from .files import write_atomic
from .run import machine


class _MLP(nn.Module):
    """The adaptive benchmark's dynamics: dim 16, hidden 64, tanh, weights doubled."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(2.0)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)  # type: ignore[no-any-return]


class _Linear(nn.Module):
    """A 2-dimensional linear system: each step's cost is the launches, not the arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([[-0.1, 2.0], [-2.0, -0.1]]))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.a


def workloads() -> dict[str, Callable[[], None]]:
    """name -> one call to time (the package is whichever ``torchode_adjoint`` imports)."""
    from torchode_adjoint import odeint

    torch.manual_seed(0)
    f, y0 = _MLP(), torch.randn(512, 16)
    span = torch.tensor([0.0, 5.0])
    tol = dict(solver="dopri5", rtol=1e-6, atol=1e-6)
    lin, y_lin = _Linear(), torch.randn(1, 2)

    def forward() -> None:
        with torch.no_grad():
            odeint(f, y0, span, adjoint="backprop", **tol)

    def step(mode: str) -> Callable[[], None]:
        def run() -> None:
            odeint(f, y0, span, adjoint=mode, **tol)[-1].square().mean().backward()

        return run

    def dense() -> None:
        with torch.no_grad():
            odeint(f, y0[:64], torch.linspace(0.0, 5.0, 101), adjoint="backprop", **tol)

    def fixed() -> None:
        with torch.no_grad():
            odeint(f, y0, span, solver="rk4", step=0.05, adjoint="backprop")

    def launch(mode: str) -> Callable[[], None]:
        def run() -> None:
            y = odeint(lin, y_lin, [0.0, 1.0], solver="rk4", step=0.01, adjoint=mode)
            y[-1].square().sum().backward()

        return run

    return {
        "adaptive forward (dopri5, MLP)": forward,
        "adaptive backprop step": step("backprop"),
        "adaptive adjoint step": step("adjoint"),
        "dense output, 100 times": dense,
        "fixed rk4 forward, 100 steps": fixed,
        "launch-bound rk4 backprop step": launch("backprop"),
        "launch-bound rk4 adjoint step": launch("adjoint"),
    }


def measure(repeats: int) -> dict[str, float]:
    """Each workload's median time in ms over ``repeats`` calls (after three warm-up calls)."""
    out = {}
    for name, fn in workloads().items():
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = 1e3 * statistics.median(times)
    return out


def _measure_with(src: Path, repeats: int) -> dict[str, float]:
    threads = torch.get_num_threads()  # the parent's (``--threads``), in the child too
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": str(threads)}
    code = (
        f"import json, torch, benchmarks.speed_against as s; torch.set_num_threads({threads}); "
        f"print(json.dumps(s.measure({repeats})))"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    """Time the working tree against ``--reference`` and write ``report.md`` and
    ``results.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="the commit to compare against")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/speed_against"))
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of each")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per round")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rounds: dict[str, list[dict[str, float]]] = {"reference": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        reference_src = export_src(args.reference, Path(tmp))
        for _ in range(args.rounds):
            rounds["reference"].append(_measure_with(reference_src, args.repeats))
            rounds["current"].append(_measure_with(ROOT / "src", args.repeats))
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    rows = []
    for name in rounds["current"][0]:
        ref = statistics.median(r[name] for r in rounds["reference"])
        cur = statistics.median(r[name] for r in rounds["current"])
        rows.append({"workload": name, "reference_ms": ref, "current_ms": cur, "ratio": cur / ref})
    result = {
        "reference": args.reference, "current": head, "machine": machine(),
        "torch": torch.__version__, "rounds": rounds, "rows": rows,
    }  # fmt: skip
    write_atomic(args.output_dir / "results.json", json.dumps(result, indent=1))
    lines = [
        "# Eager speed against another commit",
        "",
        f"Reference `{args.reference}`, current `{head}`; {machine()}; PyTorch "
        f"{torch.__version__}, {torch.get_num_threads()} thread(s). `python -m "
        f"benchmarks.speed_against --reference "
        f"{args.reference}`: {args.rounds} alternating rounds of each package in its own "
        f"process, each the median of {args.repeats} calls; the table gives the median over "
        "the rounds.",
        "",
        "| workload | reference ms | current ms | current / reference |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['reference_ms']:.2f} | {r['current_ms']:.2f} | "
            f"{r['ratio']:.3f} |"
        )
    write_atomic(args.output_dir / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines[6:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
