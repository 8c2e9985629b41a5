"""A state of two tensors against the same model on the user's own concatenation, side by side.

``python -m benchmarks.structured`` splits the MLP workload's state (batch 512, 16 features)
into two parts of 8 features and times one training step written two ways, alternating:

- ``concat``: one tensor of 16 features; the dynamics slice it into ``x, v``, compute, and
  concatenate ``dx, dv`` (what users wrote before tuple states);
- ``tuple``: the state ``(x, v)``; the dynamics take and return the pair, and the library
  flattens and concatenates.

Both compute the same ``dx, dv = F(x, v)``. It also times the single-tensor path's only added
work (recognising that the state is one real tensor) against one solve. It writes
``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torchode_adjoint import odeint
from torchode_adjoint._structure import StateStructure, first_leaf
from torchode_adjoint.measure import add_threads_argument, use_threads

from .files import write_atomic
from .run import machine, train_step
from .timing import alternating_medians
from .workloads import mlp_workload

MODES = ("backprop", "adjoint", "checkpoint", "reversible")


class Halves(nn.Module):
    """``F(x, v)``: the workload's MLP on ``[x, v]``, its output split into two halves."""

    def __init__(self, mlp: nn.Module, split: int) -> None:
        super().__init__()
        self.mlp, self.split = mlp, split

    def pair(self, t: torch.Tensor, x: torch.Tensor, v: torch.Tensor):
        out = self.mlp(t, torch.cat([x, v], dim=1))
        return out[:, : self.split], out[:, self.split :]


class ConcatState(Halves):
    """The user's own concatenation: one tensor in, one tensor out."""

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dx, dv = self.pair(t, y[:, : self.split], y[:, self.split :])
        return torch.cat([dx, dv], dim=1)


class TupleState(Halves):
    """The same dynamics on the state ``(x, v)``."""

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        return self.pair(t, *state)


def _loss(func: nn.Module, y0, solver: str, n: int, mode: str) -> Callable[[], torch.Tensor]:
    t = torch.tensor([0.0, 1.0], dtype=torch.float32)

    def run() -> torch.Tensor:
        sol = odeint(func, y0, t, solver=solver, step=1.0 / n, adjoint=mode)
        if isinstance(sol, tuple):
            return sol[0][-1].square().mean() + sol[1][-1].square().mean()
        return sol[-1].square().mean()

    return run


def bench(solver: str, steps: list[int], repeats: int) -> list[dict]:
    w = mlp_workload()
    split = w.y0.shape[1] // 2
    concat, pair = ConcatState(w.func, split), TupleState(w.func, split)
    y = w.y0.clone().requires_grad_()
    x, v = (w.y0[:, :split].clone().requires_grad_(), w.y0[:, split:].clone().requires_grad_())
    rows = []
    for n in steps:
        cands = {}
        for mode in MODES:
            cands[f"concat_{mode}"] = train_step(_loss(concat, y, solver, n, mode))
            cands[f"tuple_{mode}"] = train_step(_loss(pair, (x, v), solver, n, mode))
        times = alternating_medians(cands, repeats=repeats)
        row = {"solver": solver, "steps": n, "time_s": times}
        row["ratio"] = {m: times[f"tuple_{m}"] / times[f"concat_{m}"] for m in MODES}
        rows.append(row)
        ratios = "  ".join(f"{m} {r:.3f}" for m, r in row["ratio"].items())
        print(f"{solver} n={n:<4} tuple/concat: {ratios}", flush=True)
    return rows


def single_tensor_overhead(repeats: int = 200_000) -> dict:
    """Seconds per call of what a single real tensor now passes through: the check that it is
    one real tensor (``StateStructure.of``) and, in an ODEBlock, ``first_leaf``."""
    y0 = mlp_workload().y0
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            StateStructure.of(y0)
            first_leaf(y0)
        samples.append((time.perf_counter() - start) / repeats)
    return {"per_call_s": statistics.median(samples)}


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# Structured states against the user's own concatenation",
        "",
        f"Machine: {results['machine']}. Command: `{results['command']}`. Medians of "
        f"{results['repeats']} alternating repeats of one training step (forward, loss, "
        "backward) on the MLP workload (batch 512, 16 features) split into two parts of 8.",
        "",
        "| solver | steps | mode | concat (ms) | tuple (ms) | tuple / concat |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for m in MODES:
            t = row["time_s"]
            lines.append(
                f"| {row['solver']} | {row['steps']} | {m} | {t[f'concat_{m}'] * 1e3:.2f} | "
                f"{t[f'tuple_{m}'] * 1e3:.2f} | {row['ratio'][m]:.3f} |"
            )
    over = results["single_tensor"]["per_call_s"]
    lines += [
        "",
        f"A single real tensor passes through one added check per solve (is it one real "
        f"tensor?): {over * 1e9:.0f} ns per call, against {results['single_solve_s'] * 1e3:.2f} "
        "ms for one MLP training step with rk4 at 10 steps (backprop).",
    ]
    write_atomic(out / "report.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/structured")
    add_threads_argument(p)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 100])
    args = p.parse_args(argv)
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = []
    for solver in ("euler", "rk4"):
        rows += bench(solver, args.steps, args.repeats)
    w = mlp_workload()
    single = alternating_medians(
        {"solve": train_step(_loss(w.func, w.y0.clone().requires_grad_(), "rk4", 10, "backprop"))},
        repeats=args.repeats,
    )["solve"]
    results = {
        "machine": machine(),
        "command": "python -m benchmarks.structured "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "repeats": args.repeats,
        "rows": rows,
        "single_tensor": single_tensor_overhead(),
        "single_solve_s": single,
        "wall_s": time.time() - started,
    }
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    write_report(results, out)
    print(f"wrote {out / 'results.json'} and {out / 'report.md'} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
