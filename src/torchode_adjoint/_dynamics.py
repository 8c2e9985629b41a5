"""Everything around one call of the user's dynamics: counting, checking, BatchNorm freezing."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._compat import BatchNormBase
from ._reads import ReadRecorder, reachable_modules, version_of
from ._rng import SeededDraws
from ._temporal_norm import TemporalBatchNormBase
from ._warnings import user_stacklevel

__all__ = [
    "NFECounter",
    "Dynamics",
    "frozen_batchnorm",
    "TimeSharedStatisticsWarning",
    "warn_time_shared_statistics",
    "module_tensors",
    "normalisation_buffers",
    "training_norms",
]

DynamicsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class NFECounter:
    """Numbers of dynamics evaluations of the last forward and backward pass.

    Pass one to :func:`~torchode_adjoint.odeint` as ``nfe=``; it is reset and filled by the call
    and, for the gradient modes that evaluate the dynamics again, by the backward pass.

    Attributes
    ----------
    forward : int
        Evaluations made by the forward pass (steps x stages).
    backward : int
        Evaluations made by the backward pass (0 for backprop, which reuses the stored graph).
    accepted, rejected : int
        Error-controlled steps of the forward pass accepted and rejected (0 with fixed steps).
    backward_accepted, backward_rejected : int
        The same for the continuous adjoint's error-controlled backward pass.
    couplings : tuple of float
        The reversible mode's coupling of each step of the forward pass, where it is chosen per
        step (``Reversible()``, the default); empty otherwise.
    samples : SampleCounts or None
        With per-sample output times (a 2-D ``t``): each sample's steps of the forward pass,
        ``samples.accepted`` and ``samples.rejected`` (int64 tensors of shape ``(B,)``); None
        otherwise.
    backward_samples : SampleCounts or None
        The same for the continuous adjoint's per-sample backward pass.
    """

    forward: int = 0
    backward: int = 0
    accepted: int = 0
    rejected: int = 0
    backward_accepted: int = 0
    backward_rejected: int = 0
    couplings: tuple[float, ...] = ()
    samples: Any = None
    backward_samples: Any = None

    def reset(self) -> None:
        """Zero every count (each solve starts from zero)."""
        self.forward = self.backward = self.accepted = self.rejected = 0
        self.backward_accepted = self.backward_rejected = 0
        self.couplings = ()
        self.samples = self.backward_samples = None


class Dynamics:
    """The user's ``f(t, y)`` with an evaluation counter and a check of its first output.

    The first call checks that ``f`` returns a tensor with the state's shape and dtype (and, in
    a backward pass, hands ``(t, y, output)`` to ``probe``, which inspects its graph); later calls
    only count.
    """

    __slots__ = (
        "func",
        "nfe",
        "compile_ok",
        "draws",
        "reads",
        "_checked",
        "_check",
        "_probe",
        "_record_reads",
    )

    graph_inputs: object = ()
    """What a compiled step needs besides ``func``: nothing (see the executor)."""
    differentiable_graph: bool = True
    """A compiled step of the dynamics is recorded by autograd when grad mode is on."""

    def __init__(
        self,
        func: DynamicsFn,
        *,
        check: bool = True,
        probe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
        record_reads: bool = False,
    ) -> None:
        self.func = func
        self.nfe = 0
        # The compiled path's verdict after its first (eager) step: None before it, False when
        # the dynamics drew random numbers (the pass then stays eager), True otherwise.
        self.compile_ok: bool | None = None
        # A reversible mode's replayable random draws (see SeededDraws), or None.
        self.draws: SeededDraws | None = None
        # With `record_reads`, the first call notes the tensors outside its inputs that its
        # output depends on, with their versions after the call (see ._reads).
        self.reads: tuple[list[torch.Tensor], list[int | None]] = ([], [])
        self._check, self._probe, self._record_reads = check, probe, record_reads
        self._checked = not (check or probe is not None or record_reads)

    @property
    def checked(self) -> bool:
        """Whether the first call (output check, probe) is done."""
        return self._checked

    @property
    def index(self) -> int:
        """The index of the next evaluation, for replayed random draws."""
        return self.draws.index if self.draws is not None else self.nfe

    @index.setter
    def index(self, value: int) -> None:
        if self.draws is not None:
            self.draws.index = value

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.draws is not None:
            with self.draws.evaluation():
                return self._evaluate(t, y)
        return self._evaluate(t, y)

    def _evaluate(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        if not self._checked:
            return self._first_call(t, y)
        out = self.func(t, y)
        if out.dtype != y.dtype and torch.is_autocast_enabled(y.device.type):
            # Under autocast the state keeps its dtype and the derivative is cast to it, so that
            # the solver accumulates in the input's precision.
            out = out.to(y.dtype)
        return out

    def _first_call(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        changed = _change_detector(y)
        try:
            if self._record_reads and not torch.compiler.is_compiling():
                out = self._recorded(t, y)
            else:
                out = self.func(t, y)
        except TypeError as err:
            if "positional argument" not in str(err):
                raise
            raise TypeError(
                f"the dynamics are called as `f(t, y)` with the time first, and this call "
                f"failed with: {err}. Define `forward(self, t, y)` (or `def f(t, y)`), even if "
                "the dynamics do not use `t`."
            ) from err
        except RuntimeError as err:
            if "leaf Variable that requires grad" not in str(err):
                raise
            raise RuntimeError(f"{_IN_PLACE} (PyTorch: {err})") from err
        if changed():
            raise RuntimeError(_IN_PLACE)
        if isinstance(out, torch.Tensor) and out.dtype != y.dtype:
            if torch.is_autocast_enabled(y.device.type):
                out = out.to(y.dtype)
        if self._check:
            _check_output(out, y)
        if self._probe is not None:
            if not out.requires_grad:
                return out  # nothing to inspect yet: probe the next call
            self._probe(t, y, out)
        self._checked = True
        return out

    def _recorded(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One call of the dynamics that notes what it reads besides ``t`` and ``y``; running
        statistics of normalisation layers in training mode (written, never read for the
        output, and frozen when the dynamics are evaluated again) are left out."""
        recorder = ReadRecorder(t, y)
        with recorder:
            out = self.func(t, y)
        written = normalisation_buffers(self.func)
        read = [x for x in recorder.read_by(out) if id(x) not in written]
        self.reads = (read, [version_of(x) for x in read])
        return out


