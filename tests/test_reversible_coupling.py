"""The reversible mode on contracting dynamics: the coupling chosen per step keeps the scheme's
parasitic mode from growing, the gradient stays exact for the scheme, and what it cannot follow
raises with the cause named."""

from __future__ import annotations

import math

import pytest
import torch
from problems import HEUN_MADE_REVERSIBLE, TABLEAUS, reversible_rk_on_steps
from torch import nn

from torchode_adjoint import NFECounter, PIController, Reversible, get_solver, odeint

pytestmark = HEUN_MADE_REVERSIBLE

D = torch.float64
MODES = ["backprop", "adjoint", "checkpoint", "reversible"]

#: The solves of the leaky neural ODE, with the error each may make against a tight solve (the
#: solution's largest absolute error; the gradient's largest error relative to its largest
#: entry): the fixed-step methods' own error at these steps, 50 x rtol under error control.
LEAKY_SOLVES = {
    "euler": (dict(solver="euler", step=0.05), 0.1),
    "rk4": (dict(solver="rk4", step=0.1), 1e-5),
    "dopri5": (dict(solver="dopri5", rtol=1e-6, atol=1e-8), 5e-5),
}


def _leaky(gen: torch.Generator) -> tuple[nn.Linear, object, torch.Tensor]:
    """``dy/dt = -y + tanh(W y + b)``, 8 dimensions, batch 16: a contracting neural ODE."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    lin = nn.Linear(8, 8).double()
    y0 = torch.randn(16, 8, dtype=D, generator=gen)
    return lin, (lambda t, y: -y + torch.tanh(lin(y))), y0


def _solve_and_grad(f, lin, y0, t, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    y = y0.clone().requires_grad_()
    sol = odeint(f, y, t, params=lin.parameters(), **kw)
    grads = torch.autograd.grad((sol[-1] ** 2).sum(), [y, *lin.parameters()])
    return sol.detach(), torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("span", [2.0, 5.0, 10.0])
@pytest.mark.parametrize("solver", list(LEAKY_SOLVES))
@pytest.mark.parametrize("mode", MODES)
def test_the_leaky_neural_ode_is_right_in_every_mode(span: float, solver: str, mode: str, gen):
    # With a fixed coupling of 0.999 the reversible solution was off by up to 5,810 here.
    lin, f, y0 = _leaky(gen)
    t = torch.tensor([0.0, span], dtype=D)
    ref_sol, ref_grad = _solve_and_grad(
        f, lin, y0, t, solver="dopri5", rtol=1e-11, atol=1e-13, adjoint="backprop"
    )
    kw, tol = LEAKY_SOLVES[solver]
    sol, grad = _solve_and_grad(f, lin, y0, t, adjoint=mode, **kw)
    assert float((sol[-1] - ref_sol[-1]).abs().max()) < tol
    assert float((grad - ref_grad).abs().max() / ref_grad.abs().max()) < tol


@pytest.mark.parametrize("solver", ["euler", "rk4", "dopri5", "bosh3"])
def test_the_gradient_is_exact_for_the_scheme_with_the_couplings_it_chose(solver: str, gen):
    # The couplings are taken as constants, as step sizes are: autograd through the scheme
    # written out with the recorded couplings is the reference, state, parameters and times.
    lin, f, y0 = _leaky(gen)
    y = y0.clone().requires_grad_()
    t = torch.tensor([0.0, 1.5, 4.0], dtype=D, requires_grad=True)
    nfe = NFECounter()
    sol = odeint(
        f, y, t, solver=solver, step=0.1, adjoint="reversible", params=lin.parameters(), nfe=nfe
    )
    w = torch.randn(sol.shape, dtype=D, generator=gen)
    grads = torch.autograd.grad((w * sol).sum(), [y, t, *lin.parameters()])
    counts = [15, 25]
    assert len(nfe.couplings) == sum(counts)
    assert min(nfe.couplings) < 0.95  # chosen below the largest coupling: the case tested
    steps = [[(m / k, (m + 1) / k) for m in range(k)] for k in counts]
    ref = reversible_rk_on_steps(f, get_solver(solver), y, t, steps, nfe.couplings)
    torch.testing.assert_close(sol, ref, rtol=0, atol=1e-12)
    expected = torch.autograd.grad((w * ref).sum(), [y, t, *lin.parameters()])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


def _exact_stability(solver: str, z: float) -> float:
    """The stability function of Euler and the classical RK4 written out (Taylor polynomials)."""
    order = {"euler": 1, "rk4": 4}[solver]
    return sum(z**k / math.factorial(k) for k in range(order + 1))


@pytest.mark.parametrize(("solver", "rate"), [("euler", -3.0), ("euler", -0.5), ("rk4", -3.0)])
def test_on_linear_decay_the_coupling_is_the_steps_own_contraction(solver: str, rate: float):
    # y' = rate y: the coupled step's eigenvalues are R(h rate) and coupling / R; with the
    # coupling equal to R the parasitic mode is neutral. The coupling stays at its largest while
    # the gap is below sqrt(eps) of the state, then is R at every step.
    h = 0.1
    nfe = NFECounter()
    y0 = torch.linspace(0.5, 2.0, 6, dtype=D)
    odeint(lambda t, y: rate * y, y0, [0.0, 3.0], solver=solver, step=h, adjoint="reversible",
           params=(), nfe=nfe)  # fmt: skip
    r = _exact_stability(solver, h * rate)
    lams = list(nfe.couplings)
    assert lams[0] == Reversible.MAX_COUPLING
    first = next(k for k, lam in enumerate(lams) if lam != Reversible.MAX_COUPLING)
    for lam in lams[first:]:
        assert lam == pytest.approx(min(r, 0.999), rel=1e-6)


def test_while_the_gap_is_below_sqrt_eps_the_largest_coupling_is_kept():
    # rk4 on y' = -0.5 y: the round trip's defect is far below sqrt(eps) of the state, so the
    # first steps keep the largest coupling (the gap grows by 0.999 / R = 1.05 a step) until
    # the gap reaches sqrt(eps); Euler's defect (h^2 / 2 of the state) is past it at once.
    lams = {}
    for solver in ("rk4", "euler"):
        nfe = NFECounter()
        y0 = torch.linspace(0.5, 2.0, 6, dtype=D)
        sol = odeint(lambda t, y: -0.5 * y, y0, [0.0, 3.0], solver=solver, step=0.1,
                     adjoint="reversible", params=(), nfe=nfe)  # fmt: skip
        lams[solver] = list(nfe.couplings)
        tol = 1e-7 if solver == "rk4" else 0.05
        assert float((sol[-1] - y0 * math.exp(-1.5)).abs().max()) < tol

    def kept(values: list[float]) -> int:
        return next(k for k, lam in enumerate(values) if lam != Reversible.MAX_COUPLING)

    assert kept(lams["rk4"]) >= 4 and kept(lams["euler"]) <= 2


def test_on_expanding_dynamics_the_coupling_stays_at_its_largest():
    nfe = NFECounter()
    odeint(lambda t, y: 0.7 * y, torch.ones(4, dtype=D), [0.0, 2.0], solver="rk4", step=0.1,
           adjoint="reversible", params=(), nfe=nfe)  # fmt: skip
    assert set(nfe.couplings) == {Reversible.MAX_COUPLING}


def _linear_system(eigenvalues: list[complex], gen) -> torch.Tensor:
    """A real matrix with the given eigenvalues (complex ones in conjugate pairs, given once),
    in a random, well-conditioned basis."""
    blocks = []
    for lam in eigenvalues:
        if isinstance(lam, complex):
            blocks.append(torch.tensor([[lam.real, lam.imag], [-lam.imag, lam.real]], dtype=D))
        else:
            blocks.append(torch.tensor([[lam]], dtype=D))
    a = torch.block_diag(*blocks)
    q, _ = torch.linalg.qr(torch.randn(a.shape[0], a.shape[0], dtype=D, generator=gen))
    return q @ a @ q.T


LINEAR_SYSTEMS = {
    # A stiff-ish spread of decay rates.
    "spread": [-0.1, -0.7, -2.0, -4.5, -8.0],
    # A damped oscillator beside a fast decay.
    "damped oscillator": [complex(-0.3, 2.0), -3.0],
    # Expanding and contracting directions together.
    "mixed": [0.4, -0.2, -3.0],
    "expanding": [0.3, 0.6],
}


@pytest.mark.parametrize("name", list(LINEAR_SYSTEMS))
@pytest.mark.parametrize(
    ("kw", "tol"),
    [(dict(solver="rk4", step=0.05), 1e-5), (dict(solver="dopri5", rtol=1e-8, atol=1e-10), 1e-6)],
    ids=["rk4", "dopri5"],
)
def test_linear_systems_are_right_against_the_matrix_exponential(name: str, kw, tol, gen):
    a = nn.Parameter(_linear_system(LINEAR_SYSTEMS[name], gen))
    y0 = torch.randn(3, a.shape[0], dtype=D, generator=gen, requires_grad=True)
    # Over 1.5 the fastest decay contracts by e^12: the reconstruction undoes that within
    # float64's resolution (over 4, e^32, it cannot, and raises: the drift test below).
    span = 1.5
    sol = odeint(lambda t, y: y @ a.T, y0, [0.0, span], adjoint="reversible", params=[a], **kw)
    exact = y0 @ torch.linalg.matrix_exp(a * span).T
    scale = float(exact.detach().abs().max())
    assert float((sol[-1] - exact).detach().abs().max()) < tol * scale
    g = torch.autograd.grad((sol[-1] ** 2).sum(), [y0, a])
    e = torch.autograd.grad((exact**2).sum(), [y0, a])
    for got, want in zip(g, e):
        assert float((got - want).abs().max() / want.abs().max()) < 10 * tol


def test_a_cnf_like_dynamics_trains_with_the_reversible_gradient_of_backprop(gen):
    # A CNF's velocity field, tanh MLP with time input, contracting and expanding in places:
    # the reversible gradient against backprop through the same solver at a tight tolerance.
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 2)).double()

    def f(t, y):
        return net(torch.cat([y, t.expand(y.shape[0], 1)], dim=1)) - 0.5 * y

    y0 = torch.randn(64, 2, dtype=D, generator=gen)
    _, g_rev = _solve_and_grad(f, net, y0, torch.tensor([0.0, 3.0], dtype=D), solver="dopri5",
                               rtol=1e-7, atol=1e-9, adjoint="reversible")  # fmt: skip
    _, g_ref = _solve_and_grad(f, net, y0, torch.tensor([0.0, 3.0], dtype=D), solver="dopri5",
                               rtol=1e-11, atol=1e-13, adjoint="backprop")  # fmt: skip
    assert float((g_rev - g_ref).abs().max() / g_ref.abs().max()) < 50 * 1e-7


def test_a_fixed_step_that_contracts_faster_than_the_smallest_coupling_raises_with_the_fix():
    # Euler at h = 0.1 on y' = -15 y multiplies by R = -0.5: no coupling in (0, 1] is stable.
    y0 = torch.ones(3, dtype=D)
    with pytest.raises(RuntimeError, match=r"contracts the state by a factor of -0\.5.*smallest "
                       r"coupling 0\.5.*`step` \(at most about 0\.03"):  # fmt: skip
        odeint(lambda t, y: -15.0 * y, y0, [0.0, 1.0], solver="euler", step=0.1,
               adjoint="reversible", params=())  # fmt: skip
    # The step it names is right (R = 0.55 at 0.03) and error control shortens its own steps.
    exact = math.exp(-15.0)
    for kw, tol in ((dict(solver="euler", step=0.03), 0.1), (dict(solver="dopri5", rtol=1e-8,
                    atol=1e-12), 1e-9)):  # fmt: skip
        sol = odeint(lambda t, y: -15.0 * y, y0, [0.0, 1.0], adjoint="reversible", params=(), **kw)
        assert float((sol[-1] - exact).abs().max()) < tol


def test_error_control_sees_the_gap_and_shortens_its_steps():
    # With `min_coupling=0.9` a step of y' = -3 y longer than about 0.035 contracts by more
    # than the coupling can follow: the parasitic mode grows by 0.9 / R per step. The gap's
    # growth enters the error estimate, so the solve takes shorter steps than the base step's
    # estimate alone asks for, and stays right.
    y0 = torch.ones(2, dtype=D)
    nfe = NFECounter()
    sol = odeint(lambda t, y: -3.0 * y, y0, [0.0, 6.0], solver="dopri5", rtol=1e-6, atol=1e-12,
                 adjoint=Reversible(min_coupling=0.9), params=(), nfe=nfe)  # fmt: skip
    assert float((sol[-1] - math.exp(-18.0)).abs().max()) < 1e-6 * math.exp(-18.0) * 50
    plain = NFECounter()
    odeint(lambda t, y: -3.0 * y, y0, [0.0, 6.0], solver="dopri5", rtol=1e-6, atol=1e-12,
           adjoint="backprop", params=(), nfe=plain)  # fmt: skip
    assert nfe.accepted > 2 * plain.accepted
    assert min(nfe.couplings) == 0.9


def test_the_drift_check_names_the_parasitic_mode_or_the_contraction():
    # A rotation with coupling 0.5: the reversed steps grow the parasitic mode by 2 per step.
    a = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    y0 = torch.ones(3, 2, requires_grad=True)
    sol = odeint(lambda t, y: y @ a.T, y0, [0.0, 1.0], solver="rk4", step=0.01,
                 adjoint=Reversible(coupling=0.5), params=())  # fmt: skip
    with pytest.raises(RuntimeError, match=r"gap between the scheme's two states.*parasitic mode"):
        sol[-1].sum().backward()
    # Fast decay in float32: undoing the contraction (e^60) amplifies the round-off.
    y0 = torch.ones(3, 2, requires_grad=True)
    sol = odeint(lambda t, y: -30.0 * y, y0, [0.0, 2.0], solver="rk4", step=0.01,
                 adjoint="reversible", params=())  # fmt: skip
    with pytest.raises(RuntimeError, match=r"mean of the scheme's states.*contraction"):
        sol[-1].sum().backward()


def test_memory_stays_flat_with_the_chosen_coupling_at_ten_thousand_steps():
    # Saved-for-backward bytes of a solve with 100 and with 10,000 steps: the same.
    def saved_bytes(n: int) -> int:
        total = 0

        def pack(x: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += x.numel() * x.element_size()
            return x

        lin = nn.Linear(4, 4).double()
        y0 = torch.randn(8, 4, dtype=D, requires_grad=True)
        nfe = NFECounter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            sol = odeint(lambda t, y: -y + torch.tanh(lin(y)), y0, [0.0, 5.0], solver="euler",
                         step=5.0 / n, adjoint="reversible", params=lin.parameters(),
                         nfe=nfe)  # fmt: skip
        assert len(nfe.couplings) == n  # one host float per step: the record the mode keeps
        sol[-1].sum().backward()
        assert torch.isfinite(y0.grad).all()
        return total

    assert saved_bytes(10_000) == saved_bytes(100)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kw", [dict(solver="rk4", step=0.1), dict(solver="dopri5", rtol=1e-5)],
                         ids=["fixed", "error-controlled"])  # fmt: skip
def test_an_empty_batch_gives_zero_gradients_in_every_mode(mode: str, kw):
    lin = nn.Linear(3, 3).double()
    y0 = torch.zeros(0, 3, dtype=D, requires_grad=True)
    sol = odeint(lambda t, y: lin(y), y0, [0.0, 1.0], adjoint=mode, params=lin.parameters(), **kw)
    sol.sum().backward()
    assert y0.grad is not None and y0.grad.shape == (0, 3)
    assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) == 0.0


def test_the_adjoints_backward_pass_keeps_the_users_controller():
    # A smaller safety factor takes more steps; the backward pass used to rebuild the controller
    # from the tolerances alone and took the same steps for both.
    def backward_steps(controller: PIController) -> int:
        w = nn.Parameter(torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=D))
        y0 = torch.tensor([[1.0, 0.0]], dtype=D, requires_grad=True)
        nfe = NFECounter()
        sol = odeint(lambda t, y: torch.tanh(y @ w), y0, [0.0, 3.0], solver="dopri5", rtol=1e-6,
                     atol=1e-8, adjoint="adjoint", params=[w], controller=controller,
                     nfe=nfe)  # fmt: skip
        sol[-1].sum().backward()
        return nfe.backward_accepted + nfe.backward_rejected

    assert backward_steps(PIController(safety=0.3)) > backward_steps(PIController())


def test_an_rtol_below_the_dtypes_reach_warns_with_the_smallest_sensible_value():
    from torchode_adjoint import ToleranceWarning

    with pytest.warns(ToleranceWarning, match=r"`rtol=1e-09` is below what torch.float32 "
                      r"resolves.*at least 5e-07.*float64"):  # fmt: skip
        odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver="dopri5", rtol=1e-9,
               adjoint=False)  # fmt: skip
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ToleranceWarning)
        odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], solver="dopri5", rtol=1e-6,
               adjoint=False)  # fmt: skip
        odeint(lambda t, y: -y, torch.ones(2, dtype=D), [0.0, 1.0], solver="dopri5", rtol=1e-12,
               adjoint=False)  # fmt: skip


def test_adaptive_heun_made_reversible_does_not_warn_about_heun():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odeint(lambda t, y: -y, torch.ones(2, dtype=D), [0.0, 1.0], solver="adaptive_heun",
               rtol=1e-5, adjoint="reversible", params=())  # fmt: skip


def test_a_non_finite_adjoint_under_error_control_names_the_interval_and_the_tolerances():
    class Overflow(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    w = nn.Parameter(torch.tensor(0.5, dtype=D))
    y0 = torch.ones(2, dtype=D, requires_grad=True)
    sol = odeint(lambda t, y: -w * Overflow.apply(y), y0, [0.0, 1.0, 2.0], solver="dopri5",
                 rtol=1e-6, atol=1e-8, adjoint="checkpoint", params=[w])  # fmt: skip
    # (Checked at the start of each re-run step: the interval ends at one of them.)
    with pytest.raises(
        RuntimeError, match=r"between t = 2 and t = [\d.]+ during.*`rtol`/`atol` \(rtol=1e-06"
    ):
        sol[-1].sum().backward()


@pytest.mark.parametrize("solver", TABLEAUS)
def test_every_tableau_made_reversible_is_as_accurate_as_itself_on_the_leaky_ode(solver, gen):
    # Measured: within 1.2-15x the tableau's own error at step 0.1 over T = 5 (a fixed
    # coupling of 0.999 was off by orders of magnitude more on this problem).
    lin, f, y0 = _leaky(gen)
    t = torch.tensor([0.0, 5.0], dtype=D)
    ref = odeint(f, y0, t, solver="dopri5", rtol=1e-11, atol=1e-13, adjoint=False,
                 params=lin.parameters())[-1]  # fmt: skip
    errors = {}
    for mode in ("backprop", "reversible"):
        sol = odeint(f, y0, t, solver=solver, step=0.1, adjoint=mode, params=lin.parameters())
        errors[mode] = float((sol[-1] - ref).detach().abs().max())
    assert errors["reversible"] < 30 * errors["backprop"] + 1e-12, errors
