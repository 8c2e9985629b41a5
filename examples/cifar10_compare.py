"""CIFAR-10: ResNet vs ODENet vs the ResidualODE hybrid, with real measurements.

Trains each requested network with the same stem, head, data and optimiser, and reports best and
final test accuracy, training and test time, parameters, the reference study's "memory" (state
dict bytes) beside measured memory of a training step (bytes saved for backward; peak bytes of
live tensors on CPU via the profiler, or peak CUDA allocation), and forward/backward NFE.

    python examples/cifar10_compare.py --quick            # minutes on a CPU
    python examples/cifar10_compare.py                    # the full study
    torchrun --nproc_per_node=2 examples/cifar10_compare.py --quick ...     # DDP, 2 processes

CIFAR-10 is read from --data-dir, else from the folder in $TORCHODE_ADJOINT_DATA, else from
~/.cache/torchode_adjoint (downloaded there when the network allows).

Checkpoints are written atomically after every epoch; ``--resume`` continues from the last
finished epoch and gives the same results as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from torchode_adjoint import GRADIENT_MODES, TimeSharedStatisticsWarning, get_solver
from torchode_adjoint.datasets.cifar10 import (
    CIFAR10,
    CIFAR10Error,
    augment,
    data_dir_for,
    load_cifar10,
    normalize,
)
from torchode_adjoint.measure import (
    THREADS_HELP,
    parse_threads,
    peak_memory_bytes,
    saved_tensor_bytes,
    state_dict_bytes,
)
from torchode_adjoint.models.cifar10 import (
    NORMS,
    ModelSpec,
    build_model,
    ode_blocks,
    parse_model_spec,
)
from torchode_adjoint.runs import atomic_save, atomic_write_text
from torchode_adjoint.runs import progress as _progress

FULL_MODELS = ["resnet1", "odenet@0.5", "hybrid1@0.1"]
PRESETS = {
    "thesis": "one conv and one norm applied twice per block, as the reference study",
    "standard": "two separate convs and norms per block",
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one model's training, stored in its checkpoint."""

    model: str
    preset: str
    norm: str
    solver: str | None  # None for a network without an ODE block
    gradient: str | None
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    seed: int
    train_subset: int | None
    test_subset: int | None
    rtol: float | None = None  # error-controlled steps (None: fixed steps, or no ODE block)
    atol: float | None = None

    @property
    def run_name(self) -> str:
        parts = [self.model, self.preset, self.norm, self.solver, self.gradient]
        name = "-".join(p for p in parts if p is not None)
        if self.rtol is not None:
            name += f"-rtol{self.rtol:g}-atol{self.atol:g}"
        return f"{name}-lr{self.lr:g}-bs{self.batch_size}-seed{self.seed}"


