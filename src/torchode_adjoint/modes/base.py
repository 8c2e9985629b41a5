"""Gradient modes as objects, and the scaffolding every memory-saving mode shares.

A gradient mode decides how a solve is differentiated. :class:`Backprop` lets autograd record
the solver's operations. The memory-saving modes (the continuous adjoint, checkpointing and the
reversible method) run their forward pass without a graph and compute the gradients themselves in
a backward pass that evaluates the dynamics again. What they have in common lives here, once:

- one ``torch.autograd.Function`` that saves the mode's tensors, unpacks them and returns the
  gradients (``torch.func`` transforms are refused with a message: the backward pass is
  computed outside autograd);
- re-evaluation under the forward pass's conditions: autograd on, BatchNorm buffers frozen, the
  forward's autocast state, and the forward's random-number state replayed where the mode
  supports it (:class:`ForwardRecord`);
- the checks that turn a silently wrong gradient into an error: double backward, parameters
  swapped between forward and backward (``torch.func.functional_call``), tensors the dynamics
  capture that are not declared parameters, and one non-finite policy for the adjoint state.

A memory-saving mode overrides :meth:`GradientMode.forward` and :meth:`GradientMode.backward`,
and, where it pairs with other solvers than the tableaus, :meth:`GradientMode.check_solver` and
:meth:`GradientMode.method_for`. :class:`Backprop` overrides :meth:`GradientMode.solve` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._compat import autocast_state, functorch_transforms_active
from .._dynamics import Dynamics, frozen_batchnorm, module_tensors
from .._executor import DenseStep, integrate, integrate_adaptive
from .._per_sample import integrate_samples
from .._reads import Reads
from .._rng import RngState, SeededDraws
from .._spec import SolveSpec
from .._structure import StructuredDynamics, non_finite_part
from ..controllers.fixed import RecordedSteps, Steps
from ..solvers.methods import as_embedded, as_method, tableau_of
from ..solvers.protocol import Method
from ..solvers.registry import Solver

__all__ = [
    "recorded_solve",
    "GradientMode",
    "Backprop",
    "ForwardRecord",
    "BackwardJob",
    "Gradients",
    "RngState",
    "ForwardResult",
]


ForwardResult = tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]
"""A forward pass's result: the states at ``t[1:]`` and the extra tensors the mode saves."""


@dataclass
class ForwardRecord:
    """What the forward pass leaves for the backward pass besides the saved tensors.

    Attributes
    ----------
    device : torch.device
    autocast : tuple of (str, bool, torch.dtype)
        Autocast state of the CPU and of the state's device during the forward pass.
    random : bool
        Whether the dynamics drew random numbers during the forward pass.
    rng : list of RngState
        States the checkpointed mode kept to replay its re-evaluations (one per segment);
        empty when the dynamics draw no random numbers.
    draws : SeededDraws or None
        The reversible mode's replayable draws.
    n_extra : int
        How many extra tensors the mode's forward pass saved beside the states.
    reads : Reads or None
        The tensors the dynamics read besides the state and the time, checked unchanged before
        the backward pass evaluates them again.
    steps : RecordedSteps or None
        The accepted steps of an error-controlled forward pass (for the modes that replay
        them); None with fixed steps.
    couplings : tuple of float or None
        The reversible mode's coupling of each step, where it is chosen per step.
    dense_steps : tuple of (float, float, float) or None
        The accepted steps ``(t0, h, t1)`` of an error-controlled forward pass that stepped
        past output times and interpolated there (dense output).
    times_grad : bool
        Whether the output times need a gradient (the forward pass sees them detached).
    samples : object or None
        A per-sample forward pass's record for a replaying backward pass (its tries and kept
        carries).
    """

    device: torch.device
    autocast: tuple[tuple[str, bool, torch.dtype], ...]
    random: bool = False
    rng: list[RngState] = field(default_factory=list)
    draws: SeededDraws | None = None
    n_extra: int = 0
    reads: Reads | None = None
    steps: RecordedSteps | None = None
    couplings: tuple[float, ...] | None = None
    dense_steps: tuple[tuple[float, float, float], ...] | None = None
    times_grad: bool = False
    samples: Any = None

    @staticmethod
    def start(device: torch.device) -> ForwardRecord:
        """A record for a forward pass starting now (it notes the autocast state)."""
        kinds = ["cpu"] if device.type == "cpu" else ["cpu", device.type]
        state = tuple((k, *autocast_state(k)) for k in kinds)
        return ForwardRecord(device=device, autocast=state)

    @contextlib.contextmanager
    def autocast_replayed(self) -> Iterator[None]:
        """The forward pass's autocast state (backward runs outside the user's autocast)."""
        with contextlib.ExitStack() as stack:
            for kind, enabled, dtype in self.autocast:
                # Entering autocast costs more than the check; most backward passes need nothing.
                now_enabled, now_dtype = autocast_state(kind)
                if now_enabled != enabled or (enabled and now_dtype != dtype):
                    stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            yield


