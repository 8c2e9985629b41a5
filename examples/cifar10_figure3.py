"""The Neural ODE paper's Figure 3 on the CIFAR-10 ODENet: evaluations under error control.

    python examples/cifar10_figure3.py --quick     # minutes on a CPU
    python examples/cifar10_figure3.py             # 10,000 images, 5 epochs

CIFAR-10 is read from --data-dir, else $TORCHODE_ADJOINT_DATA, else ~/.cache/torchode_adjoint.

Chen et al. (2018), Figure 3, measured a continuous-depth network trained with an adaptive
solver: (a) the numerical error against the forward evaluations across tolerances, (b) the
forward evaluations against the time they take, (c) backward against forward evaluations
(about half), (d) forward evaluations over training (growing). Here: the ODENet of
``examples/cifar10_compare.py`` (same stem, ODE stages and head, built by
``torchode_adjoint.models.cifar10``; GroupNorm in the dynamics), its blocks solved from 0 to 1
with dopri5 under ``--rtol``/``--atol`` and trained with ``--gradient`` (the continuous adjoint,
as the paper). Every training iteration's evaluations forward and backward are logged; the
trained network then classifies the test set at each of ``--test-rtol`` (the accuracy/time
trade-off of solving at another tolerance at test time than in training). Tables (Markdown,
CSV, JSON), the four panels and a checkpoint per epoch are written atomically to
``--output-dir``; ``--resume`` continues from the last finished epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchode_adjoint import GRADIENT_MODES
from torchode_adjoint.datasets.cifar10 import (
    CIFAR10,
    CIFAR10Error,
    data_dir_for,
    load_cifar10,
    normalize,
)
from torchode_adjoint.measure import add_threads_argument, use_threads
from torchode_adjoint.models.cifar10 import build_model, ode_blocks, parse_model_spec
from torchode_adjoint.runs import atomic_save, atomic_write_text, write_records

# The comparison's training loop (one place for it): the sibling script, found when this one is
# run or loaded from its file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_compare import EpochData, describe_device, epoch_generator, train_epoch  # noqa: E402

MODEL = "odenet@1.0"  # one interval [0, 1] per block; the controller picks the steps inside


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding cifar-10-batches-bin/ (or -py/), or that folder itself; default: "
        "$TORCHODE_ADJOINT_DATA, else ~/.cache/torchode_adjoint (downloaded there when the "
        "network allows)",
    )
    p.add_argument("--output-dir", type=Path, default=Path("runs/cifar10_figure3"))
    p.add_argument("--quick", action="store_true", help="2,000 images, 1 epoch, 1,000 test")
    p.add_argument("--train-subset", type=int, default=10_000, help="train on the first N")
    p.add_argument("--test-subset", type=int, default=2_000, help="test on the first N")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--rtol", type=float, default=1e-3, help="training tolerance (dopri5)")
    p.add_argument("--atol", type=float, default=None, help="default: --rtol's value")
    p.add_argument("--test-rtol", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4],
                   help="tolerances (rtol = atol) the trained network is tested at")  # fmt: skip
    p.add_argument("--gradient", default="adjoint", choices=sorted(GRADIENT_MODES))
    p.add_argument("--seed", type=int, default=0)
    add_threads_argument(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.quick:
        args.train_subset, args.test_subset, args.epochs = 2_000, 1_000, 1
    args.atol = args.rtol if args.atol is None else args.atol
    for name in ("train_subset", "test_subset", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive int")
    for name in ("lr", "rtol", "atol"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            p.error(f"--{name} must be a positive number")
    if not all(v > 0 and math.isfinite(v) for v in args.test_rtol):
        p.error("--test-rtol values must be positive numbers")
    if args.batch_size > args.train_subset:
        p.error("--batch-size must not exceed --train-subset")
    return args


def network(args: argparse.Namespace, rtol: float, atol: float) -> nn.Module:
    """The ODENet with its blocks solved by dopri5 at ``rtol``/``atol``."""
    return build_model(parse_model_spec(MODEL), norm="group", solver="dopri5",
                       adjoint=args.gradient, rtol=rtol, atol=atol)  # fmt: skip


def nfe(model: nn.Module) -> tuple[int, int]:
    """Evaluations of the last forward and backward pass, summed over the ODE blocks."""
    blocks = ode_blocks(model)
    return sum(b.nfe_forward for b in blocks), sum(b.nfe_backward for b in blocks)


def test_at(model: nn.Module, test: CIFAR10, batch: int) -> tuple[dict[str, float], torch.Tensor]:
    """Error %, forward evaluations per batch and seconds per batch over the test set, and the
    logits."""
    model.eval()
    wrong, evals, seconds, batches = 0, 0, 0.0, 0
    logits = []
    with torch.no_grad():
        for i in range(0, len(test), batch):
            x = normalize(test.images[i : i + batch])
            start = time.perf_counter()
            out = model(x)
            seconds += time.perf_counter() - start
            logits.append(out)
            wrong += int((out.argmax(1) != test.labels[i : i + batch]).sum())
            evals += nfe(model)[0]
            batches += 1
    model.train()
    row = {"test_error": 100.0 * wrong / len(test), "nfe_forward": evals / batches,
           "seconds_per_batch": seconds / batches}  # fmt: skip
    return row, torch.cat(logits)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of tensors and plain data, loaded without running code from the file (a
    resumed run may read a checkpoint from a shared folder)."""
    try:
        return torch.load(path, weights_only=True)  # type: ignore[no-any-return]
    except pickle.UnpicklingError as err:
        raise SystemExit(
            f"error: {path} holds objects other than tensors and plain data, so it is not "
            f"loaded (it could run code): {str(err).splitlines()[0]}"
        ) from None


