"""What an event costs: a solve with an event that never fires against the same solve without.

    python -m benchmarks.events --output-dir benchmarks/results/events_cpu

``odeint_event(..., t_end=1)`` with a condition that stays positive against ``odeint`` over
``[0, 1]`` with the same fixed rk4 steps, side by side in one process (alternating medians): the
forward pass alone (no gradient) and the training step (forward, loss, backward) under backprop
and the continuous adjoint, on the MLP workload (dim 16, hidden 64, batch 512) and the
launch-bound one (a 2-element linear system, batch 1). With a gradient the steps to ``t_end``
are taken once, in the chosen mode, the condition checked between them; the path that searches
first (without a graph) and then runs the mode (twice the steps) is timed beside it, and so is
a condition that fires halfway. The target: at most 1.05x. Writes ``results.json`` and
``report.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchode_adjoint import odeint, odeint_event
from torchode_adjoint._events import Segment
from torchode_adjoint.measure import add_threads_argument, machine, use_threads

from .files import write_atomic
from .launch_bound import Linear
from .timing import alternating_medians
from .workloads import MLPDynamics


def _never(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A condition that stays positive: the event never fires."""
    return y.detach().abs().sum() * 0.0 + 1.0 + t


def _halfway(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A condition that crosses zero at t = 0.5."""
    return y.detach().abs().sum() * 0.0 + t - 0.5


def _cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {
        "mlp": (MLPDynamics(16, 64), torch.randn(512, 16)),
        "launch-bound": (Linear(), torch.tensor([[1.0, 0.0]])),
    }


def run(steps: int, repeats: int) -> list[dict[str, Any]]:
    """Medians per workload, mode and pass; the ratio with the event over without."""
    rows = []
    step = 1.0 / steps
    t = torch.tensor([0.0, 1.0])
    for name, (func, y0) in _cases().items():
        for mode in ("backprop", "adjoint"):

            def plain(train: bool, func: Any = func, y0: Any = y0, mode: str = mode) -> None:
                with torch.set_grad_enabled(train):
                    y = odeint(func, y0, t, solver="rk4", step=step, adjoint=mode)[-1]
                    if train:
                        y.square().mean().backward()

            def event(
                train: bool, one_pass: bool = True, condition: Any = _never, func: Any = func,
                y0: Any = y0, mode: str = mode,
            ) -> None:  # fmt: skip
                Segment.one_pass = one_pass
                try:
                    with torch.set_grad_enabled(train):
                        _, sol = odeint_event(func, y0, 0.0, event_fn=condition, t_end=1.0,
                                              solver="rk4", step=step, adjoint=mode)  # fmt: skip
                        if train:
                            sol[-1].square().mean().backward()
                finally:
                    Segment.one_pass = True

            for train in (False, True):
                if not train and mode == "adjoint":
                    continue  # no gradient: the mode does not matter
                calls = {"plain": lambda tr=train: plain(tr), "event": lambda tr=train: event(tr)}
                if train:  # the search first (as before the one-pass start), and firing
                    calls.update({
                        "search_first": lambda: event(True, False),
                        "fires": lambda: event(True, True, _halfway),
                        "fires_search_first": lambda: event(True, False, _halfway),
                    })  # fmt: skip
                medians = alternating_medians(calls, repeats=repeats)
                ms = {k: 1e3 * v for k, v in medians.items()}
                rows.append({
                    "workload": name, "mode": mode if train else "-",
                    "pass": "training step" if train else "forward (no_grad)",
                    "plain_ms": ms["plain"], "event_ms": ms["event"],
                    "ratio": medians["event"] / medians["plain"],
                    "search_first_ms": ms.get("search_first"), "fires_ms": ms.get("fires"),
                    "fires_search_first_ms": ms.get("fires_search_first"),
                })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", type=Path, default=Path("benchmarks/results/events_cpu"))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=15)
    add_threads_argument(p)
    args = p.parse_args(argv)
    use_threads(args.threads)
    started = time.perf_counter()
    rows = run(args.steps, args.repeats)
    seconds = time.perf_counter() - started
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output_dir / "results.json", json.dumps(rows, indent=1))
    lines = [
        "# What an event costs: an event that never fires against no event",
        "",
        f"Machine: {machine()}. Command: `python -m benchmarks.events --steps {args.steps} "
        f"--repeats {args.repeats}` ({seconds:.0f} s). rk4, {args.steps} fixed steps over "
        "[0, 1] (`t_end=1`); medians of alternating repeats in one process.",
        "",
        "With `t_end`, `odeint_event` takes the steps to `t_end` in the gradient mode first, "
        "the condition checked between them (the one-pass start); 'search first' is the path "
        "without it, timed beside it. 'fires' is a condition crossing zero at t = 0.5 (the "
        "pass stops at the next read, and the search goes on from the start of the window it "
        "crossed in).",
        "",
        "| workload | mode | pass | without event (ms) | event never fires (ms) | ratio "
        "| never fires, search first (ms) | fires at 0.5 (ms) | fires, search first (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['pass']} | {r['plain_ms']:.2f} "
            f"| {r['event_ms']:.2f} | {r['ratio']:.2f} | {cell(r['search_first_ms'])} "
            f"| {cell(r['fires_ms'])} | {cell(r['fires_search_first_ms'])} |"
        )
    write_atomic(args.output_dir / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
