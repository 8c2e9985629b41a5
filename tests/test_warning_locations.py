"""Every warning points at the user's line, whichever entry point raised it and how deep."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from problems import MLPDynamics
from torch import nn

from torchode_adjoint import ODEBlock, TimeSharedStatisticsWarning, check_gradients, odeint


class _NormDynamics(nn.Module):
    """Dynamics with a plain BatchNorm: the time-shared statistics warning's subject."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -self.norm(y)


def _line() -> int:
    """The caller's current line."""
    return sys._getframe(1).f_lineno


def _solve(func: nn.Module, **kwargs: object) -> int:
    y0, t = torch.randn(4, 3), torch.tensor([0.0, 1.0])
    line = _line() + 1
    odeint(func, y0, t, step=0.25, **kwargs)  # type: ignore[arg-type]
    return line


def _block(func: nn.Module, **kwargs: object) -> int:
    line = _line() + 1
    block = ODEBlock(func, step=0.25, **kwargs)  # type: ignore[arg-type]
    block(torch.randn(4, 3))
    return line


def _check(func: nn.Module, **kwargs: object) -> int:
    line = _line() + 1
    check_gradients(func, torch.randn(4, 3), step=0.25, **kwargs)  # type: ignore[arg-type]
    return line


ENTRY_POINTS = {"odeint": _solve, "ODEBlock": _block, "check_gradients": _check}
WARNINGS: dict[str, tuple[type[Warning], str, Callable[[], nn.Module], dict[str, object]]] = {
    "checkpoint_every": (
        DeprecationWarning,
        "checkpoint_every",
        MLPDynamics,
        {"adjoint": "checkpoint", "checkpoint_every": 2},
    ),
    "heun_reversible": (
        FutureWarning,
        "reversible_heun",
        MLPDynamics,
        {"solver": "heun", "adjoint": "reversible"},
    ),
    "time_shared_batchnorm": (TimeSharedStatisticsWarning, "BatchNorm1d", _NormDynamics, {}),
}


# check_gradients does not warn about time-shared statistics: it checks gradients in train mode,
# where the running statistics are not used; the user's own solves warn.
CASES = [
    (entry, kind)
    for kind in WARNINGS
    for entry in ENTRY_POINTS
    if not (entry == "check_gradients" and kind == "time_shared_batchnorm")
]


@pytest.mark.parametrize(("entry", "kind"), CASES)
def test_the_warning_points_at_the_users_line(entry: str, kind: str) -> None:
    category, match, make, kwargs = WARNINGS[kind]
    with pytest.warns(category, match=match) as record:
        line = ENTRY_POINTS[entry](make(), **kwargs)
    mine = [w for w in record if issubclass(w.category, category)]
    assert [(w.filename, w.lineno) for w in mine] == [(__file__, line)]


def test_a_user_package_whose_name_starts_like_the_librarys_is_the_users() -> None:
    # Code in a package named e.g. `torchode_adjoint_experiments` is the user's, not ours.
    source = (
        "def solve(odeint, f, y0, t):\n"
        "    return odeint(f, y0, t, step=0.25, adjoint='checkpoint', checkpoint_every=2)\n"
    )
    scope = {"__name__": "torchode_adjoint_experiments.runs"}
    exec(compile(source, "experiments.py", "exec"), scope)
    with pytest.warns(DeprecationWarning, match="checkpoint_every") as record:
        scope["solve"](odeint, MLPDynamics(), torch.randn(4, 3), torch.tensor([0.0, 1.0]))
    assert [(w.filename, w.lineno) for w in record] == [("experiments.py", 2)]