_IN_PLACE = (
    "the dynamics modify their input `y` in place (e.g. `nn.ReLU(inplace=True)` or `y.relu_()` "
    "as the first operation on the state); the solver uses the state again after the call, so "
    "the solution would be wrong. Make the first operation on `y` out of place "
    "(`inplace=False`, `y.relu()`), or start the dynamics with `y = y.clone()`."
)


def _change_detector(y: torch.Tensor) -> Callable[[], bool]:
    """A function telling whether ``y`` has been modified in place since this call.

    An in-place change shows in the version counter; inference tensors have none, so their
    values are compared with a copy (NaN equal to NaN; one copy of the state, once per pass).
    """
    if y.is_inference():
        before = y.clone()
        return lambda: bool(((y != before) & ~(torch.isnan(y) & torch.isnan(before))).any())
    version = y._version
    return lambda: y._version != version


def _check_output(out: object, y: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"`func` must return a Tensor (dy/dt), got {type(out).__name__}; return a tensor with "
            f"the state's shape {tuple(y.shape)}."
        )
    if out.shape != y.shape:
        raise ValueError(
            f"`func` must return dy/dt with the state's shape {tuple(y.shape)}, got "
            f"{tuple(out.shape)}; make the dynamics map the state to a tensor of the same shape."
        )
    if out.dtype != y.dtype:
        raise TypeError(
            f"`func` must return dy/dt with the state's dtype {y.dtype}, got {out.dtype}; cast "
            "the output or build the dynamics in the state's dtype."
        )


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a module's gradient flows to: its parameters that require grad, then tensor
    attributes that require grad (e.g. a context ``self.ctx = encoder(x)`` set before the solve),
    each once.

    A plain walk over ``_modules`` and ``_parameters`` (``Module.parameters()`` costs several
    times more, and this runs on every call).
    """
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    modules: list[nn.Module] = [module]
    visited = {id(module)}
    for m in modules:  # grows while it is walked: every submodule once
        for child in m._modules.values():
            if child is not None and id(child) not in visited:
                visited.add(id(child))
                modules.append(child)
        for p in m._parameters.values():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    for m in modules:
        # nn.Module keeps its own state under names starting with "_": skip it.
        for name, value in m.__dict__.items():
            if name[0] != "_" and isinstance(value, torch.Tensor) and value.requires_grad:
                if id(value) not in seen:
                    seen.add(id(value))
                    out.append(value)
    return out


def training_norms(func: object) -> list[BatchNormBase | TemporalBatchNormBase]:
    """The BatchNorm and temporal BatchNorm modules that update running statistics in ``func``
    or in the modules a function reaches (a closure or a global over a module)."""
    seen: set[int] = set()
    out: list[BatchNormBase | TemporalBatchNormBase] = []
    for top in reachable_modules(func):
        for m in top.modules():
            if (
                id(m) not in seen
                and isinstance(m, (BatchNormBase, TemporalBatchNormBase))
                and m.training
                and m.track_running_stats
            ):
                seen.add(id(m))
                out.append(m)
    return out


def normalisation_buffers(func: object) -> set[int]:
    """The ids of the buffers of ``func``'s normalisation layers in training mode: they
    normalise with the batch's statistics, so their buffers are written and not read."""
    return {id(b) for m in training_norms(func) for b in m.buffers(recurse=False)}


