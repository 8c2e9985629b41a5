"""The continuous adjoint of Chen et al. (2018).

The forward pass integrates without building a graph and keeps only the states at the output
times. The backward pass integrates the augmented state ``(y, a, g_theta, g_t)`` from the last
output time to the first with the same tableau and grid::

    dy/dt       =  f(t, y)
    da/dt       = -a . df/dy        a(t_N) = dL/dy(t_N)
    dg_theta/dt = -a . df/dtheta    g_theta(t_N) = 0,  dL/dtheta = g_theta(t_0)
    dg_t/dt     = -a . df/dt        g_t(t_N) = -dL/dy(t_N) . f(t_N, y_N),  dL/dt_0 = g_t(t_0)

The backward pass is an augmented method (:class:`AugmentedMethod`) run by the same executor as
the forward steps, eager or compiled: each of its steps is the forward's Runge--Kutta step on the
pair ``(y, a)`` with steps ``(-h, h)`` (the signs of ``-h`` and of ``-a.df/dy`` cancel for
``a``). The ``g_theta`` and ``g_t`` components enter no stage, so they are accumulated with the
weights ``h b_j`` as each stage's one vector--Jacobian product arrives, and stages with
``b_j = 0`` skip their parameter and time products. The products come from one routine in its
eager form (:func:`~torchode_adjoint._vjp.dynamics_vjp`) or, inside a compiled step, its
traceable one (:func:`~torchode_adjoint._vjp.traceable_vjp`). At every output time ``t_i`` the
incoming gradient is added to ``a``, the state is reset to the stored forward state, and
``dL/dt_i = dL/dy(t_i) . f(t_i, y_i)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .._dynamics import Dynamics
from .._executor import Executor, StepCallbacks, adaptive_interval, run_steps
from .._spec import SolveSpec
from .._vjp import (
    ParamNames,
    ProductsEvaluator,
    accumulate_,
    dynamics_vjp,
    traceable_vjp,
)
from ..controllers.error import ErrorControl, StepSizeController
from ..controllers.fixed import FixedSteps, Leg, StageTimes
from ..solvers.methods import runge_kutta_tableau
from ..solvers.protocol import MethodBase, Step, Stepped
from ..solvers.runge_kutta import StepPlan, combine, plan_for
from ..solvers.tableau import ButcherTableau
from .base import BackwardJob, ForwardRecord, ForwardResult, GradientMode, Gradients
from .per_sample import adjoint_backward

__all__ = ["ContinuousAdjoint", "AugmentedMethod"]

_BACKWARD_FAILED = (
    "in the continuous adjoint's backward pass, which integrates the state backwards from the "
    "last output time (dynamics that contract forwards in time grow backwards, and may "
    "overflow or turn stiff there; `adjoint='checkpoint'` replays the forward's own steps "
    "instead, with backprop's gradient and memory for one state per step)"
)


@dataclass(frozen=True)
class ContinuousAdjoint(GradientMode):
    """The continuous adjoint (Chen et al. 2018): ``adjoint=True`` or ``"adjoint"``.

    Gradient: approximate, with error O(step^p) against the gradient of the discretised forward
    pass (the backward pass re-integrates the state instead of storing it). Memory: the states
    at the output times, independent of the number of steps. Backward cost: one evaluation and
    one vector--Jacobian product per stage. Dynamics that draw random numbers (dropout in
    training mode) raise: the backward pass cannot replay the forward's draws.

    With error-controlled steps (``rtol=``/``atol=``) the backward pass controls its own steps,
    measuring the error on the state and the adjoint only (the seminorm of Kidger, Chen & Lyons
    2021: the parameter gradients, which feed no stage, do not shrink the steps).

    Parameters
    ----------
    rtol, atol : float, optional
        The backward pass's tolerances (torchdiffeq's ``adjoint_rtol``/``adjoint_atol``);
        default the forward's.
    norm : {"seminorm", "full"} or callable, default "seminorm"
        What the backward steps' error is measured on: the state and the adjoint (the
        seminorm), or those and the time and parameter gradients too (``"full"``:
        torchdiffeq's default, more backward steps for no better state or adjoint). Both
        measure the state and the adjoint in the forward's norm (``PIController(norm=)``,
        default the RMS over each part) and each gradient by its RMS. A function
        ``norm((y, a, g_t, *g_params)) -> Tensor`` of the scaled errors (``y`` and ``a`` shaped
        like the state; ``g_t`` 0-dim; one tensor per parameter gradient, in the order of
        ``params``) is the norm itself (torchdiffeq's callable ``adjoint_options["norm"]``).
    """

    name: ClassVar[str] = "adjoint"
    exact: ClassVar[bool] = False
    replays_randomness: ClassVar[bool] = False
    rtol: float | None = None
    atol: float | None = None
    norm: str | Callable[[Any], Any] = "seminorm"

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None:  # validated the way the forward's are
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise TypeError(
                        f"`ContinuousAdjoint({name}=...)` must be a number, got {value!r}; "
                        "tolerances per part of a structured state are given to the forward "
                        "solve (and the backward pass uses them by default)."
                    )
                ErrorControl(rtol=value, atol=1.0) if name == "rtol" else ErrorControl(1.0, value)
        if not callable(self.norm) and self.norm not in ("seminorm", "full"):
            raise ValueError(
                f"`ContinuousAdjoint(norm=...)` must be 'seminorm', 'full' or a function of the "
                f"scaled errors, got {self.norm!r}."
            )

    def forward(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        # The pass without a gradient (it keeps nothing), and the states at the output times
        # only: memory independent of the number of steps.
        return self.integrate_only(f, y0, t, spec), ()

    def forward_samples(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        return self.integrate_only(f, y0, t, spec), ()

    def backward_samples(self, job: BackwardJob) -> Gradients:
        return adjoint_backward(job, self.rtol, self.atol, self.norm)

    def backward(self, job: BackwardJob) -> Gradients:
        spec, grid = job.spec, job.spec.grid
        tableau = runge_kutta_tableau(spec.method)
        assert tableau is not None  # check_solver: the adjoint pairs with tableaus only
        f = AdjointProducts(job.f, job.vjp_params, job.need_t, spec.compile)
        if spec.control is not None:
            return self._adaptive_backward(job, tableau, f, spec.control)
        executor = Executor(AugmentedMethod(tableau), spec.compile)
        times = StageTimes(job.t, grid, tableau.c, reverse=True)
        a = torch.zeros_like(job.states[-1])
        g_t = torch.zeros((), dtype=job.t.dtype, device=job.t.device)
        g_p = tuple(torch.zeros_like(p) for p in job.vjp_params)
        dl_dt: list[torch.Tensor] = []
        total = grid.offsets[-1]
        # One leg per output interval, from the last; step r backwards is forward step
        # total - 1 - r, with the forward's size.
        legs, r = [], 0
        for i in range(len(grid.times) - 1, 0, -1):
            h: Any = grid.step_size(total - 1 - r)
            if not grid.uniform:
                h = lambda g: grid.step_size(total - 1 - g)  # noqa: E731
            legs.append(Leg(i, r, grid.n_steps[i - 1], h))
            r += grid.n_steps[i - 1]

        def enter(leg: Leg, carry: Any) -> Any:
            # dL/dy(t_i) enters; the state restarts from the stored one. Detached: the saved
            # output carries the Function's graph, and each backward step would otherwise
            # record one more node on it (memory growing with the steps).
            i, (_, a, *rest) = leg.interval, carry
            grad_i = job.grads[i - 1]
            if grad_i is not None:
                a = a + grad_i
            job.watch(grid.times[i], a)
            return (job.states[i - 1].detach(), a, *rest)

        def first_step(before: Any, out: Any, token: Any) -> Any:
            carry = out[0]
            if not job.need_t:
                return carry
            # The step's first stage is f(t_i, y_i): reuse it for dL/dt_i.
            grad_i = job.grads[controller.leg.interval - 1]
            d = g_t.new_zeros(()) if grad_i is None else torch.sum(grad_i * out[2][0][0])
            dl_dt.append(d)
            return (*carry[:2], carry[2] - d, *carry[3:])

        controller = FixedSteps(times, legs, enter=enter, split_first=True, dense_first=job.need_t)
        callbacks = StepCallbacks.of(job.f.func, "_adjoint", judged=False)
        carry = run_steps(executor, f, (job.states[-1], a, g_t, *g_p), controller,
                          accepted=first_step, callbacks=callbacks)  # fmt: skip
        _, a, g_t, *rest = carry
        g_p = tuple(rest)
        job.watch(grid.times[0], a)
        grad_t = torch.stack([g_t, *reversed(dl_dt)]) if job.need_t else None
        return Gradients(y0=a, t=grad_t, params=g_p)

    def _adaptive_backward(
        self, job: BackwardJob, tableau: ButcherTableau, f: AdjointProducts, forward: ErrorControl
    ) -> Gradients:
        """The backward pass with error-controlled steps (a failure says it happened here)."""
        try:
            return self._adaptive_steps(job, tableau, f, forward)
        except RuntimeError as err:
            raise RuntimeError(f"{_BACKWARD_FAILED}: {err}") from err

    def _adaptive_steps(
        self, job: BackwardJob, tableau: ButcherTableau, f: AdjointProducts, forward: ErrorControl
    ) -> Gradients:
        """The backward pass with error-controlled steps, interval by interval from the last
        output time, each interval's steps ending on its output time."""
        # The forward's controller (a user's PIController included), with the adjoint's own
        # tolerances where given; the first step is the backward pass's own.
        control = dataclasses.replace(
            forward,
            rtol=forward.rtol if self.rtol is None else self.rtol,
            atol=forward.atol if self.atol is None else self.atol,
            first_step=None,
            adjoint_norm=self.norm if callable(self.norm) else None,
        )
        full = self.norm == "full" or callable(self.norm)
        executor = Executor(AugmentedMethod(tableau, True, full), job.spec.compile)
        times = job.spec.grid.times
        a = torch.zeros_like(job.states[-1])
        g_t = torch.zeros((), dtype=job.t.dtype, device=job.t.device)
        g_p: tuple[torch.Tensor, ...] = tuple(torch.zeros_like(p) for p in job.vjp_params)
        dl_dt: list[torch.Tensor] = []
        sizer = StepSizeController(control, tableau.embedded_order or 1, job.t.dtype)
        h: float | None = None

        def norm(before: Any, after: Any, error: Any) -> tuple[Any, ...]:
            if full:  # the gradients' groups beside the state's and the adjoint's
                return error, before, after
            return error, before[:2], after[:2]

        callbacks = StepCallbacks.of(job.f.func, "_adjoint")
        for i in range(len(times) - 1, 0, -1):
            grad_i = job.grads[i - 1]
            if grad_i is not None:
                a = a + grad_i
            job.watch(times[i], a)
            y = job.states[i - 1].detach()
            t_i = job.t[i]
            if h is None:  # Hairer's first step, on the state's dynamics
                with torch.no_grad():
                    f0 = job.f(t_i, y)
                h = sizer.first_step(job.f, t_i, y, f0, -1.0 if times[-1] > times[0] else 1.0)
            first: list[torch.Tensor] = []
            carry, h = adaptive_interval(
                executor,
                f,
                (y, a, g_t, *g_p),
                times[i],
                times[i - 1],
                h,
                sizer,
                norm,
                like=y,
                h_sign=-1.0,
                first=lambda out, keep=first: keep.append(out[2][0][0]),  # type: ignore[misc]
                callbacks=callbacks,
            )
            y, a, g_t, *rest = carry
            g_p = tuple(rest)
            if job.need_t:
                # The first stage tried is f(t_i, y_i): dL/dt_i = dL/dy(t_i) . f(t_i, y_i).
                d = g_t.new_zeros(()) if grad_i is None else torch.sum(grad_i * first[0])
                dl_dt.append(d)
                g_t = g_t - d
        job.watch(times[0], a)
        counter = job.spec.counter
        counter.backward_accepted, counter.backward_rejected = sizer.accepted, sizer.rejected
        grad_t = torch.stack([g_t, *reversed(dl_dt)]) if job.need_t else None
        return Gradients(y0=a, t=grad_t, params=g_p)


class AdjointProducts(ProductsEvaluator):
    """The evaluator of the augmented method: ``(t, y, a, with_params) -> (f, a.df/dy,
    a.df/dtheta, a.df/dt)`` by the eager VJP, with what the executor needs to run the
    traceable one in a compiled step (``graph_inputs``: the parameters' names and tensors)."""

    __slots__ = ("dynamics", "params", "need_t", "graph_inputs", "compile_ok")

    def __init__(
        self, dynamics: Dynamics, params: tuple[torch.Tensor, ...], need_t: bool, options: Any
    ) -> None:
        self.dynamics, self.params, self.need_t = dynamics, params, need_t
        self.compile_ok: bool | None = None
        bound = self.graph_parameters(options, params)
        self.graph_inputs = None if bound is None else (*bound, need_t)

    def __call__(
        self, t: torch.Tensor, y: torch.Tensor, a: torch.Tensor, with_params: bool
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...], torch.Tensor | None]:
        vjp = dynamics_vjp(
            self.dynamics,
            t,
            y,
            a,
            self.params if with_params else (),
            want_t=self.need_t and with_params,
        )
        return vjp.value, vjp.y, vjp.params, vjp.t


