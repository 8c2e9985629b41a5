"""torchdiffeq's three examples ported to this library, each timed side by side with torchdiffeq.

    python -m benchmarks.ports --output-dir benchmarks/results/ports_cpu

One training iteration of each of torchdiffeq's examples, run with torchdiffeq (``odeint``,
``odeint_adjoint``) and with this library's ``odeint``, the same model and data in one process,
alternating medians after warm-up; the ported call is printed beside torchdiffeq's:

- ``ode_demo``: the cubic spiral (an MLP of the cubed state; batches of 20 windows of 10 output
  times, RMSprop), rk4 (torchdiffeq's is the 3/8 rule: ``solver="rk38"``), one step per output
  interval (``step=None``);
- ``latent_ode``: the latent ODE on spirals (the shared :mod:`torchode_adjoint.models.latent_ode`,
  the paper's sizes; 256 spirals, 30 of 100 times observed, the ELBO, Adam), dopri5 at
  ``rtol=1e-6, atol=1e-8`` on both sides (what ``solver="dopri5"`` alone means in float32; the
  adjoints' backward steps controlled on the seminorm on both sides);
- ``cnf``: a continuous normalising flow trained by maximum likelihood on two moons (the shared
  :class:`~torchode_adjoint.models.cnf.CNFDynamics`, 32 units; 512 points, ``(z, log q)`` as a
  tuple state, integrated from t = 1 to 0), dopri5 at ``rtol=atol=1e-5``.

Writes ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchode_adjoint import odeint
from torchode_adjoint.datasets.spirals import make_spirals, observe
from torchode_adjoint.datasets.toy2d import two_moons
from torchode_adjoint.measure import add_threads_argument, use_threads
from torchode_adjoint.models.cnf import CNFDynamics, standard_normal_log_prob
from torchode_adjoint.models.latent_ode import LatentODE, gaussian_elbo

from .files import write_atomic
from .run import machine
from .timing import alternating_medians

Solve = Callable[..., Any]


@dataclass
class Variant:
    """One library's call: its text as a user writes it, and the function that makes it."""

    call: str
    solve: Solve