@contextlib.contextmanager
def frozen_batchnorm(func: object) -> Iterator[None]:
    """Re-evaluate ``func`` without touching any BatchNorm buffer.

    Inside the context, every BatchNorm and temporal BatchNorm module of ``func``, at any depth,
    that is in training mode still normalises with the batch statistics (so a re-evaluation
    computes what the forward pass computed) but updates none of its running buffers: with
    ``track_running_stats`` off in training mode it gets no running buffers at all. Modules in
    eval mode read their running statistics as usual.
    """
    frozen = training_norms(func)
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True


class TimeSharedStatisticsWarning(UserWarning):
    """A normalisation layer in the dynamics keeps one set of running statistics for all times.

    Silence it with ``warnings.filterwarnings("ignore", category=TimeSharedStatisticsWarning)``.
    """


# Modules already inspected: the check walks the module tree once per dynamics, not per call.
_inspected: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def warn_time_shared_statistics(func: object, prefix: str = "") -> None:
    """Warn once per dynamics module that holds a plain BatchNorm tracking running statistics.

    Such a layer normalises the state at every evaluation time with statistics averaged over all
    times in eval mode; see :class:`~torchode_adjoint.TemporalBatchNorm2d`.
    """
    if not isinstance(func, nn.Module) or func in _inspected:
        return
    _inspected.add(func)
    for name, m in func.named_modules():
        if isinstance(m, BatchNormBase) and m.track_running_stats:
            path = ".".join(p for p in (prefix, name) if p) or type(func).__name__
            cls = type(m).__name__
            temporal = {"BatchNorm1d": "1d", "BatchNorm3d": "3d"}.get(cls, "2d")
            warnings.warn(
                f"`{path}` ({cls}) inside the dynamics of an ODE keeps one set of running "
                "statistics for every evaluation time, so in eval mode it normalises the state "
                "at each time with statistics averaged over all times (on CIFAR-10 this cost an "
                "ODENet 5 points of test accuracy). Use "
                f"`torchode_adjoint.TemporalBatchNorm{temporal}` (called as `norm(t, x)`), "
                "`nn.GroupNorm`, or `track_running_stats=False`; silence this with "
                "`warnings.filterwarnings('ignore', category=TimeSharedStatisticsWarning)`.",
                TimeSharedStatisticsWarning,
                stacklevel=user_stacklevel(),
            )
            return