@dataclass
class BackwardJob:
    """Everything a mode's backward pass needs, unpacked once by the shared Function.

    Attributes
    ----------
    f : Dynamics
        The dynamics, counting evaluations, without the output check.
    spec : SolveSpec
    record : ForwardRecord
    y0 : Tensor or None
        The initial state, for modes that save it.
    states : tuple of Tensor
        The states at ``t[1:]``.
    extra : tuple of Tensor
        The mode's other saved tensors.
    t : Tensor, shape (T,)
        The output times, detached.
    params : tuple of Tensor
    grads : tuple of (Tensor or None)
        ``dL/dy(t[i])`` for ``i >= 1``; None where the loss does not use that state.
    need_y0, need_t, need_p : bool
        Which gradients are asked for.
    """

    f: Dynamics
    spec: SolveSpec
    record: ForwardRecord
    y0: torch.Tensor | None
    states: tuple[torch.Tensor, ...]
    extra: tuple[torch.Tensor, ...]
    t: torch.Tensor
    params: tuple[torch.Tensor, ...]
    grads: tuple[torch.Tensor | None, ...]
    need_y0: bool
    need_t: bool
    need_p: bool
    _finite: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    # (time, adjoint state) pairs kept by `watch`, in the order the backward pass visits them.

    @property
    def steps(self) -> Steps:
        """The steps the forward pass took: recorded ones, or the spec's equal steps."""
        return self.record.steps if self.record.steps is not None else self.spec.grid

    @property
    def vjp_params(self) -> tuple[torch.Tensor, ...]:
        """The parameters to differentiate (empty when their gradient is not asked for)."""
        return self.params if self.need_p else ()

    def watch(self, time: float, a: torch.Tensor) -> None:
        """Keep the adjoint state at ``time`` for the non-finite check (a reference, no kernel)."""
        if self.spec.check_finite:
            self._finite.append((time, a))

    def check_finite(self, mode: str) -> None:
        """Raise if a watched adjoint state was not finite.

        A NaN or infinity stays in the adjoint state once there, so one check of the last one
        (one host sync) decides; only on failure are the others scanned for the first time.
        """
        if not self._finite or bool(torch.isfinite(self._finite[-1][1]).all()):
            return
        j = next(k for k, (_, a) in enumerate(self._finite) if not bool(torch.isfinite(a).all()))
        time, bad = self._finite[j]
        # The adjoint is checked at the output times, going backwards: it turned non-finite
        # after the last time it was seen finite.
        incoming = [g for g in self.grads if g is not None]
        # dL/dy(t[k]) enters at t[k]: a non-finite one made the adjoint so right there.
        times = list(self.spec.grid.times)
        k = times.index(time) if time in times else 0
        here = self.grads[k - 1] if k >= 1 else None
        entered = here is not None and not bool(torch.isfinite(here).all())
        where = (
            f"at t = {time:.6g}"
            if j == 0 or entered
            else (f"between t = {self._finite[j - 1][0]:.6g} and t = {time:.6g}")
        )
        control = self.spec.control
        fix = (
            "reduce `step`"
            if control is None
            else (f"tighten `rtol`/`atol` ({control.describe()} now)")
        )
        source = (
            "the incoming gradient dL/dy is itself NaN or infinite (check the loss)"
            if any(not bool(torch.isfinite(g).all()) for g in incoming)
            else f"the dynamics' Jacobian overflowed; {fix} or check the dynamics"
        )
        raise RuntimeError(
            f"the adjoint state dL/dy became NaN or infinite {where}"
            f"{non_finite_part(self.spec.func, bad).replace('`y', '`dL/dy')} during the "
            f"backward pass of adjoint={mode!r}: {source} (pass `check_finite=False` to return "
            "it unchecked)."
        )