def train(args: argparse.Namespace, data: CIFAR10, test: CIFAR10, out: Path) -> nn.Module:
    """Train (or resume) the ODENet, logging every iteration; returns the trained network."""
    torch.manual_seed(args.seed)
    model = network(args, args.rtol, args.atol)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ckpt = out / "checkpoint.pt"
    log: list[dict[str, Any]] = []
    epoch0 = 0
    config = {k: getattr(args, k) for k in ("train_subset", "batch_size", "lr", "rtol", "atol",
                                            "gradient", "seed")}  # fmt: skip
    if args.resume and ckpt.exists():
        state = _load_checkpoint(ckpt)
        if state["config"] != config:
            raise SystemExit(f"{ckpt} was written with another configuration; use another "
                             "--output-dir or drop --resume")  # fmt: skip
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        log, epoch0 = state["log"], state["epoch"]
        print(f"resumed after epoch {epoch0}/{args.epochs}")
    epoch_data = EpochData(data.images, data.labels, args.batch_size, args.batch_size, 0, 1)
    for epoch in range(epoch0, args.epochs):
        last = [time.perf_counter()]

        def after_step(loss: torch.Tensor, epoch: int = epoch, last: list[float] = last) -> None:
            now = time.perf_counter()
            forward, backward = nfe(model)
            log.append({"epoch": epoch + 1, "iteration": len(log) + 1, "loss": float(loss),
                        "nfe_forward": forward, "nfe_backward": backward,
                        "seconds": now - last[0]})  # fmt: skip
            last[0] = now

        label = None if args.no_progress else f"epoch {epoch + 1}/{args.epochs}"
        loss, acc, _ = train_epoch(model, opt, epoch_data,
                                   epoch_generator(args.seed, epoch, torch.device("cpu")),
                                   label, after_step)  # fmt: skip
        here = [r for r in log if r["epoch"] == epoch + 1]
        print(f"epoch {epoch + 1}: loss {loss:.3f}, train {acc:.1f} %, NFE per iteration "
              f"{_mean(here, 'nfe_forward'):.1f} forward / {_mean(here, 'nfe_backward'):.1f} "
              "backward", flush=True)  # fmt: skip
        atomic_save({"config": config, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "log": log, "epoch": epoch + 1}, ckpt)  # fmt: skip
    return model


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / max(len(rows), 1)


