"""The gradient modes' passes for per-sample output times (a 2-D ``t``).

Each pass is the one loop with a per-sample controller (:mod:`._per_sample`):

- backprop: the forward pass under autograd (the merges and output writes are differentiable
  ``torch.where`` and indexed writes);
- checkpoint: the forward pass without a graph keeps its accepted tries (step sizes, stage
  times, which samples accepted, which outputs each reached: a few ``(B,)`` tensors per try)
  and its carry every ``every`` tries; the backward pass replays each segment's tries through
  the loop with autograd (:class:`~torchode_adjoint.controllers.per_sample.ReplaySteps`) and
  differentiates them (backprop's gradient to round-off);
- continuous adjoint: the augmented system ``(y, a)`` is integrated backwards from each sample's
  last output time to its first, with its own per-sample steps (error-controlled on the state
  and the adjoint: the seminorm), every step ending on the sample's output times, where the
  incoming gradient enters and the state restarts from the stored one. The parameter gradient is
  one sum over the batch: after a try is judged, one vector--Jacobian product of its stages'
  evaluations with cotangents weighted per sample by ``h_b b_j`` (zero for a sample that
  rejected) adds to it, so no per-sample parameter gradient is ever formed.

Gradients with respect to per-sample times are not computed (refused where ``t`` is checked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._dynamics import Dynamics
from .._executor import Executor
from .._per_sample import (
    SampleOutputs,
    SampleRecord,
    check_samples_finite,
    sample_pass,
)
from .._spec import SolveSpec
from ..controllers.error import ErrorControl
from ..controllers.per_sample import (
    ReplaySteps,
    SampleStep,
    SampleSteps,
    first_steps,
    sample_ratio,
    sample_view,
)
from ..solvers.methods import runge_kutta_tableau
from ..solvers.protocol import MethodBase, Step, Stepped
from ..solvers.runge_kutta import StepPlan, combine, plan_for
from ..solvers.tableau import ButcherTableau
from .base import BackwardJob, ForwardRecord, Gradients, sample_states

__all__ = [
    "checkpoint_forward",
    "checkpoint_backward",
    "adjoint_backward",
    "SampleAugmented",
]


def _no_random(job: BackwardJob, name: str) -> None:
    if job.record.random:
        raise RuntimeError(
            f"the dynamics drew random numbers in the forward pass, and adjoint={name!r} with "
            "per-sample output times (a 2-D `t`) does not replay them; use adjoint='backprop', "
            "a 1-D `t`, or keep the randomness out of the dynamics (e.g. `model.eval()`)."
        )


def _incoming(job: BackwardJob, states_like: torch.Tensor, count: int) -> torch.Tensor:
    """``dL/dy`` at every output column ``(B, T, ...)``, zeros at column 0 and where unused."""
    grads = [torch.zeros_like(states_like)]
    grads += [torch.zeros_like(states_like) if g is None else g for g in job.grads]
    assert len(grads) == count
    return torch.stack(grads, 1)


def checkpoint_forward(
    f: Dynamics, y0: torch.Tensor, spec: SolveSpec, record: ForwardRecord, every: int
) -> list[torch.Tensor]:
    """The forward pass of the checkpointed mode, keeping its tries in ``record.samples``."""
    kept = SampleRecord(every)
    states = sample_states(f, y0, spec, kept)
    record.samples = kept
    return states


def checkpoint_backward(job: BackwardJob) -> Gradients:
    """Replay each segment of tries through the loop with autograd, from the last."""
    _no_random(job, "checkpoint")
    spec, kept = job.spec, job.record.samples
    assert spec.samples is not None and job.y0 is not None and isinstance(kept, SampleRecord)
    times, method = spec.samples, spec.method
    executor = spec.executor
    interpolate = spec.control is not None and spec.control.interpolate and method.interpolates
    incoming = _incoming(job, job.y0, times.count)
    params = job.vjp_params
    g_p: list[torch.Tensor | None] = [None] * len(params)
    steps = kept.steps
    cot: Any = None
    for s in range(len(kept.carries) - 1, -1, -1):
        first = s * kept.every
        segment = steps[first : first + kept.every]
        carry = _leaves(kept.carries[s])
        outputs = SampleOutputs(job.y0, times.count)
        end = sample_pass(
            executor, job.f, carry, ReplaySteps(segment, job.y0), times, outputs,
            interpolate=interpolate,
        )  # fmt: skip
        cot = _backward_through(
            _parts(end), outputs.values, incoming, _parts(carry), params, g_p, cot
        )
    # The first carry is y0, or (y0, f(t0, y0)): differentiate how it was made from y0.
    y0 = job.y0.detach().requires_grad_(True)
    t0 = sample_view(times.t[:, 0], y0)
    start = method.init(job.f, y0, t0) if cot is not None else y0
    if cot is None:  # no try was accepted: nothing integrated
        return Gradients(y0=None, t=None, params=[None] * len(params))
    gy0 = _backward_through(_parts(start), None, None, [y0], params, g_p, cot)[0]
    if spec.check_finite:
        check_samples_finite(gy0[:, None], times, "gradient dL/dy0")
    return Gradients(y0=gy0, t=None, params=[_zero_none(g, p) for g, p in zip(g_p, params)])


def _leaves(carry: Any) -> Any:
    if isinstance(carry, tuple):
        return tuple(c.detach().requires_grad_(True) for c in carry)
    return carry.detach().requires_grad_(True)


def _parts(carry: Any) -> list[torch.Tensor]:
    return list(carry) if isinstance(carry, tuple) else [carry]


def _zero_none(g: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if g is None else g


def _backward_through(
    ends: list[torch.Tensor],
    values: torch.Tensor | None,
    incoming: torch.Tensor | None,
    starts: list[torch.Tensor],
    params: Sequence[torch.Tensor],
    g_p: list[torch.Tensor | None],
    cot: list[torch.Tensor] | None,
) -> list[torch.Tensor]:
    """One VJP of a replayed segment: from the cotangents of its last carry (``cot``; zeros at
    the last segment) and of the outputs it wrote, those of its first carry; the parameter
    gradients add to ``g_p``."""
    outs, cots = [], []
    for k, e in enumerate(ends):
        if e.requires_grad:
            outs.append(e)
            cots.append(torch.zeros_like(e) if cot is None else cot[k])
    if values is not None and values.requires_grad:
        assert incoming is not None
        outs.append(values)
        cots.append(incoming)
    inputs = [*starts, *params]
    if not outs:
        return [torch.zeros_like(s) for s in starts]
    grads = torch.autograd.grad(outs, inputs, cots, allow_unused=True)
    for i, g in enumerate(grads[len(starts) :]):
        if g is not None:
            acc = g_p[i]
            g_p[i] = g if acc is None else acc + g
    return [torch.zeros_like(s) if g is None else g for s, g in zip(starts, grads)]


def adjoint_backward(
    job: BackwardJob, rtol: float | None, atol: float | None, norm: object
) -> Gradients:
    """The continuous adjoint's per-sample backward pass (see the module docstring)."""
    spec = job.spec
    assert spec.samples is not None
    tableau = runge_kutta_tableau(spec.method)
    assert tableau is not None
    if norm != "seminorm":
        raise ValueError(
            "with per-sample output times (a 2-D `t`) the continuous adjoint's backward steps "
            "are controlled on the state and the adjoint of each sample (the seminorm): the "
            "parameter gradient is one sum over the batch, with no per-sample error; pass "
            "`ContinuousAdjoint()` without `norm=`."
        )
    times = spec.samples.reversed()
    states = torch.stack([_initial(job), *[s.detach() for s in job.states]], 1).flip(1)
    incoming = _incoming(job, job.states[-1], times.count).flip(1)
    incoming[:, -1] = 0.0  # dL/dy0 through the solve only: y0's own reaches it directly
    y, a = states[:, 0], incoming[:, 0].clone()
    products = _Products(job.f, job.vjp_params)
    method = SampleAugmented(tableau, spec.control is not None)
    executor = Executor(method, None)
    control = spec.control
    if control is None:
        assert spec.layout is not None
        controller = SampleSteps(times, method.nodes, y, grid=spec.layout)
    else:
        # The forward's controller with the adjoint's own tolerances where given; the first
        # step is the backward pass's own (as the shared-t adjoint's).
        control = dataclasses.replace(
            control,
            rtol=control.rtol if rtol is None else rtol,
            atol=control.atol if atol is None else atol,
            first_step=None,
        )
        t_end = sample_view(times.t[:, 0], y)
        with torch.no_grad():
            f_end = job.f(t_end, y)
        h0 = first_steps(job.f, t_end, y, f_end, times.direction, control, method.error_order)
        controller = SampleSteps(
            times, method.nodes, y, control=control, error_order=method.error_order, h0=h0,
            ratio=_augmented_ratio(control), max_steps=control.max_steps,
            retake=bool(job.vjp_params),
        )  # fmt: skip
    g_p = [torch.zeros_like(p) for p in job.vjp_params]

    def on_step(taken: SampleStep, before: Any, out: Stepped, merged: Any) -> Any:
        if job.vjp_params:
            products.parameters(out[2], taken, method.plan, g_p)
        # dL/dy enters where a sample's step ended on one of its output times, and its
        # state restarts from the stored one there.
        y_m, a_m = merged
        column = taken.first_out.clamp(max=times.count - 1)
        hit = sample_view(taken.n_out > 0, y_m)
        rows = torch.arange(y_m.shape[0], device=y_m.device)
        a_m = torch.where(hit, a_m + incoming[rows, column], a_m)
        y_m = torch.where(hit, states[rows, column], y_m)
        return (y_m, a_m)

    y_end, a_end = sample_pass(
        executor, products, (y, a), controller, times, None, interpolate=False, on_step=on_step
    )
    job.spec.counter.backward_samples = controller.counts
    if control is not None:
        job.spec.counter.backward_accepted = int(controller.counts.accepted.sum())
        job.spec.counter.backward_rejected = int(controller.counts.rejected.sum())
    if spec.check_finite:
        check_samples_finite(a_end[:, None], spec.samples, "adjoint state dL/dy")
    return Gradients(y0=a_end, t=None, params=g_p)


