"""What the dynamics read besides the state and the time: right or raise in every replaying mode.

The memory-saving modes evaluate the dynamics again in the backward pass. A tensor the dynamics
read (an attribute, a buffer, a closure variable, a global, a tensor two objects deep) that is
rebound or modified in place between a solve and its backward must raise, naming the tensor; a
tensor they do not read (a counter, a cache), a rebinding undone before the backward, and
BatchNorm's running statistics must not. The references for the cases that must pass are
backprop through the same steps (exact modes) or its gradient within the discretisation error
(the continuous adjoint).
"""

from __future__ import annotations

import types

import pytest
import torch
from problems import reversible_heun_reference, reversible_rk_reference
from torch import nn

from torchode_adjoint import Compile, NFECounter, ODEBlock, Reversible, get_solver, odeint

D = torch.float64
# (solver, mode): every mode that evaluates the dynamics again, and the reversible Heun method.
REPLAYING = [
    ("rk4", "adjoint"),
    ("rk4", "checkpoint"),
    ("rk4", "reversible"),
    ("reversible_heun", "reversible"),
]
IDS = [f"{s}-{m}" for s, m in REPLAYING]
# The compiled path (aot_eager: Dynamo's graphs without generated kernels, as in
# test_compiled.py); the check lives in the mode scaffolding, before the executor.
COMPILED = Compile(backend="aot_eager", steps=2)


class Noisy(nn.Module):
    """Dynamics that read a noise vector kept on the module and a registered buffer."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.lin = nn.Linear(3, 3, dtype=D)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 3, generator=g, dtype=D) * 0.5)
        self.register_buffer("scale", torch.tensor([1.0, 0.5, 2.0], dtype=D))
        self.e = torch.ones(3, dtype=D)

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) * self.e * self.scale


def _grads(loss, module):
    return torch.autograd.grad(loss, list(module.parameters()))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# The cases that must raise


def _compiled(mode, compile):
    """The reversible mode's compiled path is that of a fixed coupling (the coupling chosen per
    step runs eagerly, with a warning: tests/test_compiled.py)."""
    return Reversible(coupling=0.999) if compile and mode == "reversible" else mode


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("solver", "mode"), REPLAYING, ids=IDS)
def test_noise_rebound_between_two_solves_of_one_backward_raises_naming_it(solver, mode, compile):
    """The CNF pattern used twice before one backward: two halves of a batch, each with its own
    noise kept on the module."""
    f = Noisy()
    block = ODEBlock(
        f,
        solver=solver,
        step=0.25,
        adjoint=_compiled(mode, compile),
        compile=COMPILED if compile else False,
    )
    x = torch.randn(4, 3, dtype=D)
    f.e = torch.randn(3, dtype=D)
    first = block(x[:2])
    f.e = torch.randn(3, dtype=D)
    second = block(x[2:])
    loss = first.pow(2).sum() + second.pow(2).sum()
    with pytest.raises(RuntimeError, match=r"`Noisy\.e` \(shape \(3,\).*rebound") as err:
        loss.backward()
    message = str(err.value)
    assert f"adjoint={mode!r}" in message
    for fix in ("Keep it fixed until `backward()`", "pass it in the state", "adjoint='backprop'"):
        assert fix in message
    assert all(p.grad is None for p in f.parameters())  # raised before anything was computed


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(("solver", "mode"), REPLAYING, ids=IDS)
def test_a_buffer_modified_in_place_after_the_solve_raises_naming_it(solver, mode, compile):
    f = Noisy()
    block = ODEBlock(
        f,
        solver=solver,
        step=0.25,
        adjoint=_compiled(mode, compile),
        compile=COMPILED if compile else False,
    )
    loss = block(torch.randn(2, 3, dtype=D)).pow(2).sum()
    with torch.no_grad():
        f.scale.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"`Noisy\.scale` .*modified in place after the solve"):
        loss.backward()


@pytest.mark.parametrize(("solver", "mode"), REPLAYING, ids=IDS)
def test_a_closure_tensor_modified_in_place_raises_naming_the_variable(solver, mode):
    weight = torch.randn(3, 3, dtype=D, requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=D)

    def rates(t, y):
        return torch.tanh(y @ weight) * mask

    y = odeint(rates, torch.randn(2, 3, dtype=D), [0.0, 1.0], solver=solver, step=0.25,
               adjoint=mode, params=[weight])  # fmt: skip
    mask[1] = 1.0
    with pytest.raises(RuntimeError, match=r"`mask` \(a variable captured by `rates`\).*in place"):
        y.sum().backward()


class _Config:
    """A plain object holding a tensor: the dynamics reach it two objects deep."""

    def __init__(self, shift: torch.Tensor) -> None:
        self.inner = types.SimpleNamespace(shift=shift)


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=D)
        self.config = _Config(torch.zeros(3, dtype=D))

    def forward(self, t, y):
        return torch.tanh(self.lin(y) + self.config.inner.shift)


@pytest.mark.parametrize(("solver", "mode"), REPLAYING, ids=IDS)
def test_a_tensor_two_objects_deep_rebound_raises_with_its_path(solver, mode):
    f = Deep()
    y = odeint(f, torch.randn(2, 3, dtype=D), [0.0, 1.0], solver=solver, step=0.25, adjoint=mode)
    f.config.inner.shift = torch.ones(3, dtype=D)
    with pytest.raises(RuntimeError, match=r"`Deep\.config\.inner\.shift` .*rebound"):
        y.sum().backward()


_GLOBAL_RATE = torch.tensor(0.5, dtype=D)


def _global_rates(t, y):
    return -_GLOBAL_RATE * y


@pytest.mark.parametrize(("solver", "mode"), REPLAYING, ids=IDS)
def test_a_global_tensor_rebound_raises_naming_the_global(solver, mode):
    global _GLOBAL_RATE
    y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    y = odeint(_global_rates, y0, [0.0, 1.0], solver=solver, step=0.25, adjoint=mode, params=())
    saved = _GLOBAL_RATE
    _GLOBAL_RATE = torch.tensor(2.0, dtype=D)
    try:
        with pytest.raises(RuntimeError, match=r"`_GLOBAL_RATE` \(a global read by `_global"):
            y.sum().backward()
    finally:
        _GLOBAL_RATE = saved


class SelfWriting(nn.Module):
    """Dynamics that scale by a buffer they also update in place at every evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=D)
        self.register_buffer("gain", torch.ones((), dtype=D))

    def forward(self, t, y):
        out = self.lin(y) * self.gain
        with torch.no_grad():
            self.gain.mul_(0.99)
        return out


