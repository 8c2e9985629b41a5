"""The compiled path gives the eager path's values, gradients, counts, buffers and errors.

Most tests compile with the ``aot_eager`` backend: it traces the same graphs as inductor
(Dynamo, functionalisation, AOTAutograd's forward and backward graphs) without generating
kernels, which keeps the suite's time reasonable; one test runs inductor itself. Every test
shares one set of options, so graphs compiled by one test are reused by the next.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from problems import HEUN_MADE_REVERSIBLE, TABLEAUS, MLPDynamics
from torch import nn

from torchode_adjoint import (
    Compile,
    CompileFallbackWarning,
    NFECounter,
    ODEBlock,
    Reversible,
    TemporalBatchNorm1d,
    odeint,
)

pytestmark = HEUN_MADE_REVERSIBLE

D = torch.float64
T = torch.tensor([0.0, 0.35, 1.0], dtype=D)
_RUNS = [0]  # executions of compiled graphs made with the backend below


def _counted_aot_eager(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """The ``aot_eager`` backend, counting every run of the graphs it compiles: a test of the
    compiled path must see compiled graphs run, not an eager fallback that gives equal values."""
    compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def run(*args):
        _RUNS[0] += 1
        return compiled(*args)

    return run


# Two steps per graph: every solve below uses graphs of two steps and of one (the rest).
FAST = Compile(backend=_counted_aot_eager, steps=2)


def _compiled_mode(mode):
    """The reversible mode's compiled path is that of a fixed coupling (a coupling chosen per
    step is read on the host at every step, so those steps run eagerly: see
    test_the_chosen_coupling_runs_eagerly_under_compile_with_the_eager_values)."""
    return Reversible(coupling=0.999) if mode == "reversible" else mode


@pytest.fixture(autouse=True)
def _no_silent_fallback():
    """A compile failure falls back to eager with a warning: here it fails the test instead,
    so that a fallback never passes for the compiled path (tests expecting it catch it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        yield


def _solve(f, y0, t, compile, compiled_runs: bool = True, **kw):
    """Solution, gradients (y0, t, parameters) and the evaluation counts of one solve; with
    ``compile=FAST`` whether compiled graphs must have run (or must not have)."""
    y0 = y0.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    nfe = NFECounter()
    runs = _RUNS[0]
    sol = odeint(f, y0, t, compile=compile, nfe=nfe, **kw)
    w = torch.linspace(-1.0, 1.0, sol.numel(), dtype=sol.dtype).reshape(sol.shape)
    grads = torch.autograd.grad((w * sol).sum(), [y0, t, *f.parameters()])
    if compile is FAST:
        ran = _RUNS[0] > runs
        assert ran == compiled_runs, "compiled graphs ran" if ran else "no compiled graph ran"
    return sol.detach(), grads, (nfe.forward, nfe.backward)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _cases() -> list[tuple[str, str]]:
    # dopri8's continuous adjoint is left out: its 13-stage augmented step is the same
    # generic tableau code as the other pairs' (dopri5 and tsit5 here), and its graph took 41 s
    # to compile on the CI machine; dopri8 compiles here under backprop and checkpoint.
    cases = [
        (s, m)
        for s in TABLEAUS
        for m in ("adjoint", "backprop", "checkpoint")
        if (s, m) != ("dopri8", "adjoint")
    ]
    return [
        *cases,
        ("rk4", "reversible"),
        ("midpoint", "reversible"),
        ("reversible_heun", "reversible"),
    ]


@pytest.mark.parametrize(("solver", "mode"), _cases())
def test_values_gradients_and_counts_equal_the_eager_path(solver: str, mode: str, gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    # step 0.1: 4 and 7 steps, so the graphs of two steps and of one both run.
    kw = dict(solver=solver, step=0.1, adjoint=_compiled_mode(mode))
    eager = _solve(f, y0, T, False, **kw)
    compiled = _solve(f, y0, T, FAST, **kw)
    assert _rel(compiled[0], eager[0]) < 1e-10
    for a, b in zip(compiled[1], eager[1]):
        assert _rel(a, b) < 1e-10
    assert compiled[2] == eager[2]


@pytest.mark.parametrize("solver", ["rk4", "midpoint", "reversible_heun"])
def test_the_reversible_backward_pass_runs_compiled_graphs_with_the_eager_gradients(
    solver: str, gen
) -> None:
    # Without time gradients and random draws the reversible mode's backward steps run as
    # compiled graphs (two steps per graph and one); the graphs must run in the backward pass
    # itself, and give the eager path's gradients and counts.
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen, requires_grad=True)

    def grads(compile: object) -> tuple[list[torch.Tensor], tuple[int, int], int]:
        nfe = NFECounter()
        sol = odeint(
            f,
            y0,
            T,
            solver=solver,
            step=0.1,
            adjoint=_compiled_mode("reversible"),
            compile=compile,
            nfe=nfe,
        )
        w = torch.linspace(-1.0, 1.0, sol.numel(), dtype=D).reshape(sol.shape)
        loss = (w * sol).sum()
        runs = _RUNS[0]
        g = torch.autograd.grad(loss, [y0, *f.parameters()])
        return list(g), (nfe.forward, nfe.backward), _RUNS[0] - runs

    eager, eager_nfe, _ = grads(False)
    compiled, compiled_nfe, backward_runs = grads(FAST)
    # 4 and 7 steps: the steps inside the intervals (3 and 6) after the first, eager, one.
    assert backward_runs >= 4, backward_runs
    assert compiled_nfe == eager_nfe
    for a, b in zip(compiled, eager):
        assert _rel(a, b) < 1e-10


def test_inductor_matches_eager_in_float32(gen) -> None:
    f = MLPDynamics().float()
    y0 = torch.randn(8, 3, generator=gen)
    t = T.float()
    kw = dict(solver="rk4", step=0.25, adjoint="adjoint")
    eager = _solve(f, y0, t, False, **kw)
    compiled = _solve(f, y0, t, Compile(steps=2), **kw)
    assert _rel(compiled[0], eager[0]) < 1e-5
    for a, b in zip(compiled[1], eager[1]):
        assert _rel(a, b) < 1e-5
    assert compiled[2] == eager[2]


def test_new_times_and_step_sizes_do_not_recompile(gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen).requires_grad_()

    def run(t1: float) -> None:
        t = torch.tensor([0.0, t1], dtype=D, requires_grad=True)
        sol = odeint(f, y0, t, solver="midpoint", step=0.1, adjoint="adjoint", compile=FAST)
        sol[-1].sum().backward()

    run(0.5)  # compiles what these solves need (5 steps: graphs of two steps and of one)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    runs = _RUNS[0]
    for k in range(20):
        run(0.41 + 0.001 * k)  # 5 steps each time, every time and step size new
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    # ... and the graphs ran: forward 2 + 1 and backward 2 + 1 per solve (the first step of
    # each pass is eager), not an eager fallback that compiles nothing.
    assert _RUNS[0] - runs >= 20 * 4


class _OtherDynamics(MLPDynamics):
    """A second dynamics class: its graphs are its own."""


def test_many_batch_sizes_and_classes_compile_once_each_without_falling_back(gen) -> None:
    # torch.compile allows 8 graphs per code object; the blocks of a network, the batch sizes
    # of training and evaluation and the grad modes together need more. Each compiles once.
    fs = [MLPDynamics().double(), _OtherDynamics().double()]
    t = torch.tensor([0.0, 0.2], dtype=D)
    counters = torch._dynamo.utils.counters["stats"]
    opts = Compile(backend="aot_eager", steps=5)  # functions of its own, none compiled yet

    def run(f: nn.Module, batch: int) -> None:
        y0 = torch.randn(batch, 3, dtype=D, generator=gen).requires_grad_()
        # Forward graph (grad on) and the adjoint's backward graph (grad off): two per size.
        sol = odeint(f, y0, t, solver="heun", step=0.1, adjoint="adjoint", compile=opts)
        sol[-1].sum().backward()

    sizes = {fs[0]: range(2, 11), fs[1]: range(2, 5)}  # 9 sizes for one class
    for f, batches in sizes.items():
        for batch in batches:
            before = counters["unique_graphs"]
            run(f, batch)
            assert counters["unique_graphs"] == before + 2
    before = counters["unique_graphs"]
    for f, batches in sizes.items():
        for batch in batches:
            run(f, batch)
    assert counters["unique_graphs"] == before


def test_past_the_signature_limit_new_shapes_run_eagerly_with_one_warning(gen, monkeypatch) -> None:
    import torchode_adjoint._compiled as compiled_module

    monkeypatch.setattr(compiled_module, "MAX_SIGNATURES", 2)
    f = MLPDynamics().double()
    opts = Compile(backend="aot_eager", steps=3)  # functions of its own, none compiled yet
    results = []
    with pytest.warns(CompileFallbackWarning, match="2 different state shapes") as record:
        for batch in (2, 3, 4, 5):
            y0 = torch.randn(batch, 3, dtype=D, generator=gen)
            compiled = _solve(f, y0, T, opts, solver="rk4", adjoint="adjoint")
            eager = _solve(f, y0, T, False, solver="rk4", adjoint="adjoint")
            results.append((compiled, eager))
    # Once per step function (forward and backward, graphs of three steps and of one).
    messages = [str(w.message) for w in record if "state shapes" in str(w.message)]
    assert len(messages) == 4
    for compiled, eager in results:
        assert _rel(compiled[0], eager[0]) < 1e-10
        for a, b in zip(compiled[1], eager[1]):
            assert _rel(a, b) < 1e-10
        assert compiled[2] == eager[2]


class _Decay(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(0.7, dtype=D))

    def rhs(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.rate * torch.tanh(y)


@pytest.mark.parametrize("kind", ["bound method", "new lambda"])
def test_a_function_made_anew_for_every_solve_compiles_once(kind: str, gen) -> None:
    # A bound method is a new object at every attribute access, and a training loop may build
    # a new lambda for every solve: the same code must reuse its graphs, not compile again.
    model = _Decay()
    # Functions of its own (a backend no other test uses), none compiled yet.
    opts = Compile(backend=_counted_aot_eager, steps=6)
    counters = torch._dynamo.utils.counters["stats"]
    keep = []  # the functions stay alive: new ones cannot reuse an old one's id
    counts = []
    runs = _RUNS[0]
    for _ in range(4):
        func = model.rhs if kind == "bound method" else (lambda t, y: model.rhs(t, y))
        keep.append(func)
        y0 = torch.randn(4, 3, dtype=D, generator=gen, requires_grad=True)
        sol = odeint(
            func,
            y0,
            T,
            solver="rk4",
            step=0.1,
            adjoint="checkpoint",
            params=[model.rate],
            compile=opts,
        )
        sol[-1].sum().backward()
        counts.append(counters["unique_graphs"])
    assert counts[1] == counts[2] == counts[3]
    assert counts[0] > 0 and _RUNS[0] > runs  # graphs were compiled, and they ran


class _NormDynamics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.tbn = TemporalBatchNorm1d(3)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.tbn(t, self.bn(self.lin(y))))


# Plain BatchNorm in the dynamics on purpose (its buffers are what is tested): the warning that
# recommends the temporal one is for users.
@pytest.mark.filterwarnings("ignore::torchode_adjoint.TimeSharedStatisticsWarning")
@pytest.mark.parametrize("mode", ["adjoint", "backprop", "checkpoint"])
def test_batchnorm_buffers_are_updated_as_in_eager_mode(mode: str, gen) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plain BatchNorm's time-shared statistics
        f = _NormDynamics().double()
    y0 = torch.randn(16, 3, dtype=D, generator=gen)
    buffers = []
    for compile in (False, FAST):
        g = _NormDynamics().double()
        g.load_state_dict(f.state_dict())
        if compile and mode == "backprop":
            # A recorded compiled step cannot update nn.BatchNorm's buffers in place: eager.
            with pytest.warns(CompileFallbackWarning, match="runs eagerly"):
                _solve(g, y0, T, compile, False, solver="rk4", step=0.2, adjoint=mode)
        else:
            _solve(g, y0, T, compile, solver="rk4", step=0.2, adjoint=mode)
        buffers.append(g.state_dict())
    for name, value in buffers[0].items():
        assert torch.allclose(
            buffers[1][name].double(), value.double(), rtol=1e-10, atol=1e-12, equal_nan=True
        )


def test_a_bad_output_raises_the_eager_error(gen) -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.lin(y)

    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    with pytest.raises(ValueError, match="state's shape"):
        odeint(Bad().double(), y0, T, compile=FAST)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_a_failing_compiler_warns_and_runs_the_eager_step(gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    eager = _solve(f, y0, T, False, solver="rk4", adjoint="adjoint")
    with pytest.warns(CompileFallbackWarning, match="torch.compile failed") as record:
        broken = _solve(f, y0, T, Compile(backend=_failing_backend), solver="rk4")
    # The warning points at the user's code (here the test's helper), not at the package.
    assert all(w.filename == __file__ for w in record), [w.filename for w in record]
    assert _rel(broken[0], eager[0]) < 1e-12
    for a, b in zip(broken[1], eager[1]):
        assert _rel(a, b) < 1e-12


def test_after_a_failed_compile_the_module_keeps_its_parameters(gen) -> None:
    # A failure after tracing torch.func.functional_call once left its tensors on the module.
    f = MLPDynamics().double()
    params = dict(f.named_parameters())
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    eager = _solve(f, y0, T, False, solver="heun", adjoint="adjoint")
    with pytest.warns(CompileFallbackWarning):
        for _ in range(2):  # the second solve's check would refuse swapped parameters
            broken = _solve(f, y0, T, Compile(backend=_failing_backend), solver="heun")
            assert all(p is params[name] for name, p in f.named_parameters())
            for a, b in zip(broken[1], eager[1]):
                assert _rel(a, b) < 1e-12


# Plain BatchNorm in the dynamics on purpose (its buffers are what is tested): the warning that
# recommends the temporal one is for users.
@pytest.mark.filterwarnings("ignore::torchode_adjoint.TimeSharedStatisticsWarning")
def test_the_thesis_conv_dynamics_compile_their_backward_with_batch_statistics(gen) -> None:
    # One conv and one BatchNorm applied twice, in training mode: the backward step's
    # torch.func VJP compiles (a fallback is an error here) and the module keeps its tensors.
    from torchode_adjoint.models.cifar10 import ConvDynamics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its BatchNorm's time-shared statistics
        f = ConvDynamics(4, shared=True).double()
    params = dict(f.named_parameters())
    y0 = torch.randn(4, 4, 3, 3, dtype=D, generator=gen)
    eager = _solve(f, y0, T, False, solver="heun", adjoint="adjoint")
    for _ in range(2):  # the second solve's check would refuse swapped parameters
        compiled = _solve(f, y0, T, FAST, solver="heun", adjoint="adjoint")
        assert all(p is params[name] for name, p in f.named_parameters())
        for a, b in zip(compiled[1], eager[1]):
            assert (a - b).norm() <= 1e-10 * max(b.norm(), 1.0)


def test_parameters_saved_through_hooks_still_compile(gen) -> None:
    # Saved-tensor hooks hand back other Python objects for the parameters (the CIFAR-10
    # example measures saved bytes this way); the compiled backward step must still find them.
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    eager = _solve(f, y0, T, False, solver="rk4", adjoint="adjoint")
    y0_ = y0.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x.detach()):
        sol = odeint(f, y0_, T, solver="rk4", adjoint="adjoint", compile=FAST)
    w = torch.linspace(-1.0, 1.0, sol.numel(), dtype=sol.dtype).reshape(sol.shape)
    grads = torch.autograd.grad((w * sol).sum(), [y0_, *f.parameters()])
    for a, b in zip(grads, [eager[1][0], *eager[1][2:]]):
        assert _rel(a, b) < 1e-10
    # A backward pass under the hooks runs its VJP eagerly (torch.func refuses the hooks).
    with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x.detach()):
        compiled = _solve(f, y0, T, FAST, solver="rk4", adjoint="adjoint")
    for a, b in zip(compiled[1], eager[1]):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("options", [FAST, Compile()], ids=["aot_eager", "inductor"])
