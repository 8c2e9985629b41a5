"""``odeint``: the functional entry point; validation lives in :mod:`._prepare`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ._compiled import Compile
from ._dynamics import NFECounter, warn_time_shared_statistics
from ._prepare import ModeName, make_config, reject_foreign_options, solve
from ._structure import State
from .controllers.error import PIController, Tolerance
from .controllers.fixed import DEFAULT_MAX_STEPS, DEFAULT_STEP, StepTo
from .modes.base import GradientMode
from .solvers.tableau import ButcherTableau

__all__ = ["odeint"]


def odeint(
    func: Callable[[torch.Tensor, State], State],
    y0: State,
    t: torch.Tensor | Sequence[float],
    *,
    solver: str | ButcherTableau = "euler",
    step: float | None = DEFAULT_STEP,
    adjoint: bool | ModeName | GradientMode = True,
    params: Iterable[torch.Tensor] | None = None,
    check_finite: bool = True,
    nfe: NFECounter | None = None,
    checkpoint_every: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    compile: bool | Compile = False,
    rtol: Tolerance | None = None,
    atol: Tolerance | None = None,
    dense_output: bool = True,
    step_t: Sequence[float] | torch.Tensor | None = None,
    jump_t: Sequence[float] | torch.Tensor | None = None,
    controller: PIController | StepTo | None = None,
    **unsupported: object,
) -> State:
    """Integrate ``dy/dt = func(t, y)`` with a fixed-step explicit Runge--Kutta method.

    Each interval ``[t[i], t[i+1]]`` is split into ``n_i = ceil(|t[i+1] - t[i]| / step)`` equal
    steps (up to a few ulps of the dtype, so 1.1 / 0.1 gives 11 steps); an interval longer than
    a whole number of steps by at most 1 % of a step warns
    (:class:`~torchode_adjoint.StepRoundingWarning`). A method with ``s`` stages costs ``s``
    evaluations of ``func`` per step.

    Parameters
    ----------
    func : callable ``(t, y) -> dy/dt``
        ``t`` arrives as a 0-dim tensor with ``y0``'s (real) dtype and device (with per-sample
        times, as one time per sample of shape ``(B, 1, ..., 1)``); the result must have
        ``y``'s structure, shapes and dtypes.
    y0 : Tensor, or tuple, list or dict of Tensors
        Initial state, any shape (a batch is usually the first dimension), floating point or
        complex. A (nested) tuple, list or dict of tensors is a state made of parts: ``func``
        receives and returns that structure. The parts share one device and one precision
        (float32 with complex64, float64 with complex128); see :doc:`/structured_states`.
    t : Tensor, shape (T,), T >= 1
        Output times, strictly increasing or strictly decreasing, on ``y0``'s device; a single
        time returns ``y0`` there (shape ``(1, *y0.shape)``, no step, as torchdiffeq). They are
        used in ``y0``'s real dtype (float64 for complex128); their gradient flows back in their
        own dtype. Shape ``(B, T)``: one row per sample of ``y0`` (its first dimension), each
        sample solved on its own times with its own steps and error control, the result of shape
        ``(T, B, ...)`` (backprop, checkpoint and the continuous adjoint; see
        :doc:`/per_sample`).
    solver : str, ButcherTableau or ReversibleHeun, default "euler"
        A name from :func:`~torchode_adjoint.available_solvers` or a tableau;
        ``"reversible_heun"`` pairs with ``adjoint="reversible"`` or ``"backprop"`` only.
    step : float or None, default 0.1
        The largest step size. ``None`` takes exactly one step per interval of ``t``. An
        embedded pair (``solver="dopri5"``, ...) named without ``step``, ``rtol`` or ``atol``
        controls its error at the default tolerances (see ``rtol``); pass ``step=`` for fixed
        steps of a pair.
    adjoint : bool, str or GradientMode, default True
        The gradient mode: a mode object (:class:`~torchode_adjoint.Backprop`,
        :class:`~torchode_adjoint.ContinuousAdjoint`, :class:`~torchode_adjoint.Checkpoint`,
        :class:`~torchode_adjoint.Reversible`) or its shorthand.

        - ``True``/``"adjoint"``: the continuous adjoint of Chen et al. (2018). Approximate
          gradient (error O(step^p) against the discrete one); memory independent of the number
          of steps; backward costs one evaluation and VJP per stage.
        - ``False``/``"backprop"``: backpropagation through the solver. Exact gradient of the
          discretised solution; memory linear in the number of steps (every activation).
        - ``"checkpoint"`` / ``Checkpoint(every=k)``: the checkpointed discrete adjoint. Exact
          (backprop's gradient to round-off); memory one state per ``k`` steps plus one
          segment's activations; backward re-runs every step once.
        - ``"reversible"`` / ``Reversible()``: the solver made reversible by McCallum &
          Foster's coupling, chosen per step from the step's contraction (same order, two
          steps of the tableau per step), or the
          reversible Heun method with ``solver="reversible_heun"``. Exact for the scheme
          integrated; memory independent of the number of steps; backward reconstructs each
          state algebraically, with one VJP per evaluation.
    params : iterable of Tensor, optional
        The tensors the memory-saving modes differentiate. For an ``nn.Module``: its parameters
        that require grad and its tensor attributes that require grad (a context stored with
        ``self.ctx = encoder(x)`` before the solve) are always included; ``params`` adds others.
        Required when ``func`` is not a module (use ``params=()`` for none).
    check_finite : bool, default True
        Raise a RuntimeError naming the time at which the state first became NaN or infinite.
        Costs one device-to-host sync per call, never one per step.
    nfe : NFECounter, optional
        Filled with the numbers of evaluations of ``func`` in the forward and backward pass.
    checkpoint_every : int, optional
        Deprecated: pass ``adjoint=Checkpoint(every=k)``.
    max_steps : int, default 10,000,000
        The largest total number of steps, checked before anything is allocated (with
        error-controlled steps: steps tried, checked as they are taken).
    rtol, atol : float, or one per part of a structured state, optional
        Error-controlled steps: given (either; the other defaults to torchdiffeq's 1e-7 or
        1e-9), or neither with an embedded pair and no ``step`` (then torchdiffeq's
        ``rtol=1e-7, atol=1e-9`` in float64, and in a dtype that cannot reach them the smallest
        power of ten of at least 4 machine epsilons with ``atol`` 100 times smaller: float32
        ``1e-6, 1e-8``), ``solver`` must be an embedded pair (``"dopri5"``, ``"tsit5"``,
        ``"bosh3"``, ``"fehlberg2"``, ``"adaptive_heun"``, or a tableau with ``b_embedded``) and
        each step is
        accepted when its error estimate's RMS norm, scaled by ``atol + rtol * |y|``, is at most
        1 (for a tuple, list or dict state: in each part, the largest part's value counting;
        a tolerance shaped like the state, e.g. ``atol=(1e-6, 1e-3)``, gives each part its
        own); a PI controller picks the next step. The solve steps to every output time exactly;
        an explicit ``step`` is then the largest step. Every gradient mode works on the accepted
        steps (the adjoint's backward pass error-controlled too, on the state and the adjoint:
        the seminorm). See :doc:`/adaptive`.
    dense_output : bool, default True
        With error control: step past output times and interpolate the solution there with
        the pair's interpolant (every built-in pair has one), as torchdiffeq and diffrax do,
        in every gradient mode (the reversible one interpolates its coupled step), for output
        times without a gradient; False ends a step on every output time.
    step_t : sequence of float or 1-D Tensor, optional
        With error control: times the steps must end on besides the output times
        (torchdiffeq's ``options={"step_t": ...}``), e.g. where the dynamics have a kink.
    jump_t : sequence of float or 1-D Tensor, optional
        With error control: times where the dynamics jump (torchdiffeq's ``jump_t``): a step
        ends there, and a first-same-as-last pair evaluates the derivative anew just after it
        (at the next representable time). Backprop and the continuous adjoint only; with the
        replaying modes pass ``step_t``.
    controller : PIController or StepTo, optional
        How the steps are sized besides ``step``/``rtol``/``atol``. With error control, a
        :class:`~torchode_adjoint.PIController`: the step-size controller's coefficients, the
        first step, the smallest step and the error's norm (default ``PIController()``: the I
        controller, Hairer's first step, the RMS norm per part). Without,
        :class:`~torchode_adjoint.StepTo`: fixed steps that end on the given times and on every
        output time (torchdiffeq's ``grid_constructor``, diffrax's ``StepTo``), in every
        gradient mode; not with ``step`` or ``rtol``/``atol``.
    compile : bool or Compile, default False
        Run each solver step and each backward step as one ``torch.compile`` graph
        (:class:`~torchode_adjoint.Compile` sets the backend). Same values and gradients as the
        eager path to round-off; the first call of a shape and dtype compiles (seconds to a
        minute), later calls are faster where per-op overhead dominates. Dynamics that draw
        random numbers in their first step run eagerly; where ``torch.compile`` fails, a
        :class:`~torchode_adjoint.CompileFallbackWarning` and the eager step.
    **unsupported
        None are taken: torchdiffeq's ``method=``, ``options=``, ``rtol=``, ``atol=``,
        ``event_fn=`` and ``adjoint_*=`` raise a TypeError that says what to pass instead.

    Returns
    -------
    Tensor, shape (T, ...), or ``y0``'s structure
        The state at each time of ``t``; row 0 is ``y0``. For a structured state, the same
        structure with a leading time axis on every tensor.

    Raises
    ------
    TypeError
        ``func`` not callable, ``y0`` not a floating tensor, ``t`` or ``params`` of a wrong type,
        ``func`` returning another dtype.
    ValueError
        Bad ``step`` or ``t`` (empty, not 1-D, not strictly monotonic, another
        device), unknown ``solver`` or ``adjoint``, missing ``params``, ``func`` returning another
        shape.
    RuntimeError
        When the state (forward) or the adjoint state (backward) becomes non-finite, with
        ``check_finite=True``; in the backward pass of a memory-saving mode when its gradient
        would be wrong: dynamics that draw random numbers with the continuous adjoint, a tensor
        the dynamics use that is not a declared parameter, parameters swapped between forward
        and backward (``torch.func.functional_call``), double backward.

    Notes
    -----
    torchdiffeq's fixed-grid solvers build one global grid with ``step_size`` and interpolate the
    outputs, shortening the last step; here every interval gets its own equal steps, so each
    output time is hit exactly. A single time returns ``y0``, as torchdiffeq.

    Examples
    --------
    >>> import torch
    >>> from torchode_adjoint import odeint
    >>> y = odeint(lambda t, y: -y, torch.ones(3), torch.tensor([0.0, 1.0]), solver="rk4",
    ...            params=())
    >>> round(y[-1, 0].item(), 4)
    0.3679
    """
    reject_foreign_options(unsupported, "odeint")
    warn_time_shared_statistics(func)
    config = make_config(
        solver=solver,
        step=step,
        adjoint=adjoint,
        check_finite=check_finite,
        checkpoint_every=checkpoint_every,
        max_steps=max_steps,
        compile=compile,
        rtol=rtol,
        atol=atol,
        dense_output=dense_output,
        step_t=step_t,
        jump_t=jump_t,
        controller=controller,
    )
    first, states, structure = solve(func, y0, t, config, params=params, nfe=nfe)
    solution = torch.stack([first, *states])
    return solution if structure is None else structure.unflatten(solution)
