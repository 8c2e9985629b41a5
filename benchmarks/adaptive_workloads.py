"""Error-controlled solves of a conv ODENet block and an FFJORD-style CNF, against torchdiffeq.

    python -m benchmarks.adaptive_workloads --output-dir benchmarks/results/adaptive_workloads_cpu

The MLP comparison (``benchmarks/adaptive.py``) has every peer; these two workloads compare
with torchdiffeq, the peer that runs the same PyTorch modules unchanged: the CIFAR-10 ODENet's
conv dynamics (64 channels, 8x8, batch 32, eval mode) and a continuous normalising flow
(``CNFDynamics`` with 32 units, ``(z, log q)`` as a tuple state, batch 512). Both at ``t`` in
[0, 1], dopri5 at ``rtol = atol = 1e-5``, float32, one thread. For each: the forward pass
without a graph and a training step (forward, mean-square loss, backward) in each of this
library's gradient modes and torchdiffeq's backprop and adjoint (its seminorm), alternating
medians, with evaluations; the forward error against torchdiffeq's dopri5 in float64 at 1e-10.
Writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchode_adjoint import NFECounter, odeint
from torchode_adjoint.measure import add_threads_argument, use_threads
from torchode_adjoint.models.cifar10 import ConvDynamics
from torchode_adjoint.models.cnf import CNFDynamics

from .files import write_atomic
from .run import machine
from .timing import alternating_medians

TOL = 1e-5
MODES = ("backprop", "adjoint", "checkpoint", "reversible")


class Counted(nn.Module):
    """A dynamics module that counts its calls (torchdiffeq's evaluations)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, t: torch.Tensor, y: Any) -> Any:
        self.calls += 1
        return self.inner(t, y)


def workloads() -> dict[str, tuple[str, nn.Module, Any]]:
    """name -> (description, dynamics, initial state)."""
    torch.manual_seed(0)
    conv = ConvDynamics(64, shared=True, norm="group").eval()
    cnf = CNFDynamics(32)
    z0 = torch.randn(512, 2)
    return {
        "conv": ("ODENet conv dynamics (64 ch, 8x8, batch 32, GroupNorm)", conv,
                 torch.randn(32, 64, 8, 8)),
        "cnf": ("CNF, 32 units, exact trace, (z, log q), batch 512", cnf,
                (z0, -0.5 * (z0**2).sum(1))),
    }  # fmt: skip


def _loss(out: Any) -> torch.Tensor:
    parts = out if isinstance(out, tuple) else (out,)
    return sum(p[-1].square().mean() for p in parts)  # type: ignore[return-value]


def _candidates(f: nn.Module, y0: Any) -> dict[str, Callable[[], Any]]:
    t = torch.tensor([0.0, 1.0])

    def ours(mode: str, nfe: NFECounter | None = None) -> Any:
        return odeint(f, y0, t, solver="dopri5", rtol=TOL, atol=TOL, adjoint=mode, nfe=nfe)

    def train(solve: Callable[[], Any]) -> Callable[[], Any]:
        def step() -> None:
            f.zero_grad(set_to_none=True)
            _loss(solve()).backward()

        return step

    def no_grad(solve: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                solve()

        return run

    out: dict[str, Callable[[], Any]] = {"ours forward": no_grad(lambda: ours("backprop"))}
    for mode in MODES:
        out[f"ours {mode}"] = train(lambda m=mode: ours(m))  # type: ignore[misc]
    try:
        import torchdiffeq
    except ImportError:
        return out
    params = tuple(f.parameters())

    def tdq() -> Any:
        return torchdiffeq.odeint(f, y0, t, method="dopri5", rtol=TOL, atol=TOL)

    def tdq_adjoint() -> Any:
        return torchdiffeq.odeint_adjoint(f, y0, t, method="dopri5", rtol=TOL, atol=TOL,
                                          adjoint_params=params,
                                          adjoint_options=dict(norm="seminorm"))  # fmt: skip

    out["torchdiffeq forward"] = no_grad(tdq)
    out["torchdiffeq backprop"] = train(tdq)
    out["torchdiffeq adjoint (seminorm)"] = train(tdq_adjoint)
    return out


def _run(f: Counted, y0: Any, repeats: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    candidates = _candidates(f, y0)
    t = torch.tensor([0.0, 1.0])
    for cand, run in candidates.items():
        if cand.startswith("ours"):
            nfe = NFECounter()
            mode = cand.split()[1]
            if mode == "forward":
                with torch.no_grad():
                    odeint(f, y0, t, solver="dopri5", rtol=TOL, atol=TOL, adjoint=False, nfe=nfe)
            else:
                out = odeint(f, y0, t, solver="dopri5", rtol=TOL, atol=TOL, adjoint=mode, nfe=nfe)
                _loss(out).backward()
            rows[cand] = {"nfe_forward": nfe.forward, "nfe_backward": nfe.backward}
        else:
            f.calls = 0
            run()
            rows[cand] = {"nfe_total": f.calls}
    for cand, value in alternating_medians(candidates, repeats=repeats, warmup=1).items():
        rows[cand]["median_s"] = value
    try:
        import torchdiffeq
    except ImportError:  # no peer, no reference: times and evaluations only
        return rows
    # Forward errors against a float64 reference (a copy of the dynamics in float64).
    ref_f = copy.deepcopy(f.inner).double()
    y64 = tuple(p.double() for p in y0) if isinstance(y0, tuple) else y0.double()
    with torch.no_grad():
        ref = torchdiffeq.odeint(ref_f, y64, t.double(), method="dopri5", rtol=1e-10, atol=1e-10)
        ours = odeint(f, y0, t, solver="dopri5", rtol=TOL, atol=TOL, adjoint=False)
        theirs = torchdiffeq.odeint(f, y0, t, method="dopri5", rtol=TOL, atol=TOL)

    def err(a: Any) -> float:
        pairs = zip(a, ref) if isinstance(a, tuple) else [(a, ref)]
        return max(float((x[-1].double() - r[-1]).abs().max()) for x, r in pairs)

    rows["ours forward"]["error"] = err(ours)
    rows["torchdiffeq forward"]["error"] = err(theirs)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/adaptive_workloads"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=["conv", "cnf"])
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name, (title, inner, y0) in workloads().items():
        if name in args.workloads:
            results[name] = {"title": title, "rows": _run(Counted(inner), y0, args.repeats)}
    info = machine()
    elapsed = time.perf_counter() - started
    write_atomic(args.output_dir / "results.json", json.dumps(
        {"machine": info, "python": platform.python_version(), "torch": torch.__version__,
         "results": results, "seconds": elapsed}, indent=1))  # fmt: skip
    report = _report(results, info, elapsed)
    write_atomic(args.output_dir / "report.md", report)
    print(report)
    return 0


def _report(results: dict[str, Any], info: str, elapsed: float) -> str:
    lines = [
        "# Error-controlled solves of a conv block and a CNF, against torchdiffeq",
        "",
        f"Machine: {info}; one thread, one process. dopri5 at rtol = atol = {TOL:g}, float32, "
        f"t in [0, 1]. Medians of alternating repeats ({elapsed:.0f} s in all). Errors: the "
        "largest absolute difference from torchdiffeq's dopri5 in float64 at 1e-10.",
    ]
    for r in results.values():
        rows = r["rows"]
        lines += ["", f"## {r['title']}", "",
                  "| candidate | median ms | evaluations (forward / backward) | error |",
                  "|---|---|---|---|"]  # fmt: skip
        for cand, row in rows.items():
            if "nfe_forward" in row:
                evals = f"{row['nfe_forward']:.0f} / {row['nfe_backward']:.0f}"
            else:
                evals = f"{row['nfe_total']:.0f} in all"
            error = f"{row['error']:.2g}" if "error" in row else "-"
            lines.append(f"| {cand} | {row['median_s'] * 1e3:.1f} | {evals} | {error} |")
        lines += ["", "| ratio | measured |", "|---|---|"]
        pairs = (
            ("forward", "ours forward", "torchdiffeq forward"),
            ("backprop step", "ours backprop", "torchdiffeq backprop"),
            ("adjoint step", "ours adjoint", "torchdiffeq adjoint (seminorm)"),
        )
        for what, a, b in pairs:
            if a in rows and b in rows:
                lines.append(f"| {what}, ours / torchdiffeq | "
                             f"{rows[a]['median_s'] / rows[b]['median_s']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