def write_reports(args: argparse.Namespace, log: list[dict[str, Any]],
                  tests: list[dict[str, Any]], out: Path, command: str) -> None:  # fmt: skip
    """figure3.json (iterations and test tolerances), tests.csv/json, figure3.md."""
    atomic_write_text(json.dumps({"iterations": log, "tests": tests}, indent=1),
                      out / "figure3.json")  # fmt: skip
    out_tests = out / "tests"
    out_tests.mkdir(exist_ok=True)
    write_records(tests, out_tests)
    epochs = sorted({r["epoch"] for r in log})
    lines = [
        "# Figure 3 of the Neural ODE paper on the CIFAR-10 ODENet",
        "",
        f"Command: `{command}`. Device: {describe_device(torch.device('cpu'))}, PyTorch "
        f"{torch.__version__}. ODENet ({MODEL}, GroupNorm), dopri5 at rtol {args.rtol:g}, atol "
        f"{args.atol:g} in training, gradient `{args.gradient}`; {args.train_subset:,} training "
        f"and {args.test_subset:,} test images, batch {args.batch_size}. Evaluations are summed "
        "over the two ODE blocks.",
        "",
        "| epoch | NFE forward per iteration | NFE backward per iteration | backward / forward "
        "| s per iteration |",
        "|---|---|---|---|---|",
    ]
    for e in epochs:
        rows = [r for r in log if r["epoch"] == e]
        f, b = _mean(rows, "nfe_forward"), _mean(rows, "nfe_backward")
        lines.append(f"| {e} | {f:.1f} | {b:.1f} | {b / f:.2f} | {_mean(rows, 'seconds'):.2f} |")
    lines += ["", "Tested at other tolerances (rtol = atol) than in training:", "",
              "| test rtol | test error % | NFE forward per batch | ms per batch | logit error "
              "(max, against the tightest) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in tests:
        lines.append(f"| {r['rtol']:g} | {r['test_error']:.2f} | {r['nfe_forward']:.1f} | "
                     f"{1e3 * r['seconds_per_batch']:.0f} | {r['logit_error']:.2e} |")  # fmt: skip
    atomic_write_text("\n".join(lines) + "\n", out / "figure3.md")


def plot(log: list[dict[str, Any]], tests: list[dict[str, Any]], out: Path) -> Path | None:
    """The four panels of the paper's Figure 3 from this run, and the test error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(1, 5, figsize=(20, 3.6))
    f = [r["nfe_forward"] for r in log]
    b = [r["nfe_backward"] for r in log]
    nfe_test = [r["nfe_forward"] for r in tests]
    others = [r for r in tests if r["logit_error"] > 0]
    ax[0].semilogy([r["nfe_forward"] for r in others], [r["logit_error"] for r in others], "o-")
    ax[0].set(xlabel="NFE forward (test batch)", ylabel="logit error vs tightest",
              title="(a) numerical error")  # fmt: skip
    ax[1].plot(nfe_test, [1e3 * r["seconds_per_batch"] for r in tests], "o-")
    ax[1].set(xlabel="NFE forward (test batch)", ylabel="ms per batch", title="(b) time")
    ax[2].plot(f, b, ".", alpha=0.3)
    top = max(f + b) if f else 1
    ax[2].plot([0, top], [0, top], "k:", lw=1, label="backward = forward")
    ax[2].set(xlabel="NFE forward", ylabel="NFE backward", title="(c) per training iteration")
    ax[2].legend(fontsize=7)
    ax[3].plot(range(1, len(f) + 1), f, lw=0.8)
    ax[3].set(xlabel="training iteration", ylabel="NFE forward", title="(d) during training")
    ax[4].plot(nfe_test, [r["test_error"] for r in tests], "o-")
    for r in tests:
        ax[4].annotate(f"{r['rtol']:g}", (r["nfe_forward"], r["test_error"]), fontsize=7)
    ax[4].set(xlabel="NFE forward (test batch)", ylabel="test error %",
              title="test error across test tolerances")  # fmt: skip
    fig.tight_layout()
    path, tmp = out / "figure3.png", out / "figure3.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Train, log, test at each tolerance, and write the tables and the figure."""
    args = parse_args(argv)
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = "python examples/cifar10_figure3.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    try:
        data_dir, _ = data_dir_for(args.data_dir)
        train_set = load_cifar10(data_dir, train=True, download=True)
        test_set = load_cifar10(data_dir, train=False, download=True)
    except CIFAR10Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n, m = args.train_subset, args.test_subset
    train_set = CIFAR10(train_set.images[:n], train_set.labels[:n], train_set.source)
    test_set = CIFAR10(test_set.images[:m], test_set.labels[:m], test_set.source)
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model = train(args, train_set, test_set, out)
    log = _load_checkpoint(out / "checkpoint.pt")["log"]
    tests, logits = [], []
    for rtol in args.test_rtol:
        tested = network(args, rtol, rtol)
        tested.load_state_dict(model.state_dict())
        row, out_logits = test_at(tested, test_set, args.batch_size)
        tests.append({"rtol": rtol, **row})
        logits.append(out_logits)
        print(f"test rtol {rtol:g}: error {row['test_error']:.2f} %, NFE {row['nfe_forward']:.1f}, "
              f"{1e3 * row['seconds_per_batch']:.0f} ms per batch", flush=True)  # fmt: skip
    # The numerical error of each solve: its logits against those of the tightest tolerance.
    tightest = logits[min(range(len(tests)), key=lambda k: tests[k]["rtol"])]
    for row, out_logits in zip(tests, logits):
        row["logit_error"] = float((out_logits - tightest).abs().max())
    write_reports(args, log, tests, out, command)
    plot(log, tests, out)
    print(f"wrote {out / 'figure3.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
