"""The latent ODE example on spirals: the data generator, and the script's quick path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from torchode_adjoint.datasets.spirals import make_spirals, observe
from torchode_adjoint.models.latent_ode import LatentODE, gaussian_elbo

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "latent_ode_spirals.py"


def _example():
    spec = importlib.util.spec_from_file_location("latent_ode_spirals", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_spirals_are_seeded_and_turn_both_ways() -> None:
    a, b = make_spirals(40, 100, seed=3), make_spirals(40, 100, seed=3)
    assert torch.equal(a.noisy, b.noisy) and a.clean.shape == (40, 100, 2)
    assert not torch.equal(make_spirals(40, 100, seed=4).clean, a.clean)
    # The sign of x v_y - y v_x (angular momentum) tells the turning direction.
    x, y = a.clean[..., 0], a.clean[..., 1]
    vx, vy = x.diff(dim=1), y.diff(dim=1)
    turning = (x[:, :-1] * vy - y[:, :-1] * vx).mean(dim=1)
    assert torch.equal(turning < 0, a.clockwise)
    assert 5 < int(a.clockwise.sum()) < 35
    noise = (a.noisy - a.clean).std()
    assert 0.08 < float(noise) < 0.12  # the default noise level, 0.1


def test_observed_times_are_drawn_without_replacement_and_sorted() -> None:
    idx = observe(50, 100, 30, seed=1)
    assert idx.shape == (50, 30)
    assert bool((idx.diff(dim=1) > 0).all())  # sorted, no repeats
    assert int(idx.min()) >= 0 and int(idx.max()) <= 99
    assert not torch.equal(idx[0], idx[1])
    with pytest.raises(ValueError, match="`n_obs` must be in 1..100"):
        observe(5, 100, 0)


def test_the_elbo_is_the_likelihood_plus_the_kl() -> None:
    pred, target = torch.zeros(2, 3, 2), torch.ones(2, 3, 2)
    mean, logvar = torch.zeros(2, 4), torch.zeros(2, 4)
    nll_only = gaussian_elbo(pred, target, None, None, 1.0)
    expected = 6 * (0.5 + 0.5 * torch.log(torch.tensor(2 * torch.pi)))
    assert torch.allclose(nll_only, expected)
    # A standard normal posterior adds no KL; a shifted mean adds |mean|^2 / 2.
    assert torch.allclose(gaussian_elbo(pred, target, mean, logvar, 1.0), nll_only)
    shifted = gaussian_elbo(pred, target, mean + 1.0, logvar, 1.0)
    assert torch.allclose(shifted - nll_only, torch.tensor(2.0))


@pytest.mark.parametrize("adjoint", ["adjoint", "checkpoint"])
def test_the_latent_ode_is_solved_by_odeint_in_each_mode(adjoint: str) -> None:
    from torchode_adjoint import odeint

    model = LatentODE()
    data = make_spirals(6, 20, seed=0)
    idx = observe(6, 20, 5, seed=0)
    times = data.times.expand(6, -1).gather(1, idx)
    values = data.noisy.gather(1, idx[..., None].expand(-1, -1, 2))

    def solve(dyn, z0, grid):
        return odeint(dyn, z0, grid, solver="dopri5", rtol=1e-3, atol=1e-4, adjoint=adjoint)

    pred, mean, logvar = model(times, values, data.times, solve)
    assert pred.shape == (6, 20, 2) and mean.shape == (6, 4)
    gaussian_elbo(pred, data.noisy, mean, logvar, 0.1).backward()
    assert all(p.grad is not None for p in model.dynamics.parameters())


def test_the_quick_path_writes_its_tables_and_the_loss_falls(tmp_path: Path) -> None:
    example = _example()
    argv = ["--spirals", "30", "--iterations", "12", "--n-obs", "10", "--seeds", "0",
            "--output-dir", str(tmp_path), "--no-progress", "--no-plot"]  # fmt: skip
    assert example.main(argv) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert {r["model"] for r in records} == {"latent_ode", "rnn"}
    for r in records:
        # The untrained model's loss is the reference: training must lower it.
        assert r["loss_last"] < r["loss_first"], r
        assert 0.0 < r["rmse"] < 5.0
    ode = next(r for r in records if r["model"] == "latent_ode")
    assert ode["nfe_forward_per_iter"] > 0 and ode["nfe_backward_per_iter"] > 0
    report = (tmp_path / "report.md").read_text()
    assert "0.1642" in report  # the paper's row beside ours
    assert (tmp_path / "results.csv").read_text().startswith("model,")
    # A resumed run finds both runs recorded and trains nothing more.
    assert example.main([*argv, "--resume"]) == 0
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--n-obs", "0"], "--n-obs"), (["--spirals", "3"], "--spirals"), (["--lr", "0"], "--lr")],
)
def test_bad_arguments_are_named(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        _example().main(args)
    assert message in capsys.readouterr().err


def test_every_gradient_mode_trains_the_same_latent_ode(tmp_path: Path) -> None:
    example = _example()
    argv = ["--compare-modes", "--spirals", "20", "--iterations", "2", "--n-obs", "10",
            "--seeds", "0", "--output-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    assert example.main(argv) == 0
    rows = {r["adjoint"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(rows) == {"adjoint", "backprop", "checkpoint", "reversible"}
    firsts = [r["loss_first"] for r in rows.values()]
    # One model, one first batch; the replaying modes step to every output time instead of
    # interpolating (dense output), a difference within the tolerance (rtol 1e-3).
    assert max(firsts) - min(firsts) < 1e-4 * abs(firsts[0]), firsts
    assert rows["backprop"]["saved_bytes"] > rows["adjoint"]["saved_bytes"] > 0
    assert rows["backprop"]["nfe_backward_per_iter"] == 0 < rows["adjoint"]["nfe_backward_per_iter"]
    assert "| checkpoint |" in (tmp_path / "modes.md").read_text()


def test_the_report_gives_a_spread_only_for_two_seeds_or_more(tmp_path: Path) -> None:
    def record(model: str, seed: int, rmse: float) -> dict:
        return {"model": model, "n_obs": 30, "seed": seed, "rmse": rmse,
                "train_s_per_iter": 0.01, "inference_s": 0.1, "nfe_forward_per_iter": None,
                "nfe_backward_per_iter": None}  # fmt: skip

    records = [record("rnn", 0, 0.2), record("latent_ode", 0, 0.15), record("latent_ode", 1, 0.16)]
    _example().write_reports(records, tmp_path, "test")
    report = (tmp_path / "report.md").read_text()
    rnn = next(line for line in report.splitlines() if line.startswith("| rnn | 0."))
    ode = next(line for line in report.splitlines() if line.startswith("| latent_ode | 0."))
    assert "0.2000 (n=1)" in rnn and "sd" not in rnn.split("|")[2]
    assert "0.1550 (sd 0.0071; n=2)" in ode


def test_solve_rows_hold_each_spirals_observations_after_its_start() -> None:
    from torchode_adjoint.datasets.spirals import solve_rows

    grid = torch.linspace(0.0, 2.0, 21)
    idx = observe(50, 21, 6, seed=3)
    idx[0] = torch.tensor([0, 2, 4, 6, 8, 10])  # one spiral observed at the start itself
    times = grid.expand(50, -1).gather(1, idx)
    rows, columns = solve_rows(times, 0.0, 0.1)
    assert rows.shape == (50, 7) and bool((rows.diff(dim=1) > 0).all())
    assert bool((rows[:, 0] == 0.0).all())
    assert torch.equal(rows.gather(1, columns), times)
    assert columns[0].tolist() == [0, 1, 2, 3, 4, 5] and rows[0, -1] == times[0, -1] + 0.1


@pytest.mark.parametrize("adjoint", ["backprop", "adjoint"])
def test_per_sample_times_train_the_latent_ode_at_each_spirals_own_times(
    tmp_path: Path, adjoint: str
) -> None:
    """The ELBO's predictions at the observations are the same whether the ODE is solved on
    the shared grid or at each spiral's own times (to the solver's tolerance); training runs."""
    from torchode_adjoint import odeint
    from torchode_adjoint.datasets.spirals import solve_rows

    model = LatentODE()
    data = make_spirals(8, 20, seed=1)
    idx = observe(8, 20, 5, seed=1)
    times = data.times.expand(8, -1).gather(1, idx)
    values = data.noisy.gather(1, idx[..., None].expand(-1, -1, 2))

    def solve(dyn, z0, grid):
        return odeint(dyn, z0, grid, solver="dopri5", rtol=1e-6, atol=1e-8, adjoint=adjoint)

    torch.manual_seed(0)
    shared, _, _ = model(times, values, data.times, solve, sample=False)
    rows, columns = solve_rows(times, 0.0, float(data.times[1]))
    own, _, _ = model(times, values, rows, solve, sample=False)
    at_shared = shared.gather(1, idx[..., None].expand(-1, -1, 2))
    at_own = own.gather(1, columns[..., None].expand(-1, -1, 2))
    torch.testing.assert_close(at_own, at_shared, rtol=1e-4, atol=1e-5)
    argv = ["--spirals", "20", "--iterations", "4", "--n-obs", "6", "--seeds", "0",
            "--models", "latent_ode", "--per-sample-times", "--adjoint", adjoint,
            "--output-dir", str(tmp_path), "--no-progress", "--no-plot"]  # fmt: skip
    assert _example().main(argv) == 0
    record = json.loads((tmp_path / "results.json").read_text())[0]
    assert record["training_times"] == "per-sample" and record["nfe_forward_per_iter"] > 0
