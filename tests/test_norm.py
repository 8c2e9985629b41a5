"""A user's norm of the error estimate (``PIController(norm=)``, ``ContinuousAdjoint(norm=f)``),
checked against solves whose outcome is known independently: a norm scaled by ten is the
default norm at tolerances ten times smaller; a norm that reads one part of a structured state
is that part solved alone; the RMS over every group is the adjoint's full norm."""

from __future__ import annotations

import pytest
import torch

from torchode_adjoint import ContinuousAdjoint, NFECounter, PIController, odeint

D = torch.float64
T = torch.tensor([0.0, 0.7, 2.0], dtype=D)
_A = torch.tensor([[-0.1, 1.0], [-1.0, -0.1]], dtype=D)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.square().mean().sqrt()


def _oscillator(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y @ _A + torch.sin(3 * t)


def _solve(func, y0, rtol, atol, norm=None, first_step=None, **kwargs):
    nfe = NFECounter()
    controller = PIController(norm=norm, first_step=first_step)
    out = odeint(func, y0, T, solver="dopri5", rtol=rtol, atol=atol, controller=controller,
                 params=(), nfe=nfe, **kwargs)  # fmt: skip
    return out, (nfe.forward, nfe.accepted, nfe.rejected)


@pytest.mark.parametrize("adjoint", [False, "checkpoint", "reversible"])
def test_a_norm_ten_times_the_rms_is_the_rms_at_a_tenth_of_the_tolerances(adjoint) -> None:
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=D)
    mine, nfe = _solve(_oscillator, y0, 1e-5, 1e-7, lambda e: 10 * _rms(e), adjoint=adjoint)
    reference, nfe_ref = _solve(_oscillator, y0, 1e-6, 1e-8, adjoint=adjoint)
    loose, nfe_loose = _solve(_oscillator, y0, 1e-5, 1e-7, adjoint=adjoint)
    assert nfe == nfe_ref and nfe[0] > nfe_loose[0]  # the norm steered the steps
    torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(mine, loose, rtol=1e-12, atol=1e-12)


def test_the_norm_gets_the_state_scaled_by_the_tolerances() -> None:
    y0 = torch.tensor([3.0, -1.0], dtype=D)
    seen: list[torch.Tensor] = []

    def norm(scaled: torch.Tensor) -> torch.Tensor:
        seen.append(scaled.clone())
        return scaled.abs().max()

    _solve(_oscillator, y0, 1e-4, 1e-6, norm, adjoint=False)
    # The first call is the first step's size: y0 / (atol + rtol |y0|) (Hairer's algorithm).
    torch.testing.assert_close(seen[0], y0 / (1e-6 + 1e-4 * y0.abs()), rtol=1e-15, atol=0)
    assert len(seen) > 4 and all(s.shape == y0.shape for s in seen)


def test_a_norm_of_one_part_is_that_part_solved_alone() -> None:
    def parts(t, y):
        return {"u": _oscillator(t, y["u"]), "v": -50.0 * y["v"] * torch.cos(t)}

    y0 = {"u": torch.tensor([1.0, 0.5], dtype=D), "v": torch.ones(3, 2, dtype=D)}
    shapes: list[tuple] = []

    def norm(scaled: dict) -> torch.Tensor:
        shapes.append((tuple(scaled), tuple(scaled["u"].shape), tuple(scaled["v"].shape)))
        return _rms(scaled["u"])

    both, _ = _solve(parts, y0, 1e-6, 1e-8, norm, adjoint=False)
    alone, _ = _solve(_oscillator, y0["u"], 1e-6, 1e-8, adjoint=False)
    assert set(shapes) == {(("u", "v"), (2,), (3, 2))}
    torch.testing.assert_close(both["u"], alone, rtol=1e-13, atol=1e-13)
    default, _ = _solve(parts, y0, 1e-6, 1e-8, adjoint=False)  # the stiffer part counts there
    assert not torch.allclose(default["u"], alone, rtol=1e-12, atol=1e-12)


def test_a_norm_with_tolerances_per_part_scales_each_part_by_its_own() -> None:
    def parts(t, y):
        return (_oscillator(t, y[0]), -2.0 * y[1])

    y0 = (torch.tensor([1.0, 0.5], dtype=D), torch.tensor([2.0], dtype=D))
    rtol, atol = (1e-6, 1e-3), (1e-8, 1e-5)

    def mixed(scaled: tuple) -> torch.Tensor:  # the default: the largest part's RMS
        return torch.maximum(_rms(scaled[0]), _rms(scaled[1]))

    # The first step given: Hairer's algorithm takes the default norm over the whole state.
    mine, nfe = _solve(parts, y0, rtol, atol, mixed, 0.01, adjoint=False)
    reference, nfe_ref = _solve(parts, y0, rtol, atol, None, 0.01, adjoint=False)
    assert nfe == nfe_ref
    for a, b in zip(mine, reference):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


