"""One generic explicit Runge--Kutta step for any tableau, and the fixed-step loop."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._grid import StageTimes, TimeGrid, step_sizes
from ._tableau import ButcherTableau

__all__ = ["StepPlan", "plan_for", "combine", "rk_step", "integrate", "StepHook"]

Step = float | torch.Tensor
DynamicsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Callable[[int, int, torch.Tensor], None]
"""``hook(i, k, y)``: called with the state before step ``k`` of interval ``i``."""


@dataclass(frozen=True)
class StepPlan:
    """A tableau's non-zero coefficients, resolved once per tableau.

    Attributes
    ----------
    stages : int
    rows : tuple of tuple of (int, float)
        For each stage ``j``, the pairs ``(l, a_jl)`` with ``a_jl != 0``.
    weights : tuple of (int, float)
        The pairs ``(j, b_j)`` with ``b_j != 0``.
    b : tuple of float
        All weights, zeros included.
    """

    stages: int
    rows: tuple[tuple[tuple[int, float], ...], ...]
    weights: tuple[tuple[int, float], ...]
    b: tuple[float, ...]


@functools.lru_cache(maxsize=64)
def plan_for(tableau: ButcherTableau) -> StepPlan:
    """The :class:`StepPlan` of a tableau (cached: tableaus are frozen and hashable)."""
    rows = tuple(
        tuple((m, a_jm) for m, a_jm in enumerate(row[:j]) if a_jm != 0.0)
        for j, row in enumerate(tableau.a)
    )
    weights = tuple((j, b_j) for j, b_j in enumerate(tableau.b) if b_j != 0.0)
    return StepPlan(stages=tableau.stages, rows=rows, weights=weights, b=tableau.b)


def combine(
    y: torch.Tensor, h: Step, terms: Sequence[tuple[int, float]], ks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``y + h * sum(coef * ks[l] for l, coef in terms)`` with fused kernels.

    With a float ``h`` each term is one ``torch.add(..., alpha=)``; with a tensor ``h`` (times
    that need a gradient) the sum is formed first and added with one ``addcmul``.
    """
    if not terms:
        return y
    if isinstance(h, float):
        out = y
        for m, coef in terms:
            out = torch.add(out, ks[m], alpha=coef * h)
        return out
    (l0, c0), *rest = terms
    if not rest:
        return torch.addcmul(y, ks[l0], h, value=c0)
    acc = ks[l0] * c0
    for m, coef in rest:
        acc = torch.add(acc, ks[m], alpha=coef)
    return torch.addcmul(y, acc, h)


def rk_step(
    f: Callable[[torch.Tensor, Any], Any],
    y: Any,
    h: Any,
    times: Sequence[torch.Tensor],
    pos: int,
    plan: StepPlan,
) -> Any:
    """One explicit RK step from ``y``; stage ``j`` is evaluated at ``times[pos + j]``.

    ``y`` is a tensor and ``h`` its step, or, for an augmented system (the continuous adjoint's
    ``(y, a)``), a tuple of tensors with a tuple of per-component steps; ``f`` then returns a
    tuple of the same length.
    """
    ks: list[Any] = []
    for j in range(plan.stages):
        ks.append(f(times[pos + j], _combine_state(y, h, plan.rows[j], ks)))
    return _combine_state(y, h, plan.weights, ks)


def _combine_state(y: Any, h: Any, terms: Sequence[tuple[int, float]], ks: Sequence[Any]) -> Any:
    if isinstance(y, tuple):
        return tuple(
            combine(y_c, h_c, terms, [k[c] for k in ks]) for c, (y_c, h_c) in enumerate(zip(y, h))
        )
    return combine(y, h, terms, ks)


def integrate(
    f: DynamicsFn,
    y0: torch.Tensor,
    t: torch.Tensor,
    grid: TimeGrid,
    tableau: ButcherTableau,
    *,
    check_finite: bool,
    before_step: StepHook | None = None,
) -> list[torch.Tensor]:
    """Integrate over the grid and return the states at the output times after the first.

    Parameters
    ----------
    f : callable
        ``f(t, y) -> dy/dt``.
    y0 : Tensor, shape (...)
    t : Tensor, shape (T,)
        Output times in ``y0``'s dtype and device. When it requires grad (backprop through the
        solver with learnable times), stage times and step sizes are differentiable tensors.
    grid : TimeGrid
    tableau : ButcherTableau
    check_finite : bool
        Check the result once, after the loop, and locate the first non-finite step if needed.
    before_step : callable, optional
        ``before_step(i, k, y)`` before every step (a gradient mode keeping checkpoints).

    Returns
    -------
    list of Tensor, T - 1 of shape (...)
        The states at ``t[1:]``; the caller stacks them with ``y0`` if it needs to.
    """
    plan = plan_for(tableau)
    times = StageTimes(t, grid, tableau.c)
    hs: Sequence[Step] = step_sizes(t, grid) if t.requires_grad else grid.h
    states = []
    y = y0
    pos = 0
    for i, n in enumerate(grid.n_steps):
        h = hs[i]
        for k in range(n):
            if before_step is not None:
                before_step(i, k, y)
            y = rk_step(f, y, h, times, pos, plan)
            pos += plan.stages
        states.append(y)
    # One host sync per call, never one per step: see locate_non_finite for the slow path.
    # Under torch.func transforms (vmap) a data-dependent branch is impossible: no check there.
    if (
        check_finite
        and not torch._C._are_functorch_transforms_active()
        and not bool(_all_finite(states))
    ):
        locate_non_finite(f, y0, states, t, grid, tableau)
    return states


def _all_finite(states: list[torch.Tensor]) -> torch.Tensor:
    if len(states) == 1:
        return torch.isfinite(states[0]).all()
    return torch.stack([torch.isfinite(s).all() for s in states]).all()


def locate_non_finite(
    f: DynamicsFn,
    y0: torch.Tensor,
    states: list[torch.Tensor],
    t: torch.Tensor,
    grid: TimeGrid,
    tableau: ButcherTableau,
) -> None:
    """Raise a RuntimeError naming the first time at which the state became non-finite.

    Only called on failure: re-integrates the first bad interval step by step, checking each.
    """
    sol = torch.stack([y0, *states]).detach()
    finite = torch.isfinite(sol.reshape(sol.shape[0], -1)).all(dim=1).tolist()
    i = finite.index(False)
    if i == 0:
        raise ValueError("`y0` contains NaN or infinite values; pass a finite initial state.")
    plan = plan_for(tableau)
    t_a, n, h = grid.times[i - 1], grid.n_steps[i - 1], grid.h[i - 1]
    times = StageTimes(t.detach(), grid, tableau.c)
    pos = grid.offsets[i - 1] * plan.stages
    y = sol[i - 1].detach()
    where = f"t = {grid.times[i]:.6g}"
    with torch.no_grad():
        for k in range(n):
            y = rk_step(f, y, h, times, pos, plan)
            pos += plan.stages
            if not bool(torch.isfinite(y).all()):
                interval = f"[{t_a:.6g}, {grid.times[i]:.6g}]"
                where = f"t = {t_a + (k + 1) * h:.6g} (step {k + 1} of {n} in {interval})"
                break
    raise RuntimeError(
        f"the ODE state became NaN or infinite at {where}; reduce `step`, use a more stable "
        "solver, or check the dynamics (pass `check_finite=False` to skip this check)."
    )
