"""torchode_adjoint: neural-ODE layers for PyTorch with fixed and error-controlled steps.

The public names only; see the documentation for the guides.
"""

from ._block import ODEBlock
from ._check import GradientCheck, GradientReport, check_gradients
from ._compiled import Compile, CompileFallbackWarning
from ._dynamics import NFECounter, TimeSharedStatisticsWarning
from ._events import EventResult, odeint_event
from ._layers import ConcatConv2d
from ._odeint import odeint
from ._prepare import GRADIENT_MODES, resolve_mode
from ._temporal_norm import TemporalBatchNorm1d, TemporalBatchNorm2d, TemporalBatchNorm3d
from .controllers.error import PIController, ToleranceWarning
from .controllers.fixed import StepRoundingWarning, StepTo
from .modes.adjoint import ContinuousAdjoint
from .modes.base import Backprop, GradientMode
from .modes.checkpoint import Checkpoint
from .modes.reversible import Reversible
from .solvers.registry import available_solvers, get_solver, register_solver
from .solvers.reversible_heun import ReversibleHeun
from .solvers.tableau import ButcherTableau

__version__ = "0.1.0"

__all__ = [
    "Backprop",
    "ButcherTableau",
    "Checkpoint",
    "Compile",
    "CompileFallbackWarning",
    "ContinuousAdjoint",
    "EventResult",
    "GradientMode",
    "Reversible",
    "ReversibleHeun",
    "ConcatConv2d",
    "GRADIENT_MODES",
    "GradientCheck",
    "GradientReport",
    "NFECounter",
    "ODEBlock",
    "PIController",
    "__version__",
    "available_solvers",
    "check_gradients",
    "get_solver",
    "odeint",
    "odeint_event",
    "register_solver",
    "resolve_mode",
    "TemporalBatchNorm1d",
    "TemporalBatchNorm2d",
    "TemporalBatchNorm3d",
    "TimeSharedStatisticsWarning",
    "StepRoundingWarning",
    "StepTo",
    "ToleranceWarning",
]