def recorded_solve(
    f: Dynamics,
    y0: torch.Tensor,
    t: torch.Tensor,
    spec: SolveSpec,
    record: ForwardRecord,
    *,
    before_try: Callable[[], Any] | None = None,
    on_accept: Callable[[int, int, float, float, Any, Any], None] | None = None,
    final: list[Any] | None = None,
) -> list[torch.Tensor]:
    """An error-controlled forward pass of a replaying mode, its accepted steps kept in
    ``record`` (host floats, no state): flat (``record.dense_steps``) where the pair
    interpolates past output times, or, with learnable output times (as backprop), those of each
    output interval, ending on its output time (``record.steps``). ``before_try``,
    ``on_accept`` and ``final`` as for :func:`~torchode_adjoint._executor.integrate_adaptive`."""
    assert spec.control is not None
    dense: list[DenseStep] = []
    recorded: list[RecordedSteps] = []
    states = integrate_adaptive(
        f,
        y0,
        t,
        spec.grid.times,
        spec.executor,
        spec.control,
        check_finite=spec.check_finite,
        stats=spec.counter,
        record=recorded,
        before_try=before_try,
        on_accept=on_accept,
        final=final,
        dense_steps=None if record.times_grad else dense,
    )
    if dense:
        record.dense_steps = tuple(dense)
    else:
        record.steps = recorded[0]
    return states


@dataclass(frozen=True)
class Gradients:
    """A mode's gradients for ``y0``, ``t`` and the parameters (None where not asked for)."""

    y0: torch.Tensor | None
    t: torch.Tensor | None
    params: Sequence[torch.Tensor | None]