@pytest.mark.parametrize(("solver", "mode"), REPLAYING, ids=IDS)
def test_dynamics_that_write_a_tensor_they_read_raise_during_the_solve(solver, mode):
    f = SelfWriting()
    y = odeint(f, torch.randn(2, 3, dtype=D), [0.0, 1.0], solver=solver, step=0.25, adjoint=mode)
    with pytest.raises(RuntimeError, match=r"`SelfWriting\.gain` .*in place during the solve"):
        y.sum().backward()


def test_a_changed_tensor_at_no_known_place_is_named_by_shape_and_dtype():
    holder = [[[[[[torch.tensor([1.0, 2.0], dtype=D)]]]]]]  # deeper than the search goes
    weight = torch.randn(2, 2, dtype=D, requires_grad=True)

    def rates(t, y):
        return (y @ weight) * holder[0][0][0][0][0][0]

    y = odeint(rates, torch.randn(2, 2, dtype=D), [0.0, 1.0], solver="rk4", step=0.5,
               adjoint="adjoint", params=[weight])  # fmt: skip
    holder[0][0][0][0][0][0].add_(1.0)
    with pytest.raises(RuntimeError, match=r"a tensor of shape \(2,\) and dtype torch.float64"):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------
# The cases that must not raise, with the right gradient


def _solve_with_reference(f, x, solver, mode, step=0.25, params=None):
    """The mode's solution at t1 and backprop's through the same scheme."""
    t = torch.tensor([0.0, 1.0], dtype=D)
    nfe = NFECounter()
    got = odeint(f, x, t, solver=solver, step=step, adjoint=mode, params=params, nfe=nfe)[-1]
    if solver == "reversible_heun":
        ref = reversible_heun_reference(f, x, t, [round(1.0 / step)])[-1]
    elif mode == "reversible":
        n = [round(1.0 / step)]
        ref = reversible_rk_reference(f, get_solver(solver), x, t, n, nfe.couplings)[-1]
    else:
        ref = odeint(f, x, t, solver=solver, step=step, adjoint="backprop")[-1]
    return got, ref


def _tolerance(mode):
    return 1e-3 if mode == "adjoint" else 1e-10


