"""The benchmark suite's machinery on a tiny workload: timings, memory, NFE and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import report, run
from benchmarks.timing import alternating_medians
from benchmarks.workloads import Oscillator, mlp_workload


def test_alternating_medians_runs_every_candidate_in_turn() -> None:
    order: list[str] = []
    medians = alternating_medians(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1
    )
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())


def test_oscillator_closed_form_matches_a_fine_numerical_solution() -> None:
    from torchode_adjoint import odeint

    osc = Oscillator().double()
    sol = odeint(
        osc,
        torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        torch.tensor([0.0, 2.0], dtype=torch.float64),
        solver="rk4",
        step=1e-3,
    )
    torch.testing.assert_close(
        sol[-1, 0],
        torch.tensor(osc.exact(2.0, (1.0, 0.0)), dtype=torch.float64),
        rtol=1e-9,
        atol=1e-9,
    )


def test_speed_rows_report_memory_growth_and_nfe_for_every_mode(tmp_path: Path) -> None:
    w = mlp_workload(batch=8, dim=2)
    rows = run.bench_speed(w, ["heun"], [2, 8], repeats=1)
    assert [r["steps"] for r in rows] == [2, 8]
    for r in rows:
        assert set(run.modes_for("heun")) == {
            k[5:] for k in r["saved_bytes"] if k.startswith("ours_")
        }
        assert r["nfe"]["ours_adjoint"] == (2 * r["steps"], 2 * r["steps"])
    assert rows[0]["saved_bytes"]["ours_adjoint"] == rows[1]["saved_bytes"]["ours_adjoint"]
    assert rows[1]["saved_bytes"]["ours_backprop"] > rows[0]["saved_bytes"]["ours_backprop"]
    results = {
        "machine": "test",
        "command": "test",
        "torchdiffeq": None,
        "wall_s": 0.0,
        "workloads": {w.name: w.title},
        "speed": rows,
        "gradients": run.bench_gradients(["heun"], [4]),
        "accuracy": run.bench_accuracy(["euler"], [50, 100]),
    }
    report.write_report(json.loads(json.dumps(results)), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Targets" in text and "ours_reversible" in text
    assert all(r["time_s"]["vjp_floor"] > 0 for r in rows)
    assert "physical floor" in text


def test_target_checks_compare_the_median_with_the_bound() -> None:
    rows = [
        {
            "workload": "mlp",
            "time_s": {
                "ours_adjoint": a,
                "tdq_adjoint": 1.0,
                "ours_backprop": 1.0,
                "ours_forward": 1.0,
                "floor": 1.0,
                "vjp_floor": 0.1,
            },
        }
        for a in (0.5, 0.6, 0.9)
    ]
    checks = {c["target"]: c for c in report.target_checks(rows)}
    adj = next(c for name, c in checks.items() if "torchdiffeq" in name)
    assert adj["median"] == 0.6 and adj["worst"] == 0.9 and adj["met"]
    assert adj["floor"] == 1.1  # (floor + vjp floor) / torchdiffeq


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["--device", "cuda:3"], "--device"),
        (["--threads", "0"], "--threads"),
        (["--compile-steps", "0"], "--compile-steps"),
    ],
)
def test_a_bad_benchmark_argument_exits_2_with_one_line(tmp_path, args, name) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--output-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {name}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_default_output_folder_is_ignored_by_git(capsys) -> None:
    with pytest.raises(SystemExit):
        run.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/benchmarks)" in text
    root = Path(__file__).resolve().parents[1]
    assert "runs/" in (root / ".gitignore").read_text().split()


def test_the_compiled_targets_take_the_median_and_worst_ratio_per_workload() -> None:
    def row(workload: str, adj: float, fwd: float) -> dict:
        return {
            "workload": workload,
            "time_s": {
                "ours_adjoint_compiled": adj,
                "tdq_adjoint": 1.0,
                "ours_forward_compiled": fwd,
                "floor": 2.0,
            },
        }

    rows = [
        row("mlp", 0.3, 0.6),
        row("mlp", 0.5, 1.0),
        row("mlp", 0.2, 2.0),
        row("conv8", 0.9, 1.0),
    ]
    checks = {c["target"]: c for c in report.compiled_checks(rows)}
    mlp_adj = next(c for name, c in checks.items() if name.startswith("MLP adjoint"))
    assert (mlp_adj["median"], mlp_adj["worst"], mlp_adj["met"]) == (0.3, 0.5, True)
    mlp_fwd = next(c for name, c in checks.items() if name.startswith("MLP forward"))
    assert (mlp_fwd["median"], mlp_fwd["worst"], mlp_fwd["met"]) == (0.5, 1.0, True)
    conv = next(c for name, c in checks.items() if name.startswith("conv"))
    assert (conv["median"], conv["met"]) == (0.9, False)


def test_the_bookkeeping_benchmark_measures_each_mode_with_and_without_the_check(tmp_path):
    from benchmarks import bookkeeping

    assert bookkeeping.main(["--repeats", "1", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["workload"], r["mode"]) for r in results["steps"]}
    assert rows == {
        (w, m) for w in ("mlp", "conv8") for m in ("adjoint", "checkpoint", "reversible")
    }
    for p in results["parts"].values():
        assert p["tensors_read"] >= 4 and p["per_solve_s"] >= 0  # weights and biases at least
    assert "share of the fastest step" in (tmp_path / "report.md").read_text()


def test_the_bookkeeping_switch_turns_the_check_off_and_back_on():
    # The benchmark's "without" rows must really run without the check, and restore it.
    from benchmarks.bookkeeping import bookkeeping_off
    from torchode_adjoint import odeint

    w = torch.ones(2, requires_grad=True)
    e = torch.ones(2)

    def solve():
        return odeint(lambda t, y: -w * y * e, torch.ones(2), [0.0, 1.0], adjoint=True, params=[w])

    with bookkeeping_off():
        y = solve()
        e.add_(1.0)
        y.sum().backward()  # no check: no error
    y = solve()
    e.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_the_three_torchdiffeq_ports_run_both_libraries(tmp_path, capsys):
    pytest.importorskip("torchdiffeq", reason="the bench extra is not installed")
    import json

    from benchmarks import ports

    assert ports.main(["--quick", "--threads", "1", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["workload"] for r in rows] == ["ode_demo", "latent_ode", "cnf"]
    for r in rows:
        assert set(r["ms"]) == {"torchdiffeq backprop", "ours backprop", "torchdiffeq adjoint",
                                "ours adjoint"}  # fmt: skip
        assert all(v > 0 for v in r["ms"].values())
        assert f"{r['workload']:>10} ours / torchdiffeq: backprop" in out
    assert "| latent_ode |" in (tmp_path / "report.md").read_text()


def test_the_ports_solve_the_same_problem_with_both_libraries():
    # The ported calls agree with torchdiffeq's (same model, same data, same tolerances): a
    # port that changed the problem would time something else.
    td = pytest.importorskip("torchdiffeq", reason="the bench extra is not installed")
    import torch

    from benchmarks import ports
    from torchode_adjoint.models.cnf import CNFDynamics
    from torchode_adjoint.models.latent_ode import LatentDynamics

    torch.manual_seed(0)
    cases = {
        "ode_demo": (ports.CubicMLP(), torch.tensor([[2.0, 0.0]]), torch.linspace(0.0, 1.0, 5)),
        "latent_ode": (LatentDynamics(), torch.randn(8, 4), torch.linspace(0.0, 2.0, 20)),
        "cnf": (CNFDynamics(8), (torch.randn(16, 2), torch.zeros(16)), torch.tensor([1.0, 0.0])),
    }
    for name, (f, y0, t) in cases.items():
        variants, _ = ports.WORKLOADS[name](td, True)
        for kind in ("backprop", "adjoint"):
            with torch.no_grad():
                theirs = variants[f"torchdiffeq {kind}"].solve(f, y0, t)
                ours = variants[f"ours {kind}"].solve(f, y0, t)
            # Within 100 times the solves' tolerances (a changed problem differs at order 1).
            tol = 1e-3 if name == "cnf" else 1e-4
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


def test_the_launch_bound_benchmark_reports_every_mode_against_a_bare_loop(tmp_path):
    from benchmarks import launch_bound

    assert launch_bound.main(["--repeats", "1", "--output-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for solver in ("euler", "rk4"):
        times = results["times"][solver]
        for mode in launch_bound.MODES:
            assert times[f"{mode}_step"] > 0 and times[f"{mode}_forward"] > 0
        assert times["bare_step"] > 0 and times["vjp_floor"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| adjoint |" in report and "bare loop, backprop" in report


def test_the_bare_loop_is_the_same_scheme_as_the_library():
    # The bare loop is a reference only if it computes what the library computes.
    from benchmarks.launch_bound import STEPS, Linear, _bare_loop
    from torchode_adjoint import odeint

    f = Linear().double()
    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    for solver in ("euler", "rk4"):
        ours = odeint(f, y0, [0.0, 1.0], solver=solver, step=1.0 / STEPS, adjoint=False)[-1]
        torch.testing.assert_close(_bare_loop(f, y0, solver), ours, rtol=1e-12, atol=1e-12)


def test_the_adaptive_workloads_benchmark_reports_every_mode(tmp_path):
    from benchmarks import adaptive_workloads

    assert adaptive_workloads.main(["--workloads", "cnf", "--repeats", "1",
                                    "--output-dir", str(tmp_path)]) == 0  # fmt: skip
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["results"]["cnf"]["rows"]
    for mode in ("backprop", "adjoint", "checkpoint", "reversible"):
        assert rows[f"ours {mode}"]["median_s"] > 0 and rows[f"ours {mode}"]["nfe_forward"] > 0
    assert rows["ours backprop"]["nfe_backward"] == 0 < rows["ours adjoint"]["nfe_backward"]
    assert "## CNF, 32 units" in (tmp_path / "report.md").read_text()


def test_the_speed_comparison_times_every_workload_once_each() -> None:
    from benchmarks import speed_against

    times = speed_against.measure(1)
    assert set(times) == set(speed_against.workloads())
    assert all(0.0 < ms < 60_000.0 for ms in times.values()), times


def test_the_per_sample_benchmark_counts_every_candidate(tmp_path):
    from benchmarks import per_sample

    per_sample.main(["--batch", "8", "--repeats", "1", "--threads", "1",
                     "--output-dir", str(tmp_path)])  # fmt: skip
    result = json.loads((tmp_path / "results.json").read_text())
    for case in result["cases"]:
        rows = case["rows"]
        shared, own = rows["shared t (one norm)"], rows["per-sample t"]
        # One shared norm steps every sample as the stiffest; per-sample steps are fewer.
        assert shared["steps sum"] == 8 * shared["steps max"] > own["steps sum"]
        assert own["forward s"] > 0 and own["backprop s"] > 0 and own["checkpoint s"] > 0
    assert "## linear system" in (tmp_path / "report.md").read_text()
