"""Small CIFAR-10 files in both official layouts, written by the tests themselves."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, n).astype(np.uint8)
    # Class-dependent mean colour so a network can learn something in a few steps.
    base = (labels[:, None].astype(np.int64) * 25) % 256
    pixels = (base + rng.integers(0, 40, (n, 3072))).clip(0, 255).astype(np.uint8)
    return pixels, labels


def write_bin(root: Path, per_file: int = 20, n_test: int = 30, seed: int = 0) -> Path:
    """``root/cifar-10-batches-bin/`` with 5 training files and a test file."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(t, per_file) for t in TRAIN] + [("test_batch", n_test)]:
        pixels, labels = _images(rng, n)
        records = np.concatenate([labels[:, None], pixels], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    return folder


def write_py(root: Path, per_file: int = 20, n_test: int = 30, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/`` as pickled dicts of bytes keys, like the official files."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(t, per_file) for t in TRAIN] + [("test_batch", n_test)]:
        pixels, labels = _images(rng, n)
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels.tolist(),
            b"data": pixels,
            b"filenames": [f"{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return folder