class Counting(nn.Module):
    """Dynamics that keep a step counter and a cache on the module, neither read for dy/dt."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=D)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.cache = torch.zeros(2, 3, dtype=D)
        self.unused = torch.zeros(3, dtype=D)

    def forward(self, t, y):
        self.calls += 1  # a counter: written, never read for the output
        out = torch.tanh(self.lin(y))
        self.cache = out.detach()  # a cache: rebound at every evaluation
        return out


@pytest.mark.parametrize(("solver", "mode"), REPLAYING, ids=IDS)
def test_counters_caches_and_unread_tensors_changing_raise_nothing(solver, mode):
    f = Counting()
    x = torch.randn(2, 3, dtype=D)
    got, ref = _solve_with_reference(f, x, solver, mode)
    loss_got, loss_ref = got.pow(2).sum(), ref.pow(2).sum()
    f.calls.zero_()  # in place, between the solves and the backward
    f.unused = torch.ones(3, dtype=D)  # rebound: the dynamics never read it
    for a, b in zip(_grads(loss_got, f), _grads(loss_ref, f)):
        assert _rel(a, b) < _tolerance(mode)


@pytest.mark.parametrize(("solver", "mode"), REPLAYING, ids=IDS)
def test_a_rebinding_undone_before_the_backward_raises_nothing(solver, mode):
    f = Noisy()
    f.e = torch.randn(3, dtype=D)
    kept = f.e
    x = torch.randn(2, 3, dtype=D)
    got, ref = _solve_with_reference(f, x, solver, mode)
    f.e = torch.zeros(3, dtype=D)
    f.e = kept  # the same tensor is back: the backward pass evaluates what the forward did
    for a, b in zip(_grads(got.pow(2).sum(), f), _grads(ref.pow(2).sum(), f)):
        assert _rel(a, b) < _tolerance(mode)


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint"])
def test_batchnorm_statistics_updated_by_a_second_solve_raise_nothing(mode):
    """Two solves of a block with BatchNorm in training mode, then one backward: the second
    solve updates the running statistics in place, which training mode never reads."""
    torch.manual_seed(0)
    dyn = nn.Sequential(nn.Linear(3, 3, dtype=D), nn.BatchNorm1d(3, dtype=D), nn.Tanh())
    f = lambda t, y: dyn(y)  # noqa: E731 - a closure over a module, as users write it
    x = torch.randn(8, 3, dtype=D)
    params = list(dyn.parameters())
    kw = dict(solver="rk4", step=0.25, params=params)
    got = odeint(f, x[:4], [0.0, 1.0], adjoint=mode, **kw)[-1].pow(2).sum()
    got = got + odeint(f, x[4:], [0.0, 1.0], adjoint=mode, **kw)[-1].pow(2).sum()
    grads = torch.autograd.grad(got, params)
    ref = odeint(f, x[:4], [0.0, 1.0], adjoint="backprop", **kw)[-1].pow(2).sum()
    ref = ref + odeint(f, x[4:], [0.0, 1.0], adjoint="backprop", **kw)[-1].pow(2).sum()
    ref_grads = torch.autograd.grad(ref, params)
    # One norm over all parameters: the linear bias before the norm has a zero gradient.
    flat = torch.cat([g.flatten() for g in grads])
    assert _rel(flat, torch.cat([g.flatten() for g in ref_grads])) < _tolerance(mode)
    # The running statistics were updated by the two forward solves only (16 evaluations
    # each), not by the backward pass's evaluations.
    assert dyn[1].num_batches_tracked.item() == 2 * 2 * 16


class NoiseInState(nn.Module):
    """The safe CNF pattern: the noise is a part of the state whose derivative is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=D)

    def forward(self, t, state):
        z, e = state
        return torch.tanh(self.lin(z)) * e, torch.zeros_like(e)


@pytest.mark.parametrize(("solver", "mode"), REPLAYING, ids=IDS)
def test_noise_passed_in_the_state_gives_backprops_gradient_over_two_solves(solver, mode):
    f = NoiseInState()
    x = torch.randn(4, 3, dtype=D)
    noise = [torch.randn(2, 3, dtype=D) for _ in range(2)]
    loss_got = loss_ref = 0.0
    flat = lambda t, y: torch.cat(f(t, (y[:, :3], y[:, 3:])), dim=1)  # noqa: E731
    for half, e in zip((x[:2], x[2:]), noise):
        z1, _ = odeint(f, (half, e), [0.0, 1.0], solver=solver, step=0.25, adjoint=mode)
        loss_got = loss_got + z1[-1].pow(2).sum()
        # The reference: the scheme through the hand-made concatenation [z, e], by backprop.
        _, ref = _solve_with_reference(
            flat, torch.cat([half, e], dim=1), solver, mode, params=list(f.parameters())
        )
        loss_ref = loss_ref + ref[:, :3].pow(2).sum()
    for a, b in zip(_grads(loss_got, f), _grads(loss_ref, f)):
        assert _rel(a, b) < _tolerance(mode)


