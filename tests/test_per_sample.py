"""Independent solves in one batch: output times of shape (B, T), one row per sample.

The references are independent computations: each sample solved on its own with a 1-D ``t``
(the shared-time solver, another code path), differentiated by backprop; and each sample
solved alone as a batch of one, against the same sample inside a batch of very different ones.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchode_adjoint import Checkpoint, NFECounter, PIController, StepTo, odeint

MODES = ["backprop", "checkpoint", "adjoint"]
DT = torch.float64
# Per-sample rates spanning 200x: the stiff samples need many more steps than the slow ones.
RATES = torch.tensor([0.5, 1.0, 20.0, 5.0, 100.0], dtype=DT)


class Field(nn.Module):
    """``dy/dt = rate_b (net(y, t) - y)``: an MLP pulled towards itself at a per-sample rate;
    ``t`` arrives as ``(B, 1)`` with per-sample times, or 0-dim with a shared one."""

    def __init__(self, net: nn.Module, rates: torch.Tensor) -> None:
        super().__init__()
        self.net, self.rates = net, rates

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.expand(y.shape[0], 1) if t.dim() < 2 else t
        return self.rates.view(-1, 1) * (self.net(torch.cat([y, tt], 1)) - y)


def make_net(seed: int = 0, dim: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim + 1, 16), nn.Tanh(), nn.Linear(16, dim)).double()


def sample_times(batch: int) -> torch.Tensor:
    """Rows of different spans and spacings; one runs backwards in time."""
    rows = [
        torch.linspace(0.0, 0.3 + 0.1 * b, 6, dtype=DT) ** (1.0 + 0.2 * b) for b in range(batch)
    ]
    t = torch.stack(rows)
    t[3] = torch.linspace(0.5, -0.2, 6, dtype=DT)
    return t


SOLVES = {
    "rk4": dict(solver="rk4", step=0.02),
    "dopri5": dict(solver="dopri5", rtol=1e-9, atol=1e-11),
    "tsit5 steps to outputs": dict(solver="tsit5", rtol=1e-8, atol=1e-10, dense_output=False),
    "bosh3": dict(solver="bosh3", rtol=1e-7, atol=1e-9),
}


def solve_each(net, y0, t, w, mode, kw):
    """Each sample on its own with its 1-D row of ``t``: solutions, counts and gradients."""
    params = list(net.parameters())
    ys, counts, g_y0 = [], [], []
    g_p = [torch.zeros_like(p) for p in params]
    for b in range(y0.shape[0]):
        y0_b = y0[b : b + 1].clone().requires_grad_(True)
        nfe = NFECounter()
        y_b = odeint(Field(net, RATES[b : b + 1]), y0_b, t[b], adjoint=mode, nfe=nfe, **kw)
        grads = torch.autograd.grad((y_b * w[:, b : b + 1]).sum(), [y0_b, *params])
        ys.append(y_b[:, 0].detach())
        counts.append((nfe.accepted, nfe.rejected))
        g_y0.append(grads[0])
        g_p = [a + g for a, g in zip(g_p, grads[1:])]
    return torch.stack(ys, 1), counts, torch.cat(g_y0), g_p


def solve_batch(net, y0, t, w, mode, kw, rates=RATES):
    params = list(net.parameters())
    y0 = y0.clone().requires_grad_(True)
    nfe = NFECounter()
    y = odeint(Field(net, rates), y0, t, adjoint=mode, nfe=nfe, **kw)
    grads = torch.autograd.grad((y * w).sum(), [y0, *params])
    return y.detach(), nfe, grads[0], list(grads[1:])


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solve", list(SOLVES))
def test_each_row_as_its_own_one_dimensional_solve(mode: str, solve: str) -> None:
    """Every sample gets the solution, the steps (accepted and rejected) and the gradients of
    its own 1-D solve in the same mode (the adjoint: the 1-D adjoint's, whose backward pass
    controls its own steps the same way)."""
    kw = SOLVES[solve]
    net = make_net()
    y0 = torch.randn(5, 3, dtype=DT)
    t = sample_times(5)
    w = torch.randn(6, 5, 3, dtype=DT)
    ref_y, ref_counts, ref_gy0, ref_gp = solve_each(net, y0, t, w, mode, kw)
    y, nfe, g_y0, g_p = solve_batch(net, y0, t, w, mode, kw)
    assert y.shape == (6, 5, 3)
    assert close(y, ref_y, 1e-12)
    if "rtol" in kw:
        assert nfe.samples.accepted.tolist() == [c[0] for c in ref_counts]
        assert nfe.samples.rejected.tolist() == [c[1] for c in ref_counts]
    assert close(g_y0, ref_gy0, 1e-10)
    for a, b in zip(g_p, ref_gp):
        assert close(a, b, 1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_a_sample_alone_equals_it_inside_a_batch_of_others(mode: str) -> None:
    """Sample 0 (slow, short span) solved alone and beside samples 200x stiffer: the same
    solution, the same steps, and its gradient."""
    kw = SOLVES["dopri5"]
    net = make_net(1)
    y0 = torch.randn(5, 3, dtype=DT)
    t = sample_times(5)
    w = torch.randn(6, 5, 3, dtype=DT)
    w[:, 1:] = 0.0  # the loss sees sample 0 only
    y, nfe, g_y0, g_p = solve_batch(net, y0, t, w, mode, kw)
    alone, nfe1, g_y0_1, g_p1 = solve_batch(net, y0[:1], t[:1], w[:, :1], mode, kw, RATES[:1])
    assert close(y[:, :1], alone, 1e-12)
    assert nfe.samples.accepted[0] == nfe1.samples.accepted[0]
    assert nfe.samples.rejected[0] == nfe1.samples.rejected[0]
    # The stiff samples took many more steps; sample 0 did not take theirs.
    assert int(nfe.samples.accepted.max()) > 10 * int(nfe1.samples.accepted[0])
    assert close(g_y0[:1], g_y0_1, 1e-10)
    assert bool((g_y0[1:] == 0).all())
    for a, b in zip(g_p, g_p1):
        assert close(a, b, 1e-10)


def test_fixed_steps_lay_out_each_row_as_a_shared_t_would() -> None:
    """``step`` cuts every interval of every row into equal steps of at most ``step``."""
    net = make_net()
    y0 = torch.randn(5, 3, dtype=DT)
    t = sample_times(5)
    nfe = NFECounter()
    odeint(Field(net, RATES), y0, t, solver="euler", step=0.05, adjoint="backprop", nfe=nfe)
    spans = [
        sum(math.ceil(abs(b - a) / 0.05 - 1e-9) for a, b in zip(r[:-1], r[1:])) for r in t.tolist()
    ]
    assert nfe.samples.accepted.tolist() == spans
    assert nfe.forward == max(spans)  # one evaluation of the batch per step of the longest row


def test_a_rejected_step_that_overflows_leaves_the_gradient_finite() -> None:
    """A first step far too large overflows the stiffer sample (``sinh`` of a stage far out:
    its error is infinite, rejected);
    backprop through the batch's tries stays finite and equal to the samples' own."""

    class Blowup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = nn.Parameter(torch.tensor([1e-4, 3.0], dtype=DT))

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return -self.k.view(-1, 1) * torch.sinh(y)

    # Sample 0 is slow enough to accept the first step that sample 1 overflows in.
    t = torch.tensor([[0.0, 100.0], [0.0, 0.5]], dtype=DT)
    y0 = torch.tensor([[0.1], [3.0]], dtype=DT, requires_grad=True)
    kw = dict(solver="dopri5", rtol=1e-8, atol=1e-10, controller=PIController(first_step=50.0))
    f = Blowup()
    nfe = NFECounter()
    y = odeint(f, y0, t, adjoint="backprop", nfe=nfe, **kw)
    assert int(nfe.samples.rejected[1]) >= 1 and int(nfe.samples.rejected[0]) == 0
    g = torch.autograd.grad(y[-1].sum(), [y0, f.k])
    assert all(bool(torch.isfinite(x).all()) for x in g)
    for mode in ("checkpoint", "adjoint"):
        g_mode = torch.autograd.grad(odeint(f, y0, t, adjoint=mode, **kw)[-1].sum(), [y0, f.k])
        assert all(bool(torch.isfinite(x).all()) for x in g_mode)
        assert close(g_mode[1], g[1], 1e-5)


def test_a_sample_that_turns_non_finite_is_named_by_its_index() -> None:
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=DT)
    y0 = torch.tensor([[0.1], [0.1], [5.0]], dtype=DT)
    with pytest.raises(RuntimeError, match="sample 2"):
        odeint(lambda t, y: y**2, y0, t, solver="rk4", step=0.25, params=())


def test_the_host_is_read_once_per_step_of_the_batch(monkeypatch) -> None:
    """The loop reads the host once per try of the batch (its decisions), never per sample."""
    reads = {"n": 0}
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            reads["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    batch = 64
    y0 = torch.randn(batch, 2, dtype=DT)
    rates = torch.logspace(0, 2, batch, dtype=DT)
    t = torch.stack([torch.linspace(0.0, 1.0 + b / batch, 4, dtype=DT) for b in range(batch)])
    nfe = NFECounter()
    odeint(lambda s, y: -rates.view(-1, 1) * y, y0, t, solver="dopri5", rtol=1e-6, nfe=nfe,
           params=(), check_finite=False)  # fmt: skip
    tries = int((nfe.samples.accepted + nfe.samples.rejected).max())
    # Setup reads (the times once, the first step's check) and one per try of the batch.
    assert tries < reads["n"] <= tries + 8


@pytest.mark.parametrize(
    ("t", "match"),
    [
        (torch.zeros(4, 5), r"one row per sample of `y0`"),
        (torch.zeros(3, 1), "at least two times"),
        (torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]), r"`t\[2\]`.*strictly"),
        (torch.tensor([[0.0, 1.0], [0.0, float("nan")], [0.0, 1.0]]), r"`t\[1\]`.*finite"),
        (torch.zeros(3, 2, 2), "1-D tensor"),
    ],
)
def test_bad_per_sample_times_name_t(t: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        odeint(lambda s, y: -y, torch.ones(3, 2), t, params=())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(adjoint="reversible"), "adjoint='reversible'"),
        (dict(controller=StepTo([0.5])), "StepTo"),
        (dict(solver="dopri5", controller=PIController(norm=lambda e: e.abs().max())), "norm"),
        (dict(solver="dopri5", step_t=[0.5]), "step_t"),
    ],
)
def test_options_per_sample_times_do_not_take_say_so(kwargs: dict, match: str) -> None:
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    with pytest.raises(ValueError, match=match):
        odeint(lambda s, y: -y, torch.ones(2, 2), t, params=(), **kwargs)


def test_learnable_per_sample_times_are_refused_not_given_a_zero_gradient() -> None:
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]], requires_grad=True)
    with pytest.raises(ValueError, match=r"t.detach\(\)"):
        odeint(lambda s, y: -y, torch.ones(2, 2), t, params=())


@pytest.mark.parametrize("mode", MODES)
def test_a_structured_state_is_solved_per_sample_with_its_tolerances_per_part(mode: str) -> None:
    """A dict state with a tolerance per part, and a complex tuple state: each sample as its
    own 1-D solve (solution, steps and gradient)."""
    w = 0.5 * torch.randn(3, 3, dtype=DT)
    rates = torch.tensor([0.5, 2.0, 10.0, 1.0], dtype=DT)

    def field(r):
        def f(t, s):
            return {"x": s["v"], "v": -r * s["x"] - 0.1 * s["v"] @ w + torch.sin(t)}

        return f

    x0, v0 = torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    t = torch.stack([torch.linspace(0.0, 0.5 + 0.5 * b, 5, dtype=DT) for b in range(4)])
    kw = dict(solver="dopri5", rtol=1e-9, atol={"x": 1e-11, "v": 1e-8}, adjoint=mode, params=())
    x = x0.clone().requires_grad_(True)
    nfe = NFECounter()
    out = odeint(field(rates.view(-1, 1)), {"x": x, "v": v0}, t, nfe=nfe, **kw)
    assert out["x"].shape == (5, 4, 3)
    (g,) = torch.autograd.grad(out["x"].sum() + out["v"].square().sum(), [x])
    for b in range(4):
        x_b = x0[b : b + 1].clone().requires_grad_(True)
        n_b = NFECounter()
        ref = odeint(field(rates[b]), {"x": x_b, "v": v0[b : b + 1]}, t[b], nfe=n_b, **kw)
        assert close(out["x"][:, b], ref["x"][:, 0].detach(), 1e-12)
        assert close(out["v"][:, b], ref["v"][:, 0].detach(), 1e-12)
        assert int(nfe.samples.accepted[b]) == n_b.accepted
        (g_b,) = torch.autograd.grad(ref["x"].sum() + ref["v"].square().sum(), [x_b])
        assert close(g[b : b + 1], g_b, 1e-10)
    # A complex state: its real and imaginary parts integrated per sample.
    z0 = torch.randn(4, 2, dtype=torch.complex128)
    lam = torch.tensor([-1.0 + 3.0j, -0.5 + 1.0j, -4.0 + 0.0j, 2.0j], dtype=torch.complex128)
    z = odeint(lambda s, y: (lam.view(-1, 1) * y[0],), (z0,), t, solver="dopri5", rtol=1e-10,
               atol=1e-12, adjoint=mode, params=())[0]  # fmt: skip
    exact = torch.exp(lam.view(1, -1, 1) * t.T[..., None]) * z0
    assert close(z, exact, 1e-8)


def test_a_state_whose_parts_do_not_share_the_batch_is_refused() -> None:
    t = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    with pytest.raises(ValueError, match="batch"):
        odeint(lambda s, y: y, (torch.ones(2, 2), torch.ones(3)), t, params=())


@pytest.mark.parametrize("mode", MODES)
def test_compiled_steps_give_the_eager_solution_and_gradients(mode: str) -> None:
    """``compile=True``: the per-sample tries run as compiled graphs (counted), with the eager
    pass's values and gradients (the adjoint's per-sample backward steps run eagerly)."""
    from torchode_adjoint import Compile

    runs = [0]

    def counted(gm: torch.fx.GraphModule, example_inputs: list):
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            runs[0] += 1
            return compiled(*args)

        return run

    kw = SOLVES["dopri5"]
    net = make_net(2)
    y0 = torch.randn(5, 3, dtype=DT)
    t = sample_times(5)
    w = torch.randn(6, 5, 3, dtype=DT)
    eager = solve_batch(net, y0, t, w, mode, kw)
    compiled = solve_batch(net, y0, t, w, mode, dict(kw, compile=Compile(backend=counted)))
    assert runs[0] > 10
    assert close(compiled[0], eager[0], 1e-12)
    assert torch.equal(compiled[1].samples.accepted, eager[1].samples.accepted)
    assert close(compiled[2], eager[2], 1e-10)
    for a, b in zip(compiled[3], eager[3]):
        assert close(a, b, 1e-10)


def test_backprop_gives_second_derivatives_through_per_sample_steps() -> None:
    """Double backward (``create_graph=True``): the Hessian of a loss in a per-sample rate
    against central differences of the gradient."""
    y0 = torch.tensor([[1.0, 0.5], [0.2, -1.0]], dtype=DT)
    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.7, 1.5]], dtype=DT)

    def loss(k: torch.Tensor) -> torch.Tensor:
        def f(s, y):
            return -k.view(-1, 1) * y**3 + torch.sin(s)

        y = odeint(f, y0, t, solver="dopri5", rtol=1e-10, atol=1e-12, adjoint="backprop")
        return y.square().sum()

    def grad(k: torch.Tensor) -> torch.Tensor:
        k = k.detach().requires_grad_(True)
        return torch.autograd.grad(loss(k), [k])[0]

    k = torch.tensor([0.7, 1.3], dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(loss(k), [k], create_graph=True)
    hessian = torch.stack([torch.autograd.grad(g[i], [k], retain_graph=True)[0] for i in range(2)])
    eye = torch.eye(2, dtype=DT) * 1e-5
    central = torch.stack([(grad(k + eye[i]) - grad(k - eye[i])) / 2e-5 for i in range(2)])
    assert close(hessian, central, 1e-6)
    assert float(hessian[0, 0]) > 0.1  # not a vanishing second derivative


@pytest.mark.parametrize("mode", ["checkpoint", "adjoint"])
def test_a_non_finite_gradient_names_the_sample(mode: str) -> None:
    """An incoming gradient that is NaN for one sample: the backward pass says which."""
    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 1.0, 2.0]], dtype=DT)
    y0 = torch.ones(2, 2, dtype=DT, requires_grad=True)
    y = odeint(lambda s, x: -x, y0, t, solver="rk4", step=0.1, adjoint=mode, params=())
    weight = torch.ones_like(y)
    weight[1, 1] = float("nan")
    with pytest.raises(RuntimeError, match="sample 1"):
        (y * weight).sum().backward()


@pytest.mark.parametrize("every", [3, 7])
def test_checkpoint_segments_of_several_tries_give_backprops_gradient(every: int) -> None:
    kw = SOLVES["dopri5"]
    net = make_net(3)
    y0 = torch.randn(5, 3, dtype=DT)
    t = sample_times(5)
    w = torch.randn(6, 5, 3, dtype=DT)
    _, _, g_y0, g_p = solve_batch(net, y0, t, w, "backprop", kw)
    _, _, c_y0, c_p = solve_batch(net, y0, t, w, Checkpoint(every=every), kw)
    assert close(c_y0, g_y0, 1e-12)
    for a, b in zip(c_p, g_p):
        assert close(a, b, 1e-12)


def test_random_draws_in_the_dynamics_are_refused_by_the_replaying_modes() -> None:
    """Dropout in training mode: the per-sample checkpoint replay does not replay the draws, so
    it raises (as the continuous adjoint does) instead of differentiating other draws."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.7, 1.5]])
    y0 = torch.randn(2, 3, requires_grad=True)
    for mode in ("checkpoint", "adjoint"):
        y = odeint(lambda s, y: net(y), y0, t, solver="rk4", step=0.1, adjoint=mode,
                   params=list(net.parameters()))  # fmt: skip
        with pytest.raises(RuntimeError, match="random numbers"):
            y.sum().backward()


