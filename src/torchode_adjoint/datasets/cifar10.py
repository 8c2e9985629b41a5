"""CIFAR-10 readers for the official layouts, and augmentation as batched tensor ops.

Two official layouts are read: the binary version (``cifar-10-batches-bin/*.bin``: records of
1 label byte and 3,072 pixel bytes, red, green and blue planes of 32x32, row-major) and the python
version (``cifar-10-batches-py/``: pickled dicts, read with an unpickler that accepts only plain
data and numpy arrays, never arbitrary objects). When neither is present the official binary
archive can be downloaded, checked against its MD5 and extracted.

Where the data lives (:func:`data_dir_for`): the folder given (``--data-dir``), else the folder
in the environment variable ``TORCHODE_ADJOINT_DATA``, else the user's cache folder
(``$XDG_CACHE_HOME/torchode_adjoint``, by default ``~/.cache/torchode_adjoint``), where the
archive is downloaded if it is not there yet.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

try:
    import numpy as np
except ImportError as err:  # numpy is an extra: only this reader needs it
    raise ImportError(
        "torchode_adjoint.datasets needs numpy to read the CIFAR-10 files; install it with "
        "`pip install 'torchode_adjoint[examples]'` (or `pip install numpy`)."
    ) from err
import torch

__all__ = [
    "CIFAR10",
    "CIFAR10Error",
    "MEAN",
    "STD",
    "load_cifar10",
    "find_cifar10",
    "download_cifar10",
    "data_dir_for",
    "DATA_ENV",
    "augment",
    "normalize",
]

RECORD_BYTES = 3073
IMAGE_BYTES = 3072
BIN_DIR = "cifar-10-batches-bin"
PY_DIR = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
DATA_ENV = "TORCHODE_ADJOINT_DATA"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


class CIFAR10Error(RuntimeError):
    """The data set is missing, truncated or corrupt; the message names the file and the fix."""


def data_dir_for(given: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The folder the data set is read from, and which rule chose it.

    ``given`` (a ``--data-dir``) if not None; else the environment variable
    ``TORCHODE_ADJOINT_DATA`` if set; else the user's cache folder,
    ``$XDG_CACHE_HOME/torchode_adjoint`` (``~/.cache/torchode_adjoint`` by default).
    """
    if given is not None:
        return Path(given), "--data-dir"
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env), f"${DATA_ENV}"
    return _cache_dir(), "the default cache folder"


def _cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "torchode_adjoint"


def _how_to_provide() -> str:
    return (
        f"give it in one of three ways: pass --data-dir DIR, set {DATA_ENV}=DIR, or put "
        f"{BIN_DIR}/ into {_cache_dir()}/ (the default cache folder, where it is downloaded "
        f"when the network allows); DIR holds {BIN_DIR}/ or {PY_DIR}/"
    )


@dataclass(frozen=True)
class CIFAR10:
    """One split of CIFAR-10 as tensors.

    Attributes
    ----------
    images : Tensor, uint8, shape (N, 3, 32, 32)
    labels : Tensor, int64, shape (N,)
    source : str
        The folder it was read from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def find_cifar10(data_dir: str | os.PathLike[str]) -> tuple[str, Path] | None:
    """Locate a layout under ``data_dir``: the folder itself or its ``cifar-10-batches-*`` child.

    Returns
    -------
    ("bin" or "py", folder) or None
    """
    root = Path(data_dir)
    for kind, name, probe in (("bin", BIN_DIR, "test_batch.bin"), ("py", PY_DIR, "test_batch")):
        for folder in (root / name, root):
            if (folder / probe).is_file():
                return kind, folder
    return None


def _read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise CIFAR10Error(
            f"CIFAR-10 file {path} is missing; the binary layout needs all of "
            f"{[f + '.bin' for f in TRAIN_FILES + TEST_FILES]}."
        )
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise CIFAR10Error(
            f"CIFAR-10 file {path} is truncated or corrupt: {raw.size} bytes is not a whole number "
            f"of {RECORD_BYTES}-byte records; download it again."
        )
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise CIFAR10Error(
            f"CIFAR-10 file {path} is corrupt: label byte {int(labels.max())} is not in 0..9."
        )
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


class _PlainDataUnpickler(pickle.Unpickler):
    """Accepts builtin containers and numpy arrays only: loading can run no other code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def _read_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise CIFAR10Error(
            f"CIFAR-10 file {path} is missing; the python layout needs all of "
            f"{TRAIN_FILES + TEST_FILES}."
        )
    try:
        with open(path, "rb") as fh:
            batch = _PlainDataUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(labels, dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
        raise CIFAR10Error(
            f"CIFAR-10 file {path} is truncated or corrupt ({err}); download it again."
        ) from err
    if images.shape[0] != labels.shape[0] or labels.size == 0 or labels.max() > 9:
        raise CIFAR10Error(f"CIFAR-10 file {path} is corrupt: images and labels do not match.")
    return images, labels


def load_cifar10(
    data_dir: str | os.PathLike[str], *, train: bool, download: bool = False
) -> CIFAR10:
    """Read one split from either official layout under ``data_dir``.

    Parameters
    ----------
    data_dir : path
        The folder that holds ``cifar-10-batches-bin/`` (or ``-py/``), or that folder itself.
    train : bool
        The 50,000 training images, else the 10,000 test images.
    download : bool, default False
        When no layout is found, download the official binary archive into ``data_dir``.

    Raises
    ------
    CIFAR10Error
        Missing data (naming where to put it), or a truncated or corrupt file (naming it).
    """
    found = find_cifar10(data_dir)
    if found is None and download:
        download_cifar10(data_dir)
        found = find_cifar10(data_dir)
    if found is None:
        raise CIFAR10Error(
            f"CIFAR-10 was not found under {os.fspath(data_dir)!r} (neither {BIN_DIR}/ nor "
            f"{PY_DIR}/); {_how_to_provide()}."
        )
    kind, folder = found
    names = TRAIN_FILES if train else TEST_FILES
    parts = [
        _read_bin(folder / f"{n}.bin") if kind == "bin" else _read_py(folder / n) for n in names
    ]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return CIFAR10(images=images, labels=labels, source=str(folder))


def download_cifar10(
    data_dir: str | os.PathLike[str], *, url: str = ARCHIVE_URL, timeout: float = 30.0
) -> Path:
    """Download the official binary archive, check its MD5 and extract it into ``data_dir``.

    Raises
    ------
    CIFAR10Error
        When the download fails or the checksum differs, saying where to put the files instead.
    """
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".tar.gz.part")
    os.close(fd)
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:
            raise CIFAR10Error(
                f"CIFAR-10 is not in {root}/ and could not be downloaded from {url} ({err}); "
                f"{_how_to_provide()}."
            ) from err
        digest = hashlib.md5(Path(tmp).read_bytes()).hexdigest()
        if digest != ARCHIVE_MD5:
            raise CIFAR10Error(f"the downloaded archive has MD5 {digest}, expected {ARCHIVE_MD5}.")
        with tarfile.open(tmp) as tar:
            tar.extractall(root, filter="data")
    finally:
        Path(tmp).unlink(missing_ok=True)
    return root / BIN_DIR


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W) -> float32, scaled to [0, 1] then ``(x - MEAN) / STD``."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip (p = 0.5), batched on the images' device.

    Parameters
    ----------
    images : Tensor, shape (B, C, H, W)
    generator : torch.Generator
        On the images' device; makes the augmentation reproducible.
    padding : int, default 4

    Returns
    -------
    Tensor, shape (B, C, H, W)
    """
    b, _, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    rows = oy[:, None] + torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + ox[:, None]
    batch = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
