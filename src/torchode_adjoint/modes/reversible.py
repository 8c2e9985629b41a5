"""The reversible gradient mode: exact gradients at memory independent of the number of steps.

The forward pass integrates with a reversible method and keeps only the outputs and the method's
last state. The backward pass walks the steps in reverse: each step is inverted algebraically
(the state before it is reconstructed from the state after it, to round-off) and differentiated
by vector--Jacobian products through the evaluations of that step alone. Nothing per step is
kept, so memory does not grow with the number of steps, learnable times included.

Two methods are reversible:

- any explicit Runge--Kutta tableau, through McCallum & Foster's coupling
  (:class:`~torchode_adjoint.solvers.reversible_coupling.Coupled`, two base steps per step,
  same order);
- the reversible Heun method (``solver="reversible_heun"``,
  :class:`~torchode_adjoint.ReversibleHeun`, one evaluation per step, order 2).

The reconstruction is watched: the state it ends with at ``t0`` is compared with the stored
``y0``, and a drift beyond what the dtype explains raises with the fixes named.

Dynamics that draw random numbers (dropout) get their draws replayed exactly: the first
evaluation's generator state is kept and every later evaluation draws from a generator seeded
with one base seed plus its index, so the backward pass, which visits the evaluations in
another order, draws the same numbers, and memory stays flat.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from .._compat import vector_jacobian_product
from .._dynamics import Dynamics
from .._executor import (
    DenseStep,
    DenseTimes,
    Executor,
    dense_outputs,
    integrate,
    run_steps,
)
from .._rng import SeededDraws
from .._spec import SolveSpec
from .._vjp import (
    ParamNames,
    ProductsEvaluator,
    accumulate_,
    dynamics_vjp,
    functional,
    traceable_vjp,
)
from ..controllers.fixed import FixedSteps, Leg, StageTimes, Steps, Times
from ..solvers.methods import as_reversible
from ..solvers.protocol import Method, MethodBase, StageCombinations, Step, Stepped
from ..solvers.registry import Solver
from ..solvers.runge_kutta import combine, rk_increment, rk_stages
from ..solvers.tableau import StepPlan
from .base import (
    BackwardJob,
    ForwardRecord,
    ForwardResult,
    GradientMode,
    Gradients,
    recorded_solve,
)

__all__ = ["Reversible", "StepVJP"]


@dataclass(frozen=True)
class Reversible(GradientMode):
    """Exact gradients at memory independent of the number of steps: ``adjoint="reversible"``.

    With a Butcher tableau (any registered solver, or your own), the solve integrates McCallum
    & Foster's reversible coupling of that method::

        y_{n+1} = lam_n y_n + (1 - lam_n) z_n + Psi_h(t_n, z_n) - z_n
        z_{n+1} = z_n + y_{n+1} - Psi_{-h}(t_{n+1}, y_{n+1})

    (``Psi_h`` one step of the tableau, ``z`` an auxiliary state with ``z_0 = y_0``), which has
    the tableau's order. With ``solver="reversible_heun"`` it integrates the reversible Heun
    method. Gradient: exact for the discretisation integrated, the couplings ``lam_n`` taken as
    constants like the step sizes (to the round-off of the reconstruction). Memory: the outputs
    and one auxiliary state, independent of the number of steps (plus one host float per step
    with a chosen coupling). Cost per step, for an ``s``-stage tableau: ``2 s`` evaluations
    forward; ``2 s`` evaluations with their vector--Jacobian products backward (the
    reconstruction and the products share them). Reversible Heun: one evaluation forward, one
    evaluation with its product backward.

    The coupling: a step that contracts the state by a factor ``R`` (``R = R(h mu)``, the
    tableau's stability function at the dynamics' rate ``mu``) grows the scheme's second,
    parasitic mode by ``lam / R``. A fixed ``lam`` near 1 therefore fails on contracting
    dynamics (``dy/dt = -y + tanh(W y + b)`` and most neural ODEs): the solution drifts
    without bound. By default (``coupling="auto"``) each step takes ``lam_n = min(0.999,
    R(h mu_n))``, ``mu_n`` the dynamics' rate measured along the gap ``y_n - z_n`` from two
    evaluations the scheme makes anyway (one host read per step; such steps run eagerly), so
    the parasitic mode grows neither forwards nor backwards. A step contracting by more than
    ``min_coupling`` raises with fixed steps and is shortened under error control, whose error
    estimate includes the gap's growth. See the gradient-modes page for the derivation.

    Parameters
    ----------
    coupling : float or "auto", default "auto"
        ``"auto"``: chosen per step as above (at most 0.999). A number in (0, 1]: that coupling
        at every step (McCallum & Foster's scheme as published): you then promise that no step
        contracts the state by more than it; nothing checks that with fixed steps. The
        reconstruction divides by the coupling once per step, so round-off grows like
        ``lam**-n`` over ``n`` steps where the dynamics do not damp it. Not used by the
        reversible Heun method.
    min_coupling : float, default 0.5
        With ``coupling="auto"``: the smallest coupling a step may take (the backward
        reconstruction divides by it).
    drift_tol : float, optional
        The largest relative difference allowed between the reconstructed and the stored
        ``y0``; default ``sqrt(eps)`` of the state's dtype (1.5e-8 in float64, 3.5e-4 in
        float32). Beyond it the backward pass raises rather than return the gradient of another
        trajectory, saying whether the parasitic mode or the dynamics' own contraction
        amplified the round-off.

    Raises
    ------
    ValueError
        For a ``coupling`` outside (0, 1] (or not "auto"), a ``min_coupling`` outside (0, 1),
        or a non-positive ``drift_tol``.
    """

    name: ClassVar[str] = "reversible"
    per_sample: ClassVar[bool] = False
    interpolates: ClassVar[bool] = True  # under error control, past output times (dense)
    replays_steps: ClassVar[bool] = True
    saves_y0: ClassVar[bool] = True
    coupling: float | Literal["auto"] = "auto"
    min_coupling: float = 0.5
    drift_tol: float | None = None

    #: The largest coupling a step takes with ``coupling="auto"``.
    MAX_COUPLING: ClassVar[float] = 0.999

    def __post_init__(self) -> None:
        c = self.coupling
        if not (isinstance(c, str) and c == "auto") and (
            isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0.0 < float(c) <= 1.0
        ):
            raise ValueError(
                f'`coupling` must be "auto" or a number in (0, 1], got {c!r}; pass '
                "`Reversible()` (chosen per step from the dynamics' contraction) or e.g. "
                "`Reversible(coupling=0.999)`."
            )
        if c != "auto":
            object.__setattr__(self, "coupling", float(c))
        m = self.min_coupling
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0.0 < float(m) < 1.0:
            raise ValueError(
                f"`min_coupling` must be a number in (0, 1), got {m!r}; pass e.g. "
                "`Reversible(min_coupling=0.5)`."
            )
        object.__setattr__(self, "min_coupling", float(m))
        tol = self.drift_tol
        if tol is not None and (
            isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not float(tol) > 0.0
        ):
            raise ValueError(
                f"`drift_tol` must be a positive number or None, got {tol!r}; pass e.g. "
                "`Reversible(drift_tol=1e-6)`, or None for sqrt(eps) of the state's dtype."
            )

    def check_solver(self, solver: Solver) -> None:
        """Any solver: a tableau is made reversible, the reversible Heun method is already."""

    def method_for(self, solver: Solver, *, error_control: bool = False) -> Method:
        choose = self.coupling == "auto"
        return as_reversible(
            solver,
            self.MAX_COUPLING if choose else float(self.coupling),
            estimate=error_control,
            choose=choose,
            min_coupling=self.min_coupling,
        )

    def integrate_only(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec
    ) -> list[torch.Tensor]:
        # The same draws as a pass with a gradient (a re-run by torch.utils.checkpoint must
        # see what the first, gradient-free run saw).
        # The forward pass itself, its record dropped: the same steps and couplings (and the
        # couplings it chose in the counter).
        return self.forward(f, y0, t, spec, ForwardRecord.start(y0.device))[0]

    def forward(
        self, f: Dynamics, y0: torch.Tensor, t: torch.Tensor, spec: SolveSpec, record: ForwardRecord
    ) -> ForwardResult:
        record.draws = f.draws = SeededDraws(y0.device)
        method: Any = spec.method
        if method.choose:
            f.draws.alias = method.draw_alias
        last: list[Any] = []
        # A coupling chosen per step is kept as a host float per step, like the steps of error
        # control: the carry before each step holds the coupling of the step before it.
        couplings: list[float] | None = [] if method.choose else None

        def keep(carry: Any) -> None:
            if couplings is not None:
                lam = method.coupling_of(carry)
                if lam is not None:
                    couplings.append(lam)

        if spec.control is not None:
            # Error-controlled steps of the reversible scheme, its error estimated on the base
            # step from z and on the gap between y and z; the accepted steps are kept (host
            # floats, no state).
            states = recorded_solve(
                f, y0, t, spec, record, final=last,
                on_accept=None if couplings is None else lambda i, k, m0, m1, c, tok: keep(c),
            )  # fmt: skip
        else:
            states = integrate(
                f,
                y0,
                t,
                spec.grid,
                spec.executor,
                check_finite=spec.check_finite,
                final=last,
                before_step=None if couplings is None else lambda i, k, c: keep(c),
            )
        if couplings is not None:
            keep(last[0])
            record.couplings = tuple(couplings)
            spec.counter.couplings = record.couplings
        # The method's last auxiliary tensors beside the outputs: memory flat in the steps.
        return states, tuple(method.auxiliary(last[0]))

    def backward(self, job: BackwardJob) -> Gradients:
        grid = job.steps
        method: Any = job.spec.method
        draws = job.record.draws
        under_control = job.record.steps is not None or job.record.dense_steps is not None
        if under_control and job.record.random:
            raise RuntimeError(
                "the dynamics drew random numbers in an error-controlled forward pass: its "
                "rejected trials drew numbers that the reversed accepted steps cannot draw "
                "again, so adjoint='reversible' cannot replay them. Use fixed steps (`step=`) "
                "with random dynamics, or keep the randomness out of the dynamics."
            )
        assert draws is not None  # the reversible forward always sets them
        if job.record.random and not draws.active:
            raise RuntimeError(
                "the dynamics drew random numbers in the forward pass, but not in their first "
                "evaluation, so adjoint='reversible' cannot replay them; use "
                "adjoint='checkpoint' or 'backprop'."
            )
        assert job.y0 is not None  # saves_y0
        job.f.draws = draws if draws.active else None
        if job.record.dense_steps is not None:
            return self._dense_backward(job, method, job.record.dense_steps)
        vjp = StepVJP(job, method)
        # Detached: the reconstruction runs under enable_grad and must record nothing.
        carry: Any = tuple(x.detach() for x in (job.states[-1], *job.extra))
        # The steps inside an interval (no incoming gradient) run through the executor, eager or
        # compiled; each interval's first step, where dL/dy(t_i) enters, runs here.
        reverse = ReverseSteps(method, len(carry))
        executor = Executor(reverse, job.spec.compile)
        total = grid.offsets[-1]
        times = _Backwards(StageTimes(job.t, grid, method.backward_nodes), total)
        n_int = len(grid.n_steps)
        last = job.grads[-1]
        a_y = last if last is not None else torch.zeros_like(job.states[-1])
        job.watch(grid.times[-1], a_y)
        vjp.at_step(n_int - 1, grid.n_steps[-1] - 1, total - 1)
        adjoint = method.backward_start(vjp, carry, a_y, grid.step_size(total - 1))
        recorded = not grid.uniform
        width = len(carry)
        # One leg per output interval, from the last, its steps run through the executor. A
        # method whose step adds dL/dy(t_i) after it (the coupled tableaus) takes every step
        # there and the gradient where the leg ends; one that needs it inside the step, with
        # the size of the step before (reversible Heun), takes the interval's first step where
        # the leg ends.
        after = method.incoming_after_step
        legs = []
        for i in range(n_int - 1, -1, -1):
            n, first = grid.n_steps[i], grid.offsets[i]
            sizes: Any = grid.step_size(first + n - 1)
            if recorded:
                sizes = lambda r: grid.step_size(total - 1 - r)  # noqa: E731
            legs.append(Leg(i, total - first - n, n if after else n - 1, sizes))

        def enter(leg: Leg, state: Any) -> Any:
            if leg.n:
                i, k = leg.interval, grid.n_steps[leg.interval] - 1
                vjp.at_step(i, k, grid.offsets[i] + k)
            return state

        def leave(leg: Leg, state: Any) -> Any:
            i, first = leg.interval, grid.offsets[leg.interval]
            vjp.g_p = list(state[width + 2 :])
            incoming = job.grads[i - 1] if i else None
            if after:
                carry, (a_y, a_z) = state[:width], state[width : width + 2]
                if incoming is not None:
                    a_y = a_y + incoming
                adjoint = (a_y, a_z)
            else:
                vjp.at_step(i, 0, first)
                h_prev = grid.step_size(first - 1) if i else None
                carry, adjoint = method.backward_step(
                    vjp, state[:width], state[width : width + 2], grid.step_size(first), h_prev,
                    incoming,
                )  # fmt: skip
            vjp.end_interval()
            job.watch(grid.times[i], adjoint[0])
            return (*carry, *adjoint, *vjp.g_p)

        controller = FixedSteps(times, legs, enter=enter, leave=leave)
        state = run_steps(executor, vjp, (*carry, *adjoint, *vjp.g_p), controller)
        carry, adjoint = state[:width], state[width : width + 2]
        grad_y0 = adjoint[0] + adjoint[1]
        self._check_drift(carry, job.y0, job.states[-1], total, method)
        return Gradients(y0=grad_y0, t=vjp.g_t, params=vjp.g_p)

    def _dense_backward(
        self, job: BackwardJob, method: Any, steps: tuple[DenseStep, ...]
    ) -> Gradients:
        """The backward pass of a dense forward: the accepted steps reversed one by one, each
        output's gradient entering where the forward produced it (at a step's start, or through
        the interpolant inside a step, with the step's own products)."""
        assert job.y0 is not None
        like = job.states[-1]
        inside, at_end = dense_outputs(steps, job.spec.grid.times)
        vjp = StepVJP(job, method, times=DenseTimes(steps, method.nodes, like),
                      ends=DenseTimes(steps, (1.0,), like))  # fmt: skip
        carry: Any = tuple(x.detach() for x in (job.states[-1], *job.extra))
        last = job.grads[-1]
        a_y = last if last is not None else torch.zeros_like(like)
        job.watch(steps[-1][2], a_y)
        total = len(steps)
        vjp.at_step(0, total - 1, total - 1)
        adjoint = method.backward_start(vjp, carry, a_y, steps[-1][1])
        # One leg per accepted step, from the last, each step through the executor (eagerly):
        # the outputs interpolated inside it enter inside it (the evaluator's ``inside``), those
        # on its start after it, where the leg ends (the coupled step adds dL/dy_n last).
        assert method.incoming_after_step
        width = len(carry)

        def enter(leg: Leg, state: Any) -> Any:
            k = leg.interval
            vjp.at_step(0, k, k)
            vjp.inside = [
                (theta, g) for j, theta in inside.get(k, ()) if (g := job.grads[j - 1]) is not None
            ]
            return state

        def leave(leg: Leg, state: Any) -> Any:
            k = leg.interval
            vjp.g_p, vjp.inside = list(state[width + 2 :]), []
            starts = [job.grads[j - 1] for j in at_end.get(k - 1, ())] if k else []
            incoming = sum_present(starts)
            a_y = state[width] if incoming is None else state[width] + incoming
            if starts:
                job.watch(steps[k][0], a_y)
            return (*state[:width], a_y, *state[width + 1 :])

        legs = [Leg(k, total - 1 - k, 1, steps[k][1]) for k in range(total - 1, -1, -1)]
        controller = FixedSteps(_NoTimes(), legs, enter=enter, leave=leave)
        executor = Executor(ReverseSteps(method, width), None)
        state = run_steps(executor, vjp, (*carry, *adjoint, *vjp.g_p), controller)
        carry, adjoint = state[:width], state[width : width + 2]
        job.watch(steps[0][0], adjoint[0])
        self._check_drift(carry, job.y0, job.states[-1], total, method)
        return Gradients(y0=adjoint[0] + adjoint[1], t=None, params=vjp.g_p)

    def _check_drift(
        self, carry: Any, y0: torch.Tensor, y_end: torch.Tensor, steps: int, method: Any
    ) -> None:
        """Raise if the reconstructed ``(y_0, z_0)`` is not the stored ``y0`` to the tolerance,
        relative to the trajectory's scale (a zero ``y0`` is reconstructed to round-off of the
        states the reconstruction passed through, not to zero), naming which mode grew."""
        y0 = y0.detach()
        if y0.numel() == 0:  # an empty batch: nothing to reconstruct
            return
        scale = torch.maximum(y0.abs().max(), y_end.detach().abs().max())
        tiny = torch.finfo(y0.dtype).tiny
        y_rec, z_rec = carry[0], carry[1]
        # The solution mode has y = z: their mean's drift is the solution's own round-off
        # amplified by undoing the dynamics' contraction; their gap is the parasitic mode.
        parts = torch.stack(
            [
                torch.maximum((y_rec - y0).abs().max(), (z_rec - y0).abs().max()),
                (y_rec - z_rec).abs().max(),
                (0.5 * (y_rec + z_rec) - y0).abs().max(),
            ]
        ) / scale.clamp_min(tiny)
        rel, gap, mean = parts.tolist()
        eps = torch.finfo(y0.dtype).eps
        tol = self.drift_tol if self.drift_tol is not None else math.sqrt(eps)
        if rel <= tol:
            return
        coupled = method.coupling is not None
        chosen = coupled and method.choose
        # A fixed coupling: the reconstruction's round-off also grows like coupling**-steps.
        closer = (
            ""
            if not coupled or chosen
            else (
                f"a `coupling` closer to 1 (over {steps:,} steps {self.coupling:g}**-{steps} = "
                f"{_power(float(self.coupling), -steps)}; e.g. `Reversible(coupling="
                f"{1.0 - 1.0 / steps:.6g})`), a smaller `step`, or float64"
            )
        )
        if coupled and gap > mean:
            cause = (
                f"the gap between the scheme's two states ({gap:.3g}, against {mean:.3g} in "
                "their mean): the coupling's parasitic mode grew through the reversed steps, "
                "where the coupling is below a step's own factor along some direction"
            )
            fixes = closer or (
                f"a larger `min_coupling` than {self.min_coupling:g} "
                "(`Reversible(min_coupling=0.8)`), a smaller `step`, or float64"
            )
        else:
            cause = (
                f"the mean of the scheme's states ({mean:.3g}, gap {gap:.3g}): undoing the "
                "dynamics' contraction amplifies the round-off of the reconstruction"
                if coupled
                else "round-off grew through the reversed steps"
            )
            # The state's own contraction cannot be undone past the dtype's resolution.
            fixes = closer or "a shorter time span" + (
                "" if y0.dtype == torch.float64 else ", or float64"
            )
        raise RuntimeError(
            f"adjoint='reversible' reconstructed the initial state with a relative error of "
            f"{rel:.3g} (allowed: {tol:.3g}, sqrt(eps) of {y0.dtype} unless `drift_tol` says "
            f"otherwise), mostly in {cause}; the gradient would be that of another trajectory. "
            f"Use {fixes}; or adjoint='checkpoint' (exact, stores states)."
        )


