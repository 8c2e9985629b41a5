"""The Neural ODE paper's latent ODE on irregularly sampled spirals, against an RNN.

    python examples/latent_ode_spirals.py --quick             # minutes on a 2-core CPU
    python examples/latent_ode_spirals.py --output-dir runs/latent_ode   # the full table

Chen et al. (2018), section 5.1 and Table 2: 1,000 noisy 2-D spirals (half clockwise), each
observed at 30, 50 or 100 of 100 equally spaced times drawn without replacement; a latent ODE
(RNN encoder run backwards over the observations, neural-ODE latent dynamics, MLP decoder,
trained by the ELBO) against an RNN at the same sizes. Reported: the predictive RMSE at all 100
times of held-out spirals against their noise-free trajectories (mean and spread over seeds),
training time per iteration, inference time, and the ODE's evaluations forward and backward per
iteration. The latent ODE is solved with ``odeint`` (dopri5 with ``--rtol``/``--atol``, or fixed
steps with ``--step``) and any gradient mode (``--adjoint``). Results and plots are written
atomically to ``--output-dir``; ``--resume`` skips the runs already recorded there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchode_adjoint import GRADIENT_MODES, NFECounter, odeint
from torchode_adjoint.datasets.spirals import Spirals, make_spirals, observe, solve_rows
from torchode_adjoint.measure import add_threads_argument, saved_tensor_bytes, use_threads
from torchode_adjoint.models.latent_ode import LatentODE, RNNBaseline, gaussian_elbo
from torchode_adjoint.runs import atomic_save, atomic_write_text, progress, write_records

# Table 2 of Chen et al. (2018): predictive RMSE, 100 new points per spiral.
PAPER = {
    "rnn": {30: 0.3937, 50: 0.3202, 100: 0.1813},
    "latent_ode": {30: 0.1642, 50: 0.1502, 100: 0.1346},
}
NOISE = 0.1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="300 spirals, 300 iterations, seed 0")
    p.add_argument("--spirals", type=int, default=1000, help="spirals in all (80 %% train)")
    p.add_argument("--n-obs", type=int, nargs="+", default=[30, 50, 100])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=2000, help="Adam steps per run")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--models", nargs="+", default=["latent_ode", "rnn"],
                   choices=["latent_ode", "rnn"])  # fmt: skip
    p.add_argument("--solver", default="dopri5")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--step", type=float, default=None,
                   help="fixed steps of this size instead of error control")  # fmt: skip
    p.add_argument("--adjoint", default="adjoint", choices=sorted(GRADIENT_MODES))
    p.add_argument("--per-sample-times", action="store_true",
                   help="train the latent ODE solving each spiral at its own observation times "
                   "(t of shape (spirals, observed + 1)) instead of the 100-time grid")  # fmt: skip
    p.add_argument("--output-dir", type=Path, default=Path("runs/latent_ode"))
    p.add_argument("--resume", action="store_true", help="skip the runs already recorded")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="skip the reconstruction plot")
    p.add_argument("--compare-modes", action="store_true",
                   help="train the latent ODE at the first --n-obs and seed under every "
                   "gradient mode")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.spirals, args.iterations, args.seeds = 300, 300, [0]
    for name in ("spirals", "iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive int")
    if args.spirals < 5:
        p.error("--spirals must be at least 5 (80 % train, 20 % test)")
    if any(not 1 <= n <= 100 for n in args.n_obs):
        p.error("--n-obs values must be in 1..100 (observed of 100 times)")
    for name in ("lr", "rtol", "atol"):
        if not getattr(args, name) > 0:
            p.error(f"--{name} must be positive")
    if args.step is not None and not args.step > 0:
        p.error("--step must be positive")
    return args


def _solver(args: argparse.Namespace, nfe: NFECounter) -> Any:
    if args.step is not None:
        tol: dict[str, Any] = {"step": args.step}
    else:
        tol = {"rtol": args.rtol, "atol": args.atol}

    def solve(dynamics: nn.Module, z0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return odeint(dynamics, z0, grid, solver=args.solver, adjoint=args.adjoint, nfe=nfe,
                      **tol)  # fmt: skip

    return solve


def rmse(model: nn.Module, data: Spirals, idx: torch.Tensor, solve: Any) -> float:
    """Predictive RMSE at every grid time against the noise-free spirals (z0 = q's mean)."""
    times = data.times.expand(len(data), -1).gather(1, idx)
    values = data.noisy.gather(1, idx[..., None].expand(-1, -1, 2))
    with torch.no_grad():
        pred, _, _ = model(times, values, data.times, solve, sample=False)
    return float(((pred - data.clean) ** 2).mean().sqrt())


def _model_path(out: Path, kind: str, n_obs: int, seed: int) -> Path:
    return out / "models" / f"{kind}_n{n_obs}_seed{seed}.pt"


def run_one(
    args: argparse.Namespace, kind: str, n_obs: int, seed: int, data: Spirals, out: Path
) -> dict[str, Any]:
    """Train one model on one observed count and seed; save its weights; its record."""
    torch.manual_seed(seed)
    n_train = int(0.8 * len(data))
    train, test = data.subset(torch.arange(n_train)), data.subset(torch.arange(n_train, len(data)))
    idx_train = observe(len(train), data.times.numel(), n_obs, seed=seed)
    idx_test = observe(len(test), data.times.numel(), n_obs, seed=seed + 10_000)
    model: nn.Module = LatentODE() if kind == "latent_ode" else RNNBaseline()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    nfe = NFECounter()
    solve = _solver(args, nfe)
    times = train.times.expand(len(train), -1).gather(1, idx_train)
    values = train.noisy.gather(1, idx_train[..., None].expand(-1, -1, 2))
    grid, at = train.times, idx_train
    if args.per_sample_times and kind == "latent_ode":
        # Each spiral solved at its own observation times only (z0 at t = 0).
        grid, at = solve_rows(times, float(train.times[0]), float(train.times[1] - train.times[0]))
    losses: list[float] = []
    nfe_f, nfe_b = [], []
    started = time.perf_counter()
    bar = progress(range(args.iterations), args.iterations, f"{kind} n={n_obs} seed={seed}",
                   not args.no_progress)  # fmt: skip
    saved = 0
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        with saved_tensor_bytes() as counted:
            pred, mean, logvar = model(times, values, grid, solve)
            at_obs = pred.gather(1, at[..., None].expand(-1, -1, 2))
            loss = gaussian_elbo(at_obs, values, mean, logvar, NOISE)
        saved = counted.bytes
        loss.backward()
        opt.step()
        losses.append(loss.item())
        nfe_f.append(nfe.forward)
        nfe_b.append(nfe.backward)
    train_s = (time.perf_counter() - started) / args.iterations
    started = time.perf_counter()
    error = rmse(model, test, idx_test, solve)
    infer_s = time.perf_counter() - started
    (out / "models").mkdir(exist_ok=True)
    atomic_save(model.state_dict(), _model_path(out, kind, n_obs, seed))
    ode = kind == "latent_ode"
    return {
        "model": kind, "n_obs": n_obs, "seed": seed, "rmse": error,
        "loss_first": losses[0], "loss_last": losses[-1],
        "train_s_per_iter": train_s, "inference_s": infer_s,
        "nfe_forward_per_iter": sum(nfe_f) / len(nfe_f) if ode else None,
        "nfe_backward_per_iter": sum(nfe_b) / len(nfe_b) if ode else None,
        "solver": args.solver if ode else None,
        "tolerance": (f"step={args.step}" if args.step else f"rtol={args.rtol}, atol={args.atol}")
        if ode else None,
        "adjoint": args.adjoint if ode else None, "saved_bytes": saved,
        "training_times": ("per-sample" if args.per_sample_times else "100-time grid")
        if ode else None,
        "iterations": args.iterations, "spirals": len(data),
    }  # fmt: skip


def write_reports(records: list[dict[str, Any]], out: Path, command: str) -> None:
    """results.json, results.csv and report.md (mean and spread over seeds beside the paper's)."""
    write_records(records, out)
    counts = sorted({r["n_obs"] for r in records})
    lines = [
        "# Latent ODE and RNN on irregularly sampled spirals",
        "",
        f"Command: `{command}`. Predictive RMSE at all 100 times of held-out spirals against "
        "their noise-free trajectories; mean (spread = sample sd over seeds; n = seeds).",
        "",
        "| model | " + " | ".join(f"{n} / 100 observed" for n in counts) + " | paper (Table 2) |",
        "|---|" + "---|" * len(counts) + "---|",
    ]
    for kind in ("rnn", "latent_ode"):
        cells = []
        for n in counts:
            vals = [r["rmse"] for r in records if r["model"] == kind and r["n_obs"] == n]
            if not vals:
                cells.append("-")
                continue
            m = sum(vals) / len(vals)
            if len(vals) > 1:  # a spread needs two seeds
                sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
                cells.append(f"{m:.4f} (sd {sd:.4f}; n={len(vals)})")
            else:
                cells.append(f"{m:.4f} (n=1)")
        paper = ", ".join(f"{n}: {v:.4f}" for n, v in PAPER[kind].items())
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {paper} |")
    lines += [
        "",
        "| model | observed | seed | train ms/iter | inference s | NFE fwd/bwd per iter |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        nfe = (f"{r['nfe_forward_per_iter']:.0f} / {r['nfe_backward_per_iter']:.0f}"
               if r["nfe_forward_per_iter"] is not None else "-")  # fmt: skip
        ms = r["train_s_per_iter"] * 1e3
        lines.append(
            f"| {r['model']} | {r['n_obs']} | {r['seed']} | {ms:.1f} | {r['inference_s']:.2f} "
            f"| {nfe} |"
        )
    atomic_write_text("\n".join(lines) + "\n", out / "report.md")


def plot(
    args: argparse.Namespace, data: Spirals, out: Path, records: list[dict[str, Any]]
) -> Path | None:
    """Reconstructions and extrapolations of held-out spirals by the trained models.

    One row per observed count, one column per spiral (the first seed's models): the noise-free
    curve, the observed points, each model's prediction over the 100 times (solid) and over
    half as long again beyond them (dashed: extrapolation, no data there).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    seed = min(r["seed"] for r in records)
    counts = sorted({r["n_obs"] for r in records if r["seed"] == seed})
    test = data.subset(torch.arange(int(0.8 * len(data)), len(data)))
    cols = min(4, len(test))
    dt = float(data.times[1] - data.times[0])
    n_t = data.times.numel()
    grid = torch.arange(n_t + n_t // 2, dtype=data.times.dtype) * dt
    solve = _solver(args, NFECounter())
    fig, axes = plt.subplots(len(counts), cols, figsize=(3 * cols, 3 * len(counts)), squeeze=False)
    styles = {"latent_ode": ("C1", "latent ODE"), "rnn": ("C2", "RNN")}
    for row, n_obs in zip(axes, counts):
        idx = observe(len(test), n_t, n_obs, seed=seed + 10_000)[:cols]
        sub = test.subset(torch.arange(cols))
        times = sub.times.expand(cols, -1).gather(1, idx)
        values = sub.noisy.gather(1, idx[..., None].expand(-1, -1, 2))
        preds = {}
        for kind in ("latent_ode", "rnn"):
            path = _model_path(out, kind, n_obs, seed)
            if not path.exists():
                continue
            model: nn.Module = LatentODE() if kind == "latent_ode" else RNNBaseline()
            model.load_state_dict(torch.load(path, weights_only=True))
            with torch.no_grad():
                preds[kind] = model(times, values, grid, solve, sample=False)[0]
        for k, ax in enumerate(row):
            ax.plot(sub.clean[k, :, 0], sub.clean[k, :, 1], "k-", lw=1, label="noise-free")
            ax.plot(values[k, :, 0], values[k, :, 1], "o", ms=2.5, color="C0",
                    label=f"{n_obs} observed")  # fmt: skip
            for kind, pred in preds.items():
                color, name = styles[kind]
                ax.plot(pred[k, :n_t, 0], pred[k, :n_t, 1], "-", color=color, lw=1.2, label=name)
                ax.plot(pred[k, n_t - 1 :, 0], pred[k, n_t - 1 :, 1], "--", color=color, lw=1)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{n_obs} / 100 observed")
    axes[0][0].legend(fontsize=7)
    path = out / "reconstructions.png"
    tmp = out / "reconstructions.tmp.png"
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def compare_modes(args: argparse.Namespace, data: Spirals, out: Path, command: str) -> None:
    """The latent ODE at one observed count and seed under every gradient mode."""
    rows = []
    n_obs, seed = args.n_obs[0], args.seeds[0]
    for mode in sorted(GRADIENT_MODES):
        args.adjoint = mode
        rows.append(run_one(args, "latent_ode", n_obs, seed, data, out))
        r = rows[-1]
        print(f"{mode:10s}: RMSE {r['rmse']:.4f}, {1e3 * r['train_s_per_iter']:.0f} ms/iteration",
              flush=True)  # fmt: skip
    write_records(rows, out)
    lines = [
        "# The latent ODE under each gradient mode",
        "",
        f"Command: `{command}`. {n_obs} / 100 observed, seed {seed}, {args.iterations} "
        f"iterations, {args.spirals} spirals; {args.solver} "
        + (f"step {args.step:g}" if args.step else f"rtol {args.rtol:g}, atol {args.atol:g}")
        + ". Saved bytes: tensors autograd kept for backward in one training step's forward "
        "pass (encoder and decoder included).",
        "",
        "| gradient | RMSE | ms per iteration | NFE forward / backward per iteration | saved "
        "for backward |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['adjoint']} | {r['rmse']:.4f} | {1e3 * r['train_s_per_iter']:.0f} | "
                     f"{r['nfe_forward_per_iter']:.0f} / {r['nfe_backward_per_iter']:.0f} | "
                     f"{r['saved_bytes'] / 1024:.0f} KiB |")  # fmt: skip
    atomic_write_text("\n".join(lines) + "\n", out / "modes.md")


def main(argv: list[str] | None = None) -> int:
    """Train every (model, observed count, seed) and write the reports."""
    args = parse_args(argv)
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    command = "python examples/latent_ode_spirals.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    records: list[dict[str, Any]] = []
    results = out / "results.json"
    if args.resume and results.exists():
        records = json.loads(results.read_text())
    done = {(r["model"], r["n_obs"], r["seed"]) for r in records}
    data = make_spirals(args.spirals, 100, noise=NOISE, seed=1234)
    if args.compare_modes:
        compare_modes(args, data, out, command)
        print(f"wrote {out / 'modes.md'}")
        return 0
    for seed in args.seeds:
        for n_obs in args.n_obs:
            for kind in args.models:
                if (kind, n_obs, seed) in done:
                    continue
                records.append(run_one(args, kind, n_obs, seed, data, out))
                write_reports(records, out, command)  # after every run: a resume starts here
                r = records[-1]
                loss = f"loss {r['loss_first']:.1f} -> {r['loss_last']:.1f}"
                print(f"{kind:10s} n_obs={n_obs:3d} seed={seed}: RMSE {r['rmse']:.4f} ({loss})")
    write_reports(records, out, command)
    if not args.no_plot and records:
        plot(args, data, out, records)
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
