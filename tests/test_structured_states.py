"""States made of several tensors (tuples, lists, dicts) and complex states, in every mode.

The reference for a structured state is the same model written the way a user without this
feature writes it: the parts concatenated into one real tensor by hand and split again in the
dynamics. For complex states it is central finite differences of the real and imaginary parts.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
from problems import reversible_heun_reference, reversible_rk_reference
from torch import nn

from torchode_adjoint import (
    NFECounter,
    ODEBlock,
    Reversible,
    TemporalBatchNorm1d,
    check_gradients,
    get_solver,
    odeint,
)
from torchode_adjoint._structure import StateStructure, map_leaves

D = torch.float64
T = torch.tensor([0.0, 0.4, 1.0], dtype=D)
# (solver, mode): every gradient mode, and the reversible Heun method.
MODES = [
    ("rk4", "backprop"),
    ("rk4", "adjoint"),
    ("rk4", "checkpoint"),
    ("rk4", "reversible"),
    ("midpoint", "checkpoint"),
    ("reversible_heun", "reversible"),
]
EXACT_TOL = 1e-10


class PairDynamics(nn.Module):
    """A second-order system with a learnable, time-dependent force: x' = v,
    v' = -k x + tanh(W x + t u) @ P. The state is ``(x, v)``: x of shape (B, 3), v of (B, 3)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.k = nn.Parameter(torch.tensor(1.3, dtype=D))
        self.W = nn.Parameter(torch.randn(3, 5, generator=g, dtype=D) * 0.5)
        self.u = nn.Parameter(torch.randn(5, generator=g, dtype=D) * 0.5)
        self.P = nn.Parameter(torch.randn(5, 3, generator=g, dtype=D) * 0.5)

    def force(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -self.k * x + torch.tanh(x @ self.W + t * self.u) @ self.P

    def forward(self, t, state):
        x, v = state
        return (v, self.force(t, x))


class ConcatPair(nn.Module):
    """The same model as PairDynamics on the hand-made concatenation ``[x, v]`` of shape (B, 6)."""

    def __init__(self, pair: PairDynamics) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, t, y):
        x, v = y[:, :3], y[:, 3:]
        return torch.cat([v, self.pair.force(t, x)], dim=1)


