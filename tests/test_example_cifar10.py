"""The CIFAR-10 comparison script end to end: real data, resume equivalence, DDP on 2 processes."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cifar_files import write_bin

from torchode_adjoint.datasets.cifar10 import data_dir_for, find_cifar10

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cifar10_compare.py"
# The documented rule without --data-dir: $TORCHODE_ADJOINT_DATA, else the default cache folder
# (this repository's CI points the variable at its shared copy).
REAL_DATA = data_dir_for(None)[0]


def _load_script():
    spec = importlib.util.spec_from_file_location("cifar10_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


compare = _load_script()


@pytest.mark.skipif(
    find_cifar10(REAL_DATA) is None,
    reason=f"CIFAR-10 not found at {REAL_DATA} (set TORCHODE_ADJOINT_DATA to a folder holding "
    "cifar-10-batches-bin/)",
)
def test_quick_comparison_runs_on_a_slice_of_the_real_data_and_writes_every_report(tmp_path):
    out = tmp_path / "out"
    rc = compare.main(
        [
            "--quick",
            "--data-dir",
            str(REAL_DATA),
            "--output-dir",
            str(out),
            "--train-subset",
            "1000",
            "--test-subset",
            "500",
            "--epochs",
            "1",
            "--batch-size",
            "100",
            "--no-progress",
        ]
    )
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in records] == ["resnet1", "odenet@0.5", "hybrid1@0.5"]
    required = {
        "model",
        "preset",
        "step",
        "params",
        "best_test_acc",
        "final_test_acc",
        "train_time_s",
        "test_time_s",
        "peak_memory_bytes",
        "nfe_forward",
        "nfe_backward",
        "epochs",
        "device",
        "history",
    }
    for r in records:
        assert required <= set(r)
        # Solver and gradient mode only where there is an ODE block.
        assert ({"solver", "gradient"} <= set(r)) == (r["model"] != "resnet1")
        assert 0.0 <= r["best_test_acc"] <= 100.0
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0
    assert records[1]["nfe_forward"] == 4 and records[1]["nfe_backward"] == 4  # 2 blocks x 2 steps
    assert records[0]["nfe_forward"] == 0
    for name in ("results.csv", "results.md", "curves.png"):
        assert (out / name).stat().st_size > 0
    assert "ResNet, 1 block" in (out / "results.md").read_text()


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir",
        str(data),
        "--output-dir",
        str(out),
        "--models",
        "odenet@0.5",
        "--epochs",
        "2",
        "--batch-size",
        "20",
        "--no-progress",
        *extra,
    ]


def test_resumed_run_gives_the_same_results_as_an_uninterrupted_one(tmp_path: Path) -> None:
    # One thread for both runs: `--threads auto` counts the idle cores at each start, and
    # another thread count changes the order of the reductions (a resumed run keeps its own,
    # tested below).
    write_bin(tmp_path / "data")
    compare.main(_args(tmp_path / "data", tmp_path / "a", "--threads", "1"))
    compare.main(_args(tmp_path / "data", tmp_path / "b", "--stop-after", "1", "--threads", "1"))
    run_b = next((tmp_path / "b").glob("*/checkpoint.pt")).parent
    assert not (run_b / "result.json").exists()
    assert torch.load(run_b / "checkpoint.pt", weights_only=True)["epoch"] == 1
    # Resumed with another count asked for: it goes on with the run's one thread.
    compare.main(_args(tmp_path / "data", tmp_path / "b", "--resume", "--threads", "2"))
    a = json.loads((tmp_path / "a" / "results.json").read_text())[0]
    b = json.loads((tmp_path / "b" / "results.json").read_text())[0]
    for key in ("best_test_acc", "final_test_acc"):
        assert a[key] == b[key]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    sa = torch.load(next((tmp_path / "a").glob("*/checkpoint.pt")), weights_only=True)
    sb = torch.load(run_b / "checkpoint.pt", weights_only=True)
    for key, value in sa["model"].items():
        # Bitwise, NaN equal to NaN (a temporal norm's unused time slots are NaN).
        torch.testing.assert_close(value, sb["model"][key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_no_temporary_files_are_left_after_a_run(tmp_path: Path) -> None:
    write_bin(tmp_path / "data")
    compare.main(_args(tmp_path / "data", tmp_path / "out", "--epochs", "1"))
    assert not list((tmp_path / "out").rglob("*.tmp*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_cpu_processes_matches_a_single_process_on_the_same_global_batch(tmp_path):
    write_bin(tmp_path / "data", per_file=16, n_test=10)  # 80 images: 2 steps of 40
    common = [
        "--data-dir",
        str(tmp_path / "data"),
        "--models",
        "odenet@0.5",
        "--epochs",
        "1",
        "--batch-size",
        "40",
        "--norm",
        "group",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(SCRIPT), *common, "--output-dir", str(tmp_path / "single")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            str(SCRIPT),
            *common,
            "--output-dir",
            str(tmp_path / "ddp"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    rec = json.loads((tmp_path / "ddp" / "results.json").read_text())[0]
    assert rec["world_size"] == 2
    sa = torch.load(next((tmp_path / "single").glob("*/checkpoint.pt")), weights_only=True)
    sb = torch.load(next((tmp_path / "ddp").glob("*/checkpoint.pt")), weights_only=True)
    initial = compare.build_model(compare.parse_model_spec("odenet@0.5"), norm="group")
    moved = 0
    for key, value in sa["model"].items():
        torch.testing.assert_close(sb["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        if value.is_floating_point() and not torch.equal(value, initial.state_dict()[key]):
            moved += 1
    assert moved > 0  # the comparison is between trained parameters


def test_measure_only_reports_memory_per_mode_without_training(tmp_path: Path) -> None:
    write_bin(tmp_path / "data")
    rc = compare.main(
        [
            "--data-dir",
            str(tmp_path / "data"),
            "--output-dir",
            str(tmp_path / "m"),
            "--measure-only",
            "--models",
            "resnet1",
            "odenet@0.1",
            "--gradient",
            "backprop",
            "adjoint",
            "checkpoint",
            "--batch-size",
            "20",
        ]
    )
    assert rc == 0
    rows = json.loads((tmp_path / "m" / "memory.json").read_text())
    assert [(r["model"], r.get("gradient")) for r in rows] == [
        ("resnet1", None),  # no ODE block: no gradient mode
        ("odenet@0.1", "backprop"),
        ("odenet@0.1", "adjoint"),
        ("odenet@0.1", "checkpoint"),
    ]
    saved = {r["gradient"]: r["saved_for_backward_bytes"] for r in rows[1:]}
    assert saved["adjoint"] < saved["checkpoint"] < saved["backprop"]
    assert not list((tmp_path / "m").glob("*/checkpoint.pt"))  # nothing was trained


def test_missing_data_stops_with_a_message_and_no_traceback(tmp_path: Path, capsys) -> None:
    rc = compare.main(["--data-dir", str(tmp_path / "none"), "--no-download", "--quick"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-bin" in err and "Traceback" not in err


def test_corrupt_data_stops_naming_the_file(tmp_path: Path, capsys) -> None:
    folder = write_bin(tmp_path / "data")
    (folder / "data_batch_4.bin").write_bytes(b"\x00" * 100)
    rc = compare.main(["--data-dir", str(tmp_path / "data"), "--no-download", "--quick"])
    assert rc == 2
    assert "data_batch_4.bin" in capsys.readouterr().err


def test_bn_statistics_diagnostic_reads_a_trained_run(tmp_path: Path) -> None:
    from benchmarks import bn_statistics

    write_bin(tmp_path / "data")
    compare.main(_args(tmp_path / "data", tmp_path / "out", "--epochs", "1"))
    run_dir = next((tmp_path / "out").glob("*/checkpoint.pt")).parent
    out = tmp_path / "bn.json"
    assert (
        bn_statistics.main(
            ["--data-dir", str(tmp_path / "data"), str(run_dir), "--output", str(out)]
        )
        == 0
    )
    (row,) = json.loads(out.read_text())
    assert row["epoch"] == 1
    for key in ("running_stats_acc", "batch_stats_acc"):
        assert 0.0 <= row[key] <= 100.0


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--solver", "rk5"], "--solver"),
        (["--models", "vgg16"], "--models"),
        (["--device", "cuda:7"], "--device"),
        (["--device", "nonsense"], "--device"),
        (["--epochs", "0"], "--epochs"),
        (["--threads", "0"], "--threads"),
        (["--rtol", "1e-3"], "--rtol"),  # euler has no error estimate
        (["--solver", "dopri5", "--rtol", "1e-3", "--norm", "temporal"], "--rtol"),
        (["--solver", "dopri5", "--rtol", "-1"], "--rtol"),
        (["--solver", "dopri5", "--atol", "1e-3"], "--atol"),
    ],
)
def test_a_bad_argument_exits_2_with_one_line_before_reading_any_data(tmp_path, args, names):
    import time

    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--data-dir",
            str(tmp_path / "no-data"),
            "--output-dir",
            str(tmp_path / "out"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {names}"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - start < 10


def test_an_output_dir_under_a_file_exits_2_naming_it(tmp_path) -> None:
    (tmp_path / "afile").write_text("")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--output-dir", str(tmp_path / "afile" / "sub")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: --output-dir"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_shows_the_defaults() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60
    )
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and "(default: ./runs/cifar10_compare)" in text


def test_a_run_is_quiet_says_where_results_go_and_what_it_resumed(tmp_path: Path) -> None:
    write_bin(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), *_args(tmp_path / "data", out, "--epochs", "1")]
    cmd += ["--models", "resnet1", "odenet@0.5"]
    first = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "Warning" not in first.stderr
    assert "profiler_st" not in first.stdout + first.stderr  # the profiler's native chatter
    assert f"results, checkpoints and plots go to {out.resolve()}/" in first.stdout
    assert "nothing to resume" in first.stdout
    written = first.stdout.strip().splitlines()[-1]
    assert written.startswith("wrote ")
    for path in written[len("wrote ") :].split(", "):
        assert Path(path).is_file(), path
    runs_ = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs_[1].startswith("resnet1-thesis-temporal-lr")  # no solver or gradient in its name
    second = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert "already finished" in second.stdout


def test_the_default_is_the_readmes_configuration_and_thesis_is_one_flag_away() -> None:
    # The Quickstart's main job trains what the README's Results table reports: temporal
    # BatchNorm in the dynamics and an exact gradient (checkpointed).
    quick = compare.parse_args(["--quick"])
    assert (quick.norm, quick.gradient) == ("temporal", ["checkpoint"])
    thesis = compare.parse_args(["--quick", "--thesis"])
    assert (thesis.norm, thesis.gradient) == ("batch", ["adjoint"])
    mixed = compare.parse_args(["--thesis", "--norm", "group"])  # an explicit flag wins
    assert (mixed.norm, mixed.gradient) == ("group", ["adjoint"])


def test_the_threads_help_says_what_auto_measures() -> None:
    from torchode_adjoint.measure import THREADS_HELP

    for command in ([str(SCRIPT)], ["-m", "benchmarks.run"]):
        proc = subprocess.run(
            [sys.executable, *command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert " ".join(THREADS_HELP.split()) in " ".join(proc.stdout.split()), command
    assert "/proc/stat" in THREADS_HELP


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path: Path, capsys) -> None:
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "runs"  # under a file: cannot be created
    rc = compare.main(["--data-dir", str(tmp_path / "none"), "--no-download", "--quick",
                       "--output-dir", str(bad)])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "--output-dir" in err and "Traceback" not in err
    # A writable one leaves no probe file behind.
    good = tmp_path / "runs"
    compare.main(["--data-dir", str(tmp_path / "none"), "--no-download", "--quick",
                  "--output-dir", str(good)])  # fmt: skip
    assert good.is_dir() and not list(good.glob(".write-test*"))
