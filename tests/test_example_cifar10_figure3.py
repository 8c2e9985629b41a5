"""The Figure 3 script and the comparison's error-controlled ODE blocks, on small files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from cifar_files import write_bin

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_figure3_logs_every_iteration_and_tests_each_tolerance(tmp_path: Path) -> None:
    write_bin(tmp_path / "data", per_file=20, n_test=30)
    figure3 = _load("cifar10_figure3")
    argv = ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
            "--train-subset", "60", "--test-subset", "30", "--epochs", "2", "--batch-size",
            "20", "--lr", "0.003", "--rtol", "1e-2", "--test-rtol", "0.1", "1e-3",
            "--no-progress", "--threads", "1"]  # fmt: skip
    assert figure3.main(argv) == 0
    report = json.loads((tmp_path / "out" / "figure3.json").read_text())
    log, tests = report["iterations"], report["tests"]
    assert len(log) == 6 and {r["epoch"] for r in log} == {1, 2}
    assert all(r["nfe_forward"] > 0 and r["nfe_backward"] > 0 for r in log)
    # The untrained network's loss is the reference: training lowers it.
    assert log[-1]["loss"] < log[0]["loss"], [r["loss"] for r in log]
    assert [r["rtol"] for r in tests] == [0.1, 1e-3]
    assert tests[1]["logit_error"] == 0.0 < tests[0]["logit_error"]  # against the tightest
    assert tests[0]["nfe_forward"] < tests[1]["nfe_forward"]
    for name in ("figure3.md", "tests/results.csv", "checkpoint.pt"):
        assert (tmp_path / "out" / name).exists(), name
    # A resumed run trains nothing more and tests again.
    assert figure3.main([*argv, "--resume"]) == 0
    again = json.loads((tmp_path / "out" / "figure3.json").read_text())
    assert again["iterations"] == log


@pytest.mark.parametrize(("args", "name"), [(["--rtol", "0"], "--rtol"),
                                             (["--batch-size", "100", "--train-subset", "50"],
                                              "--batch-size")])  # fmt: skip
def test_figure3_names_a_bad_argument(args: list[str], name: str, capsys) -> None:
    with pytest.raises(SystemExit):
        _load("cifar10_figure3").main(args)
    assert name in capsys.readouterr().err


def test_the_comparison_trains_error_controlled_blocks(tmp_path: Path) -> None:
    write_bin(tmp_path / "data", per_file=20, n_test=30)
    compare = _load("cifar10_compare")
    argv = ["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"),
            "--models", "odenet@1.0", "--solver", "dopri5", "--rtol", "1e-2", "--norm", "group",
            "--gradient", "adjoint", "--epochs", "1", "--batch-size", "20", "--no-progress",
            "--threads", "1", "--no-download"]  # fmt: skip
    assert compare.main(argv) == 0
    (record,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["rtol"] == record["atol"] == 1e-2 and record["solver"] == "dopri5"
    assert record["nfe_forward"] > 0 and record["nfe_backward"] > 0
    assert "dopri5 (rtol 0.01, atol 0.01)" in (tmp_path / "out" / "results.md").read_text()


class _Payload:
    """Unpickling this writes a file: what a tampered checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_checkpoint_with_a_pickled_payload_is_refused_without_running_it(tmp_path: Path):
    import torch

    write_bin(tmp_path / "data", per_file=20, n_test=30)
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "marker.txt"
    torch.save({"config": {}, "log": [], "payload": _Payload(marker)}, out / "checkpoint.pt")
    argv = ["--data-dir", str(tmp_path / "data"), "--output-dir", str(out), "--train-subset",
            "20", "--test-subset", "30", "--epochs", "1", "--batch-size", "20", "--rtol", "1e-2",
            "--no-progress", "--threads", "1", "--resume"]  # fmt: skip
    with pytest.raises(SystemExit, match="checkpoint.pt holds objects other than tensors"):
        _load("cifar10_figure3").main(argv)
    assert not marker.exists()
