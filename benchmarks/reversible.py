"""The reversible mode against checkpointing, backprop and the continuous adjoint, side by side.

``python -m benchmarks.reversible`` measures, on the MLP and conv workloads of the benchmark
suite, with the same tableau and step for every mode: the training-step time (alternating
medians), the bytes saved for backward, the peak of live tensor bytes during one step, the
gradient's error against the exact gradient of the discretisation each mode integrates (from
:func:`~torchode_adjoint.check_gradients`, float64), and, in fresh processes, the peak resident
memory of one training step at two step counts. It writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import torch

from torchode_adjoint import TimeSharedStatisticsWarning, check_gradients
from torchode_adjoint.measure import (
    add_threads_argument,
    peak_memory_bytes,
    saved_tensor_bytes,
    use_threads,
)

from .files import write_atomic
from .run import machine, ours_loss, train_step
from .timing import alternating_medians
from .workloads import MLPDynamics, Workload, conv_workload, mlp_workload

MODES = ("backprop", "checkpoint", "adjoint", "reversible")

# VmHWM, the peak resident set of this process's memory since exec (ru_maxrss would carry the
# parent's peak over the fork).
_RSS_SCRIPT = textwrap.dedent(
    """
    import sys, torch, warnings
    warnings.simplefilter("ignore")
    from torchode_adjoint import odeint
    from benchmarks.workloads import mlp_workload
    torch.set_num_threads(1)
    mode, solver, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    w = mlp_workload()
    y0 = w.y0.requires_grad_()
    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    before = peak()
    sol = odeint(w.func, y0, torch.tensor([0.0, 1.0]), solver=solver, step=1.0 / n,
                 adjoint=mode)
    sol[-1].square().mean().backward()
    print(before, peak())
    """
)


def peak_rss_kib(mode: str, solver: str, n: int) -> tuple[int, int]:
    """Peak resident memory (KiB) of a fresh process before and after one MLP training step."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, mode, solver, str(n)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    before, after = out.stdout.split()[-2:]
    return int(before), int(after)


def gradient_error(mode: str, solver: str, n: int) -> float:
    """The largest relative error of the mode's gradient against backprop through the
    discretisation it integrates (float64, a small MLP)."""
    torch.manual_seed(0)
    report = check_gradients(
        MLPDynamics(4, 16), torch.randn(8, 4), solver=solver, step=1.0 / n, adjoint=mode
    )
    return report.max_rel_err_backprop


def bench(w: Workload, solvers: list[str], n: int, repeats: int) -> list[dict]:
    rows = []
    for solver in solvers:
        cands = {m: train_step(ours_loss(w, solver, n, m)) for m in MODES}
        times = alternating_medians(cands, repeats=repeats)
        row: dict = {"workload": w.name, "solver": solver, "steps": n, "time_s": times}
        row["saved_bytes"], row["peak_tensor_bytes"] = {}, {}
        for m in MODES:
            with saved_tensor_bytes() as saved:
                loss = ours_loss(w, solver, n, m)()
            loss.backward()
            row["saved_bytes"][m] = saved.bytes
            row["peak_tensor_bytes"][m] = peak_memory_bytes(
                train_step(ours_loss(w, solver, n, m)), w.y0.device
            )
        rows.append(row)
        print(
            f"{w.name:>6} {solver:>8} n={n:<4} "
            + "  ".join(f"{m} {times[m] * 1e3:8.2f} ms" for m in MODES)
            + f"  reversible/checkpoint {times['reversible'] / times['checkpoint']:.2f}",
            flush=True,
        )
    return rows