def _power(base: float, exponent: int) -> str:
    log10 = exponent * math.log10(base)
    return f"{10**log10:.3g}" if log10 < 300 else f"1e{log10:.0f}"


@dataclass(frozen=True)
class ReverseSteps(MethodBase):
    """A reversible method's exact backward step, as a method the executor runs: the carry is
    ``(*state, A_y, A_z, *g_theta)`` and the evaluator implements ``StepProducts``
    (:class:`StepVJP` eagerly; :class:`_TraceableProducts` inside a compiled graph). The steps
    it takes have no incoming gradient and the same size as the step before them."""

    method: Any
    state_size: int

    @property
    def name(self) -> str:
        return f"the backward step of {self.method.name}"

    @property
    def order(self) -> int:
        return int(self.method.order)

    @property
    def nodes(self) -> tuple[float, ...]:
        return tuple(self.method.backward_nodes)

    @property
    def key(self) -> Hashable:
        return ("reverse", self.method.key, self.state_size)

    def init(self, f: Any, y0: torch.Tensor, t0: torch.Tensor) -> Any:
        raise NotImplementedError("the backward carry is built by the reversible mode")

    def output(self, carry: Any) -> torch.Tensor:
        return carry[0]  # type: ignore[no-any-return]

    def step(self, f: Any, carry: Any, h: Step, ts: tuple[torch.Tensor, ...]) -> Stepped:
        n = self.state_size
        f.begin_step(ts, carry[n + 2 :])
        # Outputs interpolated inside the step (a dense backward pass) enter inside it.
        inside = (f.inside,) if f.inside else ()
        state, adjoint = self.method.backward_step(
            f, carry[:n], carry[n : n + 2], h, h, None, *inside
        )
        return (*state, *adjoint, *f.g_p), None, None

    def bind(self, func: Any, inputs: Any) -> Any:
        names, params = inputs
        return _TraceableProducts(func, names, params)


