"""Continuous normalising flows against planar flows on the Neural ODE paper's 2-D densities.

    python examples/cnf_density.py --quick                     # minutes on a 2-core CPU
    python examples/cnf_density.py --output-dir runs/cnf        # M = K = 2, 8, 32, 3 seeds
    python examples/cnf_density.py --task ml --output-dir runs/cnf_ml   # two moons, rings
    python examples/cnf_density.py --compare-modes --output-dir runs/cnf_modes

Chen et al. (2018), section 4.1 and Figure 4: a continuous normalising flow (CNF) whose
dynamics are a sum of ``M`` tanh units (weights given by a network of ``t``; exact trace) and a
planar normalising flow of ``K = M`` layers are both fitted to a target density
``p(z) ~ exp(-U(z))`` by minimising ``KL(q || p)`` from samples of a standard normal. The loss
reported, ``E_q[log q(z) + U(z)]``, is the KL divergence less the target's log normaliser (the
same constant for both models; lower is better). The CNF solves ``(z, log q)`` as one
structured state with ``odeint`` and any gradient mode.

``--task ml`` trains the CNF by maximum likelihood on samples of a 2-D data set (section 4.2,
Figure 6: ``--data two_moons rings``): each data point is integrated from ``t = 1`` back to
noise at ``t = 0`` with its log-density change, and the negative log-likelihood on held-out
samples is reported (the planar flow has no inverse to evaluate a data point's density with,
so it is not trained here); plots show the learnt density and samples carried from noise to
data over time. ``--trace hutchinson`` replaces the exact trace by FFJORD's estimator.
``--compare-modes`` trains one configuration under every gradient mode: final loss, time per
iteration, evaluations and bytes saved for backward. Results go to ``--output-dir``
(Markdown, CSV, JSON and PNG, written atomically; ``--resume`` skips recorded runs).
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
from torchode_adjoint.datasets.toy2d import DATASETS
from torchode_adjoint.measure import add_threads_argument, saved_tensor_bytes, use_threads
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
    p.add_argument("--task", choices=["kl", "ml"], default="kl",
                   help="kl: fit a target density; ml: maximum likelihood on samples")  # fmt: skip
    p.add_argument("--data", nargs="+", default=sorted(DATASETS), choices=sorted(DATASETS),
                   help="the data sets of --task ml")  # fmt: skip
    p.add_argument("--samples", type=int, default=5000, help="training samples (--task ml)")
    p.add_argument("--trace", choices=["exact", "hutchinson"], default="exact")
    p.add_argument("--compare-modes", action="store_true",
                   help="train the first width and target (or data set) and seed under every "
                   "gradient mode")  # fmt: skip
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
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.iterations, args.seeds = [2, 8], 300, [0]
    for name in ("iterations", "batch", "samples"):
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
    if dyn.trace == "hutchinson":
        dyn.draw_noise(z0)
    z, logq = odeint(dyn, (z0, logq0), torch.tensor([0.0, 1.0]), solver=args.solver,
                     step=args.step, adjoint=args.adjoint, nfe=nfe)  # fmt: skip
    return z[-1], logq[-1]


def cnf_log_density(
    dyn: CNFDynamics, x: torch.Tensor, args: argparse.Namespace, nfe: NFECounter
) -> torch.Tensor:
    """``log q(x)`` of data points: each carried from t = 1 back to noise at t = 0, where
    ``log q(x) = log N(z(0)) - int_0^1 tr(df/dz) dt`` (the second part of the state gathers
    the integral)."""
    if dyn.trace == "hutchinson":
        dyn.draw_noise(x)
    z, c = odeint(dyn, (x, x.new_zeros(x.shape[0])), torch.tensor([1.0, 0.0]),
                  solver=args.solver, step=args.step, adjoint=args.adjoint, nfe=nfe)  # fmt: skip
    return standard_normal_log_prob(z[-1]) - c[-1]


def planar_sample(flow: PlanarFlow, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    z0 = torch.randn(n, 2)
    z, logdet = flow(z0)
    return z, standard_normal_log_prob(z0) - logdet


def run_one(args: argparse.Namespace, kind: str, target: str, width: int, seed: int) -> dict:
    """Fit one model to one target; its record (the final loss on 4,096 fresh samples)."""
    torch.manual_seed(seed)
    energy = TARGETS[target]
    model: nn.Module = CNFDynamics(width, trace=args.trace) if kind == "cnf" else PlanarFlow(width)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    nfe = NFECounter()

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "cnf":
            assert isinstance(model, CNFDynamics)
            return cnf_sample(model, n, args, nfe)
        assert isinstance(model, PlanarFlow)
        return planar_sample(model, n)

    def loss_fn() -> torch.Tensor:
        z, logq = sample(args.batch)
        return (logq + energy(z)).mean()

    losses, per_iter, saved = train(model, opt, loss_fn, args, f"{kind} {target} {width}")
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
        "saved_bytes": saved, "trace": args.trace if ode else None,
    }  # fmt: skip


def train(
    model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Any, args: argparse.Namespace,
    label: str,
) -> tuple[list[float], float, int]:  # fmt: skip
    """Adam steps on ``loss_fn()``: the losses, seconds per iteration, and the bytes saved for
    backward by the last iteration's forward pass."""
    losses = []
    saved = 0
    started = time.perf_counter()
    for _ in progress(range(args.iterations), args.iterations, label, not args.no_progress):
        opt.zero_grad(set_to_none=True)
        with saved_tensor_bytes() as counted:
            loss = loss_fn()
        saved = counted.bytes
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, (time.perf_counter() - started) / args.iterations, saved


