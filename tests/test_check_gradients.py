"""check_gradients reports small errors for a correct mode and large ones for a wrong one."""

from __future__ import annotations

import pytest
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
    assert "vs reference" in text and "l1.weight" in text
    assert report.verdict == "pass" and text.endswith("verdict: pass")


def test_backprop_mode_agrees_with_finite_differences_to_high_precision() -> None:
    report = check_gradients(
        MLPDynamics(),
        torch.randn(4, 3),
        torch.tensor([0.0, 0.5, 1.0]),
        solver="midpoint",
        step=0.1,
        adjoint=False,
    )
    # Its reference is the checkpointed mode, another computation of the same exact gradient.
    assert "checkpointed" in report.reference
    assert 0.0 < report.max_rel_err_backprop < 1e-12
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


@pytest.mark.parametrize(
    ("solver", "method"),
    [("rk4", "rk4 made reversible (coupling 0.999)"), ("reversible_heun", "reversible_heun")],
)
def test_reversible_mode_is_checked_against_finite_differences_of_its_own_forward_pass(
    solver: str, method: str
) -> None:
    report = check_gradients(
        MLPDynamics(),
        torch.randn(4, 3),
        torch.tensor([0.0, 0.55, 1.03]),
        solver=solver,
        step=0.1,
        adjoint="reversible",
    )
    assert report.max_rel_err_fd < 1e-5
    # The reference is backprop through the reversible method itself: equal to round-off.
    assert report.max_rel_err_backprop < 1e-9
    assert report.verdict == "pass" and report.reference == f"backprop through {method}"


def test_a_gradient_that_is_zero_up_to_round_off_does_not_explode() -> None:
    from problems import ConvBNDynamics

    f = ConvBNDynamics()  # the conv bias has a zero gradient under the BatchNorm
    report = check_gradients(f, torch.randn(4, 3, 5, 5), step=0.25, adjoint="checkpoint")
    bias = next(c for c in report.checks if c.name == "conv.conv.bias")
    assert bias.rel_err_backprop < 1e-6 and bias.rel_err_fd < 1e-2
    assert report.verdict == "pass", str(report)


def test_the_adjoint_tolerance_is_its_measured_discretisation_error() -> None:
    fine = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="rk4", step=0.05)
    coarse = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="euler", step=0.5)
    assert fine.verdict == coarse.verdict == "pass"
    assert max(c.tolerance for c in coarse.checks) > 100 * max(c.tolerance for c in fine.checks)


def test_a_wrong_gradient_fails_the_check(monkeypatch) -> None:
    from torchode_adjoint import _adjoint

    original = _adjoint.accumulate_

    def halved(accs, grads, alpha=1.0):  # a broken parameter gradient: half of each term
        original(accs, grads, alpha=0.5 * alpha)

    monkeypatch.setattr(_adjoint, "accumulate_", halved)
    report = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="rk4", step=0.05)
    assert report.verdict == "fail"
    assert {c.name for c in report.checks if c.verdict == "fail"} >= {"l1.weight", "l2.bias"}


def test_an_error_in_the_dynamics_mid_check_leaves_the_users_tensors_bit_identical() -> None:
    # A function's tensors are the user's own (the function closes over them): the finite
    # differences perturb them in place and must put them back whatever happens.
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    before = w.detach().clone()
    calls = {"n": 0, "limit": None}

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["limit"] is not None and calls["n"] > calls["limit"]:
            raise RuntimeError("the dynamics failed")
        return torch.tanh(y @ w.T)

    kwargs = dict(solver="rk4", step=0.25, adjoint="checkpoint", params=[w])
    check_gradients(f, torch.randn(2, 3), **kwargs)
    total, calls["n"] = calls["n"], 0
    assert torch.equal(w.detach(), before)
    calls["limit"] = int(0.9 * total)  # fails inside the parameter's finite differences
    with pytest.raises(RuntimeError, match="the dynamics failed"):
        check_gradients(f, torch.randn(2, 3), **kwargs)
    assert torch.equal(w.detach(), before)


def test_a_float32_function_is_refused_with_the_reason() -> None:
    w = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"float64.*params\[0\]"):
        check_gradients(lambda t, y: y @ w.T, torch.randn(2, 3), params=[w], adjoint="checkpoint")


def test_the_adjoint_verdict_says_what_it_measured() -> None:
    report = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="euler", step=0.5)
    assert report.discretisation_error is not None and report.discretisation_error > 1e-3
    text = str(report)
    assert "halving the step changes the exact gradient by" in text
    assert f"{report.discretisation_error:.2%}" in text
    exact = check_gradients(MLPDynamics(), torch.randn(4, 3), solver="euler", adjoint=False)
    assert exact.discretisation_error is None and "exact mode" in str(exact)
