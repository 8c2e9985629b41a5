"""Test accuracy of trained CIFAR-10 checkpoints with BatchNorm running vs batch statistics.

    python -m benchmarks.bn_statistics [--data-dir DIR] RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a folder written by ``examples/cifar10_compare.py`` (it holds ``checkpoint.pt``;
the model spec is the first part of the folder name). A BatchNorm inside ODE dynamics is applied at
every evaluation time, so its running statistics average over all times; normalising each test
batch of 1,000 images with its own statistics shows how much accuracy that averaging costs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from torchode_adjoint.datasets.cifar10 import data_dir_for, load_cifar10, normalize
from torchode_adjoint.measure import add_threads_argument, use_threads
from torchode_adjoint.models.cifar10 import build_model, parse_model_spec


def accuracy(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_stats: bool,
    batch: int = 1000,
) -> float:
    """Percent correct; ``batch_stats`` normalises each batch with its own statistics (training
    mode: the running buffers of this in-memory model change, nothing is saved)."""
    model.train(batch_stats)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch):
            logits = model(normalize(images[i : i + batch]))
            correct += int((logits.argmax(1) == labels[i : i + batch]).sum())
    return 100.0 * correct / len(labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders holding checkpoint.pt")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder holding cifar-10-batches-bin/ (or -py/), or that folder itself; default: "
        "$TORCHODE_ADJOINT_DATA, else ~/.cache/torchode_adjoint (downloaded there when the "
        "network allows)",
    )
    p.add_argument("--output", default=None, help="write the rows as JSON here")
    add_threads_argument(p)
    args = p.parse_args(argv)
    use_threads(args.threads)
    test = load_cifar10(data_dir_for(args.data_dir)[0], train=False)
    rows = []
    for run in map(Path, args.runs):
        state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
        cfg = state["config"]
        model = build_model(
            parse_model_spec(cfg["model"]),
            preset=cfg["preset"],
            norm=cfg["norm"],
            solver=cfg["solver"],
            adjoint=cfg["gradient"],
        )
        model.load_state_dict(state["model"])
        row = {
            "run": run.name,
            "epoch": state["epoch"],
            "running_stats_acc": accuracy(model, test.images, test.labels, batch_stats=False),
            "batch_stats_acc": accuracy(model, test.images, test.labels, batch_stats=True),
        }
        rows.append(row)
        print(
            f"{row['run']}: epoch {row['epoch']}, running statistics "
            f"{row['running_stats_acc']:.2f} %, batch statistics {row['batch_stats_acc']:.2f} %"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
