"""The explicit Runge--Kutta step: one generic step for every tableau, and its method.

A tableau is resolved once into a :class:`StepPlan` (its non-zero coefficients); :func:`rk_step`
takes one step of any plan, on a tensor or on a tuple of tensors (an augmented system), and
:func:`combine` is the one linear-combination kernel the steps use.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._compiled import cast
from .protocol import DynamicsFn, MethodBase, Step, Stepped
from .tableau import ButcherTableau, StepPlan, plan_for

__all__ = [
    "StepPlan",
    "plan_for",
    "combine",
    "rk_stages",
    "rk_step",
    "rk_increment",
    "RungeKutta",
    "dense_terms",
    "sample_dense_weights",
]


def combine(
    y: torch.Tensor | None, h: Step, terms: Sequence[tuple[int, float]], ks: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``y + h * sum(coef * ks[l] for l, coef in terms)`` with fused kernels (``y=None``: the
    increment alone).

    With a float ``h`` each term is one ``torch.add(..., alpha=)``; with a tensor ``h`` (times
    that need a gradient, and the compiled path) the sum is formed first and then added.
    """
    if not terms:
        return y if y is not None else torch.zeros_like(ks[0])
    if isinstance(h, float):
        m0, c0 = terms[0]
        out = torch.mul(ks[m0], c0 * h) if y is None else torch.add(y, ks[m0], alpha=c0 * h)
        for m, coef in terms[1:]:
            out = torch.add(out, ks[m], alpha=coef * h)
        return out
    if h.dim() > 0 and not torch.compiler.is_compiling():
        # One step size per sample (shape (B, 1, ..., 1)), eager: fused terms, then one
        # multiply-add of the step.
        m0, c0 = terms[0]
        acc = torch.mul(ks[m0], c0)
        for m, coef in terms[1:]:
            acc = torch.add(acc, ks[m], alpha=coef)
        return acc * h if y is None else torch.addcmul(y, acc, h)
    # No `alpha=`/`value=` coefficients here: this path is also the compiled one, and
    # torch.compile's inductor drops the `alpha` of `add(x, mm(a, b), alpha=c)` when it rewrites
    # it to `addmm` (pytorch/pytorch#167313), which a stage that is a matrix product triggers.
    acc = ks[terms[0][0]] * terms[0][1]
    for m, coef in terms[1:]:
        acc = acc + ks[m] * coef
    return acc * h if y is None else y + acc * h


def combine_state(y: Any, h: Any, terms: Sequence[tuple[int, float]], ks: Sequence[Any]) -> Any:
    """:func:`combine` on a tensor, or part by part on a tuple (with a tuple of steps)."""
    if isinstance(y, tuple):
        return tuple(
            combine(y_c, h_c, terms, [k[c] for k in ks]) for c, (y_c, h_c) in enumerate(zip(y, h))
        )
    return combine(y, h, terms, ks)


def rk_stages(
    f: Callable[[torch.Tensor, Any], Any],
    y: Any,
    h: Any,
    ts: Sequence[torch.Tensor],
    plan: StepPlan,
) -> list[Any]:
    """The stage derivatives ``k_j = f(ts[j], y + h sum_l a_jl k_l)`` of one step from ``y``.

    ``y`` is a tensor and ``h`` its step, or, for an augmented system, a tuple of tensors with a
    tuple of per-part steps; ``f`` then returns a tuple of the same length.
    """
    ks: list[Any] = []
    for j in range(plan.stages):
        ks.append(f(ts[j], combine_state(y, h, plan.rows[j], ks)))
    return ks


def rk_step(
    f: Callable[[torch.Tensor, Any], Any],
    y: Any,
    h: Any,
    ts: Sequence[torch.Tensor],
    plan: StepPlan,
) -> tuple[Any, list[Any]]:
    """One explicit RK step from ``y`` (see :func:`rk_stages`): the new state and the stages."""
    ks = rk_stages(f, y, h, ts, plan)
    return combine_state(y, h, plan.weights, ks), ks


def rk_increment(
    f: DynamicsFn, y: torch.Tensor, h: Step, ts: Sequence[torch.Tensor], plan: StepPlan
) -> torch.Tensor:
    """``Psi_h(y) - y = h * sum_j b_j k_j``: one step's increment, formed without ``y`` (so
    that a method that adds it to another state loses no digits to a cancellation)."""
    return combine(None, h, plan.weights, rk_stages(f, y, h, ts, plan))


def dense_terms(tableau: ButcherTableau, theta: Any) -> list[tuple[int, Any]]:
    """The weights ``b_i(theta)`` of the tableau's continuous extension at ``theta`` (its
    non-zero ones, as ``combine`` takes them): the increment to ``t + theta h`` is
    ``h sum_i b_i(theta) k_i``. ``theta`` is a float, or a tensor of one per sample (shape
    ``(B, 1, ..., 1)``), which gives tensor weights (every stage with a dense row kept)."""
    dense = tableau.b_dense
    if dense is None:
        raise NotImplementedError(f"{tableau.name!r} has no continuous extension")
    terms = []
    for i, row in enumerate(dense):
        w = 0.0
        for p in range(len(row) - 1, -1, -1):  # Horner: sum_p row[p] theta**(p + 1)
            w = (w + row[p]) * theta
        if isinstance(w, torch.Tensor) or w != 0.0:
            terms.append((i, w))
    return terms


