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
