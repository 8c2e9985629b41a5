"""The three CIFAR-10 networks of the reference study: ResNet, ODENet and ResidualODE.

All share the stem and the head::

    conv3x3(3->16) norm ReLU avgpool2      32x32 -> 16x16
    conv3x3(16->32) norm ReLU avgpool2     16x16 -> 8x8
    stage 1 at 32 channels, 8x8
    conv3x3(32->64) norm ReLU avgpool2     8x8 -> 4x4
    stage 2 at 64 channels, 4x4
    avgpool2, flatten (64*2*2 = 256), linear 256->10

A stage is ``k`` residual blocks or one :class:`~torchode_adjoint.ODEBlock`. Two presets:
``"thesis"`` applies ONE conv and ONE norm twice inside each residual block and each dynamics
(weights shared, as the reference study did; parameter counts 72,746 / 73,610 / 73,322);
``"standard"`` uses two separate convs and norms.

Norms: ``"batch"`` (BatchNorm everywhere, as the reference study; inside the dynamics it keeps one
set of running statistics for every time), ``"temporal"`` (BatchNorm in the stem and residual
blocks, :class:`~torchode_adjoint.TemporalBatchNorm2d` inside the dynamics: running statistics per
evaluation time, the same parameter counts) and ``"group"`` (GroupNorm everywhere).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .._block import ODEBlock
from .._layers import ConcatConv2d
from .._prepare import resolve_mode
from .._temporal_norm import TemporalBatchNorm2d

__all__ = [
    "ModelSpec",
    "parse_model_spec",
    "build_model",
    "ResidualBlock",
    "ConvDynamics",
    "ode_blocks",
]

Preset = Literal["thesis", "standard"]
Norm = Literal["batch", "temporal", "group"]
NORMS: tuple[str, ...] = ("batch", "temporal", "group")


def _norm(channels: int, norm: Norm) -> nn.Module:
    """The norm of the stem and the residual blocks (no time: temporal is plain BatchNorm)."""
    if norm in ("batch", "temporal"):
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"`norm` must be one of {list(NORMS)}, got {norm!r}.")


def _dynamics_norm(channels: int, norm: Norm) -> nn.Module:
    """The norm inside the dynamics: per-time statistics for ``"temporal"``."""
    if norm == "temporal":
        return TemporalBatchNorm2d(channels)
    return _norm(channels, norm)


def _down(c_in: int, c_out: int, norm: Norm) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), _norm(c_out, norm), nn.ReLU(), nn.AvgPool2d(2)
    )


class ResidualBlock(nn.Module):
    """``out = relu(h2 + x)`` with ``h1 = relu(norm(conv(x)))``, ``h2 = relu(norm(conv(h1)))``.

    With ``shared=True`` (the thesis preset) one conv and one norm serve both applications.
    """

    def __init__(self, channels: int, *, shared: bool, norm: Norm = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = _norm(channels, norm)
        self.conv2 = self.conv1 if shared else nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = self.norm1 if shared else _norm(channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        h = torch.relu(self.norm2(self.conv2(h)))
        return torch.relu(h + x)


class ConvDynamics(nn.Module):
    """``f(t, x) = relu(norm(conv(t, relu(norm(conv(t, x))))))`` with a time channel per conv.

    With ``shared=True`` (the thesis preset) one conv and one norm serve both applications; a
    temporal norm is called with the time, ``norm(t, h)``, and keeps separate running statistics
    for its two applications (their distributions differ) with one shared affine.
    """

    def __init__(self, channels: int, *, shared: bool, norm: Norm = "batch") -> None:
        super().__init__()
        self.conv1 = ConcatConv2d(channels, channels, 3, padding=1)
        self.norm1 = _dynamics_norm(channels, norm)
        self.conv2 = self.conv1 if shared else ConcatConv2d(channels, channels, 3, padding=1)
        self.norm2 = self.norm1 if shared else _dynamics_norm(channels, norm)
        self._temporal = norm == "temporal"
        if shared and self._temporal:
            # The two applications normalise different distributions: each keeps its own
            # statistics per time, the affine parameters stay shared (the thesis' counts).
            self.norm2 = self.norm1.with_shared_affine()  # type: ignore[operator]

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self._normalise(self.norm1, t, self.conv1(t, x)))
        return torch.relu(self._normalise(self.norm2, t, self.conv2(t, h)))

    def _normalise(self, norm: nn.Module, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return norm(t, h) if self._temporal else norm(h)


@dataclass(frozen=True)
class ModelSpec:
    """One network of the study.

    Attributes
    ----------
    family : {"resnet", "odenet", "hybrid"}
    blocks : int
        Residual blocks per residual stage (ignored by ODENet).
    step : float or None
        ODE step size (ignored by ResNet).
    """

    family: Literal["resnet", "odenet", "hybrid"]
    blocks: int = 1
    step: float | None = None

    @property
    def name(self) -> str:
        """``resnet1``, ``odenet@0.5``, ``hybrid1@0.1``."""
        blocks = "" if self.family == "odenet" else str(self.blocks)
        step = "" if self.family == "resnet" else f"@{self.step:g}"
        return f"{self.family}{blocks}{step}"

    @property
    def label(self) -> str:
        """Human-readable: ``ResNet, 1 block``, ``ODENet, step 0.5``."""
        title = {"resnet": "ResNet", "odenet": "ODENet", "hybrid": "ResidualODE"}[self.family]
        parts = (
            []
            if self.family == "odenet"
            else [f"{self.blocks} block" + ("s" if self.blocks > 1 else "")]
        )
        if self.family != "resnet":
            parts.append(f"step {self.step:g}")
        return f"{title}, {', '.join(parts)}"


_SPEC = re.compile(r"^(resnet|odenet|hybrid)(\d*)(?:@([0-9.]+))?$")


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``resnet2``, ``odenet@0.25`` or ``hybrid1@0.1``.

    Raises
    ------
    ValueError
        Naming the format when the text does not match it.
    """
    m = _SPEC.match(text.strip().lower())
    if not m:
        raise ValueError(
            f"model spec {text!r} is not understood; use resnetK, odenet@STEP or hybridK@STEP, "
            "e.g. resnet1 odenet@0.5 hybrid1@0.1."
        )
    family, blocks, step = m.group(1), m.group(2), m.group(3)
    if family == "resnet" and step:
        raise ValueError(f"model spec {text!r}: a ResNet has no step; use e.g. resnet1.")
    if family != "resnet" and not step:
        raise ValueError(f"model spec {text!r} needs a step, e.g. {family}{blocks}@0.5.")
    if family == "odenet" and blocks:
        raise ValueError(f"model spec {text!r}: an ODENet stage is one ODE block; use odenet@S.")
    n = int(blocks) if blocks else 1
    if n < 1:
        raise ValueError(f"model spec {text!r}: the number of blocks must be at least 1.")
    return ModelSpec(family=family, blocks=n, step=float(step) if step else None)  # type: ignore[arg-type]


