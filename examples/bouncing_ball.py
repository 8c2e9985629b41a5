"""A bouncing ball: learn gravity and the coefficient of restitution from observed bounce times.

    python examples/bouncing_ball.py --quick                        # seconds on a CPU
    python examples/bouncing_ball.py --output-dir runs/bouncing_ball

torchdiffeq's bouncing-ball example, on ``odeint_event``: a ball falls from height ``x0``
(``x' = v``, ``v' = -g``) until it hits the ground (the event ``x = 0`` downwards), bounces
(``v -> -e v``) and falls again. The times of its first bounces are observed for ``g = 9.8``,
``e = 0.7``; starting from ``g = 5``, ``e = 0.4``, Adam fits ``g`` and ``e`` to them through
the event times' gradients (the implicit function theorem at each bounce, the bounce's state
carried into the next solve), under every gradient mode. Writes ``results.json``,
``report.md`` and ``bouncing_ball.png`` (the true and the fitted trajectories, and the loss
per iteration of each mode) to ``--output-dir``, atomically; ``--resume`` skips recorded modes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchode_adjoint import NFECounter, odeint, odeint_event
from torchode_adjoint.measure import add_threads_argument, machine
from torchode_adjoint.runs import atomic_write_text, progress, start_run

MODES = ("backprop", "adjoint", "checkpoint", "reversible")
TRUE = {"gravity": 9.8, "restitution": 0.7}
START = {"gravity": 5.0, "restitution": 0.4}


class Ball(nn.Module):
    """Free fall: ``(x, v)' = (v, -g)``; ``g`` positive (a softplus), ``e`` in (0, 1) (a
    sigmoid)."""

    def __init__(self, gravity: float, restitution: float) -> None:
        super().__init__()
        g = torch.tensor(gravity, dtype=torch.float64)
        e = torch.tensor(restitution, dtype=torch.float64)
        self.raw_g = nn.Parameter(torch.log(torch.expm1(g)))
        self.raw_e = nn.Parameter(torch.log(e / (1 - e)))

    @property
    def gravity(self) -> torch.Tensor:
        return nn.functional.softplus(self.raw_g)

    @property
    def restitution(self) -> torch.Tensor:
        return torch.sigmoid(self.raw_e)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], -self.gravity.expand_as(y[1])])


def ground(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The event: the height, crossing zero downwards."""
    return y[0]