def _gradient_errors(
    products: list[tuple[float, tuple[torch.Tensor | None, ...], Any]],
    g_t: torch.Tensor,
    g_p: list[torch.Tensor],
    h: Step,
) -> tuple[torch.Tensor, ...]:
    """The error estimates ``h sum_j e_j (products of stage j)`` of ``g_t`` and each
    ``g_theta`` (zeros where no stage has a product)."""
    err_t = torch.zeros_like(g_t)
    err_p = [torch.zeros_like(g) for g in g_p]
    for e, params, g_tj in products:
        if g_tj is not None:
            err_t = err_t + g_tj * (h * e)
        err_p = [acc if p is None else acc + p * (h * e) for acc, p in zip(err_p, params)]
    return (err_t, *err_p)


def _traceable_products(
    func: Any, inputs: tuple[ParamNames, tuple[torch.Tensor, ...], bool]
) -> Any:
    names, params, need_t = inputs

    def products(
        t: torch.Tensor, y: torch.Tensor, a: torch.Tensor, with_params: bool
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...], torch.Tensor | None]:
        value, g_y, g_p, g_t = traceable_vjp(func, t, y, a, names, params)
        if not with_params:
            return value, g_y, (), None
        return value, g_y, g_p, (g_t if need_t else None)

    return products


