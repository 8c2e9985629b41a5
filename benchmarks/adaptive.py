"""Error-controlled solves side by side with torchdiffeq, torchode and diffrax.

    python -m benchmarks.adaptive --output-dir benchmarks/results/adaptive_cpu

The workload of the adaptive-solving issue: MLP dynamics (dim 16, hidden 64, tanh, weights
doubled), batch 512, ``t`` in [0, 5], dopri5 at ``rtol = atol = 1e-6``, float32, one thread, one
process. For each library it times (alternating, medians) the forward pass without a graph and
a training step (forward, loss, backward) with backprop and, where the library has one, the
continuous adjoint (torchdiffeq's with its seminorm), and counts evaluations; the error of the
forward solution is measured against torchdiffeq's dopri5 in float64 at ``1e-11``. Our
checkpointed and reversible modes run beside them. diffrax (JAX, XLA-compiled) runs when
installed (``pip install ".[peers]"``). Writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchode_adjoint import ContinuousAdjoint, NFECounter, odeint
from torchode_adjoint.measure import add_threads_argument, use_threads

from .files import write_atomic
from .run import machine
from .timing import alternating_medians

T_END = 5.0
TOL = 1e-6
TDQ_ADJOINT = "torchdiffeq adjoint (seminorm)"


class MLP(nn.Module):
    """``f(t, y) = W2 tanh(W1 y + b1) + b2``, counting its calls."""

    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        with torch.no_grad():
            for p in self.net.parameters():
                p.mul_(2.0)
        self.calls = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(y)


class _Plain(nn.Module):
    """The same network as :class:`MLP`, without the counter (for the compiled rows)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


def _ours(f: MLP, y0: torch.Tensor, mode: str, nfe: NFECounter | None = None) -> torch.Tensor:
    t = torch.tensor([0.0, T_END], dtype=y0.dtype)
    adjoint: Any = ContinuousAdjoint(norm="full") if mode == "adjoint-full-norm" else mode
    return odeint(f, y0, t, solver="dopri5", rtol=TOL, atol=TOL, adjoint=adjoint, nfe=nfe)[-1]