def test_backprop_reads_what_the_forward_read_and_needs_no_check():
    """Backprop keeps the tensors it read in its graph: a rebinding after the solve changes
    nothing, and it raises nothing."""
    f = Noisy()
    f.e = torch.randn(3, dtype=D)
    x = torch.randn(2, 3, dtype=D)
    loss = odeint(f, x, [0.0, 1.0], solver="rk4", step=0.25, adjoint="backprop")[-1].sum()
    before = f.e
    f.e = torch.randn(3, dtype=D)
    grads = _grads(loss, f)
    f.e = before
    again = odeint(f, x, [0.0, 1.0], solver="rk4", step=0.25, adjoint="backprop")[-1].sum()
    for a, b in zip(grads, _grads(again, f)):
        assert _rel(a, b) < 1e-14


@pytest.mark.parametrize("closure", [False, True], ids=["module", "closure"])
@pytest.mark.parametrize("mode", ["adjoint", "checkpoint", "reversible"])
def test_temporal_batchnorm_statistics_updated_by_a_second_solve_raise_nothing(mode, closure):
    """The temporal BatchNorm writes its per-time statistics and times in place at every
    evaluation of a training solve; none of them is read for the output in training mode."""
    from torchode_adjoint import TemporalBatchNorm1d

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=D)
            self.norm = TemporalBatchNorm1d(3, dtype=D)

        def forward(self, t, y):
            return torch.tanh(self.norm(t, self.lin(y)))

    torch.manual_seed(0)
    dyn = Normed()
    f = (lambda t, y: dyn(t, y)) if closure else dyn  # noqa: E731
    params = list(dyn.parameters())
    x = torch.randn(8, 3, dtype=D)

    def loss(adjoint):
        kw = dict(solver="rk4", step=0.25, adjoint=adjoint, params=params if closure else None)
        first = odeint(f, x[:4], [0.0, 1.0], **kw)[-1].pow(2).sum()
        return first + odeint(f, x[4:], [0.0, 1.0], **kw)[-1].pow(2).sum()

    got = torch.cat([g.flatten() for g in torch.autograd.grad(loss(mode), params)])
    ref = torch.cat([g.flatten() for g in torch.autograd.grad(loss("backprop"), params)])
    if mode == "reversible":  # another scheme: its gradient is close to backprop's, not equal
        assert _rel(got, ref) < 1e-2
    else:
        assert _rel(got, ref) < _tolerance(mode)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["adjoint", "checkpoint", "reversible"])
def test_batchnorm_statistics_changed_after_the_solve_raise_in_eval_mode_only(mode, training):
    """In training mode BatchNorm normalises with the batch's statistics and never reads its
    running ones; in eval mode it reads them, and a change must raise."""
    torch.manual_seed(0)
    dyn = nn.Sequential(nn.Linear(3, 3, dtype=D), nn.BatchNorm1d(3, dtype=D), nn.Tanh())
    dyn.train(training)
    f = lambda t, y: dyn(y)  # noqa: E731
    kw = dict(solver="rk4", step=0.25, params=list(dyn.parameters()))
    loss = odeint(f, torch.randn(4, 3, dtype=D), [0.0, 1.0], adjoint=mode, **kw)[-1].sum()
    with torch.no_grad():
        dyn[1].running_mean.add_(1.0)  # user code resetting or shifting the statistics
    if training:
        loss.backward()
        assert dyn[0].weight.grad is not None
    else:
        with pytest.raises(RuntimeError, match=r"`dyn\.1\.running_mean` .*modified in place"):
            loss.backward()


class _Rates:
    """A plain callable object (not a module) holding its weight."""

    def __init__(self) -> None:
        self.w = torch.randn(3, 3, dtype=D, requires_grad=True)

    def __call__(self, t, y):
        return torch.tanh(y @ self.w)

    def rates(self, t, y):  # the same, as a bound method
        return torch.tanh(y @ self.w)