def test_random_dynamics_stay_eager_and_their_draws_are_replayed(options, gen) -> None:
    # With inductor a compiled step would draw other numbers than the eager generator (about
    # 20 % wrong gradients); the rule keeps random dynamics eager with either backend.
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.drop = nn.Dropout(0.3)

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.drop(torch.tanh(self.lin(y)))

    f = Noisy().double()
    y0 = torch.randn(6, 3, dtype=D, generator=gen)
    results = []
    for compile in (False, options):
        torch.manual_seed(7)
        results.append(_solve(f, y0, T, compile, False, solver="midpoint", adjoint="checkpoint"))
    torch.manual_seed(7)
    reference = _solve(f, y0, T, False, solver="midpoint", adjoint="backprop")
    for a, b in zip(results[1][1], reference[1]):
        assert _rel(a, b) < 1e-10
    assert torch.equal(results[0][0], results[1][0])


class _SharedLayers(nn.Module):
    """One layer applied twice (the CIFAR-10 thesis preset's shared conv and norm), and a
    weight tied between two other layers."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.again = self.first  # the same module under a second name
        self.enc, self.dec = nn.Linear(3, 3), nn.Linear(3, 3)
        self.dec.weight = self.enc.weight  # one tensor held by two modules

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.again(torch.tanh(self.first(y))))
        return self.dec(torch.tanh(self.enc(h))) * torch.cos(t)


@pytest.mark.parametrize(
    ("solver", "mode"),
    [("rk4", "adjoint"), ("rk4", "reversible"), ("reversible_heun", "reversible")],
)
def test_layers_used_twice_and_tied_weights_compile_with_their_full_gradient(
    solver: str, mode: str, gen
) -> None:
    # torch.func's VJP of a layer used twice failed to compile ("Cannot access storage of
    # TensorWrapper") and ran eagerly; tied weights must get both uses' gradient.
    f = _SharedLayers().double()
    params = dict(f.named_parameters())
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    compiled = _solve(f, y0, T, FAST, solver=solver, step=0.1, adjoint=_compiled_mode(mode))
    eager = _solve(f, y0, T, False, solver=solver, step=0.1, adjoint=_compiled_mode(mode))
    assert _rel(compiled[0], eager[0]) < 1e-10
    for a, b in zip(compiled[1], eager[1]):
        assert _rel(a, b) < 1e-10
    assert all(p is params[name] for name, p in f.named_parameters())  # its own tensors


def test_tensors_other_than_parameters_warn_and_get_their_gradient(gen) -> None:
    f = MLPDynamics().double()
    scale = torch.tensor(1.5, dtype=D, requires_grad=True)

    def func(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return scale * f(t, y)

    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    grads = []
    for compile in (False, FAST):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = odeint(func, y0, T, params=[scale, *f.parameters()], compile=compile)
            grads.append(torch.autograd.grad(sol.sum(), scale)[0])
        fallbacks = [w for w in caught if issubclass(w.category, CompileFallbackWarning)]
        assert len(fallbacks) == bool(compile)
        assert all("parameters of an nn.Module only" in str(w.message) for w in fallbacks)
    assert _rel(grads[1], grads[0]) < 1e-10


def test_a_block_compiles_and_trains_like_the_eager_block(gen) -> None:
    y0 = torch.randn(5, 3, dtype=D, generator=gen)
    grads = []
    for compile in (False, FAST):
        torch.manual_seed(0)
        block = ODEBlock(MLPDynamics().double(), solver="rk4", step=0.25, compile=compile)
        block(y0).square().sum().backward()
        grads.append([p.grad for p in block.parameters()])
    for a, b in zip(*grads):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize(
    ("value", "error"),
    [("yes", TypeError), (1, TypeError)],
)
def test_a_bad_compile_argument_is_named(value: object, error: type) -> None:
    with pytest.raises(error, match="`compile`"):
        odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], params=(), compile=value)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_bad_steps_per_graph_are_named(steps: object) -> None:
    with pytest.raises(ValueError, match="`steps`"):
        Compile(steps=steps)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["adjoint", "checkpoint", "backprop"])
def test_under_autocast_compiled_and_eager_agree_to_bfloat16_precision(mode: str, gen) -> None:
    f = MLPDynamics().float()
    y0 = torch.randn(8, 3, generator=gen)
    results = []
    for compile in (False, FAST):
        y = y0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sol = odeint(f, y, T.float(), solver="rk4", step=0.25, adjoint=mode, compile=compile)
        assert sol.dtype == torch.float32  # the state keeps its dtype
        results.append((sol.detach(), torch.autograd.grad(sol[-1].sum(), [y, *f.parameters()])))
    (s_e, g_e), (s_c, g_c) = results
    assert _rel(s_c, s_e) < 2e-2
    for a, b in zip(g_c, g_e):
        assert _rel(a, b) < 2e-2


def test_double_backward_through_compiled_backprop_raises(gen) -> None:
    f = MLPDynamics().double()
    y = torch.randn(4, 3, dtype=D, generator=gen, requires_grad=True)
    sol = odeint(f, y, T, solver="rk4", step=0.25, adjoint="backprop", compile=FAST)
    (g,) = torch.autograd.grad(sol[-1].sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.sum(), y)


def test_torch_func_over_a_compiled_backprop_solve_runs_eagerly_without_giving_up(gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen)

    def loss(y: torch.Tensor, compile: object) -> torch.Tensor:
        sol = odeint(f, y, T, solver="rk4", step=0.25, adjoint="backprop", compile=compile)
        return sol[-1].sum()

    # No CompileFallbackWarning (an error here): the transform runs the eager step directly,
    # and the dynamics stay compilable afterwards.
    compiled = torch.func.grad(lambda y: loss(y, FAST))(y0)
    eager = torch.func.grad(lambda y: loss(y, False))(y0)
    assert _rel(compiled, eager) < 1e-12
    after = _solve(f, y0, T, FAST, solver="rk4", step=0.25, adjoint="backprop")
    assert (
        _rel(after[0], _solve(f, y0, T, False, solver="rk4", step=0.25, adjoint="backprop")[0])
        < 1e-10
    )


def test_a_compiled_block_saves_and_loads_whole(tmp_path, gen) -> None:
    block = ODEBlock(MLPDynamics().double(), solver="rk4", step=0.25, compile=FAST)
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    torch.save(block, tmp_path / "block.pt")
    loaded = torch.load(tmp_path / "block.pt", weights_only=False)
    assert loaded.config.compile == FAST
    assert _rel(loaded(y0), block(y0)) < 1e-12


_COMPILED_GRAPHS: list[torch.fx.GraphModule] = []


def _counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """A ``torch.compile`` backend that runs the traced graph as it is and records it."""
    _COMPILED_GRAPHS.append(gm)
    return gm.forward


@pytest.mark.parametrize(
    ("mode", "solver", "compile"),
    [
        ("adjoint", "rk4", False),
        ("checkpoint", "rk4", False),
        ("backprop", "rk4", False),
        ("reversible", "rk4", False),
        ("adjoint", "rk4", Compile(backend=_counting_backend)),
    ],
)
def test_a_network_compiled_whole_around_a_block_keeps_values_and_gradients(
    mode: str, solver: str, compile: object, gen
) -> None:
    # `torch.compile(model)` of a network with an ODE block: the solve (an autograd Function with
    # host-side bookkeeping) is a graph break, the layers around it compile.
    def block(compile: object) -> ODEBlock:
        return ODEBlock(
            MLPDynamics(), solver=solver, step=0.25, adjoint=_compiled_mode(mode), compile=compile
        )

    def network(compile: object) -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(3, 3), block(compile), nn.Linear(3, 1)).double()

    x = torch.randn(5, 3, dtype=D, generator=gen)
    eager, whole = network(False), network(compile)
    compiled = torch.compile(whole, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out_c = compiled(x)  # Dynamo does not trace into the solve: nothing to warn about
    assert [str(w.message) for w in caught] == []
    out_e = eager(x)
    grads_e = torch.autograd.grad(out_e.square().sum(), list(eager.parameters()))
    grads_c = torch.autograd.grad(out_c.square().sum(), list(whole.parameters()))
    assert _rel(out_c, out_e) < 1e-12
    for a, b in zip(grads_c, grads_e):
        assert _rel(a, b) < 1e-12
    if compile:
        # The block's own steps compiled inside the outer compiled network: its forward step
        # and the adjoint's backward step.
        assert len(_COMPILED_GRAPHS) == 2


@pytest.mark.parametrize(
    ("mode", "solver", "graphs"),
    [
        ("adjoint", "rk4", 2),  # the forward step, the backward step
        ("checkpoint", "rk4", 2),  # the forward step without grad, the re-run with it
        ("backprop", "rk4", 1),  # the recorded step
        ("reversible", "rk4", 2),  # the forward step, the exact backward step
        ("reversible", "reversible_heun", 2),
    ],
)
def test_each_step_compiles_once_for_repeated_training_steps(
    mode: str, solver: str, graphs: int, gen
) -> None:
    # The eager first step's outputs (or y0) require grad and the graphs' outputs do not; where
    # nothing is recorded that must not compile a second copy of the same step.
    traced: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        traced.append(gm)
        return gm.forward

    block = ODEBlock(
        MLPDynamics(),
        solver=solver,
        step=0.1,
        adjoint=_compiled_mode(mode),
        compile=Compile(backend=backend),
    ).double()
    y0 = torch.randn(5, 3, dtype=D, generator=gen, requires_grad=True)
    for _ in range(3):
        block(y0).square().sum().backward()
    assert len(traced) == graphs


class _PairMLP(nn.Module):
    """``(x, v)' = (v, mlp(t, x))``: a second-order system with a two-part state."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLPDynamics()

    def forward(self, t, state):
        x, v = state
        return v, self.mlp(t, x)