@dataclass(frozen=True)
class GradientMode:
    """How a solve is differentiated. Subclasses carry their own options.

    Each mode has the class attributes ``name`` (the shorthand accepted as ``adjoint=``),
    ``exact`` (whether the gradient is the discretised forward pass's to round-off),
    ``replays_randomness`` (whether random draws of the dynamics are replayed in the
    re-evaluations; a mode that cannot raises when the dynamics drew random numbers) and
    ``supports_double_backward``.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    needs_params: ClassVar[bool] = True
    saves_y0: ClassVar[bool] = False
    replays_randomness: ClassVar[bool] = True
    supports_double_backward: ClassVar[bool] = False
    interpolates: ClassVar[bool] = True
    #: Whether per-sample output times (a 2-D ``t``) are supported.
    per_sample: ClassVar[bool] = True
    #: Whether the backward pass replays the forward's steps (it cannot replay ``jump_t``'s
    #: evaluation just after a jump).
    replays_steps: ClassVar[bool] = False
    """Whether error-controlled solves may step past output times (dense output)."""

    def check_solver(self, solver: Solver) -> None:
        """Raise a ValueError if the mode cannot integrate with ``solver`` (default: any
        tableau; the reversible Heun method pairs with the reversible mode and backprop)."""
        if tableau_of(solver) is None:
            raise ValueError(
                f"`solver={solver.name!r}` pairs with `adjoint='reversible'` (exact, memory "
                f"flat in the steps) or `adjoint='backprop'`, not with adjoint={self.name!r}; "
                "pass one of those, or a Runge--Kutta solver such as `solver='heun'`."
            )

    def method_for(self, solver: Solver, *, error_control: bool = False) -> Method:
        """The method the mode's solves step with (default: the tableau's Runge--Kutta step;
        with ``error_control``, the embedded pair's step with its error estimate)."""
        tableau = tableau_of(solver)
        if error_control and tableau is not None:
            return as_embedded(tableau)
        return as_method(solver)

    def solve(
        self, spec: SolveSpec, y0: torch.Tensor, t: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The states at ``t[1:]``, differentiable as the mode promises."""
        if spec.samples is not None and not self.per_sample:
            raise ValueError(
                f"per-sample output times (a 2-D `t`) are not supported with "
                f"adjoint={self.name!r}; use adjoint='backprop', 'checkpoint' or 'adjoint', or "
                "a 1-D `t` shared by the batch."
            )
        # torch.func runs custom Functions under its own transforms; ours cannot be (see below).
        if functorch_transforms_active():
            raise RuntimeError(
                f"torch.func transforms (grad, vjp, jacrev, vmap) cannot differentiate through "
                f"adjoint={self.name!r}: its backward pass is computed outside autograd. Use "
                "adjoint='backprop' inside torch.func, or torch.autograd.grad outside it."
            )
        inputs = (y0, t, *params)
        if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
            # Nothing to differentiate: no Function, nothing kept for a backward pass.
            f = Dynamics(spec.func)
            states = self.integrate_only(f, y0, t.detach(), spec)
            spec.counter.forward, spec.counter.backward = f.nfe, 0
            return states
        out = _Solve.apply(self, spec, y0, t, *params)
        return list(out[: spec.n_outputs])

    def integrate_only(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec
    ) -> list[torch.Tensor]:
        """The states at ``t[1:]`` when no gradient is needed (inference): the mode's method,
        keeping nothing for a backward pass (and the steps its passes with a gradient take: a
        mode that replays recorded steps ends a step on every output time here too)."""
        if spec.samples is not None:
            return sample_states(f, y0, spec)
        control = spec.control
        if control is not None and not self.interpolates:
            control = dataclasses.replace(control, interpolate=False)
        return integrate(
            f,
            y0,
            t,
            spec.grid,
            spec.executor,
            check_finite=spec.check_finite,
            control=control,
            stats=spec.counter,
        )

    def forward(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        """Integrate without a graph: the states at ``t[1:]`` and the extra tensors to save."""
        raise NotImplementedError

    def backward(self, job: BackwardJob) -> Gradients:
        """The gradients, computed from the saved tensors by re-evaluating ``job.f``."""
        raise NotImplementedError

    def forward_samples(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        """:meth:`forward` with per-sample output times (``spec.samples``)."""
        raise NotImplementedError

    def backward_samples(self, job: BackwardJob) -> Gradients:
        """:meth:`backward` with per-sample output times (``job.spec.samples``)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Backprop(GradientMode):
    """Backpropagation through the solver's operations.

    Gradient: exact for the discretised forward pass (autograd records every operation).
    Memory: every stage's activations of the dynamics, linear in the number of steps.
    Backward evaluations: none (autograd replays the recorded graph). Supports double backward,
    ``torch.func`` transforms and anything autograd supports.
    """

    name: ClassVar[str] = "backprop"
    needs_params: ClassVar[bool] = False
    supports_double_backward: ClassVar[bool] = True

    def check_solver(self, solver: Solver) -> None:
        """Any solver: autograd records whatever it computes."""

    def method_for(self, solver: Solver, *, error_control: bool = False) -> Method:
        return GradientMode.method_for(self, solver, error_control=error_control)

    def solve(
        self, spec: SolveSpec, y0: torch.Tensor, t: torch.Tensor, params: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        f = Dynamics(spec.func)
        if spec.samples is not None:
            states = sample_states(f, y0, spec)
            spec.counter.forward, spec.counter.backward = f.nfe, 0
            return states
        states = integrate(
            f,
            y0,
            t,
            spec.grid,
            spec.executor,
            check_finite=spec.check_finite,
            control=spec.control,
            stats=spec.counter,
        )
        spec.counter.forward, spec.counter.backward = f.nfe, 0
        return states


def sample_states(
    f: Dynamics, y0: torch.Tensor, spec: SolveSpec, record: Any = None
) -> list[torch.Tensor]:
    """A per-sample forward pass (``spec.samples``): the states at each sample's output times
    after the first, ``record`` keeping its tries for a replaying backward pass."""
    assert spec.samples is not None and spec.layout is not None
    return integrate_samples(
        f, y0, spec.samples, spec.executor, spec.control, spec.layout,
        check_finite=spec.check_finite, counter=spec.counter, record=record,
    )  # fmt: skip


class _Solve(torch.autograd.Function):
    """The one Function behind every memory-saving mode; the mode supplies the numerics."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        mode: GradientMode,
        spec: SolveSpec,
        y0: torch.Tensor,
        t: torch.Tensor,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        # The classic ctx-style forward: torch.func transforms are refused in `solve` with a
        # clear message anyway, and `setup_context` would add a signature binding per call.
        f = Dynamics(spec.func, record_reads=True)
        record = ForwardRecord.start(y0.device)
        record.times_grad = t.requires_grad
        before = RngState.capture(y0.device)
        forward = mode.forward if spec.samples is None else mode.forward_samples
        states, extra = forward(f, y0, t.detach(), spec, record)
        # Paths are named from the user's dynamics, not from the structured-state wrapper.
        func = spec.func
        root = func.dynamics if isinstance(func, StructuredDynamics) else func
        record.reads = Reads.record(root, *f.reads)
        record.random = not before.same_as(RngState.capture(y0.device))
        if not record.random:
            record.rng.clear()
        spec.counter.forward, spec.counter.backward = f.nfe, 0
        record.n_extra = len(extra)
        ctx.mode, ctx.spec, ctx.record = mode, spec, record
        ctx.n_states = len(states)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*extra)
        ctx.param_ids = tuple(id(p) for p in params)
        y0_saved = (y0,) if mode.saves_y0 else ()
        ctx.save_for_backward(*y0_saved, *states, *extra, t, *params)
        return (*states, *extra)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        spec: SolveSpec = ctx.spec
        mode: GradientMode = ctx.mode
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"double backward (a gradient of a gradient, `create_graph=True`) is not "
                f"supported through adjoint={mode.name!r}, whose backward pass is computed "
                "outside autograd; use adjoint='backprop' for higher derivatives."
            )
        record: ForwardRecord = ctx.record
        # Before anything is computed (or unpacked); swapped parameters first, as the more
        # specific cause of a rebound parameter.
        _check_same_parameters(spec, ctx.param_ids, mode)
        if record.reads is not None:
            record.reads.check(mode.name)
        saved = ctx.saved_tensors
        y0 = saved[0] if mode.saves_y0 else None
        rest = saved[1:] if mode.saves_y0 else saved
        n, n_extra = ctx.n_states, record.n_extra
        states, extra = rest[:n], rest[n : n + n_extra]
        t, params = rest[n + n_extra], tuple(rest[n + n_extra + 1 :])
        if record.random and not mode.replays_randomness:
            raise RuntimeError(
                f"the dynamics drew random numbers in the forward pass (dropout in training mode, "
                f"or another random op), and adjoint={mode.name!r} re-evaluates them backwards "
                "in another order, so its gradient would silently use other draws. Use "
                "adjoint='checkpoint' or 'reversible' (both replay the draws exactly; memory "
                "flat in the steps with 'reversible') or 'backprop', or keep the "
                "randomness out of the dynamics (e.g. `model.eval()` for dropout)."
            )
        job = BackwardJob(
            f=Dynamics(
                spec.func,
                check=False,
                probe=lambda t_, y_, out: _check_no_captured_tensors(
                    out, [t_, y_, *params], ctx.param_ids, mode
                ),
            ),
            spec=spec,
            record=record,
            y0=y0,
            states=states,
            extra=extra,
            t=t.detach(),
            params=params,
            grads=grad_outputs[:n],
            need_y0=ctx.needs_input_grad[2],
            need_t=ctx.needs_input_grad[3],
            need_p=bool(params) and any(ctx.needs_input_grad[4:]),
        )
        with torch.enable_grad(), frozen_batchnorm(spec.func), record.autocast_replayed():
            grads = (mode.backward if spec.samples is None else mode.backward_samples)(job)
        spec.counter.backward = job.f.nfe
        job.check_finite(mode.name)
        grad_params = list(grads.params) if job.need_p else [None] * len(params)
        return (None, None, grads.y0 if job.need_y0 else None, grads.t, *grad_params)


def _check_no_captured_tensors(
    out: torch.Tensor,
    declared: Sequence[torch.Tensor],
    param_ids: tuple[int, ...],
    mode: GradientMode,
) -> None:
    """Raise if the first backward evaluation's output depends, with a gradient, on a tensor
    that is not the state, the time or a declared parameter (its gradient would be dropped)."""
    # Declared non-leaf tensors end the walk at their grad_fn; declared leaves are recognised by
    # the identity of the tensor their gradient accumulator holds (the forward's inputs: a saved
    # tensor may come back as another Python object).
    known_nodes = {x.grad_fn for x in declared if x.grad_fn is not None}
    known_leaves = {*param_ids, *(id(x) for x in declared)}
    for node in graph_nodes(out.grad_fn, known_nodes):
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in known_leaves:
            raise RuntimeError(
                f"the dynamics use a tensor that requires grad but is not one of its parameters "
                f"(shape {tuple(variable.shape)}, e.g. another module's parameter or a tensor "
                f"stored on the module from outside); adjoint={mode.name!r} cannot see it and "
                "would return no gradient for it. Store it as an attribute of the dynamics "
                "module before the solve (tensor attributes are included), pass it in "
                "`params=`, or use adjoint='backprop'."
            )


def graph_nodes(root: Any, stop: set[Any]) -> Iterator[Any]:
    """Every node of the autograd graph below ``root`` once (a residual graph has exponentially
    many paths), without descending into the nodes of ``stop``."""
    seen: set[Any] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        yield node
        stack.extend(next_fn for next_fn, _ in node.next_functions)


def _check_same_parameters(spec: SolveSpec, param_ids: tuple[int, ...], mode: GradientMode) -> None:
    func = spec.func
    if not isinstance(func, torch.nn.Module):
        return
    current = tuple(id(p) for p in module_tensors(func))
    if not set(current) <= set(param_ids):
        raise RuntimeError(
            f"the dynamics' parameters are not the tensors the forward pass used (a "
            f"`torch.func.functional_call` or a swapped parameter): adjoint={mode.name!r} "
            "re-evaluates the module as it is now and would return gradients for other weights. "
            "Use adjoint='backprop' inside functional_call, or call the block directly."
        )
