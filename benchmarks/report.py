"""The Markdown report and plots of a benchmark run."""

from __future__ import annotations

import statistics
from pathlib import Path

from .files import write_atomic

TARGETS = {
    # (metric, workload prefix): upper bound
    ("adjoint_vs_torchdiffeq", "mlp"): 0.65,
    ("adjoint_vs_torchdiffeq", "conv"): 0.85,
    ("adjoint_vs_backprop", ""): 1.5,
    ("forward_vs_floor", "mlp"): 1.15,
    ("forward_vs_floor", "conv"): 1.05,
}


def _mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.2f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def _met(check: dict) -> str:
    """A target check's verdict cell: yes, or by how much the median misses the bound."""
    return (
        "yes" if check["met"] else f"no (median {check['median'] / check['bound'] - 1:+.0%} over)"
    )


def _speed_table(speed: list[dict]) -> list[str]:
    lines = [
        "| workload | solver | steps | ours adjoint ms | torchdiffeq adjoint ms | ratio | "
        "ours backprop ms | torchdiffeq backprop ms | ratio | ours adjoint / backprop | "
        "ours fwd / floor | torchdiffeq fwd / floor | NFE ours adj (f/b) | NFE torchdiffeq adj "
        "(f/b) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in speed:
        t, nfe = r["time_s"], r["nfe"]
        tdq_nfe = nfe.get("tdq_adjoint")
        lines.append(
            f"| {r['workload']} | {r['solver']} | {r['steps']} | {_ms(t['ours_adjoint'])} | "
            f"{_ms(t.get('tdq_adjoint'))} | {_ratio(t['ours_adjoint'], t.get('tdq_adjoint'))} | "
            f"{_ms(t['ours_backprop'])} | {_ms(t.get('tdq_backprop'))} | "
            f"{_ratio(t['ours_backprop'], t.get('tdq_backprop'))} | "
            f"{_ratio(t['ours_adjoint'], t['ours_backprop'])} | "
            f"{_ratio(t['ours_forward'], t['floor'])} | "
            f"{_ratio(t.get('tdq_forward'), t['floor'])} | "
            f"{nfe['ours_adjoint'][0]}/{nfe['ours_adjoint'][1]} | "
            f"{'-' if tdq_nfe is None else f'{tdq_nfe[0]}/{tdq_nfe[1]}'} |"
        )
    return lines


def _memory_table(speed: list[dict]) -> list[str]:
    keys = sorted({k for r in speed for k in r["saved_bytes"]})
    lines = [
        "| workload | solver | steps | " + " | ".join(f"{k} MiB" for k in keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for r in speed:
        cells = " | ".join(_mib(r["saved_bytes"].get(k)) for k in keys)
        lines.append(f"| {r['workload']} | {r['solver']} | {r['steps']} | {cells} |")
    timed = [k for k in keys if any(k in r["time_s"] for r in speed)]
    lines += [
        "",
        "Time of a training step for every gradient mode (ms):",
        "",
        "| workload | solver | steps | " + " | ".join(timed) + " |",
        "|---|---|---|" + "---|" * len(timed),
    ]
    for r in speed:
        cells = " | ".join(_ms(r["time_s"].get(k)) for k in timed)
        lines.append(f"| {r['workload']} | {r['solver']} | {r['steps']} | {cells} |")
    tode_rows = [r for r in speed if "torchode_group_time_s" in r]
    if tode_rows:
        lines += [
            "",
            "torchode (fixed-step controller), timed in its own alternating group beside our "
            "two modes (ms per training step):",
            "",
            "| workload | solver | steps | ours adjoint | torchode BacksolveAdjoint | ratio | "
            "ours backprop | torchode AutoDiffAdjoint | ratio |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in tode_rows:
            g = r["torchode_group_time_s"]
            lines.append(
                f"| {r['workload']} | {r['solver']} | {r['steps']} | {_ms(g['ours_adjoint'])} | "
                f"{_ms(g['tode_adjoint'])} | {_ratio(g['ours_adjoint'], g['tode_adjoint'])} | "
                f"{_ms(g['ours_backprop'])} | {_ms(g['tode_backprop'])} | "
                f"{_ratio(g['ours_backprop'], g['tode_backprop'])} |"
            )
    if any(v is not None for r in speed for v in r["cuda_peak_bytes"].values()):
        lines += [
            "",
            "CUDA peak allocated bytes per training step:",
            "",
            "| workload | solver | steps | " + " | ".join(f"{k} MiB" for k in keys) + " |",
            "|---|---|---|" + "---|" * len(keys),
        ]
        for r in speed:
            cells = " | ".join(_mib(r["cuda_peak_bytes"].get(k)) for k in keys)
            lines.append(f"| {r['workload']} | {r['solver']} | {r['steps']} | {cells} |")
    return lines


def _gradient_table(gradients: list[dict]) -> list[str]:
    keys = sorted({k for r in gradients for k in r["rel_error"]})
    lines = ["| solver | steps | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in gradients:
        cells = " | ".join(f"{r['rel_error'][k]:.2e}" if k in r["rel_error"] else "-" for k in keys)
        lines.append(f"| {r['solver']} | {r['steps']} | {cells} |")
    return lines


def target_checks(speed: list[dict]) -> list[dict]:
    """Each target with the measured median and worst value over the rows it covers."""
    checks = []

    def add(
        metric: str, prefix: str, values: list[float], what: str, floor: list[float] | None = None
    ) -> None:
        if not values:
            return
        bound = TARGETS[(metric, prefix)]
        med, worst = statistics.median(values), max(values)
        checks.append(
            {
                "target": what,
                "bound": bound,
                "median": med,
                "worst": worst,
                "met": med <= bound,
                "floor": statistics.median(floor) if floor else None,
            }
        )

    for prefix, label in (("mlp", "workload 1 (MLP)"), ("conv", "workload 2 (conv)")):
        rows = [r for r in speed if r["workload"].startswith(prefix)]
        add(
            "adjoint_vs_torchdiffeq",
            prefix,
            [
                r["time_s"]["ours_adjoint"] / r["time_s"]["tdq_adjoint"]
                for r in rows
                if "tdq_adjoint" in r["time_s"]
            ],
            f"adjoint training step / torchdiffeq odeint_adjoint, {label}",
            [
                (r["time_s"]["floor"] + r["time_s"]["vjp_floor"]) / r["time_s"]["tdq_adjoint"]
                for r in rows
                if "tdq_adjoint" in r["time_s"] and "vjp_floor" in r["time_s"]
            ],
        )
        add(
            "forward_vs_floor",
            prefix,
            [r["time_s"]["ours_forward"] / r["time_s"]["floor"] for r in rows],
            f"forward-only / bare-calls floor, {label}",
        )
    add(
        "adjoint_vs_backprop",
        "",
        [r["time_s"]["ours_adjoint"] / r["time_s"]["ours_backprop"] for r in speed],
        "adjoint / backprop training step, all workloads",
    )
    return checks


def floor_table(speed: list[dict]) -> list[str]:
    """Adjoint training steps against their physical floor: NFE forward calls without a graph
    plus NFE calls with a graph and one VJP each (what any continuous adjoint must do)."""
    lines = [
        "| workload | solver | steps | adjoint floor ms | ours adjoint / floor | "
        "torchdiffeq adjoint / floor | best possible ratio to torchdiffeq |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in speed:
        t = r["time_s"]
        if "vjp_floor" not in t:
            continue
        fl = t["floor"] + t["vjp_floor"]
        tdq = t.get("tdq_adjoint")
        lines.append(
            f"| {r['workload']} | {r['solver']} | {r['steps']} | {_ms(fl)} | "
            f"{_ratio(t['ours_adjoint'], fl)} | {_ratio(tdq, fl)} | {_ratio(fl, tdq)} |"
        )
    return lines


def memory_flatness(speed: list[dict]) -> list[str]:
    lines = []
    for workload in sorted({r["workload"] for r in speed}):
        for solver in sorted({r["solver"] for r in speed if r["workload"] == workload}):
            rows = sorted(
                (r for r in speed if r["workload"] == workload and r["solver"] == solver),
                key=lambda r: r["steps"],
            )
            if len(rows) < 2:
                continue
            lo, hi = rows[0], rows[-1]
            for key in sorted(set(lo["saved_bytes"]) & set(hi["saved_bytes"])):
                a, b = lo["saved_bytes"][key], hi["saved_bytes"][key]
                lines.append(
                    f"| {workload} | {solver} | {key} | {lo['steps']} -> {hi['steps']} | "
                    f"{b / a:.2f}x |"
                )
    return [
        "| workload | solver | mode | steps | saved-bytes growth |",
        "|---|---|---|---|---|",
        *lines,
    ]


COMPILED_TARGETS = (
    # (what, workload prefix, ratio key numerator, denominator, bound)
    (
        "MLP adjoint step, compiled / torchdiffeq",
        "mlp",
        "ours_adjoint_compiled",
        "tdq_adjoint",
        0.35,
    ),
    ("MLP forward-only, compiled / bare calls", "mlp", "ours_forward_compiled", "floor", 0.5),
    (
        "conv adjoint step, compiled / torchdiffeq",
        "conv",
        "ours_adjoint_compiled",
        "tdq_adjoint",
        0.7,
    ),
)


def compiled_checks(rows: list[dict]) -> list[dict]:
    """The compiled path's targets: median and worst ratio over the measured rows."""
    checks = []
    for what, prefix, num, den, bound in COMPILED_TARGETS:
        ratios = [
            r["time_s"][num] / r["time_s"][den]
            for r in rows
            if r["workload"].startswith(prefix) and den in r["time_s"]
        ]
        if ratios:
            median = statistics.median(ratios)
            checks.append(
                {
                    "target": what,
                    "bound": bound,
                    "median": median,
                    "worst": max(ratios),
                    "met": median <= bound,
                }
            )
    return checks


def _compiled_table(rows: list[dict]) -> list[str]:
    lines = [
        "| workload | solver | steps | steps/graph | eager adjoint ms | compiled ms "
        "| compiled/eager | compiled / torchdiffeq | compiled fwd / floor | eager fwd / floor "
        "| first call s | adjoint break-even calls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["time_s"]
        even = r.get("adjoint_break_even_calls")
        lines.append(
            f"| {r['workload']} | {r['solver']} | {r['steps']} | {r['steps_per_graph']} "
            f"| {_ms(t['ours_adjoint'])} | {_ms(t['ours_adjoint_compiled'])} "
            f"| {_ratio(t['ours_adjoint_compiled'], t['ours_adjoint'])} "
            f"| {_ratio(t['ours_adjoint_compiled'], t.get('tdq_adjoint'))} "
            f"| {_ratio(t['ours_forward_compiled'], t['floor'])} "
            f"| {_ratio(t['ours_forward'], t['floor'])} "
            f"| {r['first_call_s']['ours_adjoint_compiled']:.1f} "
            f"| {'never' if even is None else f'{even:,.0f}'} |"
        )
    return lines


def write_report(results: dict, out: Path) -> None:
    speed, gradients, accuracy = results["speed"], results["gradients"], results["accuracy"]
    if not speed:  # --compiled-only
        lines = [
            "# Benchmark report: the compiled path",
            "",
            f"Machine: {results['machine']}.",
            f"Command: `{results['command']}` ({results['wall_s']:.0f} s; torchdiffeq "
            f"{results['torchdiffeq'] or 'not installed'}).",
            "",
            "Times are medians of alternating repeats after warm-up, all in one process.",
            "",
            "Workloads: " + "; ".join(f"`{k}`: {v}" for k, v in results["workloads"].items()) + ".",
            "",
            *_compiled_section(results.get("compiled", [])),
        ]
        write_atomic(out / "report.md", "\n".join(lines) + "\n")
        return
    lines = [
        "# Benchmark report",
        "",
        f"Machine: {results['machine']}.",
        f"Command: `{results['command']}` ({results['wall_s']:.0f} s; torchdiffeq "
        f"{results['torchdiffeq'] or 'not installed'}; torchode "
        f"{results.get('torchode') or 'not installed'}, fixed-step controller, MLP workload).",
        "",
        "Times are medians of alternating repeats after warm-up, all in one process. A training "
        "step is forward, loss (mean square of the final state) and backward, with gradients for "
        "`y0` and every parameter. The floor is NFE bare calls of the dynamics under `no_grad`. "
        "`rk38` is compared with torchdiffeq's `rk4`, which is the same 3/8-rule tableau.",
        "",
        "Workloads: " + "; ".join(f"`{k}`: {v}" for k, v in results["workloads"].items()) + ".",
        "",
        "## Targets",
        "",
        "| target | bound | median | worst | met | floor-limited best (median) |",
        "|---|---|---|---|---|---|",
    ]
    for c in target_checks(speed):
        met = _met(c)
        best = "-" if c["floor"] is None else f"{c['floor']:.2f}"
        lines.append(
            f"| {c['target']} | {c['bound']:.2f} | {c['median']:.2f} | {c['worst']:.2f} | {met} "
            f"| {best} |"
        )
    lines += [
        "",
        "## Time per call",
        "",
        *_speed_table(speed),
        "",
        "## Against the physical floor of an adjoint",
        "",
        "A continuous adjoint must evaluate the dynamics NFE times without a graph (forward) "
        "and NFE times with a graph and a VJP (backward). The last column is that floor "
        "divided by torchdiffeq's time: the smallest ratio to torchdiffeq any implementation "
        "of the same method can reach on this machine.",
        "",
        *floor_table(speed),
        "",
        *_compiled_section(results.get("compiled", [])),
        "## Memory saved for backward (MiB)",
        "",
        *_memory_table(speed),
        "",
        "Growth from the fewest to the most steps:",
        "",
        *memory_flatness(speed),
        "",
        "## Gradient error",
        "",
        "Relative error of the concatenated gradient (y0 and all parameters) against a "
        "float64 reference (rk4, 2,000 steps, backprop), MLP dynamics in float64.",
        "",
        *_gradient_table(gradients),
        "",
        "## Accuracy on the damped oscillator",
        "",
        "| solver | steps | step | max abs error at t = 2 |",
        "|---|---|---|---|",
    ]
    for r in accuracy:
        lines.append(f"| {r['solver']} | {r['steps']} | {r['step']:.4g} | {r['error']:.2e} |")
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
    _plots(results, out)


def _compiled_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## The compiled path (`compile=True`)",
        "",
        "The same training step and forward pass with `Compile(backend='inductor', "
        f"steps={rows[0]['steps_per_graph']})`, timed beside the eager path and torchdiffeq. "
        "'first call' is the first training step after `torch._dynamo.reset()` with a fresh "
        "inductor cache folder (it compiles the forward and backward graphs; kernels that an "
        "earlier row of the same process compiled are reused, so the first row of each "
        "workload and solver is the cold compile); 'break-even calls' is the first call's "
        "extra time over the time each later call saves (never: the compiled call is not "
        "faster).",
        "",
        "| target | bound | median | worst | met |",
        "|---|---|---|---|---|",
    ]
    for c in compiled_checks(rows):
        lines.append(
            f"| {c['target']} | {c['bound']:.2f} | {c['median']:.2f} | {c['worst']:.2f} "
            f"| {_met(c)} |"
        )
    return [*lines, "", *_compiled_table(rows), ""]


def _plots(results: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    speed = [r for r in results["speed"] if r["workload"] == "mlp"]
    solvers = sorted({r["solver"] for r in speed})
    fig, axes = plt.subplots(1, 3, figsize=(15, 6))
    for ax in axes:  # enough distinct colours for every line (the default cycle has ten)
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for solver in solvers:
        rows = sorted((r for r in speed if r["solver"] == solver), key=lambda r: r["steps"])
        steps = [r["steps"] for r in rows]
        for key, style in (("ours_adjoint", "-"), ("tdq_adjoint", "--")):
            if key in rows[0]["time_s"]:
                axes[0].loglog(
                    steps,
                    [r["time_s"][key] * 1e3 for r in rows],
                    style,
                    marker="o",
                    label=f"{key} {solver}",
                )
    mem_solver = "heun" if "heun" in solvers else solvers[0]
    mem_rows = sorted((r for r in speed if r["solver"] == mem_solver), key=lambda r: r["steps"])
    for key in sorted(mem_rows[0]["saved_bytes"]):
        rows = mem_rows
        axes[1].loglog(
            [r["steps"] for r in rows],
            [r["saved_bytes"][key] / 2**20 for r in rows],
            marker="o",
            label=key,
        )
    for solver in sorted({r["solver"] for r in results["gradients"]}):
        rows = [r for r in results["gradients"] if r["solver"] == solver]
        for key in sorted(k for k in rows[0]["rel_error"] if k.startswith("ours")):
            axes[2].loglog(
                [1.0 / r["steps"] for r in rows],
                [r["rel_error"][key] for r in rows],
                marker="o",
                label=f"{key} {solver}",
            )
    axes[0].set(xlabel="steps", ylabel="ms per training step", title="MLP: time vs steps")
    axes[1].set(
        xlabel="steps",
        ylabel="MiB saved for backward",
        title=f"MLP ({mem_solver}): memory vs steps",
    )
    axes[2].set(xlabel="step size", ylabel="relative gradient error", title="gradient error")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        # Below the axes, never over the data.
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(out / "benchmarks.png", dpi=110)
    plt.close(fig)