@pytest.mark.parametrize("mode", ["adjoint", "reversible"])  # compiled backward; coupled steps
def test_a_tuple_state_compiles_to_the_eager_values_and_gradients_once(mode, gen) -> None:
    f = _PairMLP().double()
    parts = [torch.randn(4, 3, dtype=D, generator=gen) for _ in range(2)]
    w = [torch.randn(3, 4, 3, dtype=D, generator=gen) for _ in range(2)]

    def solve(compile):
        y0 = tuple(p.clone().requires_grad_() for p in parts)
        mode_ = _compiled_mode(mode)
        out = odeint(f, y0, T, solver="rk4", step=0.1, adjoint=mode_, compile=compile)
        loss = sum((wi * o).sum() for wi, o in zip(w, out))
        return [o.detach() for o in out], torch.autograd.grad(loss, [*y0, *f.parameters()])

    eager = solve(False)
    runs = _RUNS[0]
    compiled = solve(FAST)
    assert _RUNS[0] > runs, "no compiled graph ran"
    for a, b in zip([*compiled[0], *compiled[1]], [*eager[0], *eager[1]]):
        assert _rel(a, b) < 1e-10
    # A new state of the same structure, and a new solve, reuse the graphs.
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    solve(FAST)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_the_chosen_coupling_runs_eagerly_under_compile_with_the_eager_values(gen) -> None:
    # The default reversible mode reads each step's coupling on the host: with compile=True its
    # steps run eagerly (no graph), with the eager values, gradients and couplings.
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    out = []
    runs = _RUNS[0]
    for compile in (FAST, False):
        nfe = NFECounter()
        y = y0.clone().requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CompileFallbackWarning)
            sol = odeint(f, y, T, solver="rk4", step=0.1, adjoint="reversible", compile=compile,
                         nfe=nfe)  # fmt: skip
        said = [str(w.message) for w in caught if w.category is CompileFallbackWarning]
        # Said once where compiling was asked for, naming the fix; nothing without it.
        assert len(said) == (1 if compile else 0)
        assert all("pass a fixed `Reversible(coupling=0.999)`" in m for m in said)
        grads = torch.autograd.grad(sol.square().sum(), [y, *f.parameters()])
        out.append((sol.detach(), grads, nfe.couplings))
    assert _RUNS[0] == runs  # no compiled graph ran
    (s1, g1, c1), (s2, g2, c2) = out
    assert torch.equal(s1, s2) and c1 == c2 and len(c1) == 11
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