def _initial(job: BackwardJob) -> torch.Tensor:
    # Column 0's stored state is never restarted from (the pass ends there).
    return torch.zeros_like(job.states[-1])


def _augmented_ratio(control: ErrorControl) -> Any:
    def ratio(carry: Any, out: Stepped) -> torch.Tensor:
        parts = [sample_ratio(e, b, a, control) for b, a, e in zip(carry, out[0], out[1])]
        return torch.maximum(parts[0], parts[1])

    return ratio


class _Products:
    """The augmented method's evaluator: ``f(t, y)`` and ``a^T df/dy`` at a stage, with the
    evaluation's graph kept (where parameters are differentiated) for :meth:`parameters`."""

    def __init__(self, dynamics: Dynamics, params: tuple[torch.Tensor, ...]) -> None:
        self.dynamics, self.params = dynamics, params
        self.func = dynamics.func
        self.nfe = 0
        self.compile_ok = False
        self.checked = True
        self.graph_inputs = None

    def __call__(
        self, t: torch.Tensor, y: torch.Tensor, a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            leaf = y.detach().requires_grad_(True)
            value = self.dynamics(t, leaf)
            (g_y,) = torch.autograd.grad(
                value, leaf, a, retain_graph=bool(self.params), allow_unused=True
            )
        self.nfe = self.dynamics.nfe
        if g_y is None:
            g_y = torch.zeros_like(y)
        return value.detach(), g_y, value

    def parameters(
        self, stages: Sequence[Any], taken: SampleStep, plan: StepPlan, g_p: list[torch.Tensor]
    ) -> None:
        """Add ``sum_b h_b sum_j b_j a_bj^T df/dtheta`` over the samples that accepted (one
        product over the stages' kept graphs); ``h_b`` the sample's forward step size."""
        weight = torch.where(taken.accept, -taken.h, torch.zeros_like(taken.h))
        outs, cots = [], []
        for j, (value, a_j) in enumerate(stages):
            b_j = plan.b[j]
            if b_j == 0.0 or not value.requires_grad:
                continue
            outs.append(value)
            cots.append(a_j * sample_view(weight * b_j, a_j))
        if not outs:
            return
        grads = torch.autograd.grad(outs, self.params, cots, allow_unused=True)
        for acc, g in zip(g_p, grads):
            if g is not None:
                acc.add_(g)


@dataclass(frozen=True)
class SampleAugmented(MethodBase):
    """The continuous adjoint's backward step with a step size per sample: one Runge--Kutta
    step of ``(y, a)`` (``y`` with ``h``, ``a`` with ``-h``: ``h`` is the signed step backwards),
    its error estimate of both (the seminorm's parts) and, as dense information, each stage's
    evaluation with its graph and its adjoint (for the parameter product after the judgement).
    """

    tableau: ButcherTableau
    estimate: bool = False
    plan: StepPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", plan_for(self.tableau))

    @property
    def name(self) -> str:
        return f"the per-sample continuous adjoint of {self.tableau.name}"

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def error_order(self) -> int:
        return int(self.tableau.embedded_order or 1)

    @property
    def nodes(self) -> tuple[float, ...]:
        return self.tableau.c

    @property
    def key(self) -> Hashable:
        return ("adjoint-samples", self.tableau, self.estimate)

    @property
    def compilable(self) -> bool:
        return False

    def init(self, f: Any, y0: torch.Tensor, t0: torch.Tensor) -> Any:
        raise NotImplementedError("the augmented carry is built by the backward pass")

    def output(self, carry: Any) -> torch.Tensor:
        return carry[1]  # type: ignore[no-any-return]

    def step(self, f: Any, carry: Any, h: Step, ts: tuple[torch.Tensor, ...]) -> Stepped:
        y, a = carry
        plan = self.plan
        back = -h
        values: list[torch.Tensor] = []
        g_ys: list[torch.Tensor] = []
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        for j in range(plan.stages):
            row = plan.rows[j]
            a_j = combine(a, back, row, g_ys)
            value, g_y, graph = f(ts[j], combine(y, h, row, values), a_j)
            values.append(value)
            g_ys.append(g_y)
            kept.append((graph, a_j))
        error = None
        if self.estimate:
            error = (combine(None, h, plan.errors, values), combine(None, back, plan.errors, g_ys))
        y = combine(y, h, plan.weights, values)
        a = combine(a, back, plan.weights, g_ys)
        return (y, a), error, kept

    def bind(self, func: Any, inputs: Any) -> Any:
        raise NotImplementedError("the per-sample adjoint steps run eagerly")
