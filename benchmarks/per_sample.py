"""Independent per-sample solves against one shared solve and against torchode, one process.

    python -m benchmarks.per_sample --threads 1 --output-dir benchmarks/results/per_sample_cpu

A batch whose samples differ 100x in stiffness: (1) a linear system ``dy/dt = -rate_b A y`` with
``rate_b`` log-spaced from 1 to 100 over the batch, and (2) an MLP field scaled per sample by the
same factors. dopri5 at ``rtol = atol = 1e-5`` in float32 on [0, 1], one thread. Candidates:
this library with one ``t`` shared by the batch (one error norm over all samples: the stiffest
sets every step) and with per-sample times (``t`` of shape (B, 2): each sample its own steps),
and torchode's per-sample solve (``AutoDiffAdjoint`` with its ``IntegralController``, eager).
For each: the forward pass without a graph and a training step (forward, mean-square loss,
backward), alternating medians; the dynamics' calls of the batch, and the steps per sample
(sum and largest). Writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchode_adjoint import NFECounter, odeint
from torchode_adjoint.measure import add_threads_argument, use_threads

from .files import write_atomic
from .run import machine
from .timing import alternating_medians

TOL = 1e-5


class Linear(nn.Module):
    """``dy/dt = -rate_b A y`` with ``A`` symmetric positive definite (eigenvalues 0.5-1.5)."""

    def __init__(self, rates: torch.Tensor, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
        a = q @ torch.diag(torch.linspace(0.5, 1.5, dim)) @ q.T
        self.a = nn.Parameter(a)
        self.register_buffer("rates", rates.view(-1, 1))
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return -self.rates * (y @ self.a)


class ScaledMLP(nn.Module):
    """``dy/dt = rate_b tanh-MLP(y)`` (32 -> 64 -> 32)."""

    def __init__(self, rates: torch.Tensor, dim: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, dim))
        self.register_buffer("rates", rates.view(-1, 1))
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.rates * (self.net(y) - y)


def _ours(f: nn.Module, per_sample: bool, mode: str) -> Callable[[torch.Tensor], Any]:
    def solve(y: torch.Tensor) -> tuple[torch.Tensor, NFECounter]:
        nfe = NFECounter()
        t = torch.tensor([0.0, 1.0])
        if per_sample:
            t = t.expand(y.shape[0], 2)
        out = odeint(f, y, t, solver="dopri5", rtol=TOL, atol=TOL, adjoint=mode, nfe=nfe)
        return out[-1], nfe

    return solve


def _torchode(f: nn.Module) -> Callable[[torch.Tensor], Any] | None:
    try:
        import torchode as to
    except ImportError:
        return None
    term = to.ODETerm(f)
    method = to.Dopri5(term=term)
    controller = to.IntegralController(atol=TOL, rtol=TOL, term=term)
    solver = to.AutoDiffAdjoint(method, controller)

    def solve(y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        t_eval = torch.tensor([[0.0, 1.0]]).expand(y.shape[0], 2)
        sol = solver.solve(to.InitialValueProblem(y0=y, t_eval=t_eval))
        return sol.ys[:, -1], sol.stats

    return solve


def _counts(f: nn.Module, solve: Callable[[torch.Tensor], Any], y0: torch.Tensor) -> dict:
    f.calls = 0
    with torch.no_grad():
        _, stats = solve(y0)
    out: dict[str, Any] = {"calls": f.calls}
    if isinstance(stats, NFECounter):
        if stats.samples is not None:
            steps = stats.samples.accepted + stats.samples.rejected
        else:
            steps = torch.full((y0.shape[0],), stats.accepted + stats.rejected)
    else:
        steps = stats["n_steps"]
    out["steps sum"], out["steps max"] = int(steps.sum()), int(steps.max())
    return out


def run_case(name: str, f: nn.Module, y0: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Every candidate's counts and medians on one workload."""
    candidates: dict[str, Callable[[torch.Tensor], Any]] = {
        "shared t (one norm)": _ours(f, False, "backprop"),
        "per-sample t": _ours(f, True, "backprop"),
    }
    theirs = _torchode(f)
    if theirs is not None:
        candidates["torchode (per sample)"] = theirs
    rows: dict[str, dict[str, Any]] = {k: _counts(f, s, y0) for k, s in candidates.items()}

    def forward(solve: Callable) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return solve(y0)

        return run

    def train(solve: Callable) -> Callable[[], Any]:
        def run() -> None:
            f.zero_grad()
            y, _ = solve(y0.clone().requires_grad_(True))
            y.square().mean().backward()

        return run

    timed: dict[str, Callable[[], Any]] = {}
    for k, s in candidates.items():
        timed[f"{k}|forward"] = forward(s)
        timed[f"{k}|backprop"] = train(s)
    for mode in ("adjoint", "checkpoint"):
        timed[f"per-sample t|{mode}"] = train(_ours(f, True, mode))
    failed: dict[str, str] = {}
    for key in list(timed):
        try:
            timed[key]()
        except RuntimeError as err:  # reported, not timed
            failed[key] = str(err).split(":")[0]
            del timed[key]
    medians = alternating_medians(timed, repeats=repeats)
    for key, sec in medians.items():
        who, what = key.split("|")
        rows.setdefault(who, {})[f"{what} s"] = sec
    return {"case": name, "rows": rows, "failed": failed}