def flatness(solvers: list[str], steps: tuple[int, int]) -> list[dict]:
    """Saved bytes of the reversible mode at two step counts (MLP workload)."""
    w = mlp_workload()
    rows = []
    for solver in solvers:
        values = []
        for n in steps:
            with saved_tensor_bytes() as saved:
                loss = ours_loss(w, solver, n, "reversible")()
            loss.backward()
            values.append(saved.bytes)
        rows.append({"solver": solver, "steps": list(steps), "saved_bytes": values})
    return rows


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.2f}"


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# The reversible mode against the other gradient modes",
        "",
        f"Machine: {results['machine']}.",
        f"Command: `{results['command']}` ({results['wall_s']:.0f} s).",
        "",
        "Training-step time (medians of alternating runs), bytes saved for backward and peak live "
        "tensor bytes during one step, every mode at the same tableau and step. The reversible "
        "mode integrates the tableau made reversible (McCallum & Foster's coupling, chosen per "
        "step).",
        "",
        "| workload | solver | steps | backprop ms | checkpoint ms | adjoint ms | reversible ms "
        "| reversible / checkpoint | saved MiB (bp / ck / adj / rev) | peak MiB (bp / ck / adj / "
        "rev) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        t, s, p = r["time_s"], r["saved_bytes"], r["peak_tensor_bytes"]
        lines.append(
            f"| {r['workload']} | {r['solver']} | {r['steps']} | "
            + " | ".join(f"{t[m] * 1e3:.2f}" for m in MODES)
            + f" | {t['reversible'] / t['checkpoint']:.2f} | "
            + " / ".join(_mib(s[m]) for m in MODES)
            + " | "
            + " / ".join(_mib(p[m]) for m in MODES)
            + " |"
        )
    lines += [
        "",
        "Gradient error against the exact gradient of the discretisation each mode integrates "
        "(`check_gradients`, float64, largest relative error over y0, t and the parameters):",
        "",
        "| solver | steps | " + " | ".join(MODES) + " |",
        "|---|---|" + "---|" * len(MODES),
    ]
    for g in results["gradient_error"]:
        lines.append(
            f"| {g['solver']} | {g['steps']} | "
            + " | ".join(f"{g['error'][m]:.1e}" for m in MODES)
            + " |"
        )
    lines += ["", "Saved bytes of the reversible mode at two step counts (MLP workload):", ""]
    for f in results["flatness"]:
        a, b = f["saved_bytes"]
        lines.append(
            f"- {f['solver']}: {a:,} B at {f['steps'][0]} steps, {b:,} B at {f['steps'][1]} "
            f"steps ({(b - a) / a:+.1%})"
        )
    lines += [
        "",
        "Peak resident memory of one MLP training step in a fresh process (KiB, "
        "before the step -> after it):",
        "",
    ]
    for r in results["rss"]:
        lines.append(
            f"- {r['mode']}, {r['solver']}, {r['steps']} steps: {r['before']:,} -> "
            f"{r['after']:,} (+{r['after'] - r['before']:,})"
        )
    write_atomic(out / "report.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the machinery only")
    p.add_argument("--output-dir", default="runs/reversible", help="where the report goes")
    add_threads_argument(p)
    args = p.parse_args(argv)
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=TimeSharedStatisticsWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    solvers = ["euler", "midpoint", "rk4"]
    if args.quick:
        workloads = [(mlp_workload(batch=8, dim=2), 4)]
        repeats, grad_steps, flat_steps, rss = 1, [4], (2, 8), []
    else:
        workloads = [(mlp_workload(), 100), (conv_workload(batch=32, size=8), 10)]
        repeats, grad_steps, flat_steps = 7, [10, 100], (10, 1000)
        rss = [(m, "rk4", n) for n in (100, 1000) for m in MODES]
    rows = []
    for w, n in workloads:
        rows += bench(w, solvers, n, repeats)
    gradient = [
        {"solver": s, "steps": n, "error": {m: gradient_error(m, s, n) for m in MODES}}
        for s in solvers
        for n in grad_steps
    ]
    rss_rows = []
    for mode, solver, n in rss:
        before, after = peak_rss_kib(mode, solver, n)
        rss_rows.append(
            {"mode": mode, "solver": solver, "steps": n, "before": before, "after": after}
        )
    flat = flatness(solvers, flat_steps)
    results = {
        "machine": machine(),
        "command": "python -m benchmarks.reversible "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": time.time() - started,
        "rows": rows,
        "gradient_error": gradient,
        "flatness": flat,
        "rss": rss_rows,
    }
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    write_report(results, out)
    print(f"wrote {out / 'results.json'} and {out / 'report.md'} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
