"""Paths real models take where a memory-saving mode could return a silently wrong gradient.

For every mode the gradient is either the one its docs promise (compared in float64 against
backprop through the same discretisation) or an error that names the cause and the fix.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from problems import (
    ConvBNDynamics,
    MLPDynamics,
    reversible_heun_reference,
    reversible_rk_reference,
)
from torch import nn

from torchode_adjoint import GRADIENT_MODES, NFECounter, ODEBlock, get_solver, odeint

D = torch.float64
MEMORY_SAVING = [m for m in GRADIENT_MODES if m != "backprop"]


def _solver(mode: str) -> str:
    return "rk4"  # every mode integrates with every tableau


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class DropoutDynamics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.drop = nn.Dropout(0.3)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.drop(self.lin(y)))


def _seeded_grads(f: nn.Module, y0: torch.Tensor, t: torch.Tensor, seed: int, **kw):
    torch.manual_seed(seed)
    y = y0.clone().requires_grad_()
    sol = odeint(f, y, t, **kw)
    return torch.autograd.grad(sol.square().sum(), [y, *f.parameters()])


def test_checkpoint_replays_dropout_and_equals_backprop_under_the_same_seed(gen) -> None:
    f = DropoutDynamics().double()
    y0 = torch.randn(5, 3, dtype=D, generator=gen)
    t = torch.tensor([0.0, 0.45, 1.0], dtype=D)
    ours = _seeded_grads(f, y0, t, 7, solver="rk4", step=0.1, adjoint="checkpoint")
    ref = _seeded_grads(f, y0, t, 7, solver="rk4", step=0.1, adjoint="backprop")
    for a, b in zip(ours, ref):
        assert _rel(a, b) < 1e-10


class RecordedDropout(nn.Module):
    """Dropout whose masks are recorded while ``record`` is on and replayed, in the order drawn,
    while ``replay`` holds them: a reference that sees exactly the forward pass's draws."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.record = False
        self.masks: list[torch.Tensor] = []
        self.replay: list[torch.Tensor] | None = None

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.lin(y)
        if self.replay is not None:
            mask = self.replay.pop(0)
        else:
            mask = (torch.rand(h.shape, dtype=h.dtype) > 0.3).to(h.dtype) / 0.7
            if self.record:
                self.masks.append(mask)
        return torch.tanh(h * mask)


@pytest.mark.parametrize(
    ("solver", "reference"),
    [
        (
            "rk4",
            lambda f, y, t, lams: reversible_rk_reference(f, get_solver("rk4"), y, t, [5, 6], lams),
        ),  # fmt: skip
        ("reversible_heun", lambda f, y, t, lams: reversible_heun_reference(f, y, t, [5, 6])),
    ],
)
def test_the_reversible_mode_replays_the_forward_draws_in_its_backward_pass(
    solver, reference, gen
) -> None:
    # The backward pass visits the evaluations in reverse order; its gradient must be the one
    # of the draws the forward pass made: autograd through the scheme with those masks.
    f = RecordedDropout().double()
    y0 = torch.randn(5, 3, dtype=D, generator=gen)
    t = torch.tensor([0.0, 0.45, 1.0], dtype=D)
    y = y0.clone().requires_grad_()
    f.record = True
    nfe = NFECounter()
    sol = odeint(f, y, t, solver=solver, step=0.1, adjoint="reversible", nfe=nfe)
    f.record = False
    masks = list(f.masks)
    assert len({m.sum().item() for m in masks}) > 1  # the dynamics did draw
    ours = torch.autograd.grad(sol.square().sum(), [y, *f.parameters()])
    f.replay = list(masks)
    yr = y0.clone().requires_grad_()
    ref_sol = reference(f, yr, t, nfe.couplings)
    assert f.replay == []  # the reference used every recorded mask, in order
    f.replay = None
    torch.testing.assert_close(sol.detach(), ref_sol.detach(), rtol=1e-12, atol=1e-12)
    ref = torch.autograd.grad(ref_sol.square().sum(), [yr, *f.parameters()])
    for a, b in zip(ours, ref):
        assert _rel(a, b) < 1e-10