def _increments(
    f: Any,
    x: torch.Tensor,
    h: Step,
    ts: Sequence[torch.Tensor],
    plan: StepPlan,
    v: torch.Tensor,
    extra: StageCombinations,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A base step's increment from ``x``; what one vector--Jacobian product takes for it and
    ``extra``'s combinations of its stages (stacked), and their cotangents (stacked)."""
    if not extra:
        out = rk_increment(f, x, h, ts, plan)
        return out, out, v
    ks = rk_stages(f, x, h, ts, plan)
    out = combine(None, h, plan.weights, ks)
    total = torch.stack([out, *(combine(None, h, terms, ks) for terms, _ in extra)])
    return out, total, torch.stack([v, *(g for _, g in extra)])


def sum_present(values: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The sum of the tensors among ``values`` (None where there are none)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    out = present[0]
    for v in present[1:]:
        out = out + v
    return out


class _NoTimes:
    """Stage times for steps whose evaluator keeps its own (the dense backward pass)."""

    def of(self, g: int) -> tuple[torch.Tensor, ...]:
        return ()


class _Backwards:
    """Stage times numbered backwards: step ``r`` is the forward's step ``total - 1 - r``."""

    __slots__ = ("times", "total")

    def __init__(self, times: StageTimes, total: int) -> None:
        self.times, self.total = times, total

    def of(self, r: int) -> tuple[torch.Tensor, ...]:
        return self.times.of(self.total - 1 - r)


class _TraceableProducts:
    """:class:`StepVJP`'s products in a form ``torch.compile`` traces (``torch.func.vjp``), for
    the backward steps without time gradients or replayed draws."""

    need_t = False
    inside: tuple[()] = ()  # no dense backward on the compiled path

    def __init__(self, func: Any, names: ParamNames, params: tuple[torch.Tensor, ...]) -> None:
        self.func, self.names, self.params = func, names, params
        self.g = functional(func, names)
        self.ts: tuple[torch.Tensor, ...] = ()
        self.g_p: list[torch.Tensor] = []

    def begin_step(self, ts: tuple[torch.Tensor, ...], g_p: Sequence[torch.Tensor]) -> None:
        self.ts, self.g_p = ts, list(g_p)

    def _add(self, grads: Sequence[torch.Tensor]) -> None:
        self.g_p = [acc + g for acc, g in zip(self.g_p, grads)]

    def evaluate(
        self, x: torch.Tensor, v: torch.Tensor, *, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        value, g_y, g_p, _ = traceable_vjp(self.func, self.ts[0], x, v, self.names, self.params)
        self._add(g_p)
        return value, g_y

    def increment(
        self,
        plan: StepPlan,
        x: torch.Tensor,
        v: torch.Tensor,
        h: Step,
        *,
        first: int,
        offset: int,
        extra: StageCombinations = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ts, g = self.ts[first : first + plan.stages], self.g

        def increment(x_: torch.Tensor, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return _increments(lambda t, y: g(t, y, params), x_, h, ts, plan, v, extra)[1]

        total, pull = torch.func.vjp(increment, x, self.params)  # type: ignore[misc]
        cot = v if not extra else torch.stack([v, *(c for _, c in extra)])
        g_x, g_p = pull(cot)
        self._add(g_p)
        return (total[0] if extra else total), g_x

    def add_step_size_gradient(self, g: torch.Tensor) -> None:
        raise AssertionError("no time gradients on the compiled path")


class StepVJP(ProductsEvaluator):
    """Vector--Jacobian products through the evaluations of one step, for a reversible method's
    backward step, with the bookkeeping every such product needs: the stage times (recorded
    when the times need a gradient), the replay of random draws, the parameter gradients
    (accumulated in place) and the time gradients (folded into the output times per interval,
    so nothing per step is kept). It is also the evaluator the executor runs
    :class:`ReverseSteps` with: ``graph_inputs`` says what a compiled step needs (None where
    the steps stay eager: time gradients, replayed draws, or tensors that are no parameters of
    a module)."""

    def __init__(
        self,
        job: BackwardJob,
        method: Any,
        *,
        times: Times | None = None,
        ends: Times | None = None,
    ) -> None:
        self.job, self.f = job, job.f
        self.dynamics = job.f
        # The (theta, dL/dy) of outputs interpolated inside the current step (dense backward).
        self.inside: list[tuple[float, torch.Tensor]] = []
        self.compile_ok: bool | None = None
        # The couplings chosen per step, read by the coupled method's backward step.
        self.couplings = job.record.couplings
        # Compiled without time gradients or replayed draws (they run eagerly).
        eager = job.need_t or job.f.draws is not None
        self.graph_inputs = (
            None if eager else self.graph_parameters(job.spec.compile, job.vjp_params)
        )
        self._fresh = True
        self.need_t = job.need_t
        self.params = job.vjp_params
        self.g_p = [torch.zeros_like(p) for p in self.params]
        # Given stage times (a dense solve's steps, no time gradient) or the record's.
        grid = job.steps
        self.grid: Steps | None = grid if times is None else None
        self.times: Times = times if times is not None else StageTimes(job.t, grid, method.nodes)
        self.ends: Times = ends if ends is not None else StageTimes(job.t, grid, (1.0,))
        self.g_t = torch.zeros_like(job.t) if self.need_t else None
        zero = job.t.new_zeros(())
        self._lo, self._hi = zero, zero.clone()
        self.i = self.k = self.step = 0
        self.evaluations = len(method.nodes)
        # Where the step starts and ends and its size, as fractions of its output interval.
        self._fractions = (0.0, 0.0, 0.0)
        self._h_leaf: torch.Tensor | None = None

    @property
    def coupling(self) -> float:
        """The coupling the forward pass chose for the current step."""
        assert self.couplings is not None
        return self.couplings[self.step]

    def at_step(self, i: int, k: int, step: int) -> None:
        """The products that follow belong to step ``k`` of interval ``i`` (global ``step``)."""
        self.i, self.k, self.step = i, k, step
        if self.grid is not None:
            self._fractions = self.grid.fractions(i, k)
        self._h_leaf = None
        self._fresh = True

    def begin_step(self, ts: tuple[torch.Tensor, ...], g_p: Sequence[torch.Tensor]) -> None:
        """The next step backwards (the first after :meth:`at_step` is that one), in the same
        interval; ``ts`` is not needed (the stage times are this object's own)."""
        if self._fresh:
            self._fresh = False
        else:
            self.at_step(self.i, self.k - 1, self.step - 1)
            self._fresh = False
        self.g_p = list(g_p)

    def end_interval(self) -> None:
        """Fold the interval's time gradients into ``dL/dt_i`` and ``dL/dt_{i+1}``."""
        if self.g_t is not None:
            self.g_t[self.i] += self._lo
            self.g_t[self.i + 1] += self._hi
            self._lo, self._hi = self._lo.new_zeros(()), self._hi.new_zeros(())

    def _point_time(self, offset: int) -> torch.Tensor:
        g = self.step + offset
        return self.ends.of(g - 1)[0] if g else self.job.t[0]

    def _add_point_gradient(self, g: torch.Tensor | None, offset: int) -> None:
        # The step's start (end) is t_i + m (t_{i+1} - t_i), m its fraction of the interval.
        if g is not None:
            m = self._fractions[offset]
            self._lo = torch.add(self._lo, g, alpha=1.0 - m)
            self._hi = torch.add(self._hi, g, alpha=m)

    def add_step_size_gradient(self, g: torch.Tensor) -> None:
        """Add ``dL/dh`` of the current step (``h`` is its fraction of the interval's length)."""
        size = self._fractions[2]
        self._lo = torch.add(self._lo, g, alpha=-size)
        self._hi = torch.add(self._hi, g, alpha=size)

    def _grad(
        self, out: torch.Tensor, x: torch.Tensor, v: torch.Tensor, times: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        inputs = [x, *self.params, *times]
        grads = vector_jacobian_product(out, inputs, v)
        accumulate_(self.g_p, grads[1 : 1 + len(self.params)])
        g_x = grads[0] if grads[0] is not None else torch.zeros_like(x)
        return g_x, grads[1 + len(self.params) :]

    def evaluate(
        self, x: torch.Tensor, v: torch.Tensor, *, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f(t, x)`` at the current step's start (``offset=0``) or end (1), and ``v^T df/dx``."""
        self.f.index = self.step + offset
        out = dynamics_vjp(self.f, self._point_time(offset), x, v, self.params, want_t=self.need_t)
        accumulate_(self.g_p, out.params)
        self._add_point_gradient(out.t, offset)
        return out.value, out.y

    def increment(
        self,
        plan: StepPlan,
        x: torch.Tensor,
        v: torch.Tensor,
        h: Step,
        *,
        first: int,
        offset: int,
        extra: StageCombinations = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The increment ``Psi_h(t, x) - x`` of one base step from the current step's start
        (``offset=0``, step ``h``) or end (1, step ``-h``), its evaluations being the step's
        ``first...first + stages``, and ``v^T`` its Jacobian (with ``extra``'s products added:
        see ``StepProducts.increment``)."""
        x_leaf = x.detach().requires_grad_(True)
        # (A tableau's coupled steps evaluate nothing at t0: evaluation numbers from 0.)
        self.f.index = self.step * self.evaluations + first
        if not self.need_t:
            ts = self.times.of(self.step)[first : first + plan.stages]
            out, total, cot = _increments(self.f, x_leaf, h, ts, plan, v, extra)
            g_x, _ = self._grad(total, x_leaf, cot, ())
            return out.detach(), g_x
        tau = self._point_time(offset).detach().requires_grad_(True)
        if self._h_leaf is None:  # the step's size, one leaf for both base steps
            h_signed = h if offset == 0 else -h
            self._h_leaf = torch.tensor(h_signed, dtype=tau.dtype, device=tau.device)
            self._h_leaf.requires_grad_(True)
        hh = self._h_leaf if offset == 0 else -self._h_leaf
        stage_times = [tau if c == 0.0 else tau + c * hh for c in plan.c]
        out, total, cot = _increments(self.f, x_leaf, hh, stage_times, plan, v, extra)
        g_x, (g_tau, g_h) = self._grad(total, x_leaf, cot, (tau, self._h_leaf))
        self._add_point_gradient(g_tau, offset)
        if g_h is not None:
            self.add_step_size_gradient(g_h)
        return out.detach(), g_x