@dataclass(frozen=True)
class AugmentedMethod(MethodBase):
    """The continuous adjoint's backward step as a method: one Runge--Kutta step of the
    augmented system on the carry ``(y, a, g_t, *g_theta)``, backwards from a step's end.

    The evaluator returns ``(f, a.df/dy, a.df/dtheta, a.df/dt)``; ``y`` steps with ``-h``,
    ``a`` with ``h``, and ``g_theta``, ``g_t`` accumulate ``h b_j`` times their products
    (in place on the eager path). The dense information is the stages' ``(f, a.df/dy)``.
    With ``estimate`` the step returns the error estimate of ``y`` and ``a`` (the seminorm's
    parts), and with ``full_norm`` those of ``g_t`` and each ``g_theta`` after them.
    """

    tableau: ButcherTableau
    estimate: bool = False
    full_norm: bool = False
    plan: StepPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "plan", plan_for(self.tableau))

    @property
    def name(self) -> str:
        return f"the continuous adjoint of {self.tableau.name}"

    @property
    def error_order(self) -> int:
        """The embedded order of the tableau (error-controlled backward steps)."""
        return int(self.tableau.embedded_order or 1)

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def nodes(self) -> tuple[float, ...]:
        return self.tableau.c

    @property
    def key(self) -> Hashable:
        return ("adjoint", self.tableau, self.estimate, self.full_norm)

    def init(self, f: Any, y0: torch.Tensor, t0: torch.Tensor) -> Any:
        raise NotImplementedError("the augmented carry is built by the adjoint's backward pass")

    def output(self, carry: Any) -> torch.Tensor:
        return carry[1]

    def step(self, f: Any, carry: Any, h: Step, ts: tuple[torch.Tensor, ...]) -> Stepped:
        y, a, g_t, *g_p = carry
        if self.estimate and isinstance(h, float):
            # A step may be rejected: accumulate into copies, never into the carry's tensors.
            g_p = [g.clone() for g in g_p]
        plan = self.plan
        back = -h
        values: list[torch.Tensor] = []
        g_ys: list[torch.Tensor] = []
        stages = []
        # The full norm's error of the gradients: (e_j, products of stage j) where e_j != 0.
        full = dict(plan.errors) if self.estimate and self.full_norm else {}
        err_products: list[tuple[float, tuple[torch.Tensor | None, ...], Any]] = []
        for j in range(plan.stages):
            row = plan.rows[j]
            weight = plan.b[j]
            # Stages with zero weight feed later stages only: no parameter or time product
            # (unless the full norm measures their error).
            value, g_y, params, g_tj = f(
                ts[j],
                combine(y, back, row, values),
                combine(a, h, row, g_ys),
                weight != 0.0 or j in full,
            )
            values.append(value)
            g_ys.append(g_y)
            stages.append((value, g_y))
            if j in full:
                err_products.append((full[j], params, g_tj))
            if weight == 0.0:
                continue
            if isinstance(h, float):  # eager: in place, fused
                w = h * weight
                accumulate_(g_p, params, alpha=w)
                if g_tj is not None:
                    g_t = torch.add(g_t, g_tj, alpha=w)
            else:  # traced: out of place, no `alpha=` (see combine)
                g_p = [g if p is None else g + p * (h * weight) for g, p in zip(g_p, params)]
                if g_tj is not None:
                    g_t = g_t + g_tj * (h * weight)
        error: tuple[torch.Tensor, ...] | None = None
        if self.estimate:  # the state's and the adjoint's (the seminorm's parts)
            error = (combine(None, back, plan.errors, values), combine(None, h, plan.errors, g_ys))
            if self.full_norm:
                error = (*error, *_gradient_errors(err_products, g_t, g_p, h))
        y = combine(y, back, plan.weights, values)
        a = combine(a, h, plan.weights, g_ys)
        return (y, a, g_t, *g_p), error, stages

    def bind(self, func: Any, inputs: Any) -> Any:
        return _traceable_products(func, inputs)