def test_the_reversible_mode_leaves_the_callers_generator_where_the_forward_left_it() -> None:
    f = RecordedDropout().double()
    y = torch.randn(5, 3, dtype=D, requires_grad=True)
    sol = odeint(f, y, [0.0, 1.0], solver="rk4", step=0.1, adjoint="reversible")
    after_forward = torch.get_rng_state()
    sol.square().sum().backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_the_continuous_adjoint_refuses_dynamics_that_draw_random_numbers(gen) -> None:
    f = DropoutDynamics().double()
    sol = odeint(f, torch.randn(5, 3, dtype=D, requires_grad=True), [0.0, 1.0], adjoint=True)
    with pytest.raises(RuntimeError, match="random numbers") as info:
        sol.sum().backward()
    assert str(info.value).endswith(
        "in another order, so its gradient would silently use other draws. Use "
        "adjoint='checkpoint' or 'reversible' (both replay the draws exactly; memory flat in "
        "the steps with 'reversible') or 'backprop', or keep the randomness out of the dynamics "
        "(e.g. `model.eval()` for dropout)."
    )
    # Every mode the message names runs these dynamics.
    for mode in ("checkpoint", "reversible", "backprop"):
        y = torch.randn(5, 3, dtype=D, requires_grad=True)
        odeint(f, y, [0.0, 1.0], solver="rk4", step=0.25, adjoint=mode).sum().backward()
        assert y.grad is not None
    f.eval()  # dropout off: no randomness, no error
    odeint(f, torch.randn(5, 3, dtype=D, requires_grad=True), [0.0, 1.0]).sum().backward()


