"""CIFAR-10 readers on files the tests write: both layouts, truncated and corrupt files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from cifar_files import write_bin, write_py

from torchode_adjoint.datasets.cifar10 import CIFAR10Error, augment, load_cifar10, normalize


def test_binary_layout_reads_labels_and_planes_in_order(tmp_path: Path) -> None:
    folder = write_bin(tmp_path, per_file=4, n_test=3)
    raw = np.fromfile(folder / "test_batch.bin", dtype=np.uint8).reshape(3, 3073)
    test = load_cifar10(tmp_path, train=False)
    assert test.images.shape == (3, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.labels.tolist() == raw[:, 0].tolist()
    # Record 1: red plane first, row-major.
    assert int(test.images[1, 0, 0, 1]) == raw[1, 2]
    assert int(test.images[1, 2, 31, 31]) == raw[1, 3072]
    train = load_cifar10(folder, train=True)  # the layout folder itself works too
    assert len(train) == 20


def test_python_layout_reads_the_same_content(tmp_path: Path) -> None:
    write_bin(tmp_path / "a", seed=3)
    write_py(tmp_path / "b", seed=3)
    for train in (True, False):
        a = load_cifar10(tmp_path / "a", train=train)
        b = load_cifar10(tmp_path / "b", train=train)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_truncated_binary_file_is_refused_naming_it(tmp_path: Path) -> None:
    folder = write_bin(tmp_path)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CIFAR10Error, match="data_batch_3.bin.*truncated"):
        load_cifar10(tmp_path, train=True)


def test_corrupt_label_byte_is_refused(tmp_path: Path) -> None:
    folder = write_bin(tmp_path)
    data = bytearray((folder / "test_batch.bin").read_bytes())
    data[0] = 200
    (folder / "test_batch.bin").write_bytes(bytes(data))
    with pytest.raises(CIFAR10Error, match="test_batch.bin.*label"):
        load_cifar10(tmp_path, train=False)


def test_truncated_pickle_is_refused_naming_it(tmp_path: Path) -> None:
    folder = write_py(tmp_path)
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CIFAR10Error, match="data_batch_2"):
        load_cifar10(tmp_path, train=True)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_arbitrary_objects_is_refused_without_running_them(tmp_path: Path) -> None:
    folder = write_py(tmp_path)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, fh)
    with pytest.raises(CIFAR10Error, match="test_batch"):
        load_cifar10(tmp_path, train=False)


def test_missing_data_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(CIFAR10Error, match="cifar-10-batches-bin"):
        load_cifar10(tmp_path, train=True)


def test_missing_training_file_is_named(tmp_path: Path) -> None:
    folder = write_bin(tmp_path)
    (folder / "data_batch_5.bin").unlink()
    with pytest.raises(CIFAR10Error, match="data_batch_5.bin"):
        load_cifar10(tmp_path, train=True)


def test_download_failure_stops_with_a_message_naming_the_folder(tmp_path: Path) -> None:
    with pytest.raises(CIFAR10Error, match=f"not in {tmp_path}/ and could not be downloaded"):
        from torchode_adjoint.datasets.cifar10 import download_cifar10

        download_cifar10(tmp_path, url="file:///nonexistent/cifar-10-binary.tar.gz")
    assert not list(tmp_path.glob("*.part"))  # no partial file left behind


def test_augment_crops_within_the_padding_and_flips() -> None:
    img = torch.arange(32 * 32, dtype=torch.int64).view(1, 1, 32, 32).repeat(64, 3, 1, 1)
    out = augment(img, torch.Generator().manual_seed(0))
    assert out.shape == img.shape
    # Each output row is a (possibly reversed) contiguous run of an input row, or zero padding.
    for b in range(64):
        row = out[b, 0, 16]
        nz = row[row > 0]
        diffs = nz[1:] - nz[:-1]
        assert bool((diffs == 1).all()) or bool((diffs == -1).all())
    flipped = sum(int(out[b, 0, 16, 10] > out[b, 0, 16, 11]) for b in range(64))
    assert 10 < flipped < 54
    again = augment(img, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_normalize_maps_0_and_255_to_minus_one_and_one() -> None:
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).repeat(1, 3, 1, 1)
    y = normalize(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y[0, :, 0, 0], -torch.ones(3))
    torch.testing.assert_close(y[0, :, 0, 1], torch.ones(3))


def test_the_data_folder_is_the_argument_then_the_variable_then_the_cache(tmp_path, monkeypatch):
    from torchode_adjoint.datasets.cifar10 import DATA_ENV, data_dir_for

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(DATA_ENV, raising=False)
    cache = tmp_path / "cache" / "torchode_adjoint"
    assert data_dir_for(None) == (cache, "the default cache folder")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert data_dir_for(None) == (tmp_path / "env", f"${DATA_ENV}")
    assert data_dir_for(tmp_path / "given") == (tmp_path / "given", "--data-dir")


def test_missing_data_names_the_three_ways_to_give_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(CIFAR10Error) as info:
        load_cifar10(tmp_path / "empty", train=False)
    message = str(info.value)
    assert "\n" not in message
    for way in ("--data-dir DIR", "TORCHODE_ADJOINT_DATA=DIR", str(tmp_path / "cache")):
        assert way in message, message