@pytest.mark.parametrize("kind", ["callable", "bound method"])
def test_a_plain_objects_tensor_rebound_is_named_through_the_object(kind):
    obj = _Rates()
    func = obj if kind == "callable" else obj.rates
    y = odeint(func, torch.randn(2, 3, dtype=D), [0.0, 1.0], solver="rk4", step=0.25,
               adjoint="adjoint", params=[obj.w])  # fmt: skip
    obj.w = torch.randn(3, 3, dtype=D, requires_grad=True)
    where = r"`_Rates\.w`" if kind == "callable" else r"`rates\.__self__\.w`"
    with pytest.raises(RuntimeError, match=where + r" .*rebound"):
        y.sum().backward()


def test_a_partials_tensor_modified_in_place_is_named_by_its_keyword():
    import functools

    def decay(t, y, rate):
        return -rate * y

    rate = torch.tensor(0.5, dtype=D)
    y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    func = functools.partial(decay, rate=rate)
    y = odeint(func, y0, [0.0, 1.0], solver="rk4", step=0.25, adjoint="checkpoint", params=())
    rate.mul_(2.0)
    with pytest.raises(RuntimeError, match=r"`partial\['rate'\]` .*modified in place"):
        y.sum().backward()


def test_a_tensor_read_only_through_item_is_a_read():
    # Its value steers the computation from Python: a change must raise like any other read.
    class Gain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=D)
            self.register_buffer("gain", torch.tensor(2.0, dtype=D))

        def forward(self, t, y):
            return self.lin(y) * float(self.gain.item())

    f = Gain()
    y = odeint(f, torch.randn(2, 3, dtype=D), [0.0, 1.0], solver="rk4", step=0.25, adjoint=True)
    with torch.no_grad():
        f.gain.fill_(3.0)
    with pytest.raises(RuntimeError, match=r"`Gain\.gain` .*modified in place"):
        y.sum().backward()


def test_a_structured_state_names_the_tensor_from_the_users_dynamics():
    # The flat-vector wrapper of a tuple state is the library's: the path starts at the user's
    # module, as the user wrote it.
    class PairNoise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3, dtype=D)
            self.e = torch.ones(3, dtype=D)

        def forward(self, t, state):
            z, logp = state
            dz = torch.tanh(self.lin(z)) * self.e
            return dz, -(dz * z).sum(dim=1)

    f = PairNoise()
    z, logp = odeint(f, (torch.randn(2, 3, dtype=D), torch.zeros(2, dtype=D)), [0.0, 1.0],
                     solver="rk4", step=0.25, adjoint="checkpoint")  # fmt: skip
    f.e = torch.full((3,), 2.0, dtype=D)
    with pytest.raises(RuntimeError, match=r"`PairNoise\.e` \(shape \(3,\)"):
        (z.sum() + logp.sum()).backward()


# ---------------------------------------------------------------------------------------------
# Every kind of place a read tensor is found at: named exactly, unchanged passes, rebound raises

_SHIFT = torch.tensor([0.1, -0.2, 0.3], dtype=D)


class _Caller:
    """A callable object whose ``__call__`` reads a global."""

    def __call__(self, t, y):
        return torch.tanh(y) + _SHIFT


def _places():
    """(id, dynamics, params, rebind, the name the error must give)."""
    out = []
    f = Noisy()
    out.append(("module attribute", f, None, lambda: setattr(f, "e", f.e.clone()), "`Noisy.e`"))

    def closure():
        noise = torch.ones(3, dtype=D)

        def rates(t, y):
            return torch.tanh(y) * noise

        def rebind():
            nonlocal noise
            noise = noise.clone()

        return rates, rebind

    rates, rebind = closure()
    out.append(("closure", rates, (), rebind, "`noise` (a variable captured by `rates`)"))
    holder = [torch.ones(3, dtype=D)]
    out.append(
        (
            "list item",
            lambda t, y: torch.tanh(y) * holder[0],
            (),
            lambda: holder.__setitem__(0, holder[0].clone()),
            "`holder[0]` (a variable captured by `<lambda>`)",
        )
    )
    config = {"scale": torch.ones(3, dtype=D)}
    out.append(
        (
            "dict item",
            lambda t, y: torch.tanh(y) * config["scale"],
            (),
            lambda: config.__setitem__("scale", config["scale"].clone()),
            "`config['scale']` (a variable captured by `<lambda>`)",
        )
    )
    obj = _Rates()
    out.append(
        (
            "bound method",
            obj.rates,
            [obj.w],
            lambda: setattr(obj, "w", obj.w.detach().clone().requires_grad_()),
            "`rates.__self__.w`",
        )
    )
    import functools

    def decay(t, y, rate):
        return -rate * y

    part = functools.partial(decay, rate=torch.tensor(0.5, dtype=D))
    out.append(
        (
            "partial keyword",
            part,
            (),
            lambda: part.keywords.__setitem__("rate", part.keywords["rate"].clone()),
            "`partial['rate']`",
        )
    )

    def rebind_global():
        global _SHIFT
        _SHIFT = _SHIFT.clone()

    out.append(
        (
            "global of a callable's __call__",
            _Caller(),
            (),
            rebind_global,
            "`_SHIFT` (a global read by `_Caller.__call__`)",
        )
    )
    return out