class DictDynamics(nn.Module):
    """Parts of different shapes: ``{"z": (B, 2), "s": (4,)}``, coupled both ways."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.A = nn.Parameter(torch.randn(2, 2, generator=g, dtype=D) * 0.5)
        self.c = nn.Parameter(torch.randn(4, generator=g, dtype=D) * 0.5)

    def rates(self, t, z, s):
        dz = torch.tanh(z @ self.A) * s[:2].sum() - 0.1 * z * torch.cos(t)
        ds = -s * self.c + z.pow(2).mean()
        return dz, ds

    def forward(self, t, state):
        dz, ds = self.rates(t, state["z"], state["s"])
        return {"s": ds, "z": dz}  # another key order than the state's: read by key


class ConcatDict(nn.Module):
    def __init__(self, inner: DictDynamics, batch: int) -> None:
        super().__init__()
        self.inner, self.batch = inner, batch

    def forward(self, t, y):
        n = 2 * self.batch
        dz, ds = self.inner.rates(t, y[:n].view(self.batch, 2), y[n:])
        return torch.cat([dz.reshape(-1), ds])


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _close(a, b, tol):
    a, b = a.detach(), b.detach()
    assert float((a - b).norm()) <= tol * max(float(b.norm()), 1e-300), (a - b).norm()


def _pair_case(gen):
    x0 = torch.randn(4, 3, dtype=D, generator=gen).requires_grad_()
    v0 = torch.randn(4, 3, dtype=D, generator=gen).requires_grad_()
    wx = torch.randn(3, 4, 3, dtype=D, generator=gen)
    wv = torch.randn(3, 4, 3, dtype=D, generator=gen)
    return x0, v0, wx, wv


def _compiled(mode, compile):
    """The reversible mode's compiled path is that of a fixed coupling (the coupling chosen per
    step runs eagerly, with a warning: tests/test_compiled.py)."""
    return Reversible(coupling=0.999) if compile and mode == "reversible" else mode


@pytest.mark.parametrize(("solver", "mode"), MODES)
def test_a_two_part_state_has_the_gradients_of_the_hand_made_concatenation(solver, mode, gen):
    f = PairDynamics()
    x0, v0, wx, wv = _pair_case(gen)
    t = T.clone().requires_grad_()
    kw = dict(solver=solver, step=0.1, adjoint=mode)
    nfe = NFECounter()
    x, v = odeint(f, (x0, v0), t, nfe=nfe, **kw)
    lams = nfe.couplings  # the reversible mode's couplings, chosen per step
    inputs = (x0, v0, t, *f.parameters())
    got = _grads((wx * x).sum() + (wv * v).sum(), inputs)
    # The reference: the concatenation by hand, in the same mode (one real tensor) ...
    y = odeint(ConcatPair(f), torch.cat([x0, v0], dim=1), t, **kw)
    ref = _grads((wx * y[..., :3]).sum() + (wv * y[..., 3:]).sum(), inputs)
    for a, b in zip(got, ref):
        _close(a, b, EXACT_TOL)
    torch.testing.assert_close(x, y[..., :3], rtol=0, atol=0)
    # ... and autograd through the method integrated: the solver itself, or for the reversible
    # mode its scheme written out independently (tests/problems.py). The continuous adjoint is
    # within its discretisation error of it; the exact modes equal it to round-off.
    y0 = torch.cat([x0, v0], dim=1)
    if solver == "reversible_heun":
        y = reversible_heun_reference(ConcatPair(f), y0, t, [4, 6])
    elif mode == "reversible":
        y = reversible_rk_reference(ConcatPair(f), get_solver(solver), y0, t, [4, 6], lams)
    else:
        y = odeint(ConcatPair(f), y0, t, solver=solver, step=0.1, adjoint="backprop")
    ref = _grads((wx * y[..., :3]).sum() + (wv * y[..., 3:]).sum(), inputs)
    for a, b in zip(got, ref):
        _close(a, b, 1e-4 if mode == "adjoint" else EXACT_TOL)


@pytest.mark.parametrize(("solver", "mode"), MODES)
def test_a_dict_state_with_parts_of_different_shapes_matches_the_concatenation(solver, mode, gen):
    f = DictDynamics()
    z0 = torch.randn(3, 2, dtype=D, generator=gen).requires_grad_()
    s0 = torch.randn(4, dtype=D, generator=gen).requires_grad_()
    wz, ws = torch.randn(3, 3, 2, dtype=D, generator=gen), torch.randn(3, 4, dtype=D, generator=gen)
    kw = dict(solver=solver, step=0.1, adjoint=mode)
    out = odeint(f, {"z": z0, "s": s0}, T, **kw)
    assert list(out) == ["z", "s"] and out["z"].shape == (3, 3, 2) and out["s"].shape == (3, 4)
    inputs = (z0, s0, *f.parameters())
    got = _grads((wz * out["z"]).sum() + (ws * out["s"]).sum(), inputs)
    # The same mode on the concatenation (for checkpoint and backprop: backprop's gradient; the
    # modes' own references are the two-part test's).
    ref_mode = mode if mode in ("adjoint", "reversible") else "backprop"
    y = odeint(
        ConcatDict(f, 3),
        torch.cat([z0.reshape(-1), s0]),
        T,
        solver=solver,
        step=0.1,
        adjoint=ref_mode,
    )
    ref = _grads((wz * y[:, :6].reshape(3, 3, 2)).sum() + (ws * y[:, 6:]).sum(), inputs)
    for a, b in zip(got, ref):
        _close(a, b, EXACT_TOL)


def test_structures_round_trip_with_their_types_and_keys() -> None:
    Pair = namedtuple("Pair", "x v")
    y0s = [
        (torch.ones(2, dtype=D), torch.zeros(3, dtype=D)),
        [torch.ones(2, dtype=D), {"a": torch.ones(1, 2, dtype=D)}],
        OrderedDict([("b", torch.ones(2, dtype=D)), ("a", torch.ones(3, dtype=D))]),
        Pair(torch.ones(2, dtype=D), torch.ones(2, dtype=D)),
    ]
    for y0 in y0s:
        seen = []

        def f(t, y, seen=seen):
            seen.append(type(y))
            return y  # returns the very structure it was given

        out = odeint(f, y0, [0.0, 0.5, 1.0], step=0.5, params=())
        assert type(out) is type(y0) and seen[0] is type(y0)
        structure = StateStructure.of(y0)
        flat_in = structure.flatten(y0)
        # y' = y with Euler steps of 0.5: (1.5)^k y0 at the k-th output time, in every part
        for k, factor in enumerate((1.0, 1.5, 2.25)):
            at_k = structure.flatten(map_leaves(lambda x, k=k: x[k], out))
            torch.testing.assert_close(at_k, factor * flat_in, rtol=0, atol=0)
    assert list(odeint(lambda t, y: y, y0s[2], [0.0, 1.0], params=())) == ["b", "a"]


def test_an_ode_block_returns_the_structure_at_t1(gen) -> None:
    f = PairDynamics()
    x0, v0, _, _ = _pair_case(gen)
    block = ODEBlock(f, solver="rk4", step=0.1, adjoint="checkpoint")
    x, v = block((x0, v0))
    y = odeint(ConcatPair(f), torch.cat([x0, v0], dim=1), [0.0, 1.0], solver="rk4", step=0.1)
    torch.testing.assert_close(torch.cat([x, v], dim=1), y[-1], rtol=0, atol=0)
    assert block.nfe_forward == 10 * 4


def test_counts_are_steps_times_stages_in_both_passes(gen) -> None:
    f = PairDynamics()
    x0, v0, wx, _ = _pair_case(gen)
    nfe = NFECounter()
    x, _ = odeint(f, (x0, v0), T, solver="rk4", step=0.1, adjoint="adjoint", nfe=nfe)
    (wx * x).sum().backward()
    assert (nfe.forward, nfe.backward) == (10 * 4, 10 * 4)


class ScalarAndVector(nn.Module):
    """A log-density beside a sample, as in a CNF: ``(logp, z)`` with ``logp`` a scalar (shape
    ``()``) or of shape ``(1,)``, z of shape (3,); d logp/dt = -sum(tanh'(...)) couples them."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.W = nn.Parameter(torch.randn(3, 3, generator=g, dtype=D) * 0.5)
        self.c = nn.Parameter(torch.tensor(0.3, dtype=D))

    def rates(self, t, logp, z):
        dz = torch.tanh(z @ self.W) * torch.cos(t) - self.c * z * logp
        return -(dz * z).sum().reshape(logp.shape), dz

    def forward(self, t, state):
        logp, z = state
        return self.rates(t, logp, z)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("scalar_shape", [(), (1,)], ids=["0-dim", "1-element"])
@pytest.mark.parametrize(("solver", "mode"), MODES)
def test_a_scalar_part_beside_a_vector_has_the_gradients_of_the_concatenation(
    solver, mode, scalar_shape, compile, gen
):
    from torchode_adjoint import Compile

    f = ScalarAndVector()
    logp0 = torch.full(scalar_shape, 0.2, dtype=D).requires_grad_()
    z0 = torch.randn(3, dtype=D, generator=gen).requires_grad_()
    w = torch.randn(3, 4, dtype=D, generator=gen)
    options = Compile(backend="aot_eager", steps=2) if compile else False
    nfe = NFECounter()
    logp, z = odeint(
        f,
        (logp0, z0),
        T,
        solver=solver,
        step=0.1,
        adjoint=_compiled(mode, compile),
        compile=options,
        nfe=nfe,
    )
    assert logp.shape == (3, *scalar_shape) and z.shape == (3, 3)
    inputs = (logp0, z0, *f.parameters())
    got = _grads((logp.reshape(3, 1) * w[:, :1]).sum() + (z * w[:, 1:]).sum(), inputs)

    def concatenated(t, y):  # the user's own concatenation [logp, z] of shape (4,)
        dlogp, dz = f.rates(t, y[:1].reshape(scalar_shape), y[1:])
        return torch.cat([dlogp.reshape(1), dz])

    y0 = torch.cat([logp0.reshape(1), z0])
    if solver == "reversible_heun":
        y = reversible_heun_reference(concatenated, y0, T, [4, 6])
    elif mode == "reversible":
        lams = nfe.couplings or 0.999  # chosen per step, or the compiled path's fixed one
        y = reversible_rk_reference(concatenated, get_solver(solver), y0, T, [4, 6], lams)
    else:
        y = odeint(concatenated, y0, T, solver=solver, step=0.1, adjoint="backprop", params=())
    ref = _grads((y * w).sum(), inputs)
    for a, b in zip(got, ref):
        _close(a, b, 1e-4 if mode == "adjoint" else EXACT_TOL)


# ---------------------------------------------------------------------------------------------
# Complex states


def _complex_problem(gen, dtype=torch.complex128):
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    A = (
        torch.complex(
            torch.randn(4, 4, generator=gen, dtype=D), torch.randn(4, 4, generator=gen, dtype=D)
        ).to(dtype)
        * 0.5
    )
    omega = nn.Parameter(torch.tensor(0.7, dtype=real))

    def f(t, z):  # a non-holomorphic part (|z|^2) too, so conj(z) and z both matter
        return 1j * (z @ A.T) * omega - 0.1 * z * z.abs().pow(2) + torch.cos(t) * z.conj()

    z0 = torch.complex(
        torch.randn(2, 4, generator=gen, dtype=D), torch.randn(2, 4, generator=gen, dtype=D)
    ).to(dtype)
    w = torch.complex(
        torch.randn(2, 4, generator=gen, dtype=D), torch.randn(2, 4, generator=gen, dtype=D)
    ).to(dtype)
    return f, z0, w, omega


def _complex_loss(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w.conj() * z).real.sum() + z.abs().pow(2).sum()


@pytest.mark.parametrize(("solver", "mode"), MODES)
def test_a_complex_state_has_backprops_gradient_and_the_finite_differences(solver, mode, gen):
    f, z0, w, omega = _complex_problem(gen)
    nfe = NFECounter()
    kw = dict(solver=solver, step=0.05, adjoint=mode, params=[omega], nfe=nfe)

    def loss(z_init: torch.Tensor, om=None) -> torch.Tensor:
        return _complex_loss(odeint(f, z_init, [0.0, 0.6], **kw)[-1], w)

    z = z0.clone().requires_grad_()
    g_z, g_om = _grads(loss(z), (z, omega))
    lams = nfe.couplings
    assert g_z.dtype == torch.complex128
    z = z0.clone().requires_grad_()
    if solver == "reversible_heun":
        out = reversible_heun_reference(f, z, torch.tensor([0.0, 0.6], dtype=D), [12])[-1]
    elif mode == "reversible":
        out = reversible_rk_reference(
            f, get_solver(solver), z, torch.tensor([0.0, 0.6], dtype=D), [12], lams
        )[-1]
    else:
        out = odeint(f, z, [0.0, 0.6], **{**kw, "adjoint": "backprop"})[-1]
    r_z, r_om = _grads(_complex_loss(out, w), (z, omega))
    tol = 1e-4 if mode == "adjoint" else EXACT_TOL
    _close(g_z, r_z, tol)
    _close(g_om, r_om, tol)
    # PyTorch's convention for a real loss of a complex input: dL/dRe + i dL/dIm.
    if mode == "adjoint":
        return
    eps = 1e-6
    with torch.no_grad():
        fd = torch.zeros_like(z0)
        for k in range(z0.numel()):
            for unit in (1.0, 1j):
                e = torch.zeros_like(z0).view(-1)
                e[k] = unit * eps
                e = e.view_as(z0)
                d = (loss(z0 + e) - loss(z0 - e)) / (2 * eps)
                fd.view(-1)[k] += d * unit
    _close(g_z, fd, 1e-7)


def test_a_complex64_state_runs_on_a_float32_time_grid(gen) -> None:
    f, z0, _, omega = _complex_problem(gen, torch.complex64)
    times = []

    def g(t, z):
        times.append(t.dtype)
        return f(t, z)

    out = odeint(g, z0, torch.tensor([0.0, 0.5], dtype=D), step=0.1, params=[omega])
    assert out.dtype == torch.complex64 and out.shape == (2, 2, 4)
    assert set(times) == {torch.float32}


@pytest.mark.parametrize("real_shape", [(3,), (2, 3)], ids=["flat", "rows"])
def test_a_state_with_complex_and_real_parts_of_odd_sizes_gets_backprops_gradient(
    real_shape, gen
) -> None:
    # A real part of 3 elements (per row, when it shares the complex part's batch dimension)
    # before a complex one: the flat state pads to keep the real/imaginary pairs aligned.
    f_c, z0, w, omega = _complex_problem(gen)
    r0 = torch.randn(real_shape, dtype=D, generator=gen)
    structure = StateStructure.of((r0, z0))
    assert structure.padded and structure.batch == real_shape[:-1]

    def f(t, state):
        r, z = state
        return (-r * z.abs().mean(), f_c(t, z) * torch.tanh(r).sum())

    def grads(mode):
        r, z = r0.clone().requires_grad_(), z0.clone().requires_grad_()
        out_r, out_z = odeint(
            f, (r, z), [0.0, 0.5, 1.0], solver="rk4", step=0.1, adjoint=mode, params=[omega]
        )
        return _grads(_complex_loss(out_z, w) + out_r.pow(2).sum(), (r, z, omega))

    ref = grads("backprop")
    for mode, tol in (("checkpoint", EXACT_TOL), ("adjoint", 1e-4)):
        for a, b in zip(grads(mode), ref):
            _close(a, b, tol)


# ---------------------------------------------------------------------------------------------
# Checks that name the part


@pytest.mark.parametrize(
    ("returned", "error", "match"),
    [
        (lambda y: (y[0],), ValueError, r"`dy/dt` must be a tuple of 2 parts.*got length 1"),
        (lambda y: (y[0], y[0]), ValueError, r"`dy/dt\[1\]` must have the state's shape \(3,\)"),
        (lambda y: (y[0], y[1].float()), TypeError, r"`dy/dt\[1\]` must have the state's dtype"),
        (lambda y: (y[0], 1.0), TypeError, r"`dy/dt\[1\]` must be a Tensor"),
        (lambda y: {"a": y[0]}, TypeError, r"`dy/dt` must be a tuple of 2 parts.*got dict"),
    ],
)
def test_dynamics_returning_another_structure_are_refused_naming_the_part(returned, error, match):
    y0 = (torch.ones(2, dtype=D), torch.ones(3, dtype=D))
    with pytest.raises(error, match=match):
        odeint(lambda t, y: returned(y), y0, [0.0, 1.0], params=())


def test_a_dict_with_a_missing_key_is_refused_naming_the_keys() -> None:
    y0 = {"x": torch.ones(2, dtype=D), "v": torch.ones(2, dtype=D)}
    with pytest.raises(ValueError, match=r"`dy/dt` must have the state's keys \['x', 'v'\]"):
        odeint(lambda t, y: {"x": y["x"], "w": y["v"]}, y0, [0.0, 1.0], params=())


@pytest.mark.parametrize(
    ("y0", "error", "match"),
    [
        ((torch.ones(2), torch.ones(2, dtype=D)), TypeError, r"`y0\[1\]` has dtype.*one precision"),
        ({"a": torch.ones(2), "b": torch.ones(2, dtype=torch.long)}, TypeError, r"`y0\['b'\]`"),
        ((torch.ones(2), "x"), TypeError, r"`y0\[1\]` must be a tensor"),
        ((), ValueError, r"`y0` holds no tensor"),
        ((torch.ones(2), torch.ones(2, device="meta")), ValueError, r"`y0\[1\]` is on meta"),
    ],
)
def test_malformed_structured_states_are_refused_naming_the_part(y0, error, match) -> None:
    with pytest.raises(error, match=match):
        odeint(lambda t, y: y, y0, [0.0, 1.0], params=())


def test_a_float32_part_with_a_complex64_part_shares_one_precision() -> None:
    y0 = (torch.ones(2), torch.ones(2, dtype=torch.complex64))
    r, z = odeint(lambda t, y: (-y[0], 1j * y[1]), y0, [0.0, 1.0], step=0.01, params=())
    assert r.dtype == torch.float32 and z.dtype == torch.complex64
    torch.testing.assert_close(
        z[-1],
        torch.full((2,), 0.99995 * complex(0.5403, 0.8415), dtype=torch.complex64),
        atol=2e-2,
        rtol=0,
    )


def test_a_non_finite_state_is_reported_with_its_part_and_time() -> None:
    y0 = {"x": torch.ones(2, dtype=D), "v": torch.ones(2, dtype=D)}

    def f(t, y):
        return {"x": -y["x"], "v": y["v"] / (0.55 - t).clamp_min(0)}  # blows up at t = 0.55

    # Euler: the step from 0.6 evaluates f at t = 0.6, so the state at 0.7 is the first infinite
    with pytest.raises(RuntimeError, match=r"at t = 0\.7 \(step 7 of 10 .*\) \(in `y\['v'\]`\)"):
        odeint(f, y0, [0.0, 1.0], step=0.1, params=())


def test_a_non_finite_adjoint_names_its_part() -> None:
    y0 = (torch.ones(2, dtype=D).requires_grad_(), torch.ones(2, dtype=D).requires_grad_())

    class F(nn.Module):
        def forward(self, t, y):
            return (-y[0], y[1].clamp(-1e300, 1e300) * 0)

    x, v = odeint(F(), y0, [0.0, 1.0], step=0.25, adjoint="adjoint")
    bad = torch.tensor([0.0, float("inf")], dtype=D)
    with pytest.raises(RuntimeError, match=r"became NaN or infinite at t = 1 \(in `dL/dy\[1\]`\)"):
        (x.sum() + (bad * v[-1]).sum()).backward()


def test_an_in_place_change_of_a_part_is_refused() -> None:
    def f(t, y):
        y[1].mul_(2)
        return y

    with pytest.raises(RuntimeError, match="modify their input `y` in place"):
        odeint(f, (torch.ones(2, dtype=D), torch.ones(2, dtype=D)), [0.0, 1.0], params=())


def test_a_captured_tensor_is_refused_by_the_memory_saving_modes(gen) -> None:
    other = torch.randn(2, dtype=D, generator=gen, requires_grad=True)

    class F(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = nn.Parameter(torch.tensor(0.5, dtype=D))

        def forward(self, t, y):
            return (y[1] * other, -self.k * y[0])

    for mode in ("adjoint", "checkpoint", "reversible"):
        x, _ = odeint(
            F(),
            (torch.ones(2, dtype=D), torch.ones(2, dtype=D)),
            [0.0, 1.0],
            adjoint=mode,
            solver="rk4",
        )
        with pytest.raises(RuntimeError, match="not one of its parameters"):
            x.sum().backward()


# ---------------------------------------------------------------------------------------------
# The tools around a solve


@pytest.mark.parametrize("mode", ["backprop", "adjoint", "checkpoint", "reversible"])
def test_check_gradients_passes_a_dict_state_and_catches_a_wrong_gradient(mode, gen) -> None:
    y0 = {
        "z": torch.randn(3, 2, dtype=D, generator=gen),
        "s": torch.randn(4, dtype=D, generator=gen),
    }
    report = check_gradients(DictDynamics(), y0, solver="rk4", step=0.05, adjoint=mode)
    assert report.verdict == "pass", str(report)
    assert report.checks[0].name == "y0 (flattened)" and report.checks[0].shape == (10,)


def test_check_gradients_flags_a_complex_state_whose_gradient_is_conjugated(monkeypatch, gen):
    # Checked as the real vector: a backward that conjugated the complex gradient (the other
    # convention) is a wrong gradient there, and the check must say so.
    f, z0, _, omega = _complex_problem(gen)
    assert check_gradients(f, z0, step=0.1, adjoint="checkpoint", params=[omega]).verdict == "pass"

    real_view = torch.view_as_real

    class Conj(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return real_view(x)

        @staticmethod
        def backward(ctx, g):
            return torch.view_as_complex(g.contiguous()).conj()

    monkeypatch.setattr(torch, "view_as_real", Conj.apply)
    report = check_gradients(f, z0, step=0.1, adjoint="checkpoint", params=[omega])
    # the reference goes through the same views, so the finite differences catch it
    assert report.checks[0].verdict != "pass" and report.checks[0].rel_err_fd > 0.1, str(report)


class NormedPair(nn.Module):
    """A temporal BatchNorm on one part of a tuple state."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = TemporalBatchNorm1d(3, max_times=16).double()
        self.lin = nn.Linear(3, 3).double()

    def forward(self, t, state):
        x, v = state
        return (v, -self.lin(self.norm(t, x)))


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint"])
def test_a_temporal_batchnorm_on_a_part_gives_backprops_gradient_and_one_update(mode, gen):
    torch.manual_seed(0)
    f = NormedPair()
    x0, v0, wx, _ = _pair_case(gen)
    kw = dict(solver="rk4", step=0.25, adjoint=mode)
    ref_f = NormedPair()
    ref_f.load_state_dict(f.state_dict())
    x, _ = odeint(f, (x0, v0), [0.0, 1.0], **kw)
    got = _grads((wx[1] * x[-1]).sum(), (x0, *f.parameters()))
    kw["adjoint"] = "backprop"
    x, _ = odeint(ref_f, (x0, v0), [0.0, 1.0], **kw)
    ref = _grads((wx[1] * x[-1]).sum(), (x0, *ref_f.parameters()))
    tol = 1e-3 if mode == "adjoint" else EXACT_TOL
    for a, b in zip(got, ref):
        _close(a, b, tol)
    # the backward pass re-evaluated the norm without updating its statistics again
    for name, buf in ref_f.state_dict().items():
        torch.testing.assert_close(
            f.state_dict()[name], buf, rtol=0, atol=0, equal_nan=True, msg=name
        )


def test_a_single_real_tensor_never_enters_the_structure_code(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a single real tensor was flattened")

    monkeypatch.setattr(StateStructure, "flatten", refuse)
    monkeypatch.setattr(StateStructure, "unflatten", refuse)
    seen = []
    y0 = torch.ones(2, dtype=D)

    def f(t, y):
        seen.append(y)
        return -y

    odeint(f, y0, [0.0, 1.0], step=0.5, params=())
    assert seen[0] is y0  # the user's own tensor, not a view of a flat copy


def test_under_autocast_each_part_keeps_the_state_dtype_and_the_concatenations_values(gen):
    x0, v0 = (torch.randn(4, 3, generator=gen) for _ in range(2))
    lin = nn.Linear(3, 3)

    def pair(t, state):
        x, v = state
        return lin(v), lin(x)  # bfloat16 under autocast

    def concat(t, y):
        return torch.cat([lin(y[:, 3:]), lin(y[:, :3])], dim=1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, v = odeint(pair, (x0, v0), [0.0, 1.0], step=0.25, params=list(lin.parameters()))
        y = odeint(
            concat, torch.cat([x0, v0], 1), [0.0, 1.0], step=0.25, params=list(lin.parameters())
        )
    assert x.dtype == v.dtype == torch.float32
    torch.testing.assert_close(torch.cat([x, v], dim=-1), y, rtol=0, atol=0)


def test_torch_func_grad_through_a_tuple_state_equals_autograd(gen) -> None:
    f = PairDynamics()
    x0, v0, wx, wv = _pair_case(gen)

    def loss(x_init, v_init):
        x, v = odeint(f, (x_init, v_init), T, solver="rk4", step=0.1, adjoint="backprop")
        return (wx * x).sum() + (wv * v).sum()

    got = torch.func.grad(loss, argnums=(0, 1))(x0.detach(), v0.detach())
    ref = _grads(loss(x0, v0), (x0, v0))
    for a, b in zip(got, ref):
        _close(a, b, EXACT_TOL)
