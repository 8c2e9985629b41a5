"""The reversible mode's coupling chosen per step: its cost and its stability picture.

``python -m benchmarks.reversible_coupling`` measures, side by side in one process, the training
step of the reversible mode with the coupling chosen per step (``Reversible()``, the default)
and with McCallum & Foster's fixed coupling 0.999 (``Reversible(coupling=0.999)``), on the MLP
and conv workloads of the benchmark suite (alternating medians), and draws the stability picture
of the docs: per step of ``y' = mu y``, how much the scheme's parasitic mode grows forwards and
how much the reconstruction amplifies backwards, for a fixed and for the chosen coupling. It
writes ``results.json``, ``report.md`` and ``stability.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from torchode_adjoint import Reversible, get_solver
from torchode_adjoint.measure import add_threads_argument, use_threads

from .files import write_atomic
from .run import machine, ours_loss, train_step
from .timing import alternating_medians
from .workloads import conv_workload, mlp_workload

FIXED = 0.999


def step_matrix(solver: str, z: float, lam: float) -> np.ndarray:
    """The coupled step on ``y' = mu y`` (``z = h mu``) as a 2x2 matrix on ``(y, z)``."""
    tableau = get_solver(solver)
    r, r_back = tableau.stability(z), tableau.stability(-z)
    # y1 = lam y + (R - lam) z;  z1 = z - (R(-z) - 1) y1
    return np.array([[lam, r - lam], [lam * (1.0 - r_back), 1.0 + (1.0 - r_back) * (r - lam)]])


def chosen(solver: str, z: float, smallest: float = 0.5) -> float:
    """The coupling the mode chooses for a step of factor ``R(z)``."""
    return max(smallest, min(FIXED, get_solver(solver).stability(z)))


def growth(solver: str, z: float, lam: float) -> tuple[float, float]:
    """Per step: the parasitic mode's factor forwards (the eigenvalue other than the
    solution's, the one farther from ``R``) and the largest factor of the reconstruction
    backwards (spectral radius of the inverse)."""
    m = step_matrix(solver, z, lam)
    eig = np.linalg.eigvals(m)
    r = get_solver(solver).stability(z)
    parasitic = eig[np.argmax(np.abs(eig - r))]
    back = np.max(np.abs(np.linalg.eigvals(np.linalg.inv(m))))
    return float(abs(parasitic)), float(back)


def stability_plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = np.linspace(-0.6, 0.3, 181)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for solver, style in (("euler", "-"), ("rk4", "--")):
        fixed = [growth(solver, z, FIXED) for z in zs]
        auto = [growth(solver, z, chosen(solver, z)) for z in zs]
        own = [1.0 / abs(get_solver(solver).stability(z)) for z in zs]
        axes[0].plot(zs, [f[0] for f in fixed], "C3" + style, label=f"{solver}, coupling 0.999")
        axes[0].plot(zs, [a[0] for a in auto], "C0" + style, label=f"{solver}, chosen")
        axes[1].plot(zs, [f[1] for f in fixed], "C3" + style, label=f"{solver}, coupling 0.999")
        axes[1].plot(zs, [a[1] for a in auto], "C0" + style, label=f"{solver}, chosen")
        label = f"{solver}, 1/|R| (the solution's own)"
        axes[1].plot(zs, own, style, color="0.5", lw=1, label=label)
    axes[0].axhline(1.0, color="k", lw=0.5)
    axes[0].set(xlabel="h mu (the step times the dynamics' rate)",
                ylabel="parasitic mode's factor per step",
                title="forwards: the parasitic mode")  # fmt: skip
    axes[1].set(xlabel="h mu", ylabel="largest factor per step",
                title="backwards: the reconstruction")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=120)
    plt.close(fig)


def overhead(repeats: int, quick: bool) -> list[dict]:
    if quick:
        cases = [(mlp_workload(batch=8, dim=2), "rk4", 4)]
    else:
        cases = [
            (w, solver, n)
            for w, n in ((mlp_workload(), 100), (conv_workload(batch=32, size=8), 10))
            for solver in ("euler", "rk4")
        ]
    rows = []
    for w, solver, n in cases:
        cands = {
            "chosen": train_step(ours_loss(w, solver, n, Reversible())),  # type: ignore[arg-type]
            "fixed": train_step(ours_loss(w, solver, n, Reversible(coupling=FIXED))),  # type: ignore[arg-type]
        }
        times = alternating_medians(cands, repeats=repeats)
        rows.append({"workload": w.name, "solver": solver, "steps": n, "time_s": times})
        print(f"{w.name:>6} {solver:>6} n={n:<4} chosen {times['chosen'] * 1e3:8.2f} ms  fixed "
              f"{times['fixed'] * 1e3:8.2f} ms  ratio {times['chosen'] / times['fixed']:.3f}",
              flush=True)  # fmt: skip
    return rows


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# The reversible mode's chosen coupling: its cost",
        "",
        f"Machine: {results['machine']}.",
        f"Command: `{results['command']}` ({results['wall_s']:.0f} s).",
        "",
        "Training-step time (medians of alternating runs) of the reversible mode with the "
        "coupling chosen per step (`Reversible()`) and with the fixed coupling 0.999 "
        "(`Reversible(coupling=0.999)`), same workload, tableau and step:",
        "",
        "| workload | solver | steps | chosen ms | fixed ms | chosen / fixed |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        t = r["time_s"]
        lines.append(
            f"| {r['workload']} | {r['solver']} | {r['steps']} | {t['chosen'] * 1e3:.2f} | "
            f"{t['fixed'] * 1e3:.2f} | {t['chosen'] / t['fixed']:.3f} |"
        )
    lines += ["", "![stability](stability.png)", ""]
    write_atomic(out / "report.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the machinery only")
    p.add_argument("--output-dir", default="runs/reversible_coupling", help="report folder")
    add_threads_argument(p)
    p.add_argument("--repeats", type=int, default=15, help="alternating timing rounds")
    args = p.parse_args(argv)
    try:
        use_threads(args.threads)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = overhead(1 if args.quick else args.repeats, args.quick)
    stability_plot(out)
    results = {
        "machine": machine(),
        "command": "python -m benchmarks.reversible_coupling "
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
