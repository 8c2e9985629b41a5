"""Contracts at their edges: step limits, near-integer step ratios, tableau tolerances, exact
casts under autocast, the time named by errors, check_gradients' verdict bands, the caller's
random generator after a backward pass, the CUDA side of the random and autocast bookkeeping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from problems import count_steps, reversible_rk_reference

from torchode_adjoint import (
    ButcherTableau,
    Checkpoint,
    NFECounter,
    Reversible,
    get_solver,
    odeint,
)
from torchode_adjoint import _check as check_module

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


# --- the step limit -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exactly_max_steps_is_allowed_and_one_more_is_refused(dtype) -> None:
    assert count_steps([0.0, 1.0], 0.25, dtype, max_steps=4) == 4
    with pytest.raises(ValueError, match=r"more than `max_steps=3`") as err:
        count_steps([0.0, 1.0], 0.25, dtype, max_steps=3)
    assert "`step=0.25` over the interval [0, 1] needs about 4 steps" in str(err.value)


def test_the_limit_is_on_the_total_over_every_output_interval() -> None:
    t = [0.0, 0.5, 1.0, 1.5]  # 2 + 2 + 2 steps of 0.25
    assert count_steps(t, 0.25, torch.float64, max_steps=6) == 6
    with pytest.raises(ValueError, match=r"`max_steps=5`") as err:
        count_steps(t, 0.25, torch.float64, max_steps=5)
    assert "`step=0.25` over the interval [0, 1.5] needs about 6 steps" in str(err.value)


# --- step counts just above an integer ratio, in every dtype ---------------------------------


@settings(max_examples=30)
@given(n=st.integers(1, 60), ulps=st.integers(0, 3), dtype=st.sampled_from(DTYPES))
@example(n=11, ulps=1, dtype=torch.float32)
@example(n=3, ulps=2, dtype=torch.bfloat16)
def test_no_step_is_larger_than_step_in_the_states_dtype(n: int, ulps: int, dtype) -> None:
    # The interval is n steps plus a few ulps of the dtype: the count may round down only within
    # the dtype's round-off, never so far that a step exceeds `step` by more than that.
    eps = torch.finfo(dtype).eps
    step = 0.1
    length = float(torch.tensor(n * step * (1 + ulps * eps), dtype=dtype))
    count = count_steps([0.0, length], step, dtype)
    assert count in (n, n + 1)
    assert length / count <= step * (1 + 16 * eps)


@pytest.mark.parametrize("n", [1, 3, 10, 11, 60])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_ratio_64_ulps_above_an_integer_takes_one_step_more(n: int, dtype) -> None:
    # The round-off tolerance is 16 ulps of the state's dtype (at most 1e-5): 64 ulps above n
    # steps is beyond it in float32 and float64, though far below 1e-5.
    eps = torch.finfo(dtype).eps
    length = float(torch.tensor(n * 0.1 * (1 + 64 * eps), dtype=dtype))
    assert length / (n * 0.1) - 1 > 32 * eps
    assert count_steps([0.0, length], 0.1, dtype) == n + 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_ratio_clearly_above_an_integer_takes_one_step_more(dtype) -> None:
    # 1 % above 10 steps is far beyond any dtype's round-off tolerance here (at most 1e-5).
    assert count_steps([0.0, 1.01], 0.1, dtype) == 11
    assert count_steps([0.0, 1.25], 0.1, dtype) == 13


# --- tableau validation at small errors and wrong order claims -----------------------------

RK4 = dict(
    c=[0.0, 0.5, 0.5, 1.0],
    a=[[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1.0, 0]],
    b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],
    order=4,
)


@pytest.mark.parametrize("typo", [1e-5, 1e-6, 1e-8])
def test_a_small_typo_in_a_weight_is_caught(typo: float) -> None:
    b = list(RK4["b"])
    b[1] += typo
    with pytest.raises(ValueError, match="`b` must sum to 1"):
        ButcherTableau(**{**RK4, "b": b})


@pytest.mark.parametrize("typo", [1e-5, 1e-6])
def test_a_small_typo_in_the_matrix_is_caught_by_the_row_sum_or_the_order(typo: float) -> None:
    a = [list(r) for r in RK4["a"]]
    a[3][2] += typo  # c[3] no longer the row sum
    with pytest.raises(ValueError, match=r"`c\[3\]` must equal the row sum"):
        ButcherTableau(**{**RK4, "a": a})
    c = list(RK4["c"])
    c[3] += typo  # consistent row sum, but the order-2+ conditions move
    with pytest.raises(ValueError, match="`order=4` is not what the coefficients give"):
        ButcherTableau(**{**RK4, "a": a, "c": c})


@pytest.mark.parametrize(
    ("tableau", "true_order"),
    [
        (dict(c=[0.0], a=[[0.0]], b=[1.0]), 1),
        (dict(c=[0.0, 0.5], a=[[0, 0], [0.5, 0]], b=[0.0, 1.0]), 2),
        (
            dict(
                c=[0.0, 0.5, 1.0],
                a=[[0, 0, 0], [0.5, 0, 0], [-1.0, 2.0, 0]],
                b=[1 / 6, 2 / 3, 1 / 6],
            ),
            3,
        ),
        (RK4, 4),
    ],
)
def test_each_order_is_accepted_up_to_the_truth_and_refused_above(tableau, true_order) -> None:
    coeffs = {k: v for k, v in tableau.items() if k != "order"}
    for order in range(1, true_order + 1):
        assert ButcherTableau(**coeffs, order=order).order == order
    if true_order < 4:
        with pytest.raises(ValueError, match=f"the order-{true_order + 1} condition"):
            ButcherTableau(**coeffs, order=true_order + 1)


def test_a_method_that_satisfies_only_the_order_three_conditions_cannot_claim_four() -> None:
    # Kutta's third-order method with a fourth stage of weight 0: order 3 exactly.
    tab = dict(
        c=[0.0, 0.5, 1.0, 0.0],
        a=[[0, 0, 0, 0], [0.5, 0, 0, 0], [-1.0, 2.0, 0, 0], [0, 0, 0, 0]],
        b=[1 / 6, 2 / 3, 1 / 6, 0.0],
    )
    assert ButcherTableau(**tab, order=3).stages == 4
    with pytest.raises(ValueError, match="the order-4 condition"):
        ButcherTableau(**tab, order=4)


# --- exact values: autocast casts, the time in error messages --------------------------------


@pytest.mark.parametrize("mode", ["backprop", "adjoint", "checkpoint", "reversible"])
def test_under_autocast_every_evaluation_returns_the_states_dtype(mode: str) -> None:
    # Not only the first: a derivative left in bfloat16 after the first evaluation would make
    # the solver accumulate in bfloat16.
    lin = torch.nn.Linear(4, 4)
    seen: list[torch.dtype] = []
    seen_out: list[torch.dtype] = []

    class F(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, t, y):
            seen.append(y.dtype)
            out = self.lin(y)
            seen_out.append(out.dtype)
            return out

    y0 = torch.randn(3, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nfe = NFECounter()
        sol = odeint(F(), y0, [0.0, 1.0], solver="rk4", step=0.25, adjoint=mode, nfe=nfe)
    assert sol.dtype == torch.float32
    assert set(seen) == {torch.float32} and torch.bfloat16 in seen_out  # autocast was on

    # The solution equals the one computed with every derivative cast to float32 by hand (an
    # increment formed from a bfloat16 derivative would be rounded to bfloat16).
    def f(t, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lin(y).float()

    with torch.no_grad():
        t = torch.tensor([0.0, 1.0])
        if mode == "reversible":
            # The couplings the solve chose per step (McCallum & Foster's scheme with them).
            lams = nfe.couplings
            ref = reversible_rk_reference(f, get_solver("rk4"), y0.detach(), t, [4], lams)[-1]
        else:
            y, h = y0.detach(), 0.25
            for _ in range(4):
                k1 = f(None, y)
                k2 = f(None, y + h / 2 * k1)
                k3 = f(None, y + h / 2 * k2)
                k4 = f(None, y + h * k3)
                y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            ref = y
    torch.testing.assert_close(sol[-1].detach(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint", "reversible"])
def test_a_non_finite_adjoint_error_names_the_output_time_where_it_appeared(mode: str) -> None:
    k = torch.tensor(1.0, requires_grad=True)
    y0 = torch.ones(2, requires_grad=True)
    sol = odeint(
        lambda t, y: -k * y,
        y0,
        [0.0, 0.25, 0.5, 1.0],
        solver="rk4",
        step=0.05,
        adjoint=mode,
        params=[k],
    )
    loss = sol[1].sum() * float("inf") + sol[3].sum()  # infinite incoming gradient at t = 0.25
    with pytest.raises(RuntimeError, match=r"at t = 0\.25 during the backward pass"):
        loss.backward()


def test_the_forward_error_names_the_step_where_the_state_blew_up() -> None:
    # y' = y^2 from y(0) = 1 blows up at t = 1; Euler with step 0.1 overflows float32 at a
    # step computed here by hand.
    y = torch.ones(1)
    t, first = 0.0, None
    for k in range(1, 200):
        y = y + 0.1 * y * y
        t = k * 0.1
        if not torch.isfinite(y).all():
            first = k
            break
    assert first is not None
    with pytest.raises(RuntimeError, match=rf"at t = {t:.6g} \(step {first} of 200"):
        odeint(lambda t, y: y * y, torch.ones(1), [0.0, 20.0], step=0.1, adjoint=False)


# --- check_gradients' verdict bands ---------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "fd_err", "exact", "verdict"),
    [
        (0.5e-9, 0.0, True, "pass"),
        (2e-9, 0.0, True, "suspicious"),  # above the tolerance, within 100x
        (99e-9, 0.0, True, "suspicious"),
        (101e-9, 0.0, True, "fail"),
        (0.5e-9, 2e-5, True, "suspicious"),  # exact, but finite differences disagree
        (0.5e-9, 2e-5, False, "pass"),  # the adjoint is judged against its tolerance only
        # the bands' edges belong to the better verdict: exactly the tolerance passes, exactly
        # 100 times it is suspicious, finite differences exactly at their limit pass
        (1e-9, 0.0, True, "pass"),
        (100e-9, 0.0, True, "suspicious"),
        (0.5e-9, 1e-5, True, "pass"),
    ],
)
def test_the_verdict_bands_are_the_tolerance_and_100_times_it(err, fd_err, exact, verdict) -> None:
    assert check_module._verdict(err, 1e-9, fd_err, exact) == verdict


# --- the caller's generator after a backward pass that replayed draws ------------------------


class _Dropout(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, t, y):
        return torch.tanh(self.drop(self.lin(y)))


@pytest.mark.parametrize("mode", [Checkpoint(), Checkpoint(every=3), Reversible()])
def test_after_backward_the_generator_is_where_the_forward_left_it(mode) -> None:
    f = _Dropout().double()
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    sol = odeint(f, y, [0.0, 1.0], solver="rk4", step=0.1, adjoint=mode)
    after_forward = torch.get_rng_state()
    sol.square().sum().backward()
    assert torch.equal(torch.get_rng_state(), after_forward)
    assert y.grad is not None and f.lin.weight.grad is not None


# The CUDA side of the random and autocast bookkeeping, run where no GPU is: the device's
# generator state is a byte tensor like the CPU's, and autocast flags exist for every kind.


def _state(byte: int) -> torch.Tensor:
    return torch.full((8,), byte, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ((1, 2), (1, 2), True),
        ((1, 2), (1, 3), False),  # a draw on the device only
        ((1, 2), (4, 2), False),  # a draw on the CPU only
        ((1, None), (1, None), True),
        ((1, None), (4, None), False),
        ((1, 2), (1, None), True),  # one side without a device state: the CPU's decides
        ((1, 2), (4, None), False),
    ],
)
def test_a_random_state_is_unchanged_only_if_every_generator_is(a, b, same) -> None:
    from torchode_adjoint._rng import RngState

    def make(cpu: int, cuda: int | None) -> RngState:
        return RngState(_state(cpu), None if cuda is None else _state(cuda))

    assert make(*a).same_as(make(*b)) is same
    assert make(*b).same_as(make(*a)) is same


def test_a_cuda_capture_keeps_that_devices_generator(monkeypatch) -> None:
    from torchode_adjoint._rng import RngState

    asked: list[torch.device] = []

    def get_rng_state(device: torch.device) -> torch.Tensor:
        asked.append(device)
        return _state(7)

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    state = RngState.capture(torch.device("cuda", 1))
    assert asked == [torch.device("cuda", 1)]
    assert state.cuda is not None and torch.equal(state.cuda, _state(7))
    assert torch.equal(state.cpu, torch.get_rng_state())
    assert RngState.capture(torch.device("cpu")).cuda is None and len(asked) == 1


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_forward_record_notes_autocast_for_the_cpu_and_the_states_device(device) -> None:
    from torchode_adjoint.modes.base import ForwardRecord

    kinds = ["cpu"] if device == "cpu" else ["cpu", "cuda"]
    # A non-default autocast dtype for each kind, so that a kind's flags read from another's
    # would differ.
    dtypes = {"cpu": torch.float16, "cuda": torch.bfloat16}
    before = {k: torch.get_autocast_dtype(k) for k in kinds}
    try:
        for k in kinds:
            torch.set_autocast_dtype(k, dtypes[k])
        record = ForwardRecord.start(torch.device(device))
    finally:
        for k in kinds:
            torch.set_autocast_dtype(k, before[k])
    assert record.autocast == tuple((k, False, dtypes[k]) for k in kinds)
    assert record.device == torch.device(device)


def test_the_verdict_bands_edges_with_exactly_representable_numbers() -> None:
    assert check_module._verdict(25.0, 0.25, 0.0, True) == "suspicious"  # exactly 100x
    assert check_module._verdict(25.0000001, 0.25, 0.0, True) == "fail"
    assert check_module._verdict(0.25, 0.25, 0.0, True) == "pass"  # exactly the tolerance


# --- dynamics that depend on neither the state nor a parameter ------------------------------


@pytest.mark.parametrize("mode", ["backprop", "adjoint", "checkpoint", "reversible"])
@pytest.mark.parametrize(
    "solve", [dict(solver="dopri5", step=0.25), dict(solver="dopri5", rtol=1e-8)]
)
def test_dynamics_of_time_alone_have_the_exact_gradients(mode: str, solve: dict) -> None:
    # y(T) = y0 + int_t0^T g(t) dt with g(t) = cos(t): dL/dy0 = 1, dL/dT = g(T), dL/dt0 = -g(t0)
    # for L = sum y(T).
    y0 = torch.ones(2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    sol = odeint(lambda s, y: torch.cos(s) * torch.ones(2, dtype=torch.float64), y0, t,
                 adjoint=mode, params=(), **solve)  # fmt: skip
    g_y0, g_t = torch.autograd.grad(sol[-1].sum(), [y0, t])
    assert torch.allclose(g_y0, torch.ones(2, dtype=torch.float64))
    expected_t = torch.tensor(
        [-2 * torch.cos(torch.tensor(0.5)), 2 * torch.cos(torch.tensor(1.5))], dtype=torch.float64
    )
    assert torch.allclose(g_t, expected_t, atol=1e-6), g_t