def _candidates(f: MLP, y0: torch.Tensor) -> dict[str, Callable[[], Any]]:
    def train(solve: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], Any]:
        def step() -> None:
            f.zero_grad(set_to_none=True)
            solve(y0).square().mean().backward()

        return step

    def no_grad(solve: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                solve(y0)

        return run

    plain = _Plain(f.net)  # no call counter: a counter's attribute would recompile each call
    t = torch.tensor([0.0, T_END])

    def compiled(y: torch.Tensor, mode: str) -> torch.Tensor:
        return odeint(plain, y, t, solver="dopri5", rtol=TOL, atol=TOL, adjoint=mode,
                      compile=True)[-1]  # fmt: skip

    out: dict[str, Callable[[], Any]] = {
        "ours forward": no_grad(lambda y: _ours(f, y, "backprop")),
        "ours forward, compiled": no_grad(lambda y: compiled(y, "backprop")),
        "ours adjoint, compiled": train(lambda y: compiled(y, "adjoint")),
        "ours backprop": train(lambda y: _ours(f, y, "backprop")),
        "ours adjoint": train(lambda y: _ours(f, y, "adjoint")),
        "ours adjoint-full-norm": train(lambda y: _ours(f, y, "adjoint-full-norm")),
        "ours checkpoint": train(lambda y: _ours(f, y, "checkpoint")),
        "ours reversible": train(lambda y: _ours(f, y, "reversible")),
    }
    try:
        import torchdiffeq
    except ImportError:
        torchdiffeq = None
    if torchdiffeq is not None:
        t = torch.tensor([0.0, T_END])

        def tdq(y: torch.Tensor) -> torch.Tensor:
            return torchdiffeq.odeint(f, y, t, method="dopri5", rtol=TOL, atol=TOL)[-1]

        def tdq_adjoint(y: torch.Tensor) -> torch.Tensor:
            return torchdiffeq.odeint_adjoint(
                f, y, t, method="dopri5", rtol=TOL, atol=TOL,
                adjoint_options=dict(norm="seminorm"),
            )[-1]  # fmt: skip

        def tdq_adjoint_full(y: torch.Tensor) -> torch.Tensor:
            return torchdiffeq.odeint_adjoint(f, y, t, method="dopri5", rtol=TOL, atol=TOL)[-1]

        out["torchdiffeq forward"] = no_grad(tdq)
        out["torchdiffeq backprop"] = train(tdq)
        out[TDQ_ADJOINT] = train(tdq_adjoint)
        out["torchdiffeq adjoint (full norm, its default)"] = train(tdq_adjoint_full)
    try:
        import torchode as to
    except ImportError:
        to = None
    if to is not None:
        term = to.ODETerm(f)
        step_method = to.Dopri5(term=term)
        controller = to.IntegralController(atol=TOL, rtol=TOL, term=term)
        solver = to.AutoDiffAdjoint(step_method, controller)

        def torchode_solve(y: torch.Tensor) -> torch.Tensor:
            t_eval = torch.tensor([[0.0, T_END]]).expand(y.shape[0], 2)
            return solver.solve(to.InitialValueProblem(y0=y, t_eval=t_eval)).ys[:, -1]

        out["torchode forward"] = no_grad(torchode_solve)
        out["torchode backprop"] = train(torchode_solve)
    return out


def _diffrax_rows(f: MLP, y0: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """diffrax's Dopri5 with a PID controller (XLA-compiled), same weights and state."""
    try:
        import diffrax
        import jax
        import jax.numpy as jnp
    except ImportError:
        return {}
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in f.net.parameters())
    params = tuple(jnp.asarray(x, dtype=jnp.float32) for x in (w1, b1, w2, b2))
    y = jnp.asarray(y0.numpy())

    def vf(t: Any, state: Any, p: Any) -> Any:
        a, b, c, d = p
        return jnp.tanh(state @ a.T + b) @ c.T + d

    def solve(p: Any, y_init: Any, adjoint: Any) -> Any:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), diffrax.Dopri5(), 0.0, T_END, None, y_init, args=p,
            stepsize_controller=diffrax.PIDController(rtol=TOL, atol=TOL),
            adjoint=adjoint, max_steps=100_000,
        )  # fmt: skip
        return sol.ys[-1], sol.stats["num_steps"]

    forward = jax.jit(lambda p, y_: solve(p, y_, diffrax.RecursiveCheckpointAdjoint()))
    rows: dict[str, dict[str, float]] = {}
    for name, adjoint in (
        ("diffrax gradient (checkpointed)", diffrax.RecursiveCheckpointAdjoint()),
        ("diffrax gradient (backsolve)", diffrax.BacksolveAdjoint()),
    ):
        grad = jax.jit(jax.grad(lambda p, y_, a=adjoint: jnp.mean(jnp.square(solve(p, y_, a)[0]))))
        jax.block_until_ready(grad(params, y))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(grad(params, y))
            times.append(time.perf_counter() - start)
        rows[name] = {"median_s": sorted(times)[len(times) // 2]}
    jax.block_until_ready(forward(params, y))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out, steps = forward(params, y)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    rows["diffrax forward"] = {"median_s": sorted(times)[len(times) // 2], "steps": int(steps)}
    ref = _reference(f, y0)
    ours = torch.from_numpy(jax.device_get(out).copy())
    rows["diffrax forward"]["error"] = float((ours - ref).abs().max())
    return rows


def _reference(f: MLP, y0: torch.Tensor) -> torch.Tensor:
    import torchdiffeq

    g = MLP()
    g.load_state_dict(f.state_dict())
    g = g.double()
    t = torch.tensor([0.0, T_END], dtype=torch.float64)
    with torch.no_grad():
        ref = torchdiffeq.odeint(g, y0.double(), t, method="dopri5", rtol=1e-11, atol=1e-11)
    return ref[-1].float()


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/adaptive"))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per candidate")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    f = MLP()
    y0 = torch.randn(512, 16)
    started = time.perf_counter()
    ref = _reference(f, y0)
    rows: dict[str, dict[str, float]] = {}
    candidates = _candidates(f, y0)
    for name, run in candidates.items():  # evaluations and errors, one call each
        f.calls = 0
        nfe = NFECounter()
        if name.endswith("compiled"):
            run()  # compiles: first calls are not timed
            rows[name] = {}
            continue
        if name.startswith("ours"):
            mode = name.split()[1]
            if mode == "forward":
                with torch.no_grad():
                    out = _ours(f, y0, "backprop", nfe)
            else:
                _ours(f, y0, mode, nfe).square().mean().backward()
            rows[name] = {"nfe_forward": nfe.forward, "nfe_backward": nfe.backward,
                          "steps": nfe.accepted, "rejected": nfe.rejected}  # fmt: skip
            if mode == "forward":
                rows[name]["error"] = float((out - ref).abs().max())
        else:
            run()
            rows[name] = {"nfe_total": f.calls}
    medians = alternating_medians(candidates, repeats=args.repeats, warmup=1)
    for name, value in medians.items():
        rows[name]["median_s"] = value
    with torch.no_grad():
        import torchdiffeq

        f.calls = 0
        theirs = torchdiffeq.odeint(f, y0, torch.tensor([0.0, T_END]), method="dopri5",
                                    rtol=TOL, atol=TOL)[-1]  # fmt: skip
        rows["torchdiffeq forward"]["error"] = float((theirs - ref).abs().max())
    rows.update(_diffrax_rows(f, y0, args.repeats))
    elapsed = time.perf_counter() - started
    info = machine()
    result = {"machine": info, "python": platform.python_version(), "torch": torch.__version__,
              "rows": rows, "seconds": elapsed}  # fmt: skip
    write_atomic(args.output_dir / "results.json", json.dumps(result, indent=1))
    write_atomic(args.output_dir / "report.md", _report(rows, info, elapsed))
    print(_report(rows, info, elapsed))
    return 0


def _ratio(rows: dict[str, dict[str, float]], a: str, b: str) -> str:
    if a in rows and b in rows:
        return f"{rows[a]['median_s'] / rows[b]['median_s']:.2f}"
    return "-"


def _report(rows: dict[str, dict[str, float]], info: str, elapsed: float) -> str:
    lines = [
        "# Error-controlled solves against torchdiffeq, torchode and diffrax",
        "",
        f"Machine: {info}; one thread, one process. MLP dynamics (dim 16, hidden 64, tanh, "
        f"weights doubled), batch 512, t in [0, {T_END:g}], dopri5, rtol = atol = {TOL:g}, "
        f"float32. Medians of alternating repeats ({elapsed:.0f} s in all). Errors: the largest "
        "absolute difference from torchdiffeq's dopri5 in float64 at 1e-11.",
        "",
        "| candidate | median ms | evaluations (forward / backward) | steps | error |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if "nfe_forward" in r:
            evals = f"{r['nfe_forward']:.0f} / {r['nfe_backward']:.0f}"
            steps = f"{r['steps']:.0f} (+{r['rejected']:.0f} rejected)"
        elif "nfe_total" in r:
            evals, steps = f"{r['nfe_total']:.0f} in all", "-"
        else:  # diffrax's, and the compiled rows (the eager rows' counts)
            evals, steps = "-", f"{r['steps']:.0f}" if "steps" in r else "-"
        err = f"{r['error']:.2g}" if "error" in r else "-"
        lines.append(f"| {name} | {r['median_s'] * 1e3:.1f} | {evals} | {steps} | {err} |")
    lines += ["", "| target | bound | measured |", "|---|---|---|"]
    for what, bound, ours, theirs in (
        ("forward", 0.35, "ours forward", "torchdiffeq forward"),
        ("backprop step", 0.5, "ours backprop", "torchdiffeq backprop"),
        ("adjoint step (torchdiffeq's seminorm)", 0.5, "ours adjoint", TDQ_ADJOINT),
        (
            "adjoint step, full norms",
            0.5,
            "ours adjoint-full-norm",
            "torchdiffeq adjoint (full norm, its default)",
        ),
    ):
        lines.append(f"| {what}, ours / torchdiffeq | {bound} | {_ratio(rows, ours, theirs)} |")
    for what, ours, theirs in (
        ("forward", "ours forward, compiled", "diffrax forward"),
        ("gradient", "ours adjoint, compiled", "diffrax gradient (backsolve)"),
    ):
        lines.append(f"| {what}, ours compiled / diffrax | 2.0 | {_ratio(rows, ours, theirs)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
