"""torchode_adjoint: neural-ODE layers for PyTorch with fixed and error-controlled steps.

The public names only; see the documentation for the guides.
"""

from ._adjoint import ContinuousAdjoint
from ._block import ODEBlock
from ._check import GradientCheck, GradientReport, check_gradients
from ._checkpoint import Checkpoint
from ._compiled import Compile, CompileFallbackWarning
from ._control import PIController, ToleranceWarning
from ._dynamics import NFECounter, TimeSharedStatisticsWarning
from ._grid import StepRoundingWarning, StepTo
from ._layers import ConcatConv2d
from ._mode import Backprop, GradientMode
from ._odeint import odeint
from ._prepare import GRADIENT_MODES, resolve_mode
from ._reversible import Reversible
from ._reversible_heun import ReversibleHeun
from ._solvers import available_solvers, get_solver, register_solver
from ._tableau import ButcherTableau
from ._temporal_norm import TemporalBatchNorm1d, TemporalBatchNorm2d, TemporalBatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "Backprop",
    "ButcherTableau",
    "Checkpoint",
    "Compile",
    "CompileFallbackWarning",
    "ContinuousAdjoint",
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
