"""Step callbacks on the dynamics (torchdiffeq's ``callback_step``, ``callback_accept_step``,
``callback_reject_step`` and their ``_adjoint`` forms), called by the one loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchode_adjoint import NFECounter, odeint

D = torch.float64
NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")


class _Logged(nn.Module):
    def __init__(self, *, adjoint: bool = True, judged: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2).double()
        self.log: list[tuple[str, float, float]] = []
        names = NAMES if judged else NAMES[:1]
        for name in names + (tuple(n + "_adjoint" for n in names) if adjoint else ()):
            setattr(self, name, self._logger(name))

    def _logger(self, name: str):  # type: ignore[no-untyped-def]
        def call(t0: torch.Tensor, y0: torch.Tensor, dt: torch.Tensor) -> None:
            assert t0.dim() == 0 and y0.shape == (3, 2) and dt.dim() == 0
            self.log.append((name, float(t0), float(dt)))

        return call

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(y)) * torch.cos(3 * t)

    def count(self, name: str) -> int:
        return sum(n == name for n, _, _ in self.log)


@pytest.mark.parametrize("mode", ["backprop", "adjoint", "checkpoint", "reversible"])
def test_fixed_steps_call_callback_step_before_each_step(mode: str) -> None:
    f = _Logged(judged=False)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=D)
    odeint(f, torch.ones(3, 2, dtype=D), t, solver="rk4", step=0.1, adjoint=mode).sum().backward()
    forward = [(t0, dt) for n, t0, dt in f.log if n == "callback_step"]
    assert [round(t0, 12) for t0, _ in forward] == [round(0.1 * k, 12) for k in range(10)]
    assert all(abs(dt - 0.1) < 1e-12 for _, dt in forward)
    # The continuous adjoint's backward pass calls the _adjoint one for each of its steps.
    assert f.count("callback_step_adjoint") == (10 if mode == "adjoint" else 0)


@pytest.mark.parametrize("mode", ["backprop", "adjoint"])
def test_error_controlled_steps_call_accept_or_reject_after_each_try(mode: str) -> None:
    f = _Logged()
    nfe = NFECounter()
    y0 = torch.ones(3, 2, dtype=D) * 3.0
    t = torch.tensor([0.0, 4.0], dtype=D)
    odeint(f, y0, t, solver="dopri5", rtol=1e-8, atol=1e-10, adjoint=mode, nfe=nfe,
           dense_output=False).sum().backward()  # fmt: skip
    tried = f.count("callback_step")
    assert tried == f.count("callback_accept_step") + f.count("callback_reject_step")
    assert f.count("callback_accept_step") == nfe.accepted
    assert f.count("callback_reject_step") == nfe.rejected
    if mode == "adjoint":
        back = f.count("callback_step_adjoint")
        assert back > 0 and back == (
            f.count("callback_accept_step_adjoint") + f.count("callback_reject_step_adjoint")
        )
        assert f.count("callback_accept_step_adjoint") == nfe.backward_accepted


def test_accept_and_reject_callbacks_with_fixed_steps_warn() -> None:
    f = _Logged(adjoint=False)
    with pytest.warns(UserWarning, match="callback_accept_step"):
        odeint(f, torch.ones(3, 2, dtype=D), torch.tensor([0.0, 1.0], dtype=D), step=0.5)