class CubicMLP(nn.Module):
    """ode_demo's dynamics: an MLP of the cubed state."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y**3)


def ode_demo(td: Any, quick: bool) -> tuple[dict[str, Variant], Callable[[Solve], Callable]]:
    torch.manual_seed(0)
    a = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])
    t = torch.linspace(0.0, 25.0, 1000)
    with torch.no_grad():
        true_y = td.odeint(lambda t, y: (y**3) @ a, torch.tensor([[2.0, 0.0]]), t, method="dopri5")

    def make(solve: Solve) -> Callable[[], None]:
        torch.manual_seed(1)
        func = CubicMLP()
        opt = torch.optim.RMSprop(func.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(2)

        def iteration() -> None:
            s = torch.randint(0, 990, (20,), generator=g)
            y0, bt = true_y[s], t[:10]
            by = torch.stack([true_y[s + i] for i in range(10)], dim=0)
            loss = (solve(func, y0, bt) - by).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        return iteration

    variants = {
        "torchdiffeq backprop": Variant('torchdiffeq.odeint(func, y0, t, method="rk4")',
                                        lambda f, y, s: td.odeint(f, y, s, method="rk4")),
        "ours backprop": Variant('odeint(func, y0, t, solver="rk38", step=None, adjoint=False)',
                                 lambda f, y, s: odeint(f, y, s, solver="rk38", step=None,
                                                        adjoint=False)),
        "torchdiffeq adjoint": Variant('torchdiffeq.odeint_adjoint(func, y0, t, method="rk4")',
                                       lambda f, y, s: td.odeint_adjoint(f, y, s, method="rk4")),
        "ours adjoint": Variant('odeint(func, y0, t, solver="rk38", step=None)',
                                lambda f, y, s: odeint(f, y, s, solver="rk38", step=None)),
    }  # fmt: skip
    return variants, make


def latent_ode(td: Any, quick: bool) -> tuple[dict[str, Variant], Callable[[Solve], Callable]]:
    n = 16 if quick else 256
    data = make_spirals(n, 100, noise=0.1, seed=0)
    idx = observe(n, 100, 30, seed=0)
    times = data.times.expand(n, -1).gather(1, idx)
    values = data.noisy.gather(1, idx[..., None].expand(-1, -1, 2))

    def make(solve: Solve) -> Callable[[], None]:
        torch.manual_seed(1)
        model = LatentODE()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)

        def iteration() -> None:
            pred, mean, logvar = model(times, values, data.times, solve)
            at_obs = pred.gather(1, idx[..., None].expand(-1, -1, 2))
            loss = gaussian_elbo(at_obs, values, mean, logvar, 0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return iteration

    tol = {"rtol": 1e-6, "atol": 1e-8}
    semi = {"norm": "seminorm"}
    variants = {
        "torchdiffeq backprop": Variant("torchdiffeq.odeint(func, z0, t, rtol=1e-6, atol=1e-8)",
                                        lambda f, z, s: td.odeint(f, z, s, **tol)),
        "ours backprop": Variant('odeint(func, z0, t, solver="dopri5", adjoint=False)',
                                 lambda f, z, s: odeint(f, z, s, solver="dopri5", adjoint=False)),
        "torchdiffeq adjoint": Variant(
            'torchdiffeq.odeint_adjoint(func, z0, t, rtol=1e-6, atol=1e-8, '
            'adjoint_options=dict(norm="seminorm"))',
            lambda f, z, s: td.odeint_adjoint(f, z, s, adjoint_options=semi, **tol)),
        "ours adjoint": Variant('odeint(func, z0, t, solver="dopri5")',
                                lambda f, z, s: odeint(f, z, s, solver="dopri5")),
    }  # fmt: skip
    return variants, make


def cnf(td: Any, quick: bool) -> tuple[dict[str, Variant], Callable[[Solve], Callable]]:
    x = two_moons(64 if quick else 512, seed=0)
    t = torch.tensor([1.0, 0.0])

    def make(solve: Solve) -> Callable[[], None]:
        torch.manual_seed(1)
        dyn = CNFDynamics(32)
        opt = torch.optim.Adam(dyn.parameters(), lr=1e-3)

        def iteration() -> None:
            z, c = solve(dyn, (x, x.new_zeros(x.shape[0])), t)
            loss = -(standard_normal_log_prob(z[-1]) - c[-1]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        return iteration

    tol = {"rtol": 1e-5, "atol": 1e-5}
    semi = {"norm": "seminorm"}
    variants = {
        "torchdiffeq backprop": Variant("torchdiffeq.odeint(func, (x, 0), t, rtol=1e-5, atol=1e-5)",
                                        lambda f, s0, s: td.odeint(f, s0, s, **tol)),
        "ours backprop": Variant('odeint(func, (x, 0), t, solver="dopri5", rtol=1e-5, atol=1e-5, '
                                 "adjoint=False)",
                                 lambda f, s0, s: odeint(f, s0, s, solver="dopri5", adjoint=False,
                                                         **tol)),
        "torchdiffeq adjoint": Variant(
            "torchdiffeq.odeint_adjoint(func, (x, 0), t, rtol=1e-5, atol=1e-5, "
            'adjoint_options=dict(norm="seminorm"))',
            lambda f, s0, s: td.odeint_adjoint(f, s0, s, adjoint_options=semi, **tol)),
        "ours adjoint": Variant('odeint(func, (x, 0), t, solver="dopri5", rtol=1e-5, atol=1e-5)',
                                lambda f, s0, s: odeint(f, s0, s, solver="dopri5", **tol)),
    }  # fmt: skip
    return variants, make


WORKLOADS = {"ode_demo": ode_demo, "latent_ode": latent_ode, "cnf": cnf}


def run(name: str, td: Any, repeats: int, warmup: int, quick: bool) -> dict[str, Any]:
    variants, make = WORKLOADS[name](td, quick)
    iterations = {v: make(variants[v].solve) for v in variants}
    medians = alternating_medians(iterations, repeats=repeats, warmup=warmup)
    row = {
        "workload": name,
        "ms": {v: 1e3 * medians[v] for v in variants},
        "calls": {v: variants[v].call for v in variants},
        "ratio": {k: medians[f"ours {k}"] / medians[f"torchdiffeq {k}"]
                  for k in ("backprop", "adjoint")},
    }  # fmt: skip
    for v in variants:
        print(f"{name:>10} {v:22s} {row['ms'][v]:9.2f} ms   {variants[v].call}", flush=True)
    print(f"{name:>10} ours / torchdiffeq: backprop {row['ratio']['backprop']:.2f}, adjoint "
          f"{row['ratio']['adjoint']:.2f}", flush=True)  # fmt: skip
    return row


def write_report(results: dict[str, Any], out: Path) -> None:
    lines = [
        "# torchdiffeq's examples ported, side by side",
        "",
        f"Machine: {results['machine']}.",
        f"Command: `{results['command']}` ({results['wall_s']:.0f} s).",
        "",
        "One training iteration (medians of alternating runs after warm-up), ms:",
        "",
        "| example | torchdiffeq backprop | ours backprop | ratio | torchdiffeq adjoint | "
        "ours adjoint | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        ms = r["ms"]
        lines.append(
            f"| {r['workload']} | {ms['torchdiffeq backprop']:.2f} | {ms['ours backprop']:.2f} "
            f"| {r['ratio']['backprop']:.2f} | {ms['torchdiffeq adjoint']:.2f} | "
            f"{ms['ours adjoint']:.2f} | {r['ratio']['adjoint']:.2f} |"
        )
    lines += ["", "The calls:", ""]
    for r in results["rows"]:
        for v, call in r["calls"].items():
            lines.append(f"- {r['workload']}, {v}: `{call}`")
    write_atomic(out / "report.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--repeats", type=int, default=15, help="alternating timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--quick", action="store_true", help="small sizes, one round: the machinery")
    p.add_argument("--output-dir", default="runs/ports", help="where the report goes")
    add_threads_argument(p)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        print("error: --repeats must be at least 1 and --warmup at least 0", file=sys.stderr)
        return 2
    try:
        import torchdiffeq
    except ImportError:
        print("error: torchdiffeq is not installed (pip install '.[bench]')", file=sys.stderr)
        return 2
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    repeats, warmup = (1, 0) if args.quick else (args.repeats, args.warmup)
    rows = [run(name, torchdiffeq, repeats, warmup, args.quick) for name in args.workloads]
    results = {
        "machine": machine(),
        "command": "python -m benchmarks.ports "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "wall_s": time.time() - started,
        "rows": rows,
    }
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    write_report(results, out)
    print(f"wrote {out / 'report.md'} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
