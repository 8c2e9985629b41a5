"""What the check of the dynamics' outside tensors costs a training step, side by side.

``python -m benchmarks.bookkeeping`` times one training step of each memory-saving mode on the
MLP and conv workloads of the suite twice, alternating: as shipped (the first evaluation of each
solve recorded, each read tensor located, the check at the backward pass), and with that
bookkeeping switched off (a patch of this benchmark only). It also times the bookkeeping's parts
directly (the recorded evaluation against a plain one, the search, the check), which is less
noisy than a difference of two step times. With ``--compiled`` it adds the compiled path's
rows (one cold compilation per mode first). Writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from torchode_adjoint import Compile, Reversible, TimeSharedStatisticsWarning
from torchode_adjoint._reads import ReadRecorder, Reads
from torchode_adjoint.measure import add_threads_argument, use_threads
from torchode_adjoint.modes import base as _mode

from .files import write_atomic
from .run import machine, ours_loss
from .timing import alternating_medians
from .workloads import Workload, conv_workload, mlp_workload

MODES = ("adjoint", "checkpoint", "reversible")


@contextlib.contextmanager
def bookkeeping_off() -> Iterator[None]:
    """Solves without the outside-tensor record and check (for this comparison only)."""
    dynamics, record = _mode.Dynamics, _mode.Reads.record

    def plain(func, **kwargs):
        kwargs["record_reads"] = False
        return dynamics(func, **kwargs)

    _mode.Dynamics = plain  # type: ignore[misc]
    _mode.Reads.record = staticmethod(lambda root, read, versions: None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        _mode.Dynamics = dynamics  # type: ignore[misc]
        _mode.Reads.record = record  # type: ignore[method-assign]


def _step(loss: Callable[[], torch.Tensor], off: bool) -> Callable[[], None]:
    def run() -> None:
        with bookkeeping_off() if off else contextlib.nullcontext():
            loss().backward()

    return run


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def parts(w: Workload, repeats: int) -> dict[str, float]:
    """Seconds per solve of the bookkeeping's parts: the recorded first evaluation minus a plain
    one, the search for the read tensors' places, and the check at the backward pass."""
    y = w.y0.detach()
    t = torch.zeros((), dtype=y.dtype)

    def recorded() -> tuple[list[torch.Tensor], list[int | None]]:
        recorder = ReadRecorder(t, y)
        with recorder:
            out = w.func(t, y)
        read = recorder.read_by(out)
        return read, [x._version for x in read]

    with torch.no_grad():
        plain_s = _median_time(lambda: w.func(t, y), repeats)
        recorded_s = _median_time(recorded, repeats)
        read, versions = recorded()
    locate_s = _median_time(lambda: Reads.record(w.func, read, versions), repeats)
    reads = Reads.record(w.func, read, versions)
    check_s = _median_time(lambda: reads.check("adjoint"), repeats)
    return {
        "plain_evaluation_s": plain_s,
        "recorded_evaluation_s": recorded_s,
        "locate_s": locate_s,
        "check_s": check_s,
        "per_solve_s": max(recorded_s - plain_s, 0.0) + locate_s + check_s,
        "tensors_read": len(read),
    }


def bench(w: Workload, solver: str, n: int, repeats: int, compile: Compile | None) -> list[dict]:
    rows = []
    for mode in MODES:
        # The compiled reversible path is a fixed coupling's (a chosen one runs eagerly).
        chosen: Any = Reversible(coupling=0.999) if compile and mode == "reversible" else mode
        loss = ours_loss(w, solver, n, chosen, compile)
        times = alternating_medians(
            {"on": _step(loss, False), "off": _step(loss, True)}, repeats=repeats
        )
        rows.append(
            {
                "workload": w.name,
                "solver": solver,
                "steps": n,
                "mode": mode,
                "compiled": compile is not None,
                "on_s": times["on"],
                "off_s": times["off"],
            }
        )
        print(
            f"{w.name:>6} {solver:>5} n={n:<4} {mode:>10} {'compiled' if compile else 'eager':>8}: "
            f"{times['on'] * 1e3:8.2f} ms with, {times['off'] * 1e3:8.2f} ms without "
            f"({times['on'] / times['off']:.3f}x)",
            flush=True,
        )
    return rows


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# What the outside-tensor check costs",
        "",
        f"Machine: {results['machine']}.",
        f"Command: `{results['command']}` ({results['wall_s']:.0f} s).",
        "",
        "Training steps (forward, loss, backward) with the check and without it, alternating, "
        f"medians of {results['repeats']} after warm-up, one process. The difference of two "
        "medians is noisy at this size; the parts below are timed directly.",
        "",
        "| workload | solver | steps | mode | path | with (ms) | without (ms) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["steps"]:
        path = "compiled" if r["compiled"] else "eager"
        lines.append(
            f"| {r['workload']} | {r['solver']} | {r['steps']} | {r['mode']} | {path} "
            f"| {r['on_s'] * 1e3:.2f} | {r['off_s'] * 1e3:.2f} | {r['on_s'] / r['off_s']:.3f} |"
        )
    lines += [
        "",
        "The bookkeeping's parts, per solve (medians), and their sum as a share of the fastest "
        "training step measured for that workload above:",
        "",
        "| workload | tensors read | plain evaluation (ms) | recorded evaluation (ms) | search "
        "(ms) | check (ms) | per solve (ms) | share of the fastest step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, p in results["parts"].items():
        fastest = min(r["on_s"] for r in results["steps"] if r["workload"] == name)
        lines.append(
            f"| {name} | {p['tensors_read']} | {p['plain_evaluation_s'] * 1e3:.3f} "
            f"| {p['recorded_evaluation_s'] * 1e3:.3f} | {p['locate_s'] * 1e3:.3f} "
            f"| {p['check_s'] * 1e3:.3f} | {p['per_solve_s'] * 1e3:.3f} "
            f"| {100 * p['per_solve_s'] / fastest:.2f} % |"
        )
    write_atomic(out / "report.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/bookkeeping", help="where the report goes")
    add_threads_argument(p)
    p.add_argument("--repeats", type=int, default=11, help="alternating repeats per row")
    p.add_argument("--compiled", action="store_true", help="add the compiled path's rows")
    args = p.parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import warnings

    warnings.filterwarnings("ignore", category=TimeSharedStatisticsWarning)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    workloads = [(mlp_workload(), "rk38", 100), (conv_workload(batch=32, size=8), "euler", 10)]
    steps: list[dict] = []
    for w, solver, n in workloads:
        steps += bench(w, solver, n, args.repeats, None)
        if args.compiled:
            steps += bench(w, solver, n, args.repeats, Compile())
    results = {
        "machine": machine(),
        "command": "python -m benchmarks.bookkeeping "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "repeats": args.repeats,
        "steps": steps,
        "parts": {w.name: parts(w, max(args.repeats, 21)) for w, _, _ in workloads},
    }
    results["wall_s"] = time.time() - started
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    write_report(results, out)
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
