"""Continuous normalising flows against planar flows on the Neural ODE paper's 2-D densities.

    python examples/cnf_density.py --quick                     # minutes on a 2-core CPU
    python examples/cnf_density.py --output-dir runs/cnf        # M = K = 2, 8, 32, 3 seeds

Chen et al. (2018), section 4.1 and Figure 4: a continuous normalising flow (CNF) whose
dynamics are a sum of ``M`` tanh units (weights given by a network of ``t``; exact trace) and a
planar normalising flow of ``K = M`` layers are both fitted to a target density
``p(z) ~ exp(-U(z))`` by minimising ``KL(q || p)`` from samples of a standard normal. The loss
reported, ``E_q[log q(z) + U(z)]``, is the KL divergence less the target's log normaliser (the
same constant for both models; lower is better). The CNF solves ``(z, log q)`` as one
structured state with ``odeint`` and any gradient mode. Results go to ``--output-dir``
(Markdown, CSV, JSON, written atomically; ``--resume`` skips recorded runs).
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

from torchode_adjoint import GRADIENT_MODES, NFECounter, odeint
from torchode_adjoint.models.cnf import (
    TARGETS,
    CNFDynamics,
    PlanarFlow,
    standard_normal_log_prob,
)
from torchode_adjoint.runs import atomic_write_text, progress, write_records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="M = K = 2 and 8, 300 iterations, seed 0")
    p.add_argument("--widths", type=int, nargs="+", default=[2, 8, 32], help="M = K")
    p.add_argument("--targets", nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--solver", default="rk4")
    p.add_argument("--step", type=float, default=0.1, help="fixed step of the CNF's solve")
    p.add_argument("--adjoint", default="adjoint", choices=sorted(GRADIENT_MODES))
    p.add_argument("--output-dir", type=Path, default=Path("runs/cnf"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.iterations, args.seeds = [2, 8], 300, [0]
    for name in ("iterations", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be a positive int")
    if any(w < 1 for w in args.widths):
        p.error("--widths must be positive ints")
    if not args.lr > 0 or not args.step > 0:
        p.error("--lr and --step must be positive")
    return args


def cnf_sample(
    dyn: CNFDynamics, n: int, args: argparse.Namespace, nfe: NFECounter
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of the CNF and their log density: noise transported from t = 0 to 1."""
    z0 = torch.randn(n, 2)
    logq0 = standard_normal_log_prob(z0)
    z, logq = odeint(dyn, (z0, logq0), torch.tensor([0.0, 1.0]), solver=args.solver,
                     step=args.step, adjoint=args.adjoint, nfe=nfe)  # fmt: skip
    return z[-1], logq[-1]


def planar_sample(flow: PlanarFlow, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    z0 = torch.randn(n, 2)
    z, logdet = flow(z0)
    return z, standard_normal_log_prob(z0) - logdet


def run_one(args: argparse.Namespace, kind: str, target: str, width: int, seed: int) -> dict:
    """Fit one model to one target; its record (the final loss on 4,096 fresh samples)."""
    torch.manual_seed(seed)
    energy = TARGETS[target]
    model: nn.Module = CNFDynamics(width) if kind == "cnf" else PlanarFlow(width)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    nfe = NFECounter()

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "cnf":
            assert isinstance(model, CNFDynamics)
            return cnf_sample(model, n, args, nfe)
        assert isinstance(model, PlanarFlow)
        return planar_sample(model, n)

    losses = []
    started = time.perf_counter()
    for _ in progress(range(args.iterations), args.iterations, f"{kind} {target} {width}",
                      not args.no_progress):  # fmt: skip
        opt.zero_grad(set_to_none=True)
        z, logq = sample(args.batch)
        loss = (logq + energy(z)).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    per_iter = (time.perf_counter() - started) / args.iterations
    evaluations = (nfe.forward, nfe.backward)  # of the last training iteration
    with torch.no_grad():
        z, logq = sample(4096)
        final = float((logq + energy(z)).mean())
    ode = kind == "cnf"
    return {
        "model": kind, "target": target, "width": width, "seed": seed, "loss": final,
        "loss_first": losses[0], "loss_last": losses[-1], "train_s_per_iter": per_iter,
        "nfe_forward": evaluations[0] if ode else None,
        "nfe_backward": evaluations[1] if ode else None,
        "adjoint": args.adjoint if ode else None, "iterations": args.iterations,
    }  # fmt: skip


def write_reports(records: list[dict[str, Any]], out: Path, command: str) -> None:
    write_records(records, out)
    widths = sorted({r["width"] for r in records})
    targets = sorted({r["target"] for r in records})
    lines = [
        "# CNF against planar flow: KL(q || p) less log Z (lower is better)",
        "",
        f"Command: `{command}`. Mean over seeds (n) of E_q[log q + U] on 4,096 samples after "
        "training; M = K is the CNF's units and the planar flow's layers.",
        "",
        "| target | model | " + " | ".join(f"M = K = {w}" for w in widths) + " |",
        "|---|---|" + "---|" * len(widths),
    ]
    for target in targets:
        for kind in ("planar", "cnf"):
            cells = []
            for w in widths:
                vals = [r["loss"] for r in records
                        if (r["model"], r["target"], r["width"]) == (kind, target, w)]  # fmt: skip
                cells.append(f"{sum(vals) / len(vals):.3f} (n={len(vals)})" if vals else "-")
            lines.append(f"| {target} | {kind} | " + " | ".join(cells) + " |")
    atomic_write_text("\n".join(lines) + "\n", out / "report.md")


def main(argv: list[str] | None = None) -> int:
    """Fit both models at every width, target and seed; write the reports."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    command = "python examples/cnf_density.py " + " ".join(given)
    records: list[dict[str, Any]] = []
    if args.resume and (out / "results.json").exists():
        records = json.loads((out / "results.json").read_text())
    done = {(r["model"], r["target"], r["width"], r["seed"]) for r in records}
    for seed in args.seeds:
        for target in args.targets:
            for width in args.widths:
                for kind in ("planar", "cnf"):
                    if (kind, target, width, seed) in done:
                        continue
                    records.append(run_one(args, kind, target, width, seed))
                    write_reports(records, out, command)
                    r = records[-1]
                    print(f"{kind:6s} {target:10s} M=K={width:3d} seed={seed}: {r['loss']:.3f}")
    write_reports(records, out, command)
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
