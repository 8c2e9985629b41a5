"""BatchNorm inside the dynamics: buffers untouched by the backward pass, gradients right."""

from __future__ import annotations

import pytest
import torch
from problems import ConvBNDynamics

from torchode_adjoint import GRADIENT_MODES, ODEBlock

D = torch.float64
# These tests put a plain BatchNorm in the dynamics on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::torchode_adjoint.TimeSharedStatisticsWarning")


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_buffers()}


@pytest.mark.parametrize("adjoint", GRADIENT_MODES)
@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_backward_pass_leaves_batchnorm_buffers_untouched(adjoint: str, solver: str) -> None:
    solver = solver
    f = ConvBNDynamics().double()
    block = ODEBlock(f, solver=solver, step=0.25, adjoint=adjoint)
    out = block(torch.randn(4, 3, 5, 5, dtype=D))
    after_forward = _buffers(f)
    # The forward pass updates the running statistics once per evaluation, as usual.
    assert int(after_forward["bn.num_batches_tracked"]) == block.nfe_forward
    out.square().sum().backward()
    for name, value in _buffers(f).items():
        torch.testing.assert_close(value, after_forward[name], rtol=0, atol=0, msg=name)
    assert f.bn.track_running_stats  # restored after the backward pass


def test_train_mode_adjoint_gradient_equals_backprop_gradient_with_batch_statistics() -> None:
    torch.manual_seed(0)
    f = ConvBNDynamics().double()
    y0 = torch.randn(4, 3, 5, 5, dtype=D)
    grads = []
    for adjoint in (True, False):
        f.zero_grad()
        ODEBlock(f, solver="rk4", step=0.05, adjoint=adjoint)(y0).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in f.parameters()]))
    # The conv bias has a zero gradient under BatchNorm: compare the whole gradient vector.
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-5


def test_eval_mode_uses_running_statistics_and_matches_backprop() -> None:
    f = ConvBNDynamics().double()
    f.bn.running_mean.uniform_(-0.5, 0.5)
    f.bn.running_var.uniform_(0.5, 2.0)
    f.eval()
    y0 = torch.randn(4, 3, 5, 5, dtype=D)
    before = _buffers(f)
    grads = []
    for adjoint in (True, False):
        f.zero_grad()
        ODEBlock(f, solver="rk4", step=0.05, adjoint=adjoint)(y0).sum().backward()
        grads.append([p.grad.clone() for p in f.parameters()])
    for name, value in _buffers(f).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    for a, b in zip(*grads):
        assert float((a - b).norm() / b.norm()) < 1e-5


@pytest.mark.parametrize(
    ("mode", "solver"),
    [("checkpoint", "rk4"), ("reversible", "rk4"), ("reversible", "reversible_heun")],
)
def test_exact_modes_leave_the_buffers_untouched_and_checkpoint_equals_backprop(mode, solver):
    torch.manual_seed(0)
    f = ConvBNDynamics().double()
    y0 = torch.randn(4, 3, 5, 5, dtype=D)
    block = ODEBlock(f, solver=solver, step=0.25, adjoint=mode)
    out = block(y0)
    before = {k: v.clone() for k, v in f.named_buffers()}
    out.square().sum().backward()
    for k, v in f.named_buffers():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    if mode == "checkpoint":
        g_mode = torch.cat([p.grad.flatten() for p in f.parameters()])
        f.zero_grad()
        ODEBlock(f, solver=solver, step=0.25, adjoint=False)(y0).square().sum().backward()
        g_bp = torch.cat([p.grad.flatten() for p in f.parameters()])
        assert _rel(g_mode, g_bp) < 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