class Distributed:
    """Rank and world size; a no-op outside torchrun."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


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
    p.add_argument(
        "--output-dir",
        default="./runs/cifar10_compare",
        help="where results, checkpoints and plots go (runs/ is ignored by git)",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        help="specs: resnetK, odenet@STEP, hybridK@STEP (default: "
        + " ".join(FULL_MODELS)
        + "; with --quick the quick preset's)",
    )
    p.add_argument(
        "--preset",
        choices=["thesis", "standard"],
        default="thesis",
        help="thesis: one conv and norm applied twice per block; standard: two",
    )
    p.add_argument(
        "--norm",
        choices=list(NORMS),
        default="temporal",
        help="temporal: TemporalBatchNorm2d inside the dynamics (statistics per evaluation time), "
        "BatchNorm elsewhere; batch: BatchNorm everywhere (the reference study; inside the "
        "dynamics one set of running statistics for all times); group: GroupNorm everywhere",
    )
    p.add_argument("--solver", default="euler", help="the ODE blocks' solver (registry name)")
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="error-controlled steps with this relative tolerance (--solver an embedded pair "
        "such as dopri5; a model's @STEP is then its largest step; not with --norm temporal)",
    )
    p.add_argument(
        "--atol", type=float, default=None, help="absolute tolerance (default: --rtol's value)"
    )
    p.add_argument(
        "--gradient",
        nargs="+",
        choices=list(GRADIENT_MODES),
        default=["checkpoint"],
        help="gradient mode(s) of the ODE blocks; several run each ODE model once per mode "
        "('reversible' integrates --solver made reversible; --solver reversible_heun pairs with "
        "'reversible' and 'backprop' only)",
    )
    p.add_argument("--epochs", type=int, default=50, help="training epochs per model")
    p.add_argument("--batch-size", type=int, default=200, help="global batch size")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="optimiser")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation and data order")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    p.add_argument(
        "--threads",
        default="auto",
        help=THREADS_HELP,
    )
    p.add_argument("--train-subset", type=int, default=None, help="train on the first N images")
    p.add_argument("--test-subset", type=int, default=None, help="test on the first N images")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoints")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop each model after N more epochs in this invocation (time-boxing)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the ODE blocks' steps as torch.compile graphs (same results to round-off; the "
        "first epoch includes compiling, and runs with and without it need separate --output-dir)",
    )
    p.add_argument(
        "--measure-only",
        action="store_true",
        help="no training: measure memory and NFE of one training step of every model and "
        "gradient mode, and write memory.md / memory.json",
    )
    p.add_argument(
        "--no-download",
        action="store_true",
        help="do not download the official archive when the data is not found",
    )
    p.add_argument(
        "--thesis",
        action="store_true",
        help="the reference study's own settings: --norm batch --gradient adjoint (flags given "
        "explicitly still win)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="10,000 training images, 3 epochs, the full test set, all three families (86 s "
        "with 2 threads on an idle 2-core Intel Xeon, torch 2.13.0 CPU build)",
    )
    args = p.parse_args(argv)
    if args.quick:
        defaults = dict(
            epochs=3, train_subset=10000, models=["resnet1", "odenet@0.5", "hybrid1@0.5"]
        )
        for key, value in defaults.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if args.thesis:
        for key, value in (("norm", "batch"), ("gradient", ["adjoint"])):
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    args.models = args.models or FULL_MODELS
    return args


class UsageError(Exception):
    """A bad command-line argument: reported as one line on stderr with exit code 2."""


def validate_args(args: argparse.Namespace) -> None:
    """Check every argument before any data is read or any model built.

    Raises
    ------
    UsageError
        Naming the argument, the value and what to pass instead.
    """
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    try:
        args.specs = [parse_model_spec(m) for m in args.models]
    except ValueError as err:
        raise UsageError(f"--models: {err}") from None
    try:
        solver = get_solver(args.solver)
    except ValueError as err:
        raise UsageError(f"--solver: {err}") from None
    if args.atol is not None and args.rtol is None:
        raise UsageError("--atol needs --rtol (error-controlled steps); pass both")
    if args.rtol is not None:
        args.atol = args.rtol if args.atol is None else args.atol
        for name in ("rtol", "atol"):
            value = getattr(args, name)
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"--{name} must be a positive number, got {value}")
        if not getattr(solver, "adaptive", False):
            raise UsageError(
                f"--rtol needs an embedded pair as --solver (e.g. --solver dopri5); "
                f"{args.solver!r} has no error estimate"
            )
        if args.norm == "temporal":
            raise UsageError(
                "--rtol with --norm temporal: a TemporalBatchNorm keeps statistics per "
                "evaluation time, which error-controlled steps choose as they go; pass "
                "--norm group (or batch)"
            )
    args.device = _check_device(args.device)
    try:
        args.threads = parse_threads(args.threads)
    except ValueError as err:
        raise UsageError(str(err)) from None
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # A file of this process's own: the ranks of a distributed run probe the same folder.
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UsageError(
            f"--output-dir {str(out)!r} cannot be created or written ({err.strerror}); pass a "
            "writable folder"
        ) from None


def _check_device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device; pass cpu or cuda") from None
    available = ["cpu"]
    if torch.cuda.is_available():
        available += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if device.type == "cpu":
        return text
    if device.type == "cuda" and torch.cuda.is_available():
        if device.index is None or device.index < torch.cuda.device_count():
            return text
    raise UsageError(f"--device {text!r} is not available here; available: {', '.join(available)}")


def evaluate(
    model: nn.Module, data: CIFAR10, device: torch.device, batch: int = 1000
) -> tuple[float, float]:
    """Test accuracy (percent) and the seconds it took over the whole set."""
    model.eval()
    correct = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(data), batch):
            x = normalize(data.images[i : i + batch].to(device, non_blocking=True))
            correct += int((model(x).argmax(1) == data.labels[i : i + batch].to(device)).sum())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train()
    return 100.0 * correct / len(data), seconds


def measure_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> dict[str, int | None]:
    """Memory and NFE of one training step, on a copy so that training is unaffected."""
    probe = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        loss_fn(probe(x), y).backward()
        probe.zero_grad(set_to_none=True)

    step()  # warm-up: allocator and lazy initialisation
    with saved_tensor_bytes() as saved:
        loss = loss_fn(probe(x), y)
    loss.backward()
    probe.zero_grad(set_to_none=True)
    peak = peak_memory_bytes(step, device)
    blocks = ode_blocks(probe)
    return {
        "saved_for_backward_bytes": saved.bytes,
        "peak_memory_bytes": peak,
        "nfe_forward": sum(b.nfe_forward for b in blocks),
        "nfe_backward": sum(b.nfe_backward for b in blocks),
    }


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Every epoch's shuffling and augmentation depend only on (seed, epoch): resumable."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


@dataclass
class Progress:
    """A run's state between epochs: what a checkpoint holds besides the weights."""

    history: list[dict]
    train_time_s: float
    epoch: int
    threads: int = 0  # the torch threads the run trained with (0: not recorded)


