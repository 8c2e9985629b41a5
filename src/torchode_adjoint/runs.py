"""What the example programs share to run: atomic writes and progress bars.

Not imported by ``import torchode_adjoint``; the examples (CIFAR-10, the latent ODE on spirals)
import it so that a file is never seen half written and a resumed run finds whole checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = ["atomic_save", "atomic_write_text", "write_records", "progress", "start_run"]

T = TypeVar("T")


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then one rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to a temporary file in the same folder, then one rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_records(records: list[dict[str, Any]], out: Path) -> None:
    """``records`` as ``results.json`` and ``results.csv`` in ``out``, each written atomically."""
    atomic_write_text(json.dumps(records, indent=1), out / "results.json")
    buf = io.StringIO()
    if records:
        writer = csv.DictWriter(buf, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    atomic_write_text(buf.getvalue(), out / "results.csv")


def progress(iterable: Iterable[T], total: int, desc: str, enabled: bool) -> Iterable[T] | Any:
    """``iterable`` with a tqdm progress bar where enabled and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def start_run(args: Any, script: str, argv: list[str] | None) -> tuple[Path, str] | None:
    """What an example does first: the threads of ``args.threads`` (None, after printing why,
    where the value is refused), ``args.output_dir`` created, and the command line that ran
    (``python examples/<script> ...``) for the report."""
    from .measure import use_threads

    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    return out, f"python examples/{script} " + " ".join(given)