def sample_dense_weights(tableau: ButcherTableau, theta: torch.Tensor) -> torch.Tensor:
    """:func:`dense_terms` for one ``theta`` per sample: the weights ``b_i(theta_b)`` of every
    stage, shape ``(B, stages)``, from one product of the powers of ``theta`` with the
    tableau's polynomial coefficients."""
    dense = tableau.b_dense
    if dense is None:
        raise NotImplementedError(f"{tableau.name!r} has no continuous extension")
    degree = max(len(row) for row in dense)
    coefs = theta.new_tensor([[*row, *([0.0] * (degree - len(row)))] for row in dense])
    powers = theta[:, None] ** torch.arange(1, degree + 1, device=theta.device, dtype=theta.dtype)
    weights = powers @ coefs.T
    stages = len(tableau.c)
    if weights.shape[1] < stages:  # stages without a dense row weigh nothing
        weights = torch.nn.functional.pad(weights, (0, stages - weights.shape[1]))
    return weights


@dataclass(frozen=True)
class RungeKutta(MethodBase):
    """An explicit Runge--Kutta method, for every tableau: its dense information is the stage
    derivatives.

    Without ``estimate`` the carry is the solution and a step returns no error. With
    ``estimate`` (error-controlled steps of an embedded pair) each step returns its error
    estimate ``h * sum_j (b_j - b_embedded_j) k_j``; with a first-same-as-last tableau the carry
    is then ``(y, f(t, y))``, so that an accepted step's last stage is the next step's first and
    a rejected step's first stage is reused (one evaluation less per step).
    """

    tableau: ButcherTableau
    estimate: bool = False
    plan: StepPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Resolved here, not in the step: the compiled step traces no cache lookups.
        object.__setattr__(self, "plan", plan_for(self.tableau))

    @property
    def name(self) -> str:
        return self.tableau.name

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def error_order(self) -> int | None:
        """The order of the error estimate's leading term less one: the embedded order."""
        return int(self.tableau.embedded_order or 1) if self.estimate else None

    @property
    def nodes(self) -> tuple[float, ...]:
        return self.tableau.c

    @property
    def key(self) -> Hashable:
        return ("embedded", self.tableau) if self.estimate else ("rk", self.tableau)

    @property
    def _carries_derivative(self) -> bool:
        return self.estimate and self.tableau.fsal

    def init(self, f: Any, y0: torch.Tensor, t0: torch.Tensor) -> Any:
        return (y0, f(t0, y0)) if self._carries_derivative else y0

    def output(self, carry: Any) -> torch.Tensor:
        return carry[0] if self._carries_derivative else carry  # type: ignore[no-any-return]

    @property
    def interpolates(self) -> bool:
        """Whether the tableau has a continuous extension (dense output)."""
        return self.tableau.b_dense is not None

    def interpolate(self, carry: Any, h: Step, ks: Sequence[Any], theta: Any) -> torch.Tensor:
        """The solution at ``t + theta h`` inside a step from ``carry`` with stages ``ks``
        (``h`` and ``theta`` tensors of one per sample, shape ``(B, 1, ..., 1)``, in a
        per-sample solve)."""
        y = self.output(carry)
        if not isinstance(theta, torch.Tensor):
            return combine(y, h, dense_terms(self.tableau, theta), ks)
        # One theta per sample: the weights of every sample at once, one batched product.
        assert isinstance(h, torch.Tensor)
        batch = y.shape[0]
        weights = sample_dense_weights(self.tableau, theta.reshape(batch))
        shape = (weights.shape[1], batch, *([1] * (y.dim() - 1)))
        acc = (torch.stack(list(ks)) * weights.T.reshape(shape)).sum(0)
        return torch.addcmul(y, acc, h)

    def derivative(self, carry: Any) -> torch.Tensor | None:
        """``f(t, y)`` at the carry's time where the carry holds it (first same as last)."""
        return carry[1] if self._carries_derivative else None  # type: ignore[no-any-return]

    def step(self, f: Any, carry: Any, h: Step, ts: tuple[torch.Tensor, ...]) -> Stepped:
        plan = self.plan
        if not self.estimate:
            y, stages = rk_step(f, carry, h, ts, plan)
            return y, None, stages
        if not self.tableau.fsal:
            stages = rk_stages(f, carry, h, ts, plan)
            y_new = combine(carry, h, plan.weights, stages)
            return y_new, combine(None, h, plan.errors, stages), stages
        y, k0 = carry
        ks: list[Any] = [k0]
        for j in range(1, plan.stages):
            ks.append(f(ts[j], combine(y, h, plan.rows[j], ks)))
        y1 = combine(y, h, plan.weights, ks)
        return (y1, ks[-1]), combine(None, h, plan.errors, ks), ks

    def bind(self, func: Any, inputs: Any) -> Any:
        return cast(func)