def run_ml(args: argparse.Namespace, data: str, width: int, seed: int, out: Path) -> dict:
    """Fit a CNF by maximum likelihood on samples of ``data``; its record (the negative
    log-likelihood of 2,000 held-out samples) and its plots."""
    torch.manual_seed(seed)
    x_train = DATASETS[data](args.samples, seed=seed)
    x_test = DATASETS[data](2000, seed=seed + 10_000)
    dyn = CNFDynamics(width, trace=args.trace)
    opt = torch.optim.Adam(dyn.parameters(), lr=args.lr)
    nfe = NFECounter()
    gen = torch.Generator().manual_seed(seed)

    def loss_fn() -> torch.Tensor:
        batch = x_train[torch.randint(0, len(x_train), (args.batch,), generator=gen)]
        return -cnf_log_density(dyn, batch, args, nfe).mean()

    losses, per_iter, saved = train(dyn, opt, loss_fn, args, f"cnf ml {data} {width}")
    evaluations = (nfe.forward, nfe.backward)
    with torch.no_grad():
        nll = float(-cnf_log_density(dyn, x_test, args, nfe).mean())
    plot_ml(dyn, x_test, args, out / f"ml_{data}_M{width}_seed{seed}.png")
    return {
        "model": "cnf", "data": data, "width": width, "seed": seed, "nll": nll,
        "loss_first": losses[0], "loss_last": losses[-1], "train_s_per_iter": per_iter,
        "nfe_forward": evaluations[0], "nfe_backward": evaluations[1], "saved_bytes": saved,
        "adjoint": args.adjoint, "trace": args.trace, "iterations": args.iterations,
    }  # fmt: skip