def _residual_stage(channels: int, k: int, shared: bool, norm: Norm) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(channels, shared=shared, norm=norm) for _ in range(k)))


def _ode_stage(
    channels: int,
    step: float,
    shared: bool,
    norm: Norm,
    solver: str,
    adjoint: bool | str,
    compile: bool,
    rtol: float | None = None,
    atol: float | None = None,
) -> ODEBlock:
    return ODEBlock(
        ConvDynamics(channels, shared=shared, norm=norm),
        solver=solver,
        step=step,
        adjoint=resolve_mode(adjoint),  # a name or a bool checked, as a mode object
        compile=compile,
        rtol=rtol,
        atol=atol,
    )


def build_model(
    spec: ModelSpec,
    *,
    preset: Preset = "thesis",
    norm: Norm = "batch",
    solver: str = "euler",
    adjoint: bool | str = True,
    compile: bool = False,
    rtol: float | None = None,
    atol: float | None = None,
) -> nn.Sequential:
    """Build one network of the study.

    Parameters
    ----------
    spec : ModelSpec
    preset : {"thesis", "standard"}, default "thesis"
        Shared (thesis) or separate (standard) conv and norm in each block and dynamics.
    norm : {"batch", "temporal", "group"}, default "batch"
    solver : str, default "euler"
    adjoint : bool or str, default True
        The ODE blocks' gradient mode.
    compile : bool, default False
        Compile the ODE blocks' steps (``ODEBlock(compile=True)``).
    rtol, atol : float, optional
        Error-controlled steps in the ODE blocks (``solver`` an embedded pair such as
        ``"dopri5"``); the spec's step is then the largest step.

    Returns
    -------
    nn.Sequential
        Input (B, 3, 32, 32) float images, output (B, 10) logits.

    Examples
    --------
    >>> from torchode_adjoint.models.cifar10 import build_model, parse_model_spec
    >>> model = build_model(parse_model_spec("odenet@0.5"), norm="temporal")
    >>> sum(p.numel() for p in model.parameters())  # the thesis' count: the norm adds no weight
    73610
    """
    if preset not in ("thesis", "standard"):
        raise ValueError(f"`preset` must be 'thesis' or 'standard', got {preset!r}.")
    shared = preset == "thesis"
    if spec.family == "resnet":
        stage1: nn.Module = _residual_stage(32, spec.blocks, shared, norm)
        stage2: nn.Module = _residual_stage(64, spec.blocks, shared, norm)
    else:
        assert spec.step is not None  # guaranteed by parse_model_spec
        tol = {"rtol": rtol, "atol": atol}
        stage2 = _ode_stage(64, spec.step, shared, norm, solver, adjoint, compile, **tol)
        stage1 = (
            _ode_stage(32, spec.step, shared, norm, solver, adjoint, compile, **tol)
            if spec.family == "odenet"
            else _residual_stage(32, spec.blocks, shared, norm)
        )
    return nn.Sequential(
        _down(3, 16, norm),
        _down(16, 32, norm),
        stage1,
        _down(32, 64, norm),
        stage2,
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, 10),
    )


def ode_blocks(model: nn.Module) -> list[ODEBlock]:
    """The ODE blocks of a model, in order (for NFE reporting)."""
    return [m for m in model.modules() if isinstance(m, ODEBlock)]
