"""``ODEBlock``: an ``nn.Module`` shell that stores its configuration and calls ``odeint``."""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence

import torch
from torch import nn

from ._compiled import Compile
from ._dynamics import NFECounter, warn_time_shared_statistics
from ._prepare import ModeName, make_config, solve
from ._structure import State, StateStructure, first_leaf, real_dtype
from .controllers.error import PIController, Tolerance
from .controllers.fixed import DEFAULT_MAX_STEPS, DEFAULT_STEP, StepTo
from .modes.base import GradientMode
from .solvers.reversible_heun import ReversibleHeun
from .solvers.tableau import ButcherTableau

__all__ = ["ODEBlock"]


def _time_value(value: float | torch.Tensor, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(
                f"`{name}` must be a real scalar, got a tensor of shape {tuple(value.shape)}."
            )
        value = value.detach().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite real number or 0-dim tensor, got {value!r}.")
    return float(value)


class ODEBlock(nn.Module):
    """A neural-ODE layer: ``forward(y0)`` returns ``y(t1)`` for ``dy/dt = dynamics(t, y)``.

    Parameters
    ----------
    dynamics : nn.Module
        ``dynamics(t, y) -> dy/dt``, with ``t`` a 0-dim tensor; its parameters that require grad
        are the ones the adjoint differentiates.
    solver : str or ButcherTableau, default "euler"
        See :func:`~torchode_adjoint.available_solvers`.
    step : float or None, default 0.1
        The largest step size; ``None`` takes one step from ``t0`` to ``t1``. An embedded pair
        named without ``step``, ``rtol`` or ``atol`` controls its error at the default
        tolerances (see :func:`~torchode_adjoint.odeint`).
    adjoint : bool, str or GradientMode, default True
        The gradient mode, as in :func:`~torchode_adjoint.odeint`: what each costs and whether
        its gradient is exact is documented there. Its pairing with the solver is checked here
        (``solver="reversible_heun"`` pairs with ``adjoint="reversible"`` or ``"backprop"``).
    t0 : float or Tensor, default 0.0
        Start of the integration interval. An ``nn.Parameter`` makes the time learnable and is
        registered among the block's parameters.
    t1 : float or Tensor, default 1.0
        End of the interval (``t1 < t0`` integrates backwards); learnable like ``t0``.
    check_finite : bool, default True
        Raise when the state becomes non-finite (see :func:`~torchode_adjoint.odeint`).
    checkpoint_every : int, optional
        Deprecated: pass ``adjoint=Checkpoint(every=k)``.
    max_steps : int, default 10,000,000
        The largest number of steps of one forward pass.
    compile : bool or Compile, default False
        Compile each solver step and each backward step with ``torch.compile`` (see
        :func:`~torchode_adjoint.odeint`).
    rtol, atol : float, or one per part of a structured state, optional
        Error-controlled steps with an embedded pair such as ``solver="dopri5"`` (see
        :func:`~torchode_adjoint.odeint`); ``step`` is then the largest step.
    step_t, jump_t : sequence of float, optional
        With error control: times between ``t0`` and ``t1`` the steps end on, and times where
        the dynamics jump (see :func:`~torchode_adjoint.odeint`).
    controller : PIController or StepTo, optional
        With error control: the step-size controller; without, ``StepTo(times)``: fixed steps
        ending on the given times between ``t0`` and ``t1`` (see
        :func:`~torchode_adjoint.odeint`).

    Attributes
    ----------
    nfe_forward : int
        Evaluations of ``dynamics`` in the last forward pass (steps x stages).
    nfe_backward : int
        Evaluations in the last backward pass (0 for backprop).
    stats : NFECounter
        The last solve's counts: evaluations, and with error control the accepted and rejected
        steps of the forward pass and of the adjoint's backward pass.

    Raises
    ------
    ValueError
        For ``t0 == t1``, a bad ``step``, an unknown ``solver`` or ``adjoint``, or a mode that
        cannot integrate with the solver.
    TypeError
        If ``dynamics`` is not an ``nn.Module``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from torchode_adjoint import ODEBlock
    >>> class F(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = nn.Linear(2, 2)
    ...     def forward(self, t, y):
    ...         return torch.tanh(self.lin(y))
    >>> block = ODEBlock(F(), solver="rk4", step=0.25)
    >>> block(torch.randn(5, 2)).shape
    torch.Size([5, 2])
    >>> block.nfe_forward
    16
    """

    def __init__(
        self,
        dynamics: nn.Module,
        solver: str | ButcherTableau = "euler",
        step: float | None = DEFAULT_STEP,
        adjoint: bool | ModeName | GradientMode = True,
        t0: float | torch.Tensor = 0.0,
        t1: float | torch.Tensor = 1.0,
        *,
        check_finite: bool = True,
        checkpoint_every: int | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        compile: bool | Compile = False,
        rtol: Tolerance | None = None,
        atol: Tolerance | None = None,
        step_t: Sequence[float] | None = None,
        jump_t: Sequence[float] | None = None,
        controller: PIController | StepTo | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dynamics, nn.Module):
            raise TypeError(
                f"`dynamics` must be an nn.Module taking (t, y), got {type(dynamics).__name__}; "
                "wrap a function in a module or call `odeint(func, y0, t, params=...)` instead."
            )
        self.dynamics = dynamics
        warn_time_shared_statistics(dynamics, prefix="dynamics")
        self.config = make_config(
            solver=solver,
            step=step,
            adjoint=adjoint,
            check_finite=check_finite,
            checkpoint_every=checkpoint_every,
            max_steps=max_steps,
            compile=compile,
            rtol=rtol,
            atol=atol,
            step_t=step_t,
            jump_t=jump_t,
            controller=controller,
        )
        values = {"t0": _time_value(t0, "t0"), "t1": _time_value(t1, "t1")}
        if values["t0"] == values["t1"]:
            raise ValueError(
                f"`t0` and `t1` must differ, got t0 = t1 = {values['t0']}; an ODE block "
                "over an empty interval is the identity."
            )
        # Learnable times are parameters; fixed ones stay Python floats (no float32 rounding of
        # 0.2 before a float64 state sees it) and become a tensor in the state's dtype per call.
        self._fixed_times: dict[str, float] = {}
        for name, value in (("t0", t0), ("t1", t1)):
            if isinstance(value, nn.Parameter):
                setattr(self, name, value)
            else:
                self._fixed_times[name] = values[name]
        self._t_cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._nfe = NFECounter()

    @property
    def solver(self) -> ButcherTableau | ReversibleHeun:
        """The solver the block integrates with (a tableau, or the reversible Heun method)."""
        return self.config.tableau

    @property
    def step(self) -> float | None:
        """The largest step size."""
        return self.config.step

    @property
    def adjoint(self) -> GradientMode:
        """The gradient mode."""
        return self.config.mode

    @property
    def nfe_forward(self) -> int:
        """Evaluations of the dynamics in the last forward pass."""
        return self._nfe.forward

    @property
    def nfe_backward(self) -> int:
        """Evaluations of the dynamics in the last backward pass."""
        return self._nfe.backward

    @property
    def stats(self) -> NFECounter:
        """The last solve's counts (evaluations; accepted and rejected error-controlled steps)."""
        return self._nfe

    def forward(self, y0: State) -> State:
        """Integrate from ``t0`` to ``t1``.

        Parameters
        ----------
        y0 : Tensor, shape (B, ...), or a tuple, list or dict of Tensors
            The state at ``t0`` (see :func:`~torchode_adjoint.odeint` for structured and
            complex states).

        Returns
        -------
        Tensor, shape (B, ...), or ``y0``'s structure
            The state at ``t1``.
        """
        reference = first_leaf(y0)
        if not isinstance(reference, torch.Tensor):
            StateStructure.of(y0)  # raises, naming the part that is not a tensor
        # A tensor here: StateStructure.of raised otherwise.
        t = self.integration_times(typing.cast(torch.Tensor, reference))
        _, states, structure = solve(self.dynamics, y0, t, self.config, nfe=self._nfe)
        return states[-1] if structure is None else structure.unflatten(states[-1])

    def _time(self, name: str) -> float | torch.Tensor:
        return self._fixed_times[name] if name in self._fixed_times else getattr(self, name)

    def integration_times(self, y0: torch.Tensor) -> torch.Tensor:
        """``[t0, t1]`` in ``y0``'s dtype and device, differentiable in learnable times.

        Parameters
        ----------
        y0 : Tensor
            Any tensor with the state's dtype (or, for a complex state, its complex dtype) and
            device.

        Returns
        -------
        Tensor, shape (2,)
            In the state's real dtype.
        """
        if not isinstance(y0, torch.Tensor):
            raise TypeError(
                f"`y0` must be a tensor or a tuple, list or dict of tensors, got "
                f"{type(y0).__name__}."
            )
        dtype = real_dtype(y0.dtype)
        if len(self._fixed_times) == 2:
            key = (dtype, y0.device)
            if key not in self._t_cache:
                values = (self._fixed_times["t0"], self._fixed_times["t1"])
                self._t_cache[key] = torch.tensor(values, dtype=dtype, device=y0.device)
            return self._t_cache[key]
        return torch.stack(
            [
                torch.as_tensor(self._time(name), dtype=dtype, device=y0.device)
                if name in self._fixed_times
                else getattr(self, name).reshape(())
                for name in ("t0", "t1")
            ]
        )

    def extra_repr(self) -> str:
        t0, t1 = (float(self._time(name)) for name in ("t0", "t1"))
        control = self.config.control
        tolerances = ""
        if control is not None:
            tolerances = f", {control.describe()}" + (
                " (defaults, fitted to the state's dtype)" if control.default_tolerances else ""
            )
        steps = f"step={self.step}" if self.config.layout is None else repr(self.config.layout)
        return (
            f"solver={self.solver.name!r}, {steps}{tolerances}, "
            f"adjoint={self.adjoint.name!r}, t0={t0:g}, t1={t1:g}"
        )