def bounces(
    ball: Ball, y0: torch.Tensor, count: int, mode: str, step: float, nfe: NFECounter | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The times of the first ``count`` bounces (differentiable) and the state after each."""
    t = torch.zeros((), dtype=torch.float64)
    y = y0
    times, states = [], []
    evaluations = 0
    for _ in range(count):
        t, sol = odeint_event(
            ball, y, t, event_fn=ground, direction=-1, solver="rk4", step=step, adjoint=mode,
            nfe=nfe,
        )  # fmt: skip
        if nfe is not None:
            evaluations += nfe.forward
        x, v = sol[-1].unbind()
        y = torch.stack([x, -ball.restitution * v])
        times.append(t)
        states.append(y)
    if nfe is not None:
        nfe.forward = evaluations
    return torch.stack(times), states


def trajectory(
    ball: Ball, y0: torch.Tensor, count: int, step: float
) -> tuple[list[float], list[float]]:
    """Heights on a fine grid through ``count`` bounces (no gradient): for the plot."""
    ts, xs = [], []
    with torch.no_grad():
        times, states = bounces(ball, y0, count, "backprop", step)
        starts = [torch.zeros((), dtype=torch.float64), *times[:-1]]
        begins = [y0, *states[:-1]]
        for t_a, t_b, y in zip(starts, times, begins):
            grid = torch.linspace(float(t_a), float(t_b), 40, dtype=torch.float64)
            sol = odeint(ball, y, grid, solver="rk4", step=step, adjoint="backprop")
            ts += grid.tolist()
            xs += sol[:, 0].tolist()
    return ts, xs


def train(
    args: argparse.Namespace, mode: str, observed: torch.Tensor, y0: torch.Tensor
) -> dict[str, Any]:
    """Fit ``g`` and ``e`` under ``mode``; the record of the run."""
    ball = Ball(**START)
    opt = torch.optim.Adam(ball.parameters(), lr=args.lr)
    losses: list[float] = []
    nfe = NFECounter()
    started = time.perf_counter()
    evaluations = 0
    for _ in progress(range(args.iterations), args.iterations, mode, not args.no_progress):
        opt.zero_grad()
        times, _ = bounces(ball, y0, len(observed), mode, args.step, nfe)
        evaluations += nfe.forward
        loss = torch.mean((times - observed) ** 2)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "gravity": float(ball.gravity.detach()),
        "restitution": float(ball.restitution.detach()),
        "final_loss": losses[-1],
        "first_loss": losses[0],
        "ms_per_iteration": 1e3 * seconds / args.iterations,
        "forward_evaluations_per_iteration": evaluations / args.iterations,
        "losses": losses,
    }


def write_report(
    records: list[dict[str, Any]], out: Path, command: str, observed: list[float]
) -> None:
    """``results.json`` and ``report.md``."""
    atomic_write_text(json.dumps(records, indent=1), out / "results.json")
    lines = [
        "# Bouncing ball: gravity and restitution from bounce times",
        "",
        f"Machine: {machine()}.",
        "",
        f"Command: `{command}`. True g = {TRUE['gravity']}, e = {TRUE['restitution']}; start "
        f"g = {START['gravity']}, e = {START['restitution']}. Observed bounce times: "
        + ", ".join(f"{t:.4f}" for t in observed)
        + ".",
        "",
        "| mode | g | e | first loss | final loss | ms / iteration "
        "| forward evaluations / iteration |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['mode']} | {r['gravity']:.4f} | {r['restitution']:.4f} | {r['first_loss']:.3g} "
            f"| {r['final_loss']:.3g} | {r['ms_per_iteration']:.1f} "
            f"| {r['forward_evaluations_per_iteration']:.0f} |"
        )
    atomic_write_text("\n".join(lines) + "\n", out / "report.md")


def plot(
    records: list[dict[str, Any]], out: Path, y0: torch.Tensor, args: argparse.Namespace
) -> None:
    """The true and fitted trajectories, and each mode's loss per iteration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ts, xs = trajectory(Ball(**TRUE), y0, args.bounces, args.step)
    ax1.plot(ts, xs, "k-", label="true")
    ts, xs = trajectory(Ball(**START), y0, args.bounces, args.step)
    ax1.plot(ts, xs, ":", color="grey", label="start")
    for r in records:
        ts, xs = trajectory(Ball(r["gravity"], r["restitution"]), y0, args.bounces, args.step)
        ax1.plot(ts, xs, "--", label=f"fitted ({r['mode']})")
        ax2.semilogy(r["losses"], label=r["mode"])
    ax1.set_xlabel("t")
    ax1.set_ylabel("height")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("mean squared error of the bounce times")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    tmp = out / "bouncing_ball.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out / "bouncing_ball.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="60 iterations")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--bounces", type=int, default=4, help="bounce times observed")
    p.add_argument("--height", type=float, default=5.0, help="the initial height")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--step", type=float, default=0.05, help="rk4's fixed step")
    p.add_argument("--output-dir", type=Path, default=Path("runs/bouncing_ball"))
    p.add_argument("--resume", action="store_true")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 60)
    if args.iterations < 1 or args.bounces < 1 or not args.step > 0 or not args.height > 0:
        p.error("--iterations and --bounces must be positive, --step and --height too")
    return args


def main(argv: list[str] | None = None) -> int:
    """Fit the ball under every mode; write the report and the plot."""
    args = parse_args(argv)
    started = start_run(args, "bouncing_ball.py", argv)
    if started is None:
        return 2
    out, command = started
    y0 = torch.tensor([args.height, 0.0], dtype=torch.float64)
    with torch.no_grad():
        observed, _ = bounces(Ball(**TRUE), y0, args.bounces, "backprop", args.step)
    records: list[dict[str, Any]] = []
    if args.resume and (out / "results.json").exists():
        records = json.loads((out / "results.json").read_text())
    done = {r["mode"] for r in records}
    for mode in args.modes:
        if mode in done:
            continue
        records.append(train(args, mode, observed, y0))
        write_report(records, out, command, observed.tolist())
        r = records[-1]
        print(f"{mode:10s} g = {r['gravity']:.4f}, e = {r['restitution']:.4f}, "
              f"loss {r['first_loss']:.3g} -> {r['final_loss']:.3g}")  # fmt: skip
    write_report(records, out, command, observed.tolist())
    plot(records, out, y0, args)
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
