"""TemporalBatchNorm: running statistics per evaluation time, exact at stage times."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torchode_adjoint import (
    GRADIENT_MODES,
    ConcatConv2d,
    ODEBlock,
    TemporalBatchNorm1d,
    TemporalBatchNorm2d,
    TimeSharedStatisticsWarning,
    check_gradients,
    odeint,
)

D = torch.float64


def _t(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=D)


def test_with_one_time_it_equals_batchnorm_in_training_and_eval() -> None:
    temporal, plain = TemporalBatchNorm2d(4).double(), nn.BatchNorm2d(4).double()
    with torch.no_grad():
        temporal.weight.uniform_(0.5, 2.0)
        temporal.bias.uniform_(-1.0, 1.0)
        plain.load_state_dict({"weight": temporal.weight, "bias": temporal.bias}, strict=False)
    for i in range(6):
        x = torch.randn(8, 4, 3, 3, dtype=D) * (i + 1) + i
        torch.testing.assert_close(temporal(_t(0.3), x), plain(x), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(temporal.running_mean[0], plain.running_mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(temporal.running_var[0], plain.running_var, rtol=1e-14, atol=0)
    assert temporal.recorded_times() == [pytest.approx(0.3)]
    temporal.eval(), plain.eval()
    x = torch.randn(8, 4, 3, 3, dtype=D)
    # Every eval time, recorded or not, uses the only statistics there are.
    for t in (0.3, 0.0, 1.0):
        torch.testing.assert_close(temporal(_t(t), x), plain(x), rtol=1e-14, atol=1e-14)


def _trained_at_two_times(momentum: float = 0.1) -> tuple[TemporalBatchNorm1d, dict]:
    """The layer trained at t = 0 and t = 0.5 with different distributions, beside one
    nn.BatchNorm1d per time fed only that time's batches (the independent reference)."""
    norm = TemporalBatchNorm1d(3, momentum=momentum).double()
    refs = {
        0.0: nn.BatchNorm1d(3, momentum=momentum).double(),
        0.5: nn.BatchNorm1d(3, momentum=momentum).double(),
    }
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for t, (scale, shift) in ((0.0, (1.0, 0.0)), (0.5, (3.0, 2.0))):
            x = torch.randn(16, 3, generator=gen, dtype=D) * scale + shift
            norm(_t(t), x)
            refs[t](x)
    return norm.eval(), refs