def report(results: dict[str, Any]) -> str:
    """The markdown report."""
    lines = [
        "# Per-sample solves: a batch 100x apart in stiffness",
        "",
        f"Machine: {results['machine']}.",
        f"Command: `{results['command']}`.",
        "",
        f"dopri5 at rtol = atol = {TOL:g}, float32, t in [0, 1], batch {results['batch']} with "
        "per-sample rates log-spaced from 1 to 100. Calls: the dynamics' calls of the batch "
        "(each evaluates every sample). Steps: accepted and rejected per sample, summed over the "
        "batch and the largest. Times: medians of alternating repeats after warm-up, one "
        "process; ratios against torchode's. The continuous adjoint's backward pass integrates "
        "the state backwards, where these contracting dynamics grow like exp(rate t): at rate "
        "100 it overflows float32 (the mode's known limit, see the adjoint page), and is "
        "reported as raised.",
        "",
    ]
    for case in results["cases"]:
        rows = case["rows"]
        ref = rows.get("torchode (per sample)")
        lines += [
            f"## {case['case']}",
            "",
            "| solve | calls | steps (sum) | steps (max) | forward (ms) | vs torchode | "
            "training step (ms) | vs torchode |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for who, row in rows.items():

            def ms(key: str, row: dict = row) -> str:
                return f"{1e3 * row[key]:.1f}" if key in row else "-"

            def ratio(key: str, row: dict = row, ref: dict | None = ref) -> str:
                if ref is None or key not in row or key not in ref:
                    return "-"
                return f"{row[key] / ref[key]:.2f}x"

            lines.append(
                f"| {who} | {row.get('calls', '-')} | {row.get('steps sum', '-')} | "
                f"{row.get('steps max', '-')} | {ms('forward s')} | {ratio('forward s')} | "
                f"{ms('backprop s')} | {ratio('backprop s')} |"
            )
        for mode in ("adjoint", "checkpoint"):
            key = f"{mode} s"
            row = rows["per-sample t"]
            if key in row:
                lines.append(f"| per-sample t, {mode} | | | | | | {1e3 * row[key]:.1f} | "
                             f"{row[key] / ref['backprop s']:.2f}x |" if ref else "")  # fmt: skip
        for key, why in case.get("failed", {}).items():
            lines.append(f"\n{key.replace('|', ', ')}: raised ({why}).")
        lines.append("")
    return "\n".join(lines) + "\n"


def rewrite(directory: Path) -> None:
    """Write ``report.md`` again from ``results.json`` (no run)."""
    results = json.loads((directory / "results.json").read_text())
    write_atomic(directory / "report.md", report(results))


def main(argv: list[str] | None = None) -> None:
    """Run both workloads and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("per_sample_results"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    threads = use_threads(args.threads)
    rates = torch.logspace(0.0, 2.0, args.batch)
    torch.manual_seed(0)
    cases = [
        run_case("linear system (16 dimensions)", Linear(rates, 16), torch.randn(args.batch, 16),
                 args.repeats),
        run_case("MLP scaled per sample (32 dimensions)", ScaledMLP(rates, 32),
                 torch.randn(args.batch, 32), args.repeats),
    ]  # fmt: skip
    results = {
        "machine": machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "batch": args.batch,
        "command": "python -m benchmarks.per_sample " + " ".join(sys.argv[1:]),
        "cases": cases,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(args.output_dir / "report.md", report(results))
    print(report(results))


if __name__ == "__main__":
    main()
