"""The CNF example: the exact trace, the planar flow's log-determinant, and the quick path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from torchode_adjoint.models.cnf import TARGETS, CNFDynamics, PlanarFlow

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "cnf_density.py"
D = torch.float64


def _example():
    spec = importlib.util.spec_from_file_location("cnf_density", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_the_cnf_trace_is_the_jacobians_trace() -> None:
    torch.manual_seed(0)
    dyn = CNFDynamics(8).double()
    z = torch.randn(5, 2, dtype=D)
    t = torch.tensor(0.3, dtype=D)
    _, minus_trace = dyn(t, (z, torch.zeros(5, dtype=D)))
    for i in range(5):
        jac = torch.autograd.functional.jacobian(
            lambda x: dyn(t, (x[None], torch.zeros(1, dtype=D)))[0][0], z[i]
        )
        assert torch.allclose(-minus_trace[i], torch.trace(jac), atol=1e-12)


def test_the_planar_log_determinant_is_the_jacobians() -> None:
    torch.manual_seed(0)
    flow = PlanarFlow(4).double()
    z = torch.randn(5, 2, dtype=D)
    _, logdet = flow(z)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda x: flow(x[None])[0][0], z[i])
        assert torch.allclose(logdet[i], torch.linalg.slogdet(jac)[1], atol=1e-10)


def test_the_targets_are_finite_energies() -> None:
    z = torch.randn(100, 2, dtype=D) * 3
    for name, energy in TARGETS.items():
        u = energy(z)
        assert u.shape == (100,) and bool(torch.isfinite(u).all()), name


def test_the_quick_path_writes_its_tables_and_both_losses_fall(tmp_path: Path) -> None:
    example = _example()
    argv = ["--widths", "2", "--iterations", "40", "--seeds", "0", "--targets", "ring",
            "--output-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    assert example.main(argv) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert {r["model"] for r in records} == {"cnf", "planar"}
    for r in records:
        # The untrained flow's loss is the reference: training must lower it.
        assert r["loss_last"] < r["loss_first"], r
    cnf = next(r for r in records if r["model"] == "cnf")
    assert cnf["nfe_forward"] > 0 and cnf["nfe_backward"] > 0
    assert "M = K = 2" in (tmp_path / "report.md").read_text()
    assert example.main([*argv, "--resume"]) == 0
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2


@pytest.mark.parametrize(("args", "message"), [(["--widths", "0"], "--widths"),
                                               (["--step", "0"], "--step")])  # fmt: skip
def test_bad_arguments_are_named(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        _example().main(args)
    assert message in capsys.readouterr().err


# --- maximum likelihood on samples, the Hutchinson trace, the gradient modes ----------------


def test_the_data_sets_are_seeded_and_have_their_shapes() -> None:
    from torchode_adjoint.datasets.toy2d import rings, two_moons

    a, b = two_moons(400, seed=1), two_moons(400, seed=1)
    assert a.shape == (400, 2) and torch.equal(a, b) and not torch.equal(a, two_moons(400))
    # Undo the centring and scaling: every point lies near one of the two unit half circles.
    x = a / 2.0 + torch.tensor([0.5, 0.25])
    upper = ((x.norm(dim=1) - 1).abs() < 0.25) & (x[:, 1] > -0.2)
    lower = (((x - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs() < 0.25) & (x[:, 1] < 0.7)
    assert bool((upper | lower).all()) and 150 < int(upper.sum()) < 250
    r = rings(3000, seed=0).norm(dim=1)
    for radius in (1.0, 2.0, 3.0):
        assert int(((r - radius).abs() < 0.3).sum()) > 300
    assert bool(((r - r.round()).abs() < 0.4).all())


def test_the_hutchinson_trace_averages_to_the_exact_one() -> None:
    torch.manual_seed(0)
    exact = CNFDynamics(8).double()
    estimator = CNFDynamics(8, trace="hutchinson").double()
    estimator.load_state_dict(exact.state_dict())
    z, t = torch.randn(3, 2, dtype=D), torch.tensor(0.3, dtype=D)
    minus_trace = exact(t, (z, torch.zeros(3, dtype=D)))[1].detach()
    gen = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(4000):
        estimator.draw_noise(z, generator=gen)
        draws.append(estimator(t, (z, torch.zeros(3, dtype=D)))[1].detach())
    mean, sd = torch.stack(draws).mean(0), torch.stack(draws).std(0)
    assert bool(((mean - minus_trace).abs() < 4 * sd / 4000**0.5 + 1e-12).all())
    assert float(sd.max()) > 0  # an estimate, not the exact trace again
    estimator.noise = None
    with pytest.raises(RuntimeError, match="draw_noise"):
        estimator(t, (z, torch.zeros(3, dtype=D)))


def test_a_data_points_log_density_inverts_a_samples() -> None:
    # Noise carried forwards to x with log q(x), then x carried back: the same log q(x).
    example = _example()
    args = example.parse_args(["--step", "0.01", "--solver", "rk4"])
    torch.manual_seed(0)
    dyn = CNFDynamics(4)
    from torchode_adjoint import NFECounter

    with torch.no_grad():
        x, logq = example.cnf_sample(dyn, 64, args, NFECounter())
        back = example.cnf_log_density(dyn, x, args, NFECounter())
    assert torch.allclose(back, logq, atol=1e-4), (back - logq).abs().max()


def test_maximum_likelihood_lowers_the_nll_and_draws_the_flow(tmp_path: Path) -> None:
    example = _example()
    argv = ["--task", "ml", "--data", "two_moons", "--widths", "4", "--iterations", "25",
            "--samples", "400", "--batch", "128", "--seeds", "0", "--trace", "hutchinson",
            "--output-dir", str(tmp_path), "--no-progress"]  # fmt: skip
    assert example.main(argv) == 0
    (record,) = json.loads((tmp_path / "results.json").read_text())
    # The untrained flow's NLL is the reference: training lowers it.
    assert record["loss_last"] < record["loss_first"] and record["trace"] == "hutchinson"
    assert record["nfe_forward"] > 0 and record["nfe_backward"] > 0
    assert "two_moons" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "ml_two_moons_M4_seed0.png").stat().st_size > 0


def test_every_gradient_mode_trains_the_same_cnf(tmp_path: Path) -> None:
    example = _example()
    argv = ["--compare-modes", "--widths", "2", "--targets", "ring", "--iterations", "3",
            "--batch", "64", "--seeds", "0", "--output-dir", str(tmp_path),
            "--no-progress"]  # fmt: skip
    assert example.main(argv) == 0
    rows = {r["adjoint"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(rows) == {"adjoint", "backprop", "checkpoint", "reversible"}
    # Same seed, same first batch: the same first loss in every mode (the gradients differ
    # only after it); backprop keeps the most for backward, the adjoint the least.
    firsts = [r["loss_first"] for r in rows.values()]
    assert max(firsts) - min(firsts) < 1e-5, firsts
    assert rows["backprop"]["saved_bytes"] > rows["checkpoint"]["saved_bytes"]
    assert rows["backprop"]["saved_bytes"] > rows["adjoint"]["saved_bytes"]
    assert rows["backprop"]["nfe_backward"] == 0 < rows["adjoint"]["nfe_backward"]
    assert "| reversible |" in (tmp_path / "modes.md").read_text()