@pytest.mark.parametrize("index", range(7), ids=[p[0] for p in _places()])
@pytest.mark.parametrize("mode", ["adjoint", "checkpoint", "reversible"])
def test_each_kind_of_place_passes_unchanged_and_raises_rebound_with_its_exact_name(index, mode):
    _, func, params, rebind, name = _places()[index]
    kw = dict(solver="rk4", step=0.25, adjoint=mode, params=params)
    y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    odeint(func, y0, [0.0, 1.0], **kw).sum().backward()  # nothing changed: no error
    assert y0.grad is not None
    y = odeint(func, y0, [0.0, 1.0], **kw)
    rebind()
    with pytest.raises(RuntimeError) as err:
        y.sum().backward()
    assert f"read besides the state and the time, {name} (shape " in str(err.value)
    assert "was rebound to another tensor after the solve" in str(err.value)


class _ShapeOnly(nn.Module):
    """Dynamics that use an outside tensor's shape and a tensor "like" it, never its values,
    and one outside tensor written into a slice of the output (a read)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=D)
        self.template = torch.zeros(2, 3, dtype=D)  # shape only
        self.column = torch.ones(2, dtype=D)  # written into the output: read

    def forward(self, t, y):
        base = torch.zeros_like(self.template) + y.new_zeros(self.template.shape)
        out = self.lin(y) + base
        out[:, 0] = self.column
        return out


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint", "reversible"])
def test_shapes_and_tensors_like_are_not_reads_and_a_slice_assignment_is(mode):
    f = _ShapeOnly()
    kw = dict(solver="rk4", step=0.25, adjoint=mode)
    y = odeint(f, torch.randn(2, 3, dtype=D), [0.0, 1.0], **kw)
    with torch.no_grad():
        f.template.fill_(5.0)  # its values are never read: no error
    y.sum().backward()
    y = odeint(f, torch.randn(2, 3, dtype=D), [0.0, 1.0], **kw)
    with torch.no_grad():
        f.column.fill_(5.0)
    with pytest.raises(RuntimeError, match=r"`_ShapeOnly\.column` .*modified in place"):
        y.sum().backward()


class _Shifted(nn.Module):
    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=D)
        self.shift = shift  # added, never saved for backward (autograd refuses inference tensors)

    def forward(self, t, y):
        return torch.tanh(self.lin(y)) + self.shift


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint", "reversible"])
def test_an_inference_tensor_the_dynamics_read_is_accepted_unchanged(mode):
    # Inference tensors have no version counter: the check must not read one (it would raise
    # inside the library); a rebinding is still seen.
    with torch.inference_mode():
        f = _Shifted(torch.tensor([1.0, 0.5, 2.0], dtype=D))
    f = _Shifted(f.shift)  # the module itself built outside inference mode
    kw = dict(solver="rk4", step=0.25, adjoint=mode)
    odeint(f, torch.randn(2, 3, dtype=D), [0.0, 1.0], **kw).sum().backward()
    assert f.lin.weight.grad is not None
    y = odeint(f, torch.randn(2, 3, dtype=D), [0.0, 1.0], **kw)
    with torch.inference_mode():
        f.shift = torch.ones(3, dtype=D)
    with pytest.raises(RuntimeError, match=r"`_Shifted\.shift` .*rebound"):
        y.sum().backward()


def test_a_tensor_in_a_long_container_is_checked_in_place_but_not_searched_for():
    # Containers over 256 items are not walked (every solve would pay for a global data set):
    # the tensor's in-place change is still caught, named by shape and dtype.
    data = [torch.full((3,), float(i), dtype=D) for i in range(1000)]

    def rates(t, y):
        return torch.tanh(y) * data[999]

    y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
    y = odeint(rates, y0, [0.0, 1.0], solver="rk4", step=0.25, adjoint="adjoint", params=())
    data[999].mul_(2.0)
    with pytest.raises(RuntimeError, match=r"a tensor of shape \(3,\) and dtype torch.float64"):
        y.sum().backward()