def test_eval_at_a_trained_time_uses_that_times_statistics_exactly() -> None:
    norm, refs = _trained_at_two_times()
    x = torch.randn(10, 3, dtype=D)
    for t, ref in refs.items():
        ref.eval()
        torch.testing.assert_close(norm(_t(t), x), ref(x), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("t, w", [(0.25, 0.5), (0.1, 0.2), (0.4, 0.8)])
def test_eval_between_two_times_interpolates_the_statistics_linearly(t: float, w: float) -> None:
    norm, refs = _trained_at_two_times()
    mean = (1 - w) * refs[0.0].running_mean + w * refs[0.5].running_mean
    var = (1 - w) * refs[0.0].running_var + w * refs[0.5].running_var
    x = torch.randn(10, 3, dtype=D)
    expected = F.batch_norm(x, mean, var, norm.weight, norm.bias, False, 0.0, norm.eps)
    torch.testing.assert_close(norm(_t(t), x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t, nearest", [(-1.0, 0.0), (0.9, 0.5)])
def test_eval_outside_the_recorded_times_uses_the_nearest(t: float, nearest: float) -> None:
    norm, refs = _trained_at_two_times()
    x = torch.randn(10, 3, dtype=D)
    ref = refs[nearest].eval()
    torch.testing.assert_close(norm(_t(t), x), ref(x), rtol=1e-14, atol=1e-14)


def test_a_full_table_updates_the_neighbours_of_a_new_time_by_interpolation() -> None:
    norm = TemporalBatchNorm1d(2, max_times=2, momentum=1.0).double()
    norm(_t(0.0), torch.zeros(4, 2, dtype=D))
    norm(_t(1.0), torch.zeros(4, 2, dtype=D))
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=D)  # mean (2, 4)
    norm(_t(0.25), x)  # weights 0.75 on t=0 and 0.25 on t=1, momentum 1
    assert norm.recorded_times() == [0.0, 1.0]
    by_time = dict(zip(norm.times.tolist(), norm.running_mean.tolist()))
    torch.testing.assert_close(torch.tensor(by_time[0.0]), torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(torch.tensor(by_time[1.0]), torch.tensor([0.5, 1.0]))


class _DriftDynamics(nn.Module):
    """dy/dt = drift + 0 * norm(t, y): the state's mean moves with time; the norm is read off."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.seen: list[torch.Tensor] = []

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.norm(t, y) if isinstance(self.norm, TemporalBatchNorm1d) else self.norm(y)
        self.seen.append(z.detach())
        return torch.full_like(y, 3.0) + 0.0 * z


@pytest.mark.parametrize("temporal", [True, False])
def test_eval_normalises_each_time_like_training_when_the_distribution_moves_in_time(
    temporal: bool,
) -> None:
    # With momentum 1 the running statistics are the last batch's, so eval on the training batch
    # must reproduce training's normalised values at every stage time: true with statistics per
    # time, false with one set shared by all times (plain BatchNorm, the control).
    norm = TemporalBatchNorm1d(2, momentum=1.0) if temporal else nn.BatchNorm1d(2, momentum=1.0)
    f = _DriftDynamics(norm).double()
    y0 = torch.randn(4000, 2, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TimeSharedStatisticsWarning)
        block = ODEBlock(f, solver="rk4", step=0.25, adjoint="backprop")
    block(y0)
    trained = f.seen[:]
    f.seen.clear()
    block.eval()(y0)
    worst = max(float((a - b).abs().max()) for a, b in zip(trained, f.seen))
    # Unbiased (running) against biased (batch) variance: a relative 1/8000 at most.
    if temporal:
        assert worst < 1e-3
    else:
        assert worst > 1.0


class _TemporalConvDynamics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # No conv bias: a norm cancels it, and its zero gradient has no relative error.
        self.conv = ConcatConv2d(3, 3, 3, padding=1, bias=False)
        self.inner = nn.Sequential(nn.Identity())  # the norm sits one level down
        self.inner.add_module("norm", TemporalBatchNorm2d(3))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.inner.norm(t, self.conv(t, y)))


def _mode_kwargs(mode: str) -> dict:
    return {"adjoint": mode, "solver": "rk4"}


@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_backward_of_every_mode_leaves_the_temporal_buffers_untouched(mode: str) -> None:
    f = _TemporalConvDynamics().double()
    block = ODEBlock(f, step=0.25, **_mode_kwargs(mode))
    out = block(torch.randn(4, 3, 5, 5, dtype=D))
    after_forward = {k: v.clone() for k, v in f.named_buffers()}
    assert int(f.inner.norm.num_batches_tracked.sum()) == block.nfe_forward
    out.square().sum().backward()
    for name, value in f.named_buffers():
        torch.testing.assert_close(value, after_forward[name], rtol=0, atol=0, equal_nan=True)
    assert f.inner.norm.track_running_stats


@pytest.mark.parametrize("mode", GRADIENT_MODES)
@pytest.mark.parametrize("training", [True, False])
def test_gradients_through_a_temporal_norm_pass_check_gradients(mode: str, training: bool) -> None:
    f = _TemporalConvDynamics().double()
    ODEBlock(f, step=0.25, **_mode_kwargs(mode))(torch.randn(4, 3, 5, 5, dtype=D))
    f.train(training)
    report = check_gradients(f, torch.randn(4, 3, 5, 5, dtype=D), step=0.25, **_mode_kwargs(mode))
    if mode == "adjoint":  # the continuous adjoint: O(step^4) from the discrete gradient
        for check in report.checks:
            # In eval mode df/dt jumps at every recorded (stage) time, where the interpolated
            # statistics have kinks: the adjoint's quadrature of a.df/dt loses its order there.
            tol = 1e-2 if check.name == "t" and not training else 1e-4
            assert check.rel_err_backprop < tol, str(report)
    else:  # exact for the discretisation the mode integrates
        assert report.max_rel_err_fd < 1e-5, str(report)
        assert report.max_rel_err_backprop < 1e-10, str(report)


def test_state_dict_round_trips_with_weights_only_loading_and_dtype_moves() -> None:
    norm = TemporalBatchNorm2d(3)
    for t in (0.0, 0.5, 1.0):
        norm(torch.tensor(t), torch.randn(6, 3, 2, 2) + t)
    buffer = io.BytesIO()
    torch.save(norm.state_dict(), buffer)
    buffer.seek(0)
    fresh = TemporalBatchNorm2d(3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(6, 3, 2, 2)
    norm.eval(), fresh.eval()
    assert fresh.recorded_times() == norm.recorded_times()
    torch.testing.assert_close(fresh(torch.tensor(0.25), x), norm(torch.tensor(0.25), x))
    wide = fresh.double()
    assert wide.running_mean.dtype == D and wide.times.dtype == D
    torch.testing.assert_close(
        wide(torch.tensor(0.5, dtype=D), x.double()).float(), norm(torch.tensor(0.5), x)
    )


def test_plain_batchnorm_in_the_dynamics_warns_once_naming_its_path() -> None:
    f = nn.Module()
    f.body = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))
    f.forward = lambda t, y: f.body(y)  # type: ignore[method-assign]
    y0 = torch.randn(2, 2, 3, 3)
    with pytest.warns(TimeSharedStatisticsWarning, match=r"`dynamics\.body\.1` \(BatchNorm2d\)"):
        block = ODEBlock(f, step=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(y0)
        odeint(f, y0, torch.tensor([0.0, 1.0]), step=0.5)


def test_odeint_warns_for_plain_batchnorm_and_never_for_the_temporal_layer() -> None:
    plain = nn.Module()
    plain.bn = nn.BatchNorm1d(2)
    plain.forward = lambda t, y: plain.bn(y)  # type: ignore[method-assign]
    with pytest.warns(TimeSharedStatisticsWarning, match="`bn`"):
        odeint(plain, torch.randn(4, 2), [0.0, 1.0], step=0.5)
    untracked = nn.Module()
    untracked.bn = nn.BatchNorm1d(2, track_running_stats=False)
    untracked.forward = lambda t, y: untracked.bn(y)  # type: ignore[method-assign]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ODEBlock(_TemporalConvDynamics(), step=0.5)(torch.randn(2, 3, 4, 4))
        odeint(untracked, torch.randn(4, 2), [0.0, 1.0], step=0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_features": 0}, "num_features"),
        ({"max_times": 0}, "max_times"),
        ({"momentum": None}, "momentum"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs: dict, match: str) -> None:
    args = {"num_features": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        TemporalBatchNorm2d(**args)


def test_wrong_input_shapes_raise_naming_the_layer() -> None:
    with pytest.raises(ValueError, match="TemporalBatchNorm2d expects"):
        TemporalBatchNorm2d(3)(0.0, torch.randn(2, 3))
    with pytest.raises(ValueError, match="channels"):
        TemporalBatchNorm2d(3)(0.0, torch.randn(2, 4, 2, 2))


def test_with_shared_affine_gives_own_statistics_and_the_same_parameters() -> None:
    norm = TemporalBatchNorm2d(3, max_times=8)
    twin = norm.with_shared_affine()
    assert type(twin) is TemporalBatchNorm2d and twin.max_times == 8
    assert twin.weight is norm.weight and twin.bias is norm.bias
    twin(0.0, torch.randn(4, 3, 2, 2) + 5.0)
    assert norm.recorded_times() == [] and twin.recorded_times() == [0.0]
    pair = nn.ModuleList([norm, twin])
    assert sum(p.numel() for p in pair.parameters()) == 6  # shared: counted once


def test_a_solve_with_more_distinct_times_than_slots_warns_once_naming_how_many() -> None:
    import warnings

    from torchode_adjoint import ODEBlock, TemporalBatchNorm1d

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.norm = TemporalBatchNorm1d(3)  # max_times=64

        def forward(self, t, y):
            return torch.tanh(self.norm(t, self.lin(y)))

    # rk4, 100 steps on [0, 1]: stages at t_k and t_k + h/2 (twice each) and t_k + h, which is
    # the next step's first: 201 distinct times.
    block = ODEBlock(Normed(), solver="rk4", step=0.01, adjoint="checkpoint")
    x = torch.randn(8, 3)
    with pytest.warns(UserWarning, match=r"`max_times=64` .*at 201 distinct times") as rec:
        block(x)
    assert "`max_times=201`" in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(x)  # once per layer
        # rk4 with 8 steps: 17 distinct times fit in a fresh layer's 64 slots: no warning
        ODEBlock(Normed(), solver="rk4", step=0.125, adjoint="checkpoint")(x)
        block.eval()
        block(x)  # eval mode claims no slots