class _Decay(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.7, -0.3], dtype=D))
        self.b = torch.nn.Parameter(torch.tensor(0.2, dtype=D))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.w * y + self.b * torch.sin(t)


def _adjoint_gradients(mode: ContinuousAdjoint, norm=None, rtol=1e-6, atol=1e-8):
    func, nfe = _Decay(), NFECounter()
    y0 = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    controller = None if norm is None else PIController(norm=norm)
    out = odeint(func, y0, T, solver="dopri5", rtol=rtol, atol=atol, adjoint=mode,
                 controller=controller, nfe=nfe)  # fmt: skip
    out.square().sum().backward()
    return (y0.grad, func.w.grad, func.b.grad), nfe.backward


def _same(a, b) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_the_adjoints_norm_gets_every_group_and_can_be_the_full_norm_or_the_seminorm() -> None:
    groups: list[tuple] = []

    def full(scaled: tuple) -> torch.Tensor:
        groups.append(tuple(tuple(s.shape) for s in scaled))
        return torch.stack([_rms(s) for s in scaled]).max()

    def semi(scaled: tuple) -> torch.Tensor:
        return torch.maximum(_rms(scaled[0]), _rms(scaled[1]))

    mine_full, nfe_full = _adjoint_gradients(ContinuousAdjoint(norm=full))
    ref_full, nfe_ref_full = _adjoint_gradients(ContinuousAdjoint(norm="full"))
    mine_semi, nfe_semi = _adjoint_gradients(ContinuousAdjoint(norm=semi))
    ref_semi, nfe_ref_semi = _adjoint_gradients(ContinuousAdjoint(norm="seminorm"))
    assert set(groups) == {((2,), (2,), (), (2,), ())}  # y, a, g_t, g_w, g_b
    assert (nfe_full, nfe_semi) == (nfe_ref_full, nfe_ref_semi)
    assert nfe_full > nfe_semi  # the two norms took different steps
    _same(mine_full, ref_full)
    _same(mine_semi, ref_semi)


def test_the_forward_norm_measures_the_state_and_adjoint_of_the_backward_pass() -> None:
    mine, nfe = _adjoint_gradients(ContinuousAdjoint(), lambda e: 10 * _rms(e))
    reference, nfe_ref = _adjoint_gradients(ContinuousAdjoint(), rtol=1e-7, atol=1e-9)
    loose, nfe_loose = _adjoint_gradients(ContinuousAdjoint())
    assert nfe == nfe_ref > nfe_loose
    _same(mine, reference)


@pytest.mark.parametrize(
    "norm, error, message",
    [
        (lambda e: e.abs(), ValueError, r"`PIController\(norm=...\)` must return one real number"),
        (lambda e: "big", ValueError, r"`PIController\(norm=...\)` must return one real number"),
    ],
)
def test_a_norm_that_returns_no_number_is_named(norm, error, message) -> None:
    with pytest.raises(error, match=message):
        _solve(_oscillator, torch.tensor([1.0, 2.0], dtype=D), 1e-6, 1e-8, norm, adjoint=False)


def test_a_norm_that_is_not_a_function_is_named() -> None:
    with pytest.raises(TypeError, match=r"`PIController\(norm=...\)` must be a function"):
        PIController(norm="rms")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`ContinuousAdjoint\(norm=...\)` must be 'seminorm'"):
        ContinuousAdjoint(norm="max")


def test_an_adjoint_norm_that_returns_no_number_is_named() -> None:
    with pytest.raises(ValueError, match=r"`ContinuousAdjoint\(norm=...\)` must return one"):
        _adjoint_gradients(ContinuousAdjoint(norm=lambda groups: groups[0]))


@pytest.mark.parametrize(
    "mode", [ContinuousAdjoint(rtol=1e-3), ContinuousAdjoint(norm=lambda groups: groups[0])]
)
def test_the_adjoints_own_error_control_is_refused_where_its_steps_are_fixed(mode) -> None:
    from torchode_adjoint import odeint_event

    y0 = torch.tensor([1.0, 2.0], dtype=D)
    with pytest.raises(ValueError, match=r"`ContinuousAdjoint\((rtol|norm)=...\)` sets the back"):
        odeint(_Decay(), y0, T, solver="rk4", step=0.1, adjoint=mode)
    with pytest.raises(ValueError, match=r"which odeint_event does not take"):
        odeint_event(_Decay(), y0, T[0], event_fn=lambda t, y: y[0] - 0.5, solver="dopri5",
                     rtol=1e-6, atol=1e-8, adjoint=mode)  # fmt: skip
