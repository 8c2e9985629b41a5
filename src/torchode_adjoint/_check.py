"""``check_gradients``: a gradient mode against its reference and finite differences, in float64,
with a verdict per input."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ._block import ODEBlock
from ._executor import Executor
from ._prepare import Prepared, SolveConfig, make_config, prepare
from ._structure import State, StateStructure, first_leaf, map_leaves, real_dtype
from .controllers.fixed import StepRoundingWarning, Steps, StepTo, TimeGrid, make_grid, regrid
from .modes.base import Backprop
from .modes.checkpoint import Checkpoint
from .modes.reversible import Reversible
from .solvers.reversible_coupling import Coupled, CouplingReplay
from .solvers.tableau import ButcherTableau

__all__ = ["GradientCheck", "GradientReport", "check_gradients"]

Verdict = Literal["pass", "suspicious", "fail"]
_ORDER: dict[str, int] = {"pass": 0, "suspicious": 1, "fail": 2}
# Round-off of an exact gradient in float64 over a solve, with room for long solves.
_EXACT_TOL = 1e-9
# Finite differences of the mode's own forward pass in float64 with eps = 1e-6 agree to about
# 1e-8 for smooth dynamics; beyond this an exact mode is suspicious.
_FD_TOL = 1e-5


@dataclass(frozen=True)
class GradientCheck:
    """The check of one input's gradient.

    Attributes
    ----------
    name : str
        ``"y0"``, ``"t"`` or the parameter's name.
    shape : tuple of int
    rel_err_backprop : float
        ``||g - g_ref|| / ||g_ref||`` against the mode's reference: backprop through the solver
        for the exact modes and the continuous adjoint, backprop through the reversible method
        itself for ``"reversible"``. The denominator is at least ``1e-8`` times the
        largest reference gradient of the report, so a gradient that is zero up to round-off
        (a bias before a norm) does not show a huge relative error.
    rel_err_fd : float
        ``|<g, v> - fd|`` along a random unit direction ``v``, where ``fd`` is the central finite
        difference of the mode's own discretised forward pass (same step counts), relative to
        ``max(|fd|, |<g_ref, v>|)`` and at least the finite differences' round-off,
        ``100 * eps64 * max(|L|, 1) / eps`` (``eps64`` float64's machine epsilon, ``L`` the
        checked loss at the unperturbed inputs, ``eps`` the finite-difference step).
        ``inf`` when a perturbed solve is not finite (the dynamics leave their domain within
        ``eps``): the finite differences then verify nothing. A difference ``|<g, v> - fd|``
        below the round-off floor does not count against the verdict (the value is below 1):
        the finite differences cannot resolve it.
    tolerance : float
        What the mode's error against its reference may be: round-off (1e-9) for the exact
        modes; for the continuous adjoint ten times the discretisation error, measured as the
        change of the exact gradient when the step is halved.
    verdict : {"pass", "suspicious", "fail"}
        ``pass`` within the tolerance, ``suspicious`` within 100 times it (or an exact mode
        whose finite-difference error exceeds 1e-5, or is ``inf``), ``fail`` beyond.
    """

    name: str
    shape: tuple[int, ...]
    rel_err_backprop: float
    rel_err_fd: float
    tolerance: float
    verdict: Verdict


@dataclass(frozen=True)
class GradientReport:
    """The result of :func:`check_gradients`; ``print(report)`` shows a table with verdicts.

    Attributes
    ----------
    mode : str
        The gradient mode checked.
    solver : str
    step : float or None
    reference : str
        What the mode was compared with.
    checks : tuple of GradientCheck
    discretisation_error : float or None
        For the continuous adjoint: the largest relative change of the exact gradient when the
        step is halved (under error control: when the tolerances are divided by 1,000), the
        yardstick of its tolerance (None for the exact modes).
    tolerances : str or None
        ``"rtol=..., atol=..."`` of an error-controlled solve (None: fixed steps).
    layout : str or None
        The user's step times (``"StepTo([...])"``) where they laid out the steps.
    """

    mode: str
    solver: str
    step: float | None
    reference: str
    checks: tuple[GradientCheck, ...]
    discretisation_error: float | None = None
    tolerances: str | None = None
    layout: str | None = None

    @property
    def summary(self) -> str:
        """One sentence saying what the verdict measured."""
        worst = self.max_rel_err_backprop
        if self.discretisation_error is None:
            return (
                f"exact mode: largest error {worst:.2e} against {self.reference} (allowed: "
                f"round-off, {_EXACT_TOL:.0e}) and {self.max_rel_err_fd:.2e} against finite "
                "differences"
            )
        if self.tolerances is not None:
            finer, knob = "tolerances 1,000 times tighter change", "tighten `rtol`/`atol`"
        elif self.layout is not None:
            finer, knob = "halving every step changes", "give more step times"
        else:
            finer, knob = "halving the step changes", "reduce `step`"
        return (
            f"continuous adjoint: its gradient differs from the exact discrete one by up to "
            f"{_percent(worst)}, which is this mode's expected approximation (it differentiates "
            f"the ODE, not the solver's steps; the difference shrinks with the step), not a "
            f"fault; {finer} the exact gradient by {_percent(self.discretisation_error)}, and "
            f"'pass' allows 10 times that. A large discretisation error means a large adjoint "
            f"error: {knob}, or use an exact mode ('checkpoint', 'reversible')"
        )

    @property
    def max_rel_err_backprop(self) -> float:
        """Largest relative error against the reference over all inputs."""
        return max(c.rel_err_backprop for c in self.checks)

    @property
    def max_rel_err_fd(self) -> float:
        """Largest relative error against finite differences over all inputs."""
        return max(c.rel_err_fd for c in self.checks)

    @property
    def verdict(self) -> Verdict:
        """The worst verdict over all inputs."""
        return max((c.verdict for c in self.checks), key=_ORDER.__getitem__)

    def __str__(self) -> str:
        width = max(len(c.name) for c in self.checks)
        lines = [
            f"gradient check: mode={self.mode}, solver={self.solver}, "
            + (self.tolerances or self.layout or f"step={self.step}")
            + " (float64)",
            f"reference: {self.reference}",
            f"{'input':<{width}}  {'shape':<16}  {'vs reference':>12}  {'vs finite diff':>14}  "
            f"{'tolerance':>9}  verdict",
        ]
        exact = self.discretisation_error is None
        mark = "" if exact else "*"  # the finite differences do not count for the adjoint
        for c in self.checks:
            fd = f"{c.rel_err_fd:.3e}{mark}"
            lines.append(
                f"{c.name:<{width}}  {str(c.shape):<16}  {c.rel_err_backprop:>12.3e}  "
                f"{fd:>14}  {c.tolerance:>9.1e}  {c.verdict}"
            )
        if exact:
            lines.append(
                f"'tolerance' bounds 'vs reference'; 'vs finite diff' makes a row suspicious above "
                f"{_FD_TOL:.0e} unless the difference is below the finite differences' round-off"
            )
        else:
            lines.append(
                "* for information only: the continuous adjoint's gradient differs from the "
                "discrete one by its discretisation error, so only 'vs reference' against "
                "'tolerance' decides"
            )
        lines.append(self.summary)
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def _percent(x: float) -> str:
    """A relative error as a percentage with two significant digits (``3.1e-06 %``, not
    ``0.00%``)."""
    return f"{100 * x:.2g} %"


def _verdict(err: float, tol: float, fd_err: float, exact: bool) -> Verdict:
    if err > 100 * tol:
        return "fail"
    if err > tol or (exact and fd_err > _FD_TOL):
        return "suspicious"
    return "pass"


def check_gradients(
    func_or_block: nn.Module | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y0: State,
    t: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    seed: int = 0,
    **odeint_kwargs: object,
) -> GradientReport:
    """Check a gradient mode on your own dynamics, in float64.

    The loss is ``sum(w * odeint(...))`` with fixed random weights ``w``. The gradients of the
    chosen mode for ``y0``, every time in ``t`` and every parameter are compared with the mode's
    reference (backprop through the solver; for ``"reversible"`` backprop through the reversible
    method itself) and with central finite differences of the same discretised forward pass
    along a random direction (the step counts are held fixed while the times move). Each input
    gets a verdict against the tolerance the mode deserves: round-off for the exact modes, the
    measured discretisation error for the continuous adjoint (see :class:`GradientCheck`).

    Parameters
    ----------
    func_or_block : ODEBlock, nn.Module or callable
        An :class:`~torchode_adjoint.ODEBlock` (its solver, step, mode and times are the
        defaults), a dynamics module, or a function (then pass ``params=`` and make it compute in
        float64). Modules are copied and cast to float64; the original is untouched.
    y0 : Tensor, shape (...), or a tuple, list or dict of Tensors
        A structured or complex state is checked as the flat real vector it is integrated as
        (one row ``"y0 (flattened)"``; a complex part contributes its real and imaginary parts).
    t : Tensor, shape (T,), optional
        Default: the block's ``[t0, t1]``, else ``[0, 1]``.
    eps : float, default 1e-6
        Finite-difference step.
    seed : int, default 0
        Seeds the loss weights and the directions.
    **odeint_kwargs
        ``solver``, ``step``, ``adjoint``, ``params`` ... as for :func:`~torchode_adjoint.odeint`.

    Returns
    -------
    GradientReport

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from torchode_adjoint import check_gradients
    >>> class F(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = nn.Linear(3, 3)
    ...     def forward(self, t, y):
    ...         return torch.tanh(self.lin(y))
    >>> report = check_gradients(F(), torch.randn(4, 3), solver="rk4", step=0.05)
    >>> report.verdict
    'pass'
    """
    setup = _setup(func_or_block, y0, t, odeint_kwargs)
    gen = torch.Generator().manual_seed(seed)
    out = setup.solution(setup.config)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    g_mode = setup.gradients(out, w)
    reference, g_ref = _reference(setup, w)
    scale = max(float(g.norm()) for g in g_ref) * 1e-8 + 1e-300

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm()) / max(float(b.norm()), scale)

    tolerances, discretisation = _tolerances(setup, w, g_ref, rel)
    directions = [
        (v / v.norm().clamp_min(1e-300))
        for v in (
            torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device)
            for x in setup.inputs
        )
    ]
    fds, fd_noise = _finite_differences(setup, w, directions, eps)
    checks = []
    for idx, (name, x) in enumerate(zip(setup.names, setup.inputs)):
        v, fd = directions[idx], fds[idx]
        directional = float((g_mode[idx] * v).sum())
        ref_dir = float((g_ref[idx] * v).sum())
        fd_err = abs(directional - fd) / max(abs(fd), abs(ref_dir), fd_noise)
        if not math.isfinite(fd_err):
            fd_err = math.inf
        err = rel(g_mode[idx], g_ref[idx])
        exact = setup.config.mode.exact
        checks.append(
            GradientCheck(
                name=name,
                shape=tuple(x.shape),
                rel_err_backprop=err,
                rel_err_fd=fd_err,
                tolerance=tolerances[idx],
                # A difference below the finite differences' round-off cannot count against
                # the gradient (a gradient zero up to round-off, e.g. a bias under BatchNorm).
                verdict=_verdict(
                    err,
                    tolerances[idx],
                    0.0 if abs(directional - fd) <= fd_noise else fd_err,
                    exact,
                ),
            )
        )
    return GradientReport(
        mode=setup.config.mode.name,
        solver=setup.config.tableau.name,
        step=setup.config.step,
        reference=reference,
        checks=tuple(checks),
        discretisation_error=discretisation,
        tolerances=None if setup.config.control is None else setup.config.control.describe(),
        layout=None if setup.config.layout is None else repr(setup.config.layout),
    )


@dataclass
class _Setup:
    """The float64 problem a check runs on: the dynamics (a module's copy, or the user's
    function), the inputs to differentiate and the solve's settings."""

    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    config: SolveConfig
    y: torch.Tensor
    t: torch.Tensor
    params: list[torch.Tensor]
    names: list[str]
    counts: tuple[int, ...]
    """The steps per interval of the user's own solve (counted in the user's dtype)."""

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [self.y, self.t, *self.params]

    def prepared(self, cfg: SolveConfig) -> Prepared:
        """The float64 solve of ``cfg``; at the user's own step, with the user's step
        counts (float32 times cast to float64 can round to another count: 0.3f / 0.1 is
        3.0000001 steps, 3 in float32 and 4 in float64)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StepRoundingWarning)  # counts: the user's, below
            prepared = prepare(self.func, self.y, self.t, cfg, params=self.params)
        grid = prepared.spec.grid
        if cfg.step != self.config.step or not isinstance(grid, TimeGrid):
            # Another discretisation (the halved step), or the user's own step times.
            return prepared
        user = dataclasses.replace(grid, n_steps=self.counts)
        grid = regrid(user, prepared.spec.grid.times)
        return dataclasses.replace(prepared, spec=dataclasses.replace(prepared.spec, grid=grid))

    def solution(self, cfg: SolveConfig) -> torch.Tensor:
        return torch.stack([self.y, *self.prepared(cfg).solve()])

    def gradients(self, sol: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        g = torch.autograd.grad((w * sol).sum(), self.inputs, allow_unused=True)
        return [gi if gi is not None else torch.zeros_like(x) for gi, x in zip(g, self.inputs)]


def _setup(func_or_block: object, y0: State, t: torch.Tensor | None, odeint_kwargs: dict) -> _Setup:
    kwargs = dict(odeint_kwargs)
    if isinstance(func_or_block, ODEBlock):
        block = func_or_block
        kwargs.setdefault("solver", block.solver)
        kwargs.setdefault("step", block.step)
        kwargs.setdefault("adjoint", block.adjoint)
        if t is None:
            t = block.integration_times(_double(typing.cast(torch.Tensor, first_leaf(y0))))
        func_or_block = block.dynamics
    func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if isinstance(func_or_block, nn.Module):
        # A float64 copy: the user's module, its weights and buffers are never touched.
        func = copy.deepcopy(func_or_block).double()
        named = [(n, p) for n, p in func.named_parameters() if p.requires_grad]
        if "params" in kwargs:
            raise ValueError(
                "`params` cannot be given with a module: its parameters are checked by name."
            )
    else:
        if not callable(func_or_block):
            raise TypeError(
                f"`func_or_block` must be an ODEBlock, an nn.Module or a function f(t, y), got "
                f"{type(func_or_block).__name__}."
            )
        func = func_or_block  # type: ignore[assignment]
        given = kwargs.pop("params", None)
        named = [(f"params[{i}]", p) for i, p in enumerate(given or ())]  # type: ignore[arg-type]
        wrong = [n for n, p in named if p.dtype != torch.float64]
        if wrong:
            raise TypeError(
                f"check_gradients computes in float64, and a function's tensors cannot be "
                f"copied: {', '.join(wrong)} of `params` are not float64. Build the function on "
                "float64 tensors (e.g. `w = w.double()` before defining it), or pass an "
                "nn.Module, which is copied and cast."
            )
    config = make_config(**kwargs)  # type: ignore[arg-type]
    y_name = "y0"
    state = map_leaves(_double, y0)
    structure = StateStructure.of(state)
    if structure is not None:  # checked as the flat real vector it is integrated as
        func, state, y_name = structure.wrap(func), structure.flatten(state), "y0 (flattened)"
    y = state.detach().requires_grad_(True)  # type: ignore[union-attr]
    given_t = t if t is not None else torch.tensor([0.0, 1.0])
    tt = given_t.detach().double().to(y.device)
    tt.requires_grad_(True)
    counts = _user_counts(y0, given_t, config)
    names = [y_name, "t", *(n for n, _ in named)]
    return _Setup(func, config, y, tt, [p for _, p in named], names, counts)


def _user_counts(y0: State, t: torch.Tensor, config: SolveConfig) -> tuple[int, ...]:
    """The steps per interval the user's solve takes: its times in the state's real dtype."""
    leaf = first_leaf(y0)
    dtype = real_dtype(leaf.dtype) if isinstance(leaf, torch.Tensor) else torch.float64
    host = t.detach().to(dtype).cpu().tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StepRoundingWarning)
        grid = make_grid(host, config.step, torch.finfo(dtype).eps, max_steps=config.max_steps)
    return grid.n_steps


def _double(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached in float64 (complex128 for a complex tensor)."""
    return x.detach().to(torch.complex128 if x.is_complex() else torch.float64)


def _reference(setup: _Setup, w: torch.Tensor) -> tuple[str, list[torch.Tensor]]:
    """What the mode's gradient is compared with, and that gradient. For the memory-saving
    modes: backprop through the method the mode integrates (for the reversible mode, the
    reversible scheme itself). For backprop: the checkpointed mode, an independent computation
    of the same exact gradient."""
    config = setup.config
    if isinstance(config.mode, Backprop):
        ref_config = dataclasses.replace(config, mode=Checkpoint())
        name = f"the checkpointed discrete adjoint of {config.executor.method.name}"
        if not isinstance(config.tableau, ButcherTableau):  # reversible Heun: its own scheme
            ref_config = dataclasses.replace(config, mode=Reversible())
            name = f"the reversible mode's backward pass through {config.tableau.name}"
    else:
        ref_config = dataclasses.replace(config, mode=Backprop())
        name = f"backprop through {config.executor.method.name}"
    return name, setup.gradients(setup.solution(ref_config), w)


def _tolerances(
    setup: _Setup, w: torch.Tensor, g_ref: list[torch.Tensor], rel: Callable[..., float]
) -> tuple[list[float], float | None]:
    """Per input, the error the mode may have against its reference, and (for the continuous
    adjoint) the measured discretisation error."""
    config = setup.config
    if config.mode.exact:
        return [_EXACT_TOL] * len(g_ref), None
    # The continuous adjoint is as far from the discrete gradient as the discretisation error:
    # measure that as the change of the exact gradient when the step is halved (under error
    # control: against tolerances 1,000 times tighter; one notch tighter can change the steps
    # little or much, while far tighter gives the error of the user's own tolerance).
    if config.control is not None:
        tighter = dataclasses.replace(
            config.control, rtol=_scaled(config.control.rtol), atol=_scaled(config.control.atol)
        )
        fine = dataclasses.replace(config, mode=Backprop(), control=tighter)
    elif config.layout is not None:  # the user's step times with each step halved
        fine = dataclasses.replace(
            config, mode=Backprop(), layout=_halved(setup.prepared(config).spec.grid)
        )
    else:
        grid = setup.prepared(config).spec.grid
        assert isinstance(grid, TimeGrid)
        half = max(abs(h) for h in grid.h) / 2
        fine = dataclasses.replace(config, mode=Backprop(), step=half)
    g_fine = setup.gradients(setup.solution(fine), w)
    errors = [rel(a, b) for a, b in zip(g_ref, g_fine)]
    return [max(10 * e, _EXACT_TOL) for e in errors], max(errors)


def _halved(grid: Steps) -> StepTo:
    """Step times that split every step of ``grid`` in two."""
    ts = grid.times
    ends = [
        ts[i] + m * (ts[i + 1] - ts[i])
        for i in range(len(ts) - 1)
        for k in range(grid.n_steps[i])
        for m in (grid.fractions(i, k)[0], sum(grid.fractions(i, k)[:2]) / 2)
    ]
    return StepTo(ends)


def _scaled(tolerance: Any) -> Any:
    """A tolerance (a number, or one per part) divided by 1,000 (not below 1e-13, float64's
    reach)."""
    if isinstance(tolerance, dict):
        return {k: _scaled(v) for k, v in tolerance.items()}
    if isinstance(tolerance, (tuple, list)):
        return type(tolerance)(_scaled(v) for v in tolerance)
    return max(tolerance / 1000.0, 1e-13)


def _finite_differences(
    setup: _Setup, w: torch.Tensor, directions: list[torch.Tensor], eps: float
) -> tuple[list[float], float]:
    """Central differences of the loss along each direction, through the mode's own forward
    pass with the step counts held fixed (the grid's counts are piecewise constant in t, so
    moving t across a ceil() boundary would jump), and their round-off level.

    Parameters are perturbed in place (a function's tensors are the user's own: it closes over
    them) and restored in a ``finally``, whatever the dynamics raise.
    """
    # Its evaluation counter is this check's own (prepare() without `nfe`), never the user's.
    base_spec = setup.prepared(setup.config).spec

    # The check differentiates with respect to t, so its solves end a step on every output time
    # (error control interpolates only where the times need no gradient): so do these.
    control = base_spec.control
    if control is not None:
        control = dataclasses.replace(control, interpolate=False)

    # A reversible scheme's couplings chosen per step are constants of its exact gradient: with
    # fixed steps the perturbed solves take the unperturbed one's (chosen anew, they would move
    # with the inputs and the differences would see that too).
    method = base_spec.executor.method
    coupled = method if isinstance(method, Coupled) and method.choose else None
    replays = coupled is not None and control is None
    couplings: list[float] = []

    def loss_at(y_in: torch.Tensor, t_in: torch.Tensor) -> float:
        spec = dataclasses.replace(
            base_spec,
            grid=regrid(base_spec.grid, t_in.tolist()),
            check_finite=False,
            control=control,
        )
        if couplings and coupled is not None:  # filled only where the couplings replay
            replayed = dataclasses.replace(coupled, replay=CouplingReplay(couplings))
            spec = dataclasses.replace(spec, executor=Executor(replayed, None))
        with torch.no_grad():
            states = setup.config.mode.solve(spec, y_in, t_in, setup.params)
            return float((w * torch.stack([y_in, *states])).sum())

    y, tt = setup.y.detach(), setup.t.detach()
    loss0 = abs(loss_at(y, tt))
    if replays:
        couplings.extend(base_spec.counter.couplings)
    fds = []
    for idx, (x, v) in enumerate(zip(setup.inputs, directions)):
        values = []
        if idx == 0:
            values = [loss_at(y + sign * eps * v, tt) for sign in (1.0, -1.0)]
        elif idx == 1:
            values = [loss_at(y, tt + sign * eps * v) for sign in (1.0, -1.0)]
        else:
            with torch.no_grad():
                base = x.detach().clone()
                try:
                    for sign in (1.0, -1.0):
                        x.copy_(base + sign * eps * v)
                        values.append(loss_at(y, tt))
                finally:
                    x.copy_(base)
        fds.append((values[0] - values[1]) / (2 * eps))
    # Central differences lose about machine eps * |L| / eps to round-off.
    return fds, 100 * torch.finfo(torch.float64).eps * max(loss0, 1.0) / eps
