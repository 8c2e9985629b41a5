"""Dense output in the reversible mode: under error control its solves step past output times and
interpolate there, and its backward pass differentiates the interpolant.

The gradient's reference is autograd through the same forward pass (backprop through the coupled
method under the same error control, whose interpolant autograd differentiates), an independent
computation of the reversible mode's hand-written backward step; finite differences through the
mode's own forward with a fixed coupling.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from torchode_adjoint import Backprop, NFECounter, Reversible, check_gradients, odeint
from torchode_adjoint._prepare import make_config, prepare

D = torch.float64


class Field(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(0.6 * torch.randn(3, 16, generator=g, dtype=D))
        self.w2 = nn.Parameter(0.6 * torch.randn(16, 3, generator=g, dtype=D))
        self.b = nn.Parameter(0.1 * torch.randn(16, generator=g, dtype=D))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y @ self.w1 + self.b * torch.sin(2 * t)) @ self.w2 - 0.1 * y


def _backprop_through_the_scheme(f, y0, t, mode, **kwargs) -> torch.Tensor:
    """Backprop through the reversible mode's own method (the coupled pair under the same error
    control, dense output included), with the couplings the mode chooses as host numbers."""
    config = make_config(adjoint=mode, **kwargs)
    config = dataclasses.replace(config, mode=Backprop())
    return torch.stack([y0, *prepare(f, y0, t, config).solve()])


@pytest.mark.parametrize("solver", ["dopri5", "tsit5", "bosh3"])
@pytest.mark.parametrize("coupling", ["auto", 0.999])
def test_gradients_are_autograds_through_the_interpolated_solve(solver: str, coupling) -> None:
    torch.manual_seed(1)
    f = Field()
    y0 = torch.randn(4, 3, dtype=D, requires_grad=True)
    t = torch.linspace(0.0, 3.0, 40, dtype=D)
    mode = Reversible(coupling=coupling)
    kwargs = dict(solver=solver, rtol=1e-6, atol=1e-8)
    w = torch.randn(40, 4, 3, dtype=D)
    nfe = NFECounter()
    sol = odeint(f, y0, t, adjoint=mode, nfe=nfe, **kwargs)
    got = torch.autograd.grad((w * sol).sum(), [y0, *f.parameters()])
    ref_sol = _backprop_through_the_scheme(f, y0, t, mode, **kwargs)
    torch.testing.assert_close(sol.detach(), ref_sol.detach(), rtol=0, atol=1e-13)
    expected = torch.autograd.grad((w * ref_sol).sum(), [y0, *f.parameters()])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_dense_output_takes_far_fewer_steps_than_stepping_to_every_output_time() -> None:
    f = Field()
    y0 = torch.randn(4, 3, dtype=D)
    t = torch.linspace(0.0, 3.0, 101, dtype=D)
    counts = {}
    for dense in (True, False):
        nfe = NFECounter()
        with torch.no_grad():
            odeint(f, y0, t, solver="dopri5", rtol=1e-5, atol=1e-7, adjoint="reversible",
                   dense_output=dense, nfe=nfe)  # fmt: skip
        counts[dense] = nfe.forward
    assert counts[True] * 4 < counts[False], counts


def test_interpolated_outputs_are_as_accurate_as_the_steps() -> None:
    """Against a tight backprop solve: the interpolated outputs within the tolerance's reach."""
    f = Field()
    y0 = torch.randn(4, 3, dtype=D)
    t = torch.linspace(0.0, 3.0, 61, dtype=D)
    with torch.no_grad():
        truth = odeint(f, y0, t, solver="dopri5", rtol=1e-12, atol=1e-14, adjoint="backprop")
        ours = odeint(f, y0, t, solver="dopri5", rtol=1e-7, atol=1e-9, adjoint="reversible")
    assert float((ours - truth).abs().max()) < 1e-5


def test_gradients_with_the_training_path_and_the_inference_path_agree() -> None:
    """No gradient (inference) and a gradient pass take the same steps: same outputs."""
    f = Field()
    y0 = torch.randn(4, 3, dtype=D)
    t = torch.linspace(0.0, 2.0, 25, dtype=D)
    kwargs = dict(solver="dopri5", rtol=1e-6, atol=1e-8, adjoint="reversible")
    with torch.no_grad():
        inference = odeint(f, y0, t, **kwargs)
    training = odeint(f, y0.clone().requires_grad_(), t, **kwargs)
    torch.testing.assert_close(training.detach(), inference, rtol=0, atol=0)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_outputs_on_step_ends_and_inside_steps(reverse: bool) -> None:
    """``step_t`` makes a step end on the output time 1.0 (its gradient enters at a step's
    start) while the others are interpolated; reverse time too."""
    torch.manual_seed(2)
    f = Field()
    y0 = torch.randn(4, 3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.37, 0.8, 1.0, 1.55, 2.0], dtype=D)
    if reverse:
        t = t.flip(0)
    mode = Reversible()
    kwargs = dict(solver="dopri5", rtol=1e-6, atol=1e-8, step_t=[1.0])
    w = torch.randn(6, 4, 3, dtype=D)
    sol = odeint(f, y0, t, adjoint=mode, **kwargs)
    got = torch.autograd.grad((w * sol).sum(), [y0, *f.parameters()])
    ref = _backprop_through_the_scheme(f, y0, t, mode, **kwargs)
    expected = torch.autograd.grad((w * ref).sum(), [y0, *f.parameters()])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode", ["backprop", "checkpoint", "reversible"])
def test_check_gradients_passes_under_error_control(mode: str) -> None:
    """Its finite differences take the steps its gradient pass takes (ending on every output
    time, as with learnable times): they used to interpolate, and a mode's verdict was
    'suspicious' at the difference between the two discretisations (1e-6 to 1e-4)."""
    adjoint = Reversible(coupling=0.999) if mode == "reversible" else mode
    report = check_gradients(
        Field(), torch.randn(3, 3), torch.linspace(0.0, 1.5, 12), solver="dopri5",
        rtol=1e-7, atol=1e-9, adjoint=adjoint,
    )  # fmt: skip
    assert report.verdict == "pass", str(report)


def test_learnable_output_times_step_to_every_output_time() -> None:
    """With a gradient for ``t`` the steps end on every output time (as backprop's and the
    checkpointed mode's), and the time gradient is backprop's through the same scheme."""
    f = Field()
    y0 = torch.randn(4, 3, dtype=D, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=D, requires_grad=True)
    mode = Reversible()
    kwargs = dict(solver="dopri5", rtol=1e-6, atol=1e-8)
    sol = odeint(f, y0, t, adjoint=mode, **kwargs)
    got = torch.autograd.grad(sol.square().sum(), [y0, t])
    ref = _backprop_through_the_scheme(f, y0, t, mode, **kwargs)
    expected = torch.autograd.grad(ref.square().sum(), [y0, t])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