def build_run(
    cfg: RunConfig, device: torch.device, *, compile: bool = False
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The seeded model and its optimiser (``compile``: the ODE blocks' compiled path, which
    changes the speed only, so it is not part of the run's configuration)."""
    torch.manual_seed(cfg.seed)
    model = build_model(
        parse_model_spec(cfg.model),
        preset=cfg.preset,
        norm=cfg.norm,
        solver=cfg.solver or "euler",  # unused by a ResNet
        adjoint=cfg.gradient or True,
        compile=compile,
        rtol=cfg.rtol,
        atol=cfg.atol,
    ).to(device)
    if cfg.optimizer == "adam":
        return model, torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return model, torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)


def restore(
    ckpt_path: Path,
    cfg: RunConfig,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    device: torch.device,
) -> Progress | None:
    """Load a checkpoint into ``model`` and ``opt``; None when there is none."""
    if not ckpt_path.exists():
        return None
    state = torch.load(ckpt_path, map_location=device, weights_only=True)
    if state["config"] != asdict(cfg):
        raise SystemExit(
            f"{ckpt_path} was written with another configuration; use another "
            "--output-dir or drop --resume."
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return Progress(
        state["history"], state["train_time_s"], state["epoch"], state.get("threads", 0)
    )


def save_checkpoint(
    path: Path, cfg: RunConfig, model: nn.Module, opt: torch.optim.Optimizer, progress: Progress
) -> None:
    """Everything :func:`restore` needs, written atomically."""
    atomic_save(
        {
            "config": asdict(cfg),
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": progress.epoch,
            "history": progress.history,
            "train_time_s": progress.train_time_s,
            "threads": torch.get_num_threads(),
        },
        path,
    )


@dataclass
class EpochData:
    """The training set on the device and how one global batch is split over the ranks."""

    images: torch.Tensor
    labels: torch.Tensor
    batch_size: int
    per_rank: int
    rank: int
    world: int


def train_epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    data: EpochData,
    gen: torch.Generator,
    bar_label: str | None,
    after_step: Callable[[torch.Tensor], None] | None = None,
) -> tuple[float, float, int]:
    """One pass over the shuffled, augmented training set: mean loss, accuracy %, images seen
    (``after_step(loss)`` after each optimiser step: a caller's per-iteration log)."""
    n = data.images.shape[0]
    steps = n // data.batch_size
    perm = torch.randperm(n, generator=gen, device=data.images.device)
    loss_fn = nn.CrossEntropyLoss()
    loss_sum = torch.zeros((), device=data.images.device)
    correct = torch.zeros((), device=data.images.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar = _progress(range(steps), steps, bar_label or "", bar_label is not None)
    for i in bar:
        idx = perm[i * data.batch_size : (i + 1) * data.batch_size]
        x = normalize(augment(data.images[idx], gen))  # the same augmentation on every rank
        y = data.labels[idx]
        x = x[data.rank * data.per_rank : (data.rank + 1) * data.per_rank]
        y = y[data.rank * data.per_rank : (data.rank + 1) * data.per_rank]
        logits = net(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(loss.detach())
        loss_sum += loss.detach() * y.shape[0]
        correct += (logits.argmax(1) == y).sum()
        seen += y.shape[0]
        if bar_label is not None and hasattr(bar, "set_postfix") and i % 10 == 0:
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{float(loss.detach()):.3f}",
                acc=f"{100.0 * float(correct) / seen:.1f}",
                img_s=f"{seen * data.world / max(elapsed, 1e-9):.0f}",
            )
    return float(loss_sum) / max(seen, 1), 100.0 * float(correct) / max(seen, 1), seen


def train_model(
    cfg: RunConfig,
    train: CIFAR10,
    test: CIFAR10,
    device: torch.device,
    out_dir: Path,
    ddp: Distributed,
    *,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    compile: bool = False,
) -> dict | None:
    """Train one network; returns its result record, or None if stopped early."""
    run_dir = out_dir / cfg.run_name
    ckpt_path, result_path = run_dir / "checkpoint.pt", run_dir / "result.json"
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ddp.barrier()
    if resume and result_path.exists():
        record = json.loads(result_path.read_text())
        if ddp.main:
            print(f"[{cfg.model}] already finished: best {record['best_test_acc']:.2f} %")
        return record

    model, opt = build_run(cfg, device, compile=compile)
    state = restore(ckpt_path, cfg, model, opt, device) if resume else None
    if ddp.main and resume:
        print(
            f"[{cfg.model}] resumed {run_dir} after epoch {state.epoch}/{cfg.epochs}"
            if state is not None
            else f"[{cfg.model}] nothing to resume in {run_dir}: starting from epoch 1"
        )
    if state is not None and state.threads and state.threads != torch.get_num_threads():
        # The run goes on with the threads it trained with: another count changes the order of
        # the reductions, and the resumed run would differ from an uninterrupted one.
        if ddp.main:
            print(f"[{cfg.model}] continuing with the run's {state.threads} threads, not "
                  f"{torch.get_num_threads()}")  # fmt: skip
        torch.set_num_threads(state.threads)
    state = state or Progress(history=[], train_time_s=0.0, epoch=0)
    net: nn.Module = model
    if ddp.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    per_rank = cfg.batch_size // ddp.world
    if per_rank * ddp.world != cfg.batch_size:
        raise SystemExit(
            f"--batch-size {cfg.batch_size} must be divisible by the world size {ddp.world}."
        )
    x0, y0 = normalize(train.images[:per_rank].to(device)), train.labels[:per_rank].to(device)
    measured = measure_step(model, x0, y0, device)
    data = EpochData(
        train.images.to(device),
        train.labels.to(device),
        cfg.batch_size,
        per_rank,
        ddp.rank,
        ddp.world,
    )
    for epochs_run, epoch in enumerate(range(state.epoch, cfg.epochs)):
        if stop_after is not None and epochs_run >= stop_after:
            return None
        model.train()
        start = time.perf_counter()
        label = f"{cfg.model} {epoch + 1}/{cfg.epochs}" if progress and ddp.main else None
        loss, acc, seen = train_epoch(
            net, opt, data, epoch_generator(cfg.seed, epoch, device), label
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - start
        test_acc, test_time = evaluate(model, test, device)
        state.history.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss,
                "train_acc": acc,
                "test_acc": test_acc,
                "epoch_time_s": epoch_time,
                "test_time_s": test_time,
            }
        )
        state.train_time_s += epoch_time
        state.epoch = epoch + 1
        if ddp.main:
            print(
                f"[{cfg.model}] epoch {epoch + 1}/{cfg.epochs}  loss {loss:.4f}  "
                f"train {acc:.2f} %  test {test_acc:.2f} %  "
                f"{epoch_time:.1f} s  {seen * ddp.world / epoch_time:.0f} img/s",
                flush=True,
            )
            save_checkpoint(ckpt_path, cfg, model, opt, state)
        ddp.barrier()
    record = result_record(cfg, model, state, measured, device, ddp, train, test)
    record["compiled"] = compile
    if ddp.main:
        atomic_write_text(json.dumps(record, indent=2), result_path)
    return record


def result_record(
    cfg: RunConfig,
    model: nn.Module,
    state: Progress,
    measured: dict,
    device: torch.device,
    ddp: Distributed,
    train: CIFAR10,
    test: CIFAR10,
) -> dict:
    """The finished run's row: configuration, accuracy, times, memory, NFE and history."""
    spec: ModelSpec = parse_model_spec(cfg.model)
    history = state.history
    return {
        **applicable(asdict(cfg)),
        "label": spec.label,
        "step": spec.step,
        "params": sum(p.numel() for p in model.parameters()),
        "state_dict_bytes": state_dict_bytes(model),
        "best_test_acc": max(h["test_acc"] for h in history),
        "final_test_acc": history[-1]["test_acc"],
        "train_time_s": state.train_time_s,
        "test_time_s": history[-1]["test_time_s"],
        **measured,
        "device": describe_device(device),
        "world_size": ddp.world,
        "train_images": len(train),
        "test_images": len(test),
        "history": history,
    }


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    unit = "thread" if threads == 1 else "threads"
    return f"CPU ({platform.processor() or platform.machine()}, {threads} {unit})"


def applicable(fields: dict) -> dict:
    """The fields without ``solver``/``gradient`` where they do not apply (None: no ODE block),
    and without ``rtol``/``atol`` for fixed steps."""
    optional = ("solver", "gradient", "rtol", "atol")
    return {k: v for k, v in fields.items() if v is not None or k not in optional}


def solver_of(record: dict) -> str:
    """The solver column: '-' for a network without an ODE block; the tolerances with error
    control."""
    if record["step"] is None:
        return "-"
    if record.get("rtol") is not None:
        return f"{record['solver']} (rtol {record['rtol']:g}, atol {record['atol']:g})"
    return record["solver"]


def gradient_of(record: dict) -> str:
    """The gradient column: '-' for a network without an ODE block."""
    return "-" if record["step"] is None else record["gradient"]


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def write_reports(records: list[dict], out_dir: Path, command: str) -> list[Path]:
    """results.json, results.csv, results.md and the plots; returns the paths written."""
    atomic_write_text(json.dumps(records, indent=2), out_dir / "results.json")
    keys = [
        "model",
        "label",
        "preset",
        "norm",
        "solver",
        "step",
        "gradient",
        "lr",
        "params",
        "state_dict_bytes",
        "best_test_acc",
        "final_test_acc",
        "train_time_s",
        "test_time_s",
        "saved_for_backward_bytes",
        "peak_memory_bytes",
        "nfe_forward",
        "nfe_backward",
        "epochs",
        "device",
        "train_images",
        "test_images",
    ]
    tmp = out_dir / "results.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    os.replace(tmp, out_dir / "results.csv")
    lines = [
        "| network | step | lr | solver | gradient | best acc % | final acc % | train s | test s | "
        'params | "memory" B (state dict) | saved for backward MiB | peak step MiB | NFE fwd | '
        "NFE bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        step = "-" if r["step"] is None else f"{r['step']:g}"
        lines.append(
            f"| {r['label']} | {step} | {r['lr']:g} | {solver_of(r)} | {gradient_of(r)} | "
            f"{r['best_test_acc']:.2f} | "
            f"{r['final_test_acc']:.2f} | {r['train_time_s']:.0f} | {r['test_time_s']:.2f} | "
            f"{r['params']:,} | {r['state_dict_bytes']:,} | "
            f"{_mib(r['saved_for_backward_bytes'])} | {_mib(r['peak_memory_bytes'])} | "
            f"{r['nfe_forward']} | {r['nfe_backward']} |"
        )
    r0 = records[0]
    notes = [
        "",
        f"Command: `{command}`",
        "",
        f"Device: {r0['device']}; preset {r0['preset']}, norm {r0['norm']}, optimiser "
        f"{r0['optimizer']}, batch "
        f"{r0['batch_size']}, {r0['epochs']} epochs, seed {r0['seed']}; "
        f"{r0['train_images']:,} training and {r0['test_images']:,} test images.",
        "",
        'Memory columns, per training step at the batch size above: *"memory" B* is the '
        "reference study's column (parameter and buffer bytes, shared weights once); *saved for "
        "backward* is the bytes of tensors autograd kept for the backward pass "
        "(`torch.autograd.graph.saved_tensors_hooks`); *peak step* is the peak of live tensor "
        "bytes allocated during one forward+backward (CUDA: `max_memory_allocated`; CPU: the "
        "memory timeline of `torch.profiler` with `profile_memory=True`). NFE are per training "
        "step, summed over the ODE blocks.",
    ]
    atomic_write_text("\n".join(lines + notes) + "\n", out_dir / "results.md")
    curves = plot(records, out_dir)
    names = ["results.json", "results.csv", "results.md"]
    return [out_dir / n for n in names] + ([curves] if curves is not None else [])


def plot(records: list[dict], out_dir: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install '.[examples]')")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    several = len({gradient_of(r) for r in records} - {"-"}) > 1
    for r in records:
        epochs = [h["epoch"] for h in r["history"]]
        label = r["label"] + (f", {gradient_of(r)}" if several and r["step"] is not None else "")
        axes[0].plot(epochs, [h["test_acc"] for h in r["history"]], label=label)
        axes[1].plot(epochs, [h["train_loss"] for h in r["history"]], label=label)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="CIFAR-10 test accuracy")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="training loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs only
    fig.tight_layout()
    tmp = out_dir / "curves.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_dir / "curves.png")
    return out_dir / "curves.png"


def measure_only(args: argparse.Namespace, train: CIFAR10, device: torch.device) -> list[dict]:
    """Memory and NFE of one training step per model and gradient mode, without training."""
    x = normalize(train.images[: args.batch_size].to(device))
    y = train.labels[: args.batch_size].to(device)
    rows = []
    for spec, gradient in runs(args.specs, args.gradient):
        solver = args.solver
        torch.manual_seed(args.seed)
        model = build_model(
            spec,
            preset=args.preset,
            norm=args.norm,
            solver=solver,
            adjoint=gradient,
            rtol=args.rtol,
            atol=args.atol,
        ).to(device)
        ode = spec.family != "resnet"
        row = {
            "model": spec.name,
            "label": spec.label,
            "step": spec.step,
            **applicable(
                {"solver": solver if ode else None, "gradient": gradient if ode else None}
            ),
            "batch_size": args.batch_size,
            "params": sum(p.numel() for p in model.parameters()),
            "state_dict_bytes": state_dict_bytes(model),
            **measure_step(model, x, y, device),
        }
        rows.append(row)
        print(
            f"[{spec.name} {gradient}] saved {_mib(row['saved_for_backward_bytes'])} MiB, "
            f"peak {_mib(row['peak_memory_bytes'])} MiB",
            flush=True,
        )
    return rows


def write_memory_report(rows: list[dict], out_dir: Path, command: str, device: str) -> None:
    """memory.json and memory.md: one row per model and gradient mode."""
    atomic_write_text(json.dumps(rows, indent=2), out_dir / "memory.json")
    lines = [
        '| network | solver | gradient | params | "memory" B (state dict) | '
        "saved for backward MiB | peak step MiB | NFE fwd | NFE bwd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {solver_of(r)} | {gradient_of(r)} | {r['params']:,} | "
            f"{r['state_dict_bytes']:,} | {_mib(r['saved_for_backward_bytes'])} | "
            f"{_mib(r['peak_memory_bytes'])} | {r['nfe_forward']} | {r['nfe_backward']} |"
        )
    lines += ["", f"Command: `{command}`", "", f"Device: {device}; batch {rows[0]['batch_size']}."]
    atomic_write_text("\n".join(lines) + "\n", out_dir / "memory.md")


def runs(specs: list[ModelSpec], gradients: list[str]) -> list[tuple[ModelSpec, str]]:
    """Every model once per gradient mode; a ResNet has no ODE block, so it runs once."""
    out = []
    for spec in specs:
        for gradient in gradients[:1] if spec.family == "resnet" else gradients:
            out.append((spec, gradient))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        validate_args(args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    # `--norm batch` reproduces the reference study's BatchNorm inside the dynamics on purpose;
    # the header says so instead of a warning per model.
    warnings.filterwarnings("ignore", category=TimeSharedStatisticsWarning)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    ddp = Distributed(device)
    try:
        data_dir, rule = data_dir_for(args.data_dir)
        train = load_cifar10(data_dir, train=True, download=not args.no_download)
        test = load_cifar10(data_dir, train=False, download=not args.no_download)
    except CIFAR10Error as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.train_subset:
        train = CIFAR10(
            train.images[: args.train_subset], train.labels[: args.train_subset], train.source
        )
    if args.test_subset:
        test = CIFAR10(
            test.images[: args.test_subset], test.labels[: args.test_subset], test.source
        )
    out_dir = Path(args.output_dir)
    if ddp.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"CIFAR-10 from {train.source} ({rule}): {len(train):,} train / {len(test):,} test "
            "images; "
            f"block preset {args.preset!r} ({PRESETS[args.preset]}), norm {args.norm!r}, "
            f"gradient {' '.join(args.gradient)}, "
            f"device {describe_device(device)}, world size {ddp.world}"
        )
        if args.norm == "batch" and any(sp.family != "resnet" for sp in args.specs):
            print(
                "norm 'batch': the BatchNorm inside the ODE dynamics keeps one set of running "
                "statistics for every time, as in the reference study (--norm temporal keeps "
                "them per time)"
            )
        print(f"results, checkpoints and plots go to {out_dir.resolve()}/", flush=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    if args.measure_only:
        if ddp.main:
            rows = measure_only(args, train, device)
            write_memory_report(rows, out_dir, command, describe_device(device))
            print((out_dir / "memory.md").read_text())
            print(f"wrote {out_dir / 'memory.md'} and {out_dir / 'memory.json'}")
        return 0
    records = []
    for spec, gradient in runs(args.specs, args.gradient):
        ode = spec.family != "resnet"  # a ResNet has no ODE block: no solver, no gradient mode
        cfg = RunConfig(
            model=spec.name,
            preset=args.preset,
            norm=args.norm,
            solver=args.solver if ode else None,
            gradient=gradient if ode else None,
            epochs=args.epochs,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            seed=args.seed,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            rtol=args.rtol if ode else None,
            atol=args.atol if ode else None,
        )
        record = train_model(
            cfg,
            train,
            test,
            device,
            out_dir,
            ddp,
            resume=args.resume,
            stop_after=args.stop_after,
            progress=not args.no_progress,
            compile=args.compile,
        )
        if record is not None:
            records.append(record)
    if ddp.main and records:
        written = write_reports(records, out_dir, command)
        print((out_dir / "results.md").read_text())
        print("wrote " + ", ".join(str(path) for path in written))
    if ddp.world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