class Conditional(nn.Module):
    """A conditional ODE: the context is stored on the module before each solve."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.ctx: torch.Tensor | None = None

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(y) + self.ctx)


@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_a_context_computed_outside_the_dynamics_gets_its_gradient(mode, gen) -> None:
    encoder = nn.Linear(2, 3).double()
    f = Conditional().double()
    x = torch.randn(4, 2, dtype=D, generator=gen)
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    f.ctx = encoder(x)
    block = ODEBlock(f, solver=_solver(mode), step=0.1, adjoint=mode)
    out = block(y0)
    ours = torch.autograd.grad(out.square().sum(), list(encoder.parameters()))
    f.ctx = encoder(x)
    if mode == "reversible":  # autograd through the reversible scheme itself
        t = torch.tensor([0.0, 1.0], dtype=D)
        lams = block.stats.couplings  # the couplings the solve chose per step
        ref_out = reversible_rk_reference(f, get_solver("rk4"), y0, t, [10], lams)[-1]
    else:
        ref_out = ODEBlock(f, solver="rk4", step=0.1, adjoint="backprop")(y0)
    ref = torch.autograd.grad(ref_out.square().sum(), list(encoder.parameters()))
    for a, b in zip(ours, ref):
        assert a.abs().sum() > 0
        assert _rel(a, b) < (1e-4 if mode == "adjoint" else 1e-10)


@pytest.mark.parametrize("mode", MEMORY_SAVING)
def test_a_tensor_the_dynamics_reach_without_declaring_it_raises(mode) -> None:
    other = nn.Linear(3, 3).double()

    class Borrowing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.borrowed = [other]  # hidden from .parameters()

        def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.lin(y) + self.borrowed[0](y))

    block = ODEBlock(Borrowing().double(), solver=_solver(mode), step=0.25, adjoint=mode)
    out = block(torch.randn(2, 3, dtype=D))
    with pytest.raises(RuntimeError, match="not one of its parameters") as info:
        out.sum().backward()
    assert str(info.value).endswith(
        "would return no gradient for it. Store it as an attribute of the dynamics module before "
        "the solve (tensor attributes are included), pass it in `params=`, or use "
        "adjoint='backprop'."
    )


@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_functional_call_gives_the_substitute_weights_gradient_or_raises(mode, gen) -> None:
    block = ODEBlock(MLPDynamics().double(), solver=_solver(mode), step=0.1, adjoint=mode)
    y0 = torch.randn(4, 3, dtype=D, generator=gen)
    w = (torch.randn(8, 3, dtype=D, generator=gen) * 0.5).requires_grad_()
    out = torch.func.functional_call(block, {"dynamics.l1.weight": w}, (y0,))
    if mode != "backprop":
        with pytest.raises(RuntimeError, match="functional_call") as info:
            torch.autograd.grad(out.sum(), [w])
        assert str(info.value).endswith(
            "re-evaluates the module as it is now and would return gradients for other weights. "
            "Use adjoint='backprop' inside functional_call, or call the block directly."
        )
        return
    (g,) = torch.autograd.grad(out.sum(), [w])
    with torch.no_grad():
        block.dynamics.l1.weight.copy_(w)
    (ref,) = torch.autograd.grad(block(y0).sum(), [block.dynamics.l1.weight])
    assert _rel(g, ref) < 1e-12


@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_double_backward_works_with_backprop_and_raises_elsewhere(mode, gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(2, 3, dtype=D, generator=gen, requires_grad=True)
    sol = odeint(f, y0, [0.0, 1.0], solver=_solver(mode), step=0.25, adjoint=mode)
    if mode != "backprop":
        with pytest.raises(RuntimeError, match="double backward") as info:
            torch.autograd.grad(sol.square().sum(), [y0], create_graph=True)
        assert str(info.value).endswith(
            "outside autograd; use adjoint='backprop' for higher derivatives."
        )
        return
    (g,) = torch.autograd.grad(sol.square().sum(), [y0], create_graph=True)
    v = torch.randn_like(y0)
    (hv,) = torch.autograd.grad((g * v).sum(), [y0])

    def grad_at(y: torch.Tensor) -> torch.Tensor:
        y = y.detach().requires_grad_()
        s = odeint(f, y, [0.0, 1.0], solver="rk4", step=0.25, adjoint=False)
        return torch.autograd.grad(s.square().sum(), [y])[0]

    eps = 1e-6
    fd = (grad_at(y0 + eps * v) - grad_at(y0 - eps * v)) / (2 * eps)
    assert _rel(hv, fd) < 1e-6


@pytest.mark.parametrize("mode", MEMORY_SAVING)
def test_torch_func_grad_over_a_memory_saving_mode_raises_naming_torch_func(mode) -> None:
    def loss(y0: torch.Tensor) -> torch.Tensor:
        return odeint(
            lambda t, y: torch.sin(y),
            y0,
            [0.0, 1.0],
            solver=_solver(mode),
            adjoint=mode,
            params=(),
        ).sum()

    with pytest.raises(RuntimeError, match="torch.func"):
        torch.func.grad(loss)(torch.ones(3, dtype=D))


def test_torch_func_grad_with_backprop_equals_autograd() -> None:
    def loss(y0: torch.Tensor) -> torch.Tensor:
        return odeint(lambda t, y: torch.sin(y), y0, [0.0, 1.0], adjoint=False).sum()

    y0 = torch.linspace(-1.0, 1.0, 3, dtype=D)
    y = y0.clone().requires_grad_()
    (ref,) = torch.autograd.grad(loss(y), [y])
    torch.testing.assert_close(torch.func.grad(loss)(y0), ref, rtol=1e-14, atol=0)


def test_vmap_over_a_backprop_solve_equals_the_batched_solve() -> None:
    def solve(y0: torch.Tensor) -> torch.Tensor:
        return odeint(lambda t, y: torch.sin(y) * t, y0, [0.0, 1.0], solver="rk4", adjoint=False)

    y0 = torch.linspace(-1.0, 1.0, 6, dtype=D).reshape(3, 2)
    torch.testing.assert_close(torch.func.vmap(solve)(y0), solve(y0).transpose(0, 1))


@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_an_autocast_training_step_works_and_keeps_the_state_in_float32(mode, gen) -> None:
    torch.manual_seed(0)
    f = MLPDynamics(dim=4, hidden=16)
    block = ODEBlock(f, solver=_solver(mode), step=0.25, adjoint=mode)
    y0 = torch.randn(8, 4, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(y0)
    assert out.dtype == torch.float32
    (g_amp,) = torch.autograd.grad(out.square().sum(), [f.l1.weight])
    (g_fp32,) = torch.autograd.grad(block(y0).square().sum(), [f.l1.weight])
    assert torch.isfinite(g_amp).all()
    assert _rel(g_amp, g_fp32) < 0.05  # bfloat16 matmuls: about 2-3 significant digits


@pytest.mark.parametrize("step", [1e-9, 1e-300])
def test_a_tiny_step_raises_before_allocating(step: float) -> None:
    with pytest.raises(ValueError, match="`max_steps=10,000,000`"):
        odeint(lambda t, y: -y, torch.ones(2), [0.0, 1.0], step=step, params=())
    with pytest.raises(ValueError, match="max_steps"):
        ODEBlock(MLPDynamics(), step=1e-3, max_steps=100)(torch.ones(2, 3))


def test_the_step_count_in_bfloat16_keeps_every_step_at_most_step() -> None:
    nfe = NFECounter()
    odeint(
        lambda t, y: -y,
        torch.ones(2, dtype=torch.bfloat16),
        [0.0, 1.0],
        step=0.1,
        params=(),
        nfe=nfe,
    )
    assert nfe.forward == 10


def test_numpy_scalar_times_are_accepted() -> None:
    for kind in (np.float32, np.float64):
        sol = odeint(lambda t, y: -y, torch.ones(2), [kind(0.0), kind(1.0)], params=())
        assert sol.shape == (2, 2)


class NestedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = ConvBNDynamics()

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.inner(t, y)


@pytest.mark.parametrize("mode", MEMORY_SAVING)
@pytest.mark.filterwarnings("ignore::torchode_adjoint.TimeSharedStatisticsWarning")
def test_a_batchnorm_inside_a_submodule_is_frozen_during_the_backward_pass(mode) -> None:
    f = NestedBN().double()
    out = ODEBlock(f, solver=_solver(mode), step=0.25, adjoint=mode)(
        torch.randn(4, 3, 5, 5, dtype=D)
    )
    before = {k: v.clone() for k, v in f.named_buffers()}
    out.square().sum().backward()
    for k, v in f.named_buffers():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def test_checkpoint_with_fixed_times_of_unequal_intervals_equals_backprop(gen) -> None:
    f = MLPDynamics().double()
    y0 = torch.randn(4, 3, dtype=D, generator=gen, requires_grad=True)
    t = torch.tensor([0.0, 0.13, 0.9, 1.0], dtype=D)  # steps of 0.065, 0.096, 0.1
    grads = []
    for mode in ("checkpoint", "backprop"):
        sol = odeint(f, y0, t, solver="rk4", step=0.1, adjoint=mode)
        grads.append(torch.autograd.grad(sol.square().sum(), [y0, *f.parameters()]))
    for a, b in zip(*grads):
        assert _rel(a, b) < 1e-12


def test_the_reversible_forward_raises_when_the_state_blows_up() -> None:
    with pytest.raises(RuntimeError, match="NaN or infinite"):
        odeint(
            lambda t, y: y**3,
            torch.full((2,), 10.0),
            [0.0, 1.0],
            solver="rk4",
            step=0.1,
            adjoint="reversible",
            params=(),
        )


@pytest.mark.parametrize("mode", MEMORY_SAVING)
def test_a_non_finite_adjoint_state_raises_naming_the_time(mode) -> None:
    k = torch.tensor(1.0, requires_grad=True)
    y0 = torch.ones(2, requires_grad=True)
    sol = odeint(
        lambda t, y: -k * y,
        y0,
        [0.0, 0.5, 1.0],
        solver=_solver(mode),
        step=0.1,
        adjoint=mode,
        params=[k],
    )
    loss = sol[1].sum() * float("inf")  # an infinite incoming gradient at t = 0.5
    with pytest.raises(
        RuntimeError, match=r"adjoint state dL/dy became NaN or infinite at t = "
    ) as info:
        loss.backward()
    assert ": the incoming gradient dL/dy is itself NaN or infinite (check the loss) (pass" in (
        str(info.value)
    )
    assert str(info.value).endswith("(pass `check_finite=False` to return it unchecked).")


class _InfiniteJacobianBefore(torch.autograd.Function):
    """``-y`` whose backward is infinite for times before 0.5 (a Jacobian that overflows)."""

    @staticmethod
    def forward(ctx, t, y):
        ctx.early = bool(t < 0.5)
        return -y

    @staticmethod
    def backward(ctx, g):
        return None, -g * (float("inf") if ctx.early else 1.0)


@pytest.mark.parametrize("mode", MEMORY_SAVING)
def test_a_jacobian_that_overflows_only_in_the_first_interval_is_reported_there(mode) -> None:
    # The adjoint state is finite at t = 1 and 0.5 and infinite only at t = 0, the last state
    # the backward pass reaches: the check must look at that one.
    k = torch.tensor(1.0, dtype=D, requires_grad=True)
    sol = odeint(
        lambda t, y: k * _InfiniteJacobianBefore.apply(t, y),
        torch.ones(2, dtype=D, requires_grad=True),
        [0.0, 0.5, 1.0],
        solver=_solver(mode),
        step=0.1,
        adjoint=mode,
        params=[k],
    )
    # Seen finite at t = 0.5 and not at t = 0: the message names that interval.
    with pytest.raises(
        RuntimeError, match=r"became NaN or infinite between t = 0.5 and t = 0 during"
    ) as info:
        sol[-1].sum().backward()
    assert (
        f"of adjoint={mode!r}: the dynamics' Jacobian overflowed; reduce `step` or check "
        "the dynamics" in str(info.value)
    )


@pytest.mark.parametrize("mode", MEMORY_SAVING)
def test_the_backward_pass_replays_the_forwards_autocast_state_not_the_callers(mode, gen) -> None:
    f = MLPDynamics(dim=4, hidden=16)
    block = ODEBlock(f, solver=_solver(mode), step=0.25, adjoint=mode)
    y0 = torch.randn(8, 4, generator=gen)
    (g_plain,) = torch.autograd.grad(block(y0).square().sum(), [f.l1.weight])
    out = block(y0)  # forward without autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):  # backward called inside autocast
        (g_inside,) = torch.autograd.grad(out.square().sum(), [f.l1.weight])
    torch.testing.assert_close(g_inside, g_plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(
    ("mode", "dynamics"),
    [(m, MLPDynamics) for m in GRADIENT_MODES]
    + [("checkpoint", DropoutDynamics), ("reversible", DropoutDynamics)],
)
def test_a_block_inside_torch_utils_checkpoint_gets_the_same_gradients(
    mode, dynamics, reentrant, gen
) -> None:
    # The user's own activation checkpointing runs the block twice (without and with grad); the
    # second run must rebuild exactly the first one's solve, dropout draws included. Reference:
    # backprop for the checkpointed mode (exact, the same draws), else the block unwrapped.
    torch.manual_seed(0)
    block = ODEBlock(dynamics(), solver=_solver(mode), step=0.1, adjoint=mode).double()
    reference = copy.deepcopy(block)
    if mode == "checkpoint":
        reference = ODEBlock(reference.dynamics, solver="rk4", step=0.1, adjoint="backprop")
    lin = nn.Linear(3, 3).double()
    x = torch.randn(5, 3, dtype=D, generator=gen)

    def grads(blk: nn.Module, wrap: bool) -> list[torch.Tensor]:
        params = [*lin.parameters(), *blk.parameters()]
        for p in params:
            p.grad = None
        torch.manual_seed(11)
        h = lin(x)
        out = torch.utils.checkpoint.checkpoint(blk, h, use_reentrant=reentrant) if wrap else blk(h)
        out.square().sum().backward()  # the reentrant variant refuses torch.autograd.grad
        return [p.grad.clone() for p in params]

    for a, b in zip(grads(block, True), grads(reference, False)):
        assert _rel(a, b) < 1e-12


def test_the_dynamics_tensors_are_found_once_each_and_private_attributes_are_not() -> None:
    from torchode_adjoint._dynamics import module_tensors

    shared = nn.Linear(2, 2)
    tied = nn.Linear(2, 2)
    tied.weight = shared.weight  # the same parameter in two layers

    class F(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = shared, shared, tied  # one child registered twice
            self.dropped = nn.Linear(2, 2)
            self.dropped = None  # a child set to None stays in _modules as None
            self.ctx = torch.ones(2, requires_grad=True)  # a context tensor: included
            self.alias = self.ctx  # the same tensor under a second name: once
            self.frozen = torch.ones(2)  # no grad: not included
            self._private = torch.ones(2, requires_grad=True)  # private: not included

    f = F()
    found = module_tensors(f)
    want = [shared.weight, shared.bias, tied.bias, f.ctx]
    assert len(found) == len(want) and all(x is y for x, y in zip(found, want))


def test_the_graph_walk_visits_each_node_once_in_a_residual_graph() -> None:
    # y <- y + tanh(y), 40 times: 2**40 paths from the output to x, but 81 nodes (an add and a
    # tanh per level, x's accumulator). A walk that revisits shared nodes would never end here;
    # at most 1000 are taken, so that it fails instead.
    from torchode_adjoint.modes.base import graph_nodes

    x = torch.randn(3, requires_grad=True)
    y = x
    for _ in range(40):
        y = y + torch.tanh(y)
    nodes = list(itertools.islice(graph_nodes(y.grad_fn, set()), 1000))
    assert len(nodes) == len(set(nodes)) == 81
    assert sum(getattr(n, "variable", None) is x for n in nodes) == 1
    # A stop node's subgraph is not entered: stopping at the 20th level leaves 20 levels.
    z = x
    for i in range(40):
        z = z + torch.tanh(z)
        if i == 19:
            stop = {z.grad_fn}
    assert len(list(itertools.islice(graph_nodes(z.grad_fn, stop), 1000))) == 40


@pytest.mark.parametrize("mode", MEMORY_SAVING)
def test_a_captured_tensor_behind_a_shared_subexpression_is_still_found(mode) -> None:
    # The graph walk meets the shared node `a` twice before it reaches `other`: a second visit
    # must skip that node, not end the walk.
    other = torch.randn(3, dtype=D, requires_grad=True)

    class Diamond(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.ones(3, dtype=D))

        def forward(self, t, y):
            a = y * self.p
            return torch.tanh(y * other) + (a + a)

    sol = odeint(
        Diamond(),
        torch.ones(2, 3, dtype=D, requires_grad=True),
        [0.0, 1.0],
        solver=_solver(mode),
        step=0.25,
        adjoint=mode,
    )
    with pytest.raises(RuntimeError, match="not one of its parameters"):
        sol.sum().backward()


class _WithNorm(nn.Module):
    """Dynamics holding a normalisation layer (the time-shared statistics warning's subject)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm


def test_each_fix_the_time_shared_batchnorm_warning_names_works() -> None:
    # The warning explains the cause, then names fixes in backticks: two alternative layers and
    # a line of code that silences it. Each is taken from the message and tried.
    import re
    import warnings

    from torchode_adjoint import TimeSharedStatisticsWarning

    with pytest.warns(TimeSharedStatisticsWarning) as record:
        ODEBlock(_WithNorm(nn.BatchNorm2d(3)))
    text = str(record[0].message)
    assert "one set of running statistics for every evaluation time" in text
    assert "in eval mode it normalises the state at each time with statistics averaged" in text
    assert "(on CIFAR-10 this cost an ODENet 5 points of test accuracy)" in text
    fixes = re.findall(r"`([^`]+)`", text.split("Use ", 1)[1])
    group, no_stats, silence = fixes[-3:]
    assert (group, no_stats) == ("nn.GroupNorm", "track_running_stats=False")
    assert f"), `{group}`, or `{no_stats}`; silence this with `{silence}`." in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", TimeSharedStatisticsWarning)
        ODEBlock(_WithNorm(getattr(nn, group.split(".")[1])(1, 3)))
        ODEBlock(_WithNorm(eval(f"nn.BatchNorm2d(3, {no_stats})")))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exec(
            silence,
            {"warnings": warnings, "TimeSharedStatisticsWarning": TimeSharedStatisticsWarning},
        )
        ODEBlock(_WithNorm(nn.BatchNorm2d(3)))
    assert not [w for w in seen if issubclass(w.category, TimeSharedStatisticsWarning)]


@pytest.mark.parametrize(
    ("norm", "kind"), [("BatchNorm1d", "1d"), ("BatchNorm2d", "2d"), ("BatchNorm3d", "3d")]
)
def test_a_time_shared_batchnorm_is_named_with_its_temporal_replacement(norm, kind) -> None:
    from torchode_adjoint import TimeSharedStatisticsWarning

    with pytest.warns(TimeSharedStatisticsWarning) as record:
        ODEBlock(_WithNorm(getattr(nn, norm)(3)))
    text = str(record[0].message)
    assert text.startswith(f"`dynamics.norm` ({norm}) inside the dynamics")
    assert f"Use `torchode_adjoint.TemporalBatchNorm{kind}` (called as `norm(t, x)`)" in text
    # A bare normalisation layer as the dynamics is named by its class.
    from torchode_adjoint._dynamics import warn_time_shared_statistics

    with pytest.warns(TimeSharedStatisticsWarning) as record:
        warn_time_shared_statistics(getattr(nn, norm)(3))
    assert str(record[0].message).startswith(f"`{norm}` ({norm}) inside the dynamics")
