"""check_gradients reports small errors for a correct mode and large ones for a wrong one."""

from __future__ import annotations

import torch
from problems import MLPDynamics

from torchode_adjoint import GradientReport, ODEBlock, check_gradients


def test_report_for_a_block_has_one_row_per_input_and_small_errors() -> None:
    block = ODEBlock(MLPDynamics(), solver="rk4", step=0.05)
    report = check_gradients(block, torch.randn(4, 3))
    assert isinstance(report, GradientReport)
    assert [c.name for c in report.checks] == ["y0", "t"] + [
        n for n, _ in block.dynamics.named_parameters()
    ]
    assert report.mode == "adjoint" and report.solver == "rk4"
    assert report.max_rel_err_backprop < 1e-5
    assert report.max_rel_err_fd < 1e-4
    text = str(report)
    assert "vs backprop" in text and "l1.weight" in text


def test_backprop_mode_agrees_with_finite_differences_to_high_precision() -> None:
    report = check_gradients(
        MLPDynamics(),
        torch.randn(4, 3),
        torch.tensor([0.0, 0.5, 1.0]),
        solver="midpoint",
        step=0.1,
        adjoint=False,
    )
    assert report.max_rel_err_backprop == 0.0
    assert report.max_rel_err_fd < 1e-6


def test_coarse_euler_adjoint_shows_its_discretisation_error() -> None:
    report = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="euler", step=0.5)
    assert report.max_rel_err_backprop > 1e-3


def test_the_checked_module_is_left_untouched() -> None:
    f = MLPDynamics()
    before = {k: v.clone() for k, v in f.state_dict().items()}
    check_gradients(f, torch.randn(2, 3), step=0.25)
    for k, v in f.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_reversible_mode_is_checked_against_finite_differences_of_its_own_forward_pass() -> None:
    report = check_gradients(
        MLPDynamics(),
        torch.randn(4, 3),
        torch.tensor([0.0, 0.55, 1.03]),
        solver="heun",
        step=0.1,
        adjoint="reversible",
    )
    assert report.max_rel_err_fd < 1e-5
    # Plain Heun is another discretisation: the difference is visible but small.
    assert 1e-9 < report.max_rel_err_backprop < 1e-2