def plot_ml(dyn: CNFDynamics, data: torch.Tensor, args: argparse.Namespace, path: Path) -> None:
    """The data, the learnt density, and samples carried from noise (t = 0) to data (t = 1)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    nfe = NFECounter()
    lim = float(data.abs().max()) * 1.15
    axis = torch.linspace(-lim, lim, 80)
    grid = torch.cartesian_prod(axis, axis).flip(1)  # rows of (x, y), y varying slowest
    times = torch.linspace(0.0, 1.0, 5)
    with torch.no_grad():
        density = cnf_log_density(dyn, grid, args, nfe).exp().reshape(80, 80)
        z0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
        if dyn.trace == "hutchinson":
            dyn.draw_noise(z0)
        path_z, _ = odeint(dyn, (z0, torch.zeros(2000)), times, solver=args.solver,
                           step=args.step, adjoint=False)  # fmt: skip
    fig, axes = plt.subplots(1, 7, figsize=(21, 3))
    data_np, density_np, path_np = data.numpy(), density.numpy(), path_z.numpy()
    axes[0].scatter(data_np[:, 0], data_np[:, 1], s=1)
    axes[0].set_title("data")
    axes[1].imshow(density_np, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
    axes[1].set_title("learnt density")
    for ax, k in zip(axes[2:], range(len(times))):
        ax.scatter(path_np[k, :, 0], path_np[k, :, 1], s=1, c="C1")
        ax.set_title(f"samples at t = {float(times[k]):.2f}")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=80, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def compare_modes(args: argparse.Namespace, out: Path, command: str) -> None:
    """One configuration under every gradient mode: loss, time, evaluations, saved bytes."""
    rows = []
    for mode in sorted(GRADIENT_MODES):
        args.adjoint = mode
        if args.task == "ml":
            r = run_ml(args, args.data[0], args.widths[0], args.seeds[0], out)
        else:
            r = run_one(args, "cnf", args.targets[0], args.widths[0], args.seeds[0])
        rows.append(r)
        print(f"{mode:10s}: loss {r.get('nll', r.get('loss')):.3f}, "
              f"{1e3 * r['train_s_per_iter']:.0f} ms/iteration", flush=True)  # fmt: skip
    write_records(rows, out)
    what = (f"NLL on {args.data[0]}" if args.task == "ml"
            else f"E_q[log q + U] on {args.targets[0]}")  # fmt: skip
    lines = [
        "# The CNF under each gradient mode",
        "",
        f"Command: `{command}`. M = {args.widths[0]}, seed {args.seeds[0]}, {args.iterations} "
        f"iterations, batch {args.batch}, {args.solver} step {args.step:g}, trace {args.trace}. "
        "Saved bytes: tensors autograd kept for backward in one training step's forward pass.",
        "",
        f"| gradient | {what} | ms per iteration | NFE forward / backward | saved for backward |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        loss = r.get("nll", r.get("loss"))
        lines.append(f"| {r['adjoint']} | {loss:.3f} | {1e3 * r['train_s_per_iter']:.0f} | "
                     f"{r['nfe_forward']} / {r['nfe_backward']} | "
                     f"{r['saved_bytes'] / 1024:.0f} KiB |")  # fmt: skip
    atomic_write_text("\n".join(lines) + "\n", out / "modes.md")


def write_ml_reports(records: list[dict[str, Any]], out: Path, command: str) -> None:
    """results.json/csv and report.md of --task ml."""
    write_records(records, out)
    widths = sorted({r["width"] for r in records})
    lines = [
        "# CNF by maximum likelihood: negative log-likelihood of held-out samples (nats)",
        "",
        f"Command: `{command}`. Mean over seeds (n) of the NLL of 2,000 held-out samples.",
        "",
        "| data | " + " | ".join(f"M = {w}" for w in widths) + " |",
        "|---|" + "---|" * len(widths),
    ]
    for data in sorted({r["data"] for r in records}):
        cells = []
        for w in widths:
            vals = [r["nll"] for r in records if (r["data"], r["width"]) == (data, w)]
            cells.append(f"{sum(vals) / len(vals):.3f} (n={len(vals)})" if vals else "-")
        lines.append(f"| {data} | " + " | ".join(cells) + " |")
    atomic_write_text("\n".join(lines) + "\n", out / "report.md")


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
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    command = "python examples/cnf_density.py " + " ".join(given)
    if args.compare_modes:
        compare_modes(args, out, command)
        print(f"wrote {out / 'modes.md'}")
        return 0
    records: list[dict[str, Any]] = []
    if args.resume and (out / "results.json").exists():
        records = json.loads((out / "results.json").read_text())
    if args.task == "ml":
        done_ml = {(r["data"], r["width"], r["seed"]) for r in records}
        for seed in args.seeds:
            for data in args.data:
                for width in args.widths:
                    if (data, width, seed) in done_ml:
                        continue
                    records.append(run_ml(args, data, width, seed, out))
                    write_ml_reports(records, out, command)
                    r = records[-1]
                    print(f"cnf ml {data:9s} M={width:3d} seed={seed}: NLL {r['nll']:.3f}")
        write_ml_reports(records, out, command)
        print(f"wrote {out / 'report.md'}")
        return 0
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
