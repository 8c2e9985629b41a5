"""The per-step cost where launches, not arithmetic, dominate: a 2-element linear system.

    python -m benchmarks.launch_bound --output-dir benchmarks/results/launch_bound_cpu

``dy/dt = y A`` with a learnable 2x2 ``A``, batch 1, 1,000 steps over [0, 1], one thread: what
small dynamics on a GPU and small models on a CPU see. For Euler and rk4 and every gradient mode
it times, alternating, medians: the training step (forward, loss, backward), the forward alone
under ``no_grad``, and so the backward; beside them a bare loop (the same steps written as plain
PyTorch: ``y = y + h f(y)``), its backprop, and one evaluation with its VJP by
``torch.autograd.grad`` (the floor of an adjoint's backward stage). torchdiffeq's ``odeint`` and
``odeint_adjoint`` with the same method run beside them when installed. Writes ``results.json``
and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from torchode_adjoint import odeint
from torchode_adjoint.measure import add_threads_argument, use_threads

from .files import write_atomic
from .run import heun_meant, machine
from .timing import alternating_medians

STEPS = 1000
MODES = ("backprop", "adjoint", "checkpoint", "reversible")
# torchdiffeq's methods with our tableaus (its "rk4" is the 3/8 rule: ours is classic rk4,
# with as many stages and the same cost).
TORCHDIFFEQ = {"euler": "euler", "rk4": "rk4"}


class Linear(nn.Module):
    """``f(t, y) = y A``, a damped rotation."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.1, 1.0], [-1.0, -0.1]]))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.A


def _bare_loop(f: Linear, y0: torch.Tensor, solver: str) -> torch.Tensor:
    """The same fixed steps as plain PyTorch, without a library."""
    h = 1.0 / STEPS
    t = torch.zeros(())
    y = y0
    for _ in range(STEPS):
        if solver == "euler":
            y = y + h * f(t, y)
        else:
            k1 = f(t, y)
            k2 = f(t, y + (0.5 * h) * k1)
            k3 = f(t, y + (0.5 * h) * k2)
            k4 = f(t, y + h * k3)
            y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return y


def candidates(solver: str) -> dict[str, Callable[[], object]]:
    f = Linear()
    y0 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    out: dict[str, Callable[[], object]] = {}

    def ours(mode: str, grad: bool) -> Callable[[], object]:
        def run() -> None:
            with heun_meant(), torch.set_grad_enabled(grad):
                y = odeint(f, y0, t, solver=solver, step=1.0 / STEPS, adjoint=mode)
            if grad:
                y[-1].sum().backward()

        return run

    for mode in MODES:
        out[f"{mode}_step"] = ours(mode, True)
        out[f"{mode}_forward"] = ours(mode, False)  # the mode's method, without a graph

    def bare(grad: bool) -> Callable[[], object]:
        def run() -> None:
            with torch.set_grad_enabled(grad):
                y = _bare_loop(f, y0, solver)
            if grad:
                y.sum().backward()

        return run

    out["bare_step"] = bare(True)
    out["bare_forward"] = bare(False)
    stages = 1 if solver == "euler" else 4

    def vjp_floor() -> None:
        a = torch.ones(1, 2)
        y = y0.detach()
        for _ in range(STEPS * stages):
            x = y.detach().requires_grad_()
            value = f(t[0], x)
            torch.autograd.grad(value, (x, f.A), a)

    out["vjp_floor"] = vjp_floor
    try:
        import torchdiffeq
    except ImportError:
        return out
    options = {"step_size": 1.0 / STEPS}

    def tdq(adjoint: bool) -> Callable[[], object]:
        fn = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
        kw = {"adjoint_params": (f.A,)} if adjoint else {}

        def run() -> None:
            y = fn(f, y0, t, method=TORCHDIFFEQ[solver], options=options, **kw)
            y[-1].sum().backward()

        return run

    out["torchdiffeq_backprop_step"] = tdq(False)
    out["torchdiffeq_adjoint_step"] = tdq(True)
    return out


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# Launch-bound per-step costs: a 2-element linear system, 1,000 steps",
        "",
        f"Machine: {results['machine']}.",
        f"Command: `{results['command']}` ({results['wall_s']:.0f} s).",
        "",
        "Medians of alternating repeats after warm-up, one process, one thread. Per-step costs "
        "are a whole call's time divided by 1,000 steps; a mode's backward is its training step "
        "minus its forward without a graph (the reversible mode's forward takes two steps of "
        "the tableau per step; the bare loop's backward: its step minus its forward).",
        "",
    ]
    for solver, t in results["times"].items():
        per = {k: 1e6 * v / STEPS for k, v in t.items()}
        lines += [
            f"## {solver}",
            "",
            "| what | training step (us/step) | forward (us/step) | backward (us/step) "
            "| step / backprop's step |",
            "|---|---|---|---|---|",
        ]
        bp = per["backprop_step"]
        for mode in MODES:
            s, fwd = per[f"{mode}_step"], per[f"{mode}_forward"]
            lines.append(f"| {mode} | {s:.1f} | {fwd:.1f} | {s - fwd:.1f} | {s / bp:.2f} |")
        lines.append(
            f"| bare loop, backprop | {per['bare_step']:.1f} | {per['bare_forward']:.1f} "
            f"| {per['bare_step'] - per['bare_forward']:.1f} | {per['bare_step'] / bp:.2f} |"
        )
        for name in ("torchdiffeq_backprop_step", "torchdiffeq_adjoint_step"):
            if name in per:
                lines.append(
                    f"| {name.removesuffix('_step').replace('_', ' ')} | {per[name]:.1f} | - | - "
                    f"| {per[name] / bp:.2f} |"
                )
        lines += [
            "",
            f"One evaluation with its VJP (`torch.autograd.grad`), the floor of an adjoint's "
            f"backward stage: {per['vjp_floor']:.1f} us per step.",
            "",
        ]
    write_atomic(out / "report.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/launch_bound", help="where the report goes")
    p.add_argument("--repeats", type=int, default=7, help="alternating repeats per candidate")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    times = {}
    for solver in ("euler", "rk4"):
        times[solver] = alternating_medians(candidates(solver), repeats=args.repeats)
        print(
            f"{solver}: adjoint/backprop "
            f"{times[solver]['adjoint_step'] / times[solver]['backprop_step']:.2f}",
            flush=True,
        )
    results = {
        "machine": machine(),
        "command": "python -m benchmarks.launch_bound "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "times": times,
        "wall_s": time.time() - started,
    }
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    write_report(results, out)
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