def test_torch_func_grad_through_backprop_per_sample() -> None:
    t = torch.tensor([[0.0, 0.5, 1.0], [0.0, 0.7, 1.5]], dtype=DT)
    y0 = torch.randn(2, 3, dtype=DT)

    def loss(a: torch.Tensor) -> torch.Tensor:
        y = odeint(lambda s, y: -y, a, t, solver="dopri5", rtol=1e-10, atol=1e-12,
                   adjoint="backprop", params=())  # fmt: skip
        return y[-1].sum()

    g = torch.func.grad(loss)(y0)
    exact = torch.exp(-t[:, -1:]).expand(2, 3)  # d y(T)/d y0 of dy/dt = -y
    assert close(g, exact, 1e-8)


def test_integer_per_sample_times_are_cast_and_boolean_ones_refused() -> None:
    y0 = torch.ones(2, 1, dtype=DT)
    y = odeint(lambda s, y: -y, y0, torch.tensor([[0, 1], [0, 2]]), solver="rk4", step=0.01,
               params=())  # fmt: skip
    assert close(y[-1, :, 0], torch.exp(-torch.tensor([1.0, 2.0], dtype=DT)), 1e-9)
    with pytest.raises(TypeError, match="`t`"):
        odeint(lambda s, y: -y, y0, torch.tensor([[False, True], [False, True]]), params=())
