"""Benchmark suite: every solver and gradient mode, side by side with torchdiffeq.

    python -m benchmarks.run --quick                  # the CI preset, into runs/benchmarks/
    python -m benchmarks.run --output-dir benchmarks/results/cpu

Writes ``results.json``, ``report.md`` and PNG plots. torchdiffeq is measured when it is
installed (``pip install .[bench]``) and skipped with a message otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch._functorch.config
import torch._inductor.config

from torchode_adjoint import (
    GRADIENT_MODES,
    Compile,
    NFECounter,
    TimeSharedStatisticsWarning,
    get_solver,
    odeint,
    resolve_mode,
)
from torchode_adjoint.measure import (
    THREADS_HELP,
    parse_threads,
    peak_memory_bytes,
    saved_tensor_bytes,
    use_threads,
)
from torchode_adjoint.measure import machine as describe_machine

from .files import write_atomic
from .timing import alternating_medians
from .workloads import Counting, Oscillator, Workload, conv_workload, mlp_workload

# Our solver name -> torchdiffeq's method with the same tableau (its "rk4" is the 3/8 rule).
TORCHDIFFEQ_METHOD = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk38": "rk4"}


def modes_for(solver: str) -> list[str]:
    """Every gradient mode that integrates with a solver (all of them for a tableau)."""
    out = []
    for m in GRADIENT_MODES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # heun + reversible: a new meaning
            try:
                resolve_mode(m).check_solver(get_solver(solver))
            except ValueError:
                continue
        out.append(m)
    return out


try:
    import torchdiffeq
except ImportError:  # pragma: no cover - optional extra
    torchdiffeq = None

try:
    import torchode
except ImportError:  # pragma: no cover - optional extra
    torchode = None

# Our solver name -> torchode's fixed-step method (batched (B, D) states only).
TORCHODE_METHOD = {"euler": "Euler", "heun": "Heun"}


def machine() -> str:
    """The machine, in words (:func:`torchode_adjoint.measure.machine`)."""
    return describe_machine()


def _times(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([0.0, 1.0], dtype=dtype, device=device)


def ours_loss(
    w: Workload, solver: str, n: int, mode: str, compile: Compile | None = None
) -> Callable[[], torch.Tensor]:
    """The forward pass and loss of one training step with this library."""
    y0 = w.y0.detach().clone().requires_grad_()
    t = _times(y0.device, y0.dtype)
    options = compile if compile is not None else False

    def run() -> torch.Tensor:
        with heun_meant():
            sol = odeint(w.func, y0, t, solver=solver, step=1.0 / n, adjoint=mode, compile=options)
        return sol[-1].square().mean()

    return run


@contextlib.contextmanager
def heun_meant() -> Iterator[None]:
    """The suite means Heun's method made reversible by ``solver='heun'`` with the reversible
    mode: the FutureWarning about the name's old meaning is for users, not for these rows."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`solver='heun'` with `adjoint='reversible'`", FutureWarning
        )
        yield


def tdq_loss(w: Workload, solver: str, n: int, adjoint: bool) -> Callable[[], torch.Tensor]:
    """The same with torchdiffeq's ``odeint_adjoint`` or ``odeint``."""
    y0 = w.y0.detach().clone().requires_grad_()
    t = _times(y0.device, y0.dtype)
    fn = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    kw = {"adjoint_params": tuple(w.func.parameters())} if adjoint else {}

    def run() -> torch.Tensor:
        sol = fn(
            w.func, y0, t, method=TORCHDIFFEQ_METHOD[solver], options={"step_size": 1.0 / n}, **kw
        )
        return sol[-1].square().mean()

    return run


def tode_loss(w: Workload, solver: str, n: int, adjoint: bool) -> Callable[[], torch.Tensor]:
    """The same with torchode's fixed-step controller: ``BacksolveAdjoint`` or
    ``AutoDiffAdjoint``."""
    y0 = w.y0.detach().clone().requires_grad_()
    batch = y0.shape[0]
    term = torchode.ODETerm(w.func)
    method = getattr(torchode, TORCHODE_METHOD[solver])(term=term)
    control = torchode.FixedStepController()
    if adjoint:
        solver_ = torchode.BacksolveAdjoint(term, method, control)
    else:
        solver_ = torchode.AutoDiffAdjoint(method, control)
    t_eval = _times(y0.device, y0.dtype).repeat(batch, 1)
    dt0 = torch.full((batch,), 1.0 / n, dtype=y0.dtype, device=y0.device)

    def run() -> torch.Tensor:
        sol = solver_.solve(torchode.InitialValueProblem(y0=y0, t_eval=t_eval), dt0=dt0)
        return sol.ys[:, -1].square().mean()

    return run


def train_step(loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """Forward, loss and backward."""
    return lambda: loss().backward()


def ours_forward(
    w: Workload, solver: str, n: int, compile: Compile | None = None
) -> Callable[[], None]:
    t = _times(w.y0.device, w.y0.dtype)
    options = compile if compile is not None else False

    def run() -> None:
        with torch.no_grad():
            odeint(w.func, w.y0, t, solver=solver, step=1.0 / n, adjoint=True, compile=options)

    return run


def tdq_forward(w: Workload, solver: str, n: int) -> Callable[[], None]:
    t = _times(w.y0.device, w.y0.dtype)

    def run() -> None:
        with torch.no_grad():
            torchdiffeq.odeint(
                w.func, w.y0, t, method=TORCHDIFFEQ_METHOD[solver], options={"step_size": 1.0 / n}
            )

    return run


def floor(w: Workload, evaluations: int) -> Callable[[], None]:
    """The physical floor of a forward pass: ``evaluations`` bare calls of the dynamics."""
    t0 = _times(w.y0.device, w.y0.dtype)[0]

    def run() -> None:
        with torch.no_grad():
            for _ in range(evaluations):
                w.func(t0, w.y0)

    return run


def vjp_floor(w: Workload, evaluations: int) -> Callable[[], None]:
    """The floor of any adjoint backward pass: ``evaluations`` calls of the dynamics with a graph,
    each followed by one VJP for the state and the parameters."""
    t0 = _times(w.y0.device, w.y0.dtype)[0]
    params = [p for p in w.func.parameters() if p.requires_grad]
    v = torch.ones_like(w.y0)

    def run() -> None:
        for _ in range(evaluations):
            y = w.y0.detach().requires_grad_(True)
            torch.autograd.grad(w.func(t0, y), [y, *params], v)

    return run


def saved_bytes(loss: Callable[[], torch.Tensor]) -> int:
    """Bytes saved for backward by the forward pass of one training step.

    The backward pass runs outside the count: the graphs the adjoint builds and frees stage by
    stage during backward are transient, not memory kept from the forward pass.
    """
    with saved_tensor_bytes() as saved:
        value = loss()
    value.backward()
    return saved.bytes


def cuda_peak(loss: Callable[[], torch.Tensor]) -> int | None:
    """Peak CUDA bytes allocated during one training step, above what was allocated before."""
    if not torch.cuda.is_available():
        return None
    return peak_memory_bytes(lambda: loss().backward(), torch.device("cuda"))


def nfe_ours(w: Workload, solver: str, n: int, mode: str) -> tuple[int, int]:
    counter = NFECounter()
    y0 = w.y0.detach().clone().requires_grad_()
    with heun_meant():
        sol = odeint(
            w.func,
            y0,
            _times(y0.device, y0.dtype),
            solver=solver,
            step=1.0 / n,
            adjoint=mode,
            nfe=counter,
        )
    sol[-1].sum().backward()
    return counter.forward, counter.backward


def nfe_tdq(w: Workload, solver: str, n: int, adjoint: bool) -> tuple[int, int]:
    counting = Counting(w.func)
    y0 = w.y0.detach().clone().requires_grad_()
    fn = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    kw = {"adjoint_params": tuple(w.func.parameters())} if adjoint else {}
    sol = fn(
        counting,
        y0,
        _times(y0.device, y0.dtype),
        method=TORCHDIFFEQ_METHOD[solver],
        options={"step_size": 1.0 / n},
        **kw,
    )
    forward = counting.calls
    sol[-1].sum().backward()
    return forward, counting.calls - forward


def bench_speed(w: Workload, solvers: list[str], steps: list[int], repeats: int) -> list[dict]:
    rows = []
    have_tdq = torchdiffeq is not None
    for solver in solvers:
        stages = get_solver(solver).stages
        for n in steps:
            cands: dict[str, Callable[[], None]] = {
                f"ours_{m}": train_step(ours_loss(w, solver, n, m)) for m in modes_for(solver)
            }
            cands["ours_forward"] = ours_forward(w, solver, n)
            cands["floor"] = floor(w, n * stages)
            cands["vjp_floor"] = vjp_floor(w, n * stages)
            if have_tdq:
                cands["tdq_adjoint"] = train_step(tdq_loss(w, solver, n, True))
                cands["tdq_backprop"] = train_step(tdq_loss(w, solver, n, False))
                cands["tdq_forward"] = tdq_forward(w, solver, n)
            times = alternating_medians(cands, repeats=repeats)
            use_tode = torchode is not None and w.y0.dim() == 2 and solver in TORCHODE_METHOD
            if use_tode:
                # torchode's adjoint is an order of magnitude slower and allocates heavily; it is
                # timed in a group of its own, against our two modes re-measured beside it, so
                # that it does not disturb the main comparison.
                group = {
                    "ours_adjoint": cands["ours_adjoint"],
                    "ours_backprop": cands["ours_backprop"],
                    "tode_adjoint": train_step(tode_loss(w, solver, n, True)),
                    "tode_backprop": train_step(tode_loss(w, solver, n, False)),
                }
                tode_times = alternating_medians(group, repeats=max(3, repeats // 3))
            row: dict = {
                "workload": w.name,
                "solver": solver,
                "steps": n,
                "time_s": times,
                "saved_bytes": {},
                "cuda_peak_bytes": {},
                "nfe": {},
            }
            for m in modes_for(solver):
                row["saved_bytes"][f"ours_{m}"] = saved_bytes(ours_loss(w, solver, n, m))
                row["cuda_peak_bytes"][f"ours_{m}"] = cuda_peak(ours_loss(w, solver, n, m))
                row["nfe"][f"ours_{m}"] = nfe_ours(w, solver, n, m)
            if have_tdq:
                for adj, name in ((True, "tdq_adjoint"), (False, "tdq_backprop")):
                    row["saved_bytes"][name] = saved_bytes(tdq_loss(w, solver, n, adj))
                    row["cuda_peak_bytes"][name] = cuda_peak(tdq_loss(w, solver, n, adj))
                    row["nfe"][name] = nfe_tdq(w, solver, n, adj)
            if use_tode:
                for adj, name in ((True, "tode_adjoint"), (False, "tode_backprop")):
                    row["saved_bytes"][name] = saved_bytes(tode_loss(w, solver, n, adj))
                    row["cuda_peak_bytes"][name] = cuda_peak(tode_loss(w, solver, n, adj))
                row["torchode_group_time_s"] = tode_times
            rows.append(row)
            print(_speed_line(row), flush=True)
    return rows


def _speed_line(row: dict) -> str:
    t = row["time_s"]
    parts = [f"{row['workload']:>6} {row['solver']:>8} n={row['steps']:<5}"]
    parts.append(f"adjoint {t['ours_adjoint'] * 1e3:8.2f} ms")
    parts.append(f"adj/bp {t['ours_adjoint'] / t['ours_backprop']:.2f}")
    parts.append(f"fwd/floor {t['ours_forward'] / t['floor']:.2f}")
    if "tdq_adjoint" in t:
        parts.append(
            f"vs torchdiffeq: adjoint {t['ours_adjoint'] / t['tdq_adjoint']:.2f}x, "
            f"backprop {t['ours_backprop'] / t['tdq_backprop']:.2f}x, "
            f"fwd/floor {t['tdq_forward'] / t['floor']:.2f}"
        )
    return "  ".join(parts)


def bench_compiled(
    w: Workload, solver: str, steps: list[int], repeats: int, options: Compile
) -> list[dict]:
    """The compiled path against the eager one and torchdiffeq: adjoint training step and
    forward pass, with the one-off compile time and the calls after which it has paid off."""
    rows = []
    stages = get_solver(solver).stages
    for n in steps:
        torch._dynamo.reset()  # every row compiles from scratch: its first call is timed
        adjoint_c = train_step(ours_loss(w, solver, n, "adjoint", options))
        forward_c = ours_forward(w, solver, n, options)
        first = {}
        # Cold compilation: no on-disk caches of earlier rows or runs (a fresh inductor cache
        # folder, and no FX-graph or AOTAutograd cache).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchinductor-bench-")
        with (
            torch._inductor.config.patch(fx_graph_cache=False),
            torch._functorch.config.patch(enable_autograd_cache=False),
        ):
            for name, fn in (
                ("ours_adjoint_compiled", adjoint_c),
                ("ours_forward_compiled", forward_c),
            ):
                start = time.perf_counter()
                fn()
                first[name] = time.perf_counter() - start
        cands: dict[str, Callable[[], None]] = {
            "ours_adjoint": train_step(ours_loss(w, solver, n, "adjoint")),
            "ours_adjoint_compiled": adjoint_c,
            "ours_forward": ours_forward(w, solver, n),
            "ours_forward_compiled": forward_c,
            "floor": floor(w, n * stages),
        }
        if torchdiffeq is not None and solver in TORCHDIFFEQ_METHOD:
            cands["tdq_adjoint"] = train_step(tdq_loss(w, solver, n, True))
        times = alternating_medians(cands, repeats=repeats)
        row: dict = {
            "workload": w.name,
            "solver": solver,
            "steps": n,
            "steps_per_graph": options.steps,
            "backend": str(options.backend),
            "time_s": times,
            "first_call_s": first,
        }
        for kind in ("adjoint", "forward"):
            eager, compiled = times[f"ours_{kind}"], times[f"ours_{kind}_compiled"]
            compile_s = first[f"ours_{kind}_compiled"] - compiled
            gain = eager - compiled
            row[f"{kind}_break_even_calls"] = compile_s / gain if gain > 0 else None
        rows.append(row)
        print(_compiled_line(row), flush=True)
    return rows


def _compiled_line(row: dict) -> str:
    t = row["time_s"]
    parts = [f"{row['workload']:>6} {row['solver']:>8} n={row['steps']:<5} compiled:"]
    parts.append(f"adjoint {t['ours_adjoint_compiled'] * 1e3:8.2f} ms")
    parts.append(f"compiled/eager {t['ours_adjoint_compiled'] / t['ours_adjoint']:.2f}")
    if "tdq_adjoint" in t:
        parts.append(f"vs torchdiffeq {t['ours_adjoint_compiled'] / t['tdq_adjoint']:.2f}x")
    parts.append(f"fwd/floor {t['ours_forward_compiled'] / t['floor']:.2f}")
    parts.append(f"first call {row['first_call_s']['ours_adjoint_compiled']:.0f} s")
    return "  ".join(parts)


def bench_gradients(solvers: list[str], steps: list[int]) -> list[dict]:
    """Gradient error of every mode against a float64 reference (rk4, 2,000 steps, backprop)."""
    w = mlp_workload(batch=64, dim=8, dtype=torch.float64)
    params = list(w.func.parameters())

    def grads(solver: str, n: int, mode: str, lib: str = "ours") -> torch.Tensor:
        y0 = w.y0.detach().clone().requires_grad_()
        t = _times(y0.device, y0.dtype)
        if lib == "ours":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # heun + reversible: a new meaning
                sol = odeint(w.func, y0, t, solver=solver, step=1.0 / n, adjoint=mode)
        else:
            fn = torchdiffeq.odeint_adjoint if mode == "adjoint" else torchdiffeq.odeint
            kw = {"adjoint_params": tuple(params)} if mode == "adjoint" else {}
            sol = fn(
                w.func,
                y0,
                t,
                method=TORCHDIFFEQ_METHOD[solver],
                options={"step_size": 1.0 / n},
                **kw,
            )
        g = torch.autograd.grad(sol[-1].square().mean(), [y0, *params])
        return torch.cat([x.flatten() for x in g])

    ref = grads("rk4", 2000, "backprop")
    rows = []
    for solver in solvers:
        for n in steps:
            row = {"solver": solver, "steps": n, "rel_error": {}, "rel_error_discrete": {}}
            discrete = grads(solver, n, "backprop")
            for mode in modes_for(solver):
                g = grads(solver, n, mode)
                row["rel_error"][f"ours_{mode}"] = float((g - ref).norm() / ref.norm())
                row["rel_error_discrete"][f"ours_{mode}"] = float(
                    (g - discrete).norm() / discrete.norm()
                )
            if torchdiffeq is not None and solver in TORCHDIFFEQ_METHOD:
                for mode in ("adjoint", "backprop"):
                    g = grads(solver, n, mode, lib="tdq")
                    row["rel_error"][f"tdq_{mode}"] = float((g - ref).norm() / ref.norm())
            rows.append(row)
    return rows


def bench_accuracy(solvers: list[str], steps: list[int]) -> list[dict]:
    """Workload 3: max error at t = 2 against the closed form, per solver and step count."""
    osc = Oscillator().double()
    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    exact = torch.tensor(osc.exact(2.0, (1.0, 0.0)), dtype=torch.float64)
    rows = []
    for solver in solvers:
        for n in steps:
            with torch.no_grad():
                sol = odeint(
                    osc,
                    y0,
                    torch.tensor([0.0, 2.0], dtype=torch.float64),
                    solver=solver,
                    step=2.0 / n,
                    check_finite=False,
                )
            err = float((sol[-1, 0] - exact).abs().max())
            rows.append({"solver": solver, "steps": n, "step": 2.0 / n, "error": err})
    return rows


SPEED_HEADER = (
    "workload   solver steps  our adjoint step (median)  adj/bp = our adjoint / our backprop  "
    "fwd/floor = our forward-only / bare dynamics calls; then the same against torchdiffeq"
)

COMPILED_HEADER = (
    "the compiled path (Compile(steps={steps})): our compiled adjoint step (median), "
    "compiled/eager adjoint, compiled adjoint / torchdiffeq's adjoint, compiled forward-only / "
    "bare dynamics calls, first call (compiling)"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the CI preset: fewer steps and repeats, no compiled rows (its time on the 2-core "
        "CPU is in benchmarks/README.md)",
    )
    p.add_argument(
        "--output-dir",
        default="runs/benchmarks",
        help="where results.json, report.md and the plots go (runs/ is ignored by git)",
    )
    p.add_argument(
        "--threads",
        default="auto",
        help=THREADS_HELP,
    )
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    p.add_argument(
        "--compile-steps",
        type=int,
        default=1,
        help="solver steps per compiled graph in the compiled rows (Compile(steps=...))",
    )
    p.add_argument(
        "--compiled-only",
        action="store_true",
        help="measure the compiled path's rows only (no eager table, gradients or accuracy)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = p.parse_args(argv)
    try:
        out = _check_args(args)
    except ValueError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    use_threads(str(args.threads))
    # The conv workload is the reference study's dynamics, BatchNorm included on purpose.
    warnings.filterwarnings("ignore", category=TimeSharedStatisticsWarning)
    print(f"results, report and plots go to {out.resolve()}/", flush=True)
    for name, lib in (("torchdiffeq", torchdiffeq), ("torchode", torchode)):
        if lib is None:
            print(f"{name} is not installed: skipping it (pip install '.[bench]')")
    device = torch.device(args.device)
    solvers = ["euler", "midpoint", "heun", "rk38"]
    if args.quick:
        mlp_steps, conv_steps, repeats, conv_batch = [10, 100], [2, 5], 5, 32
    else:
        mlp_steps, conv_steps, repeats, conv_batch = [10, 100, 1000], [2, 10], 7, 128
    started = time.time()
    workloads = [mlp_workload()]
    workloads += [conv_workload(batch=conv_batch, size=s) for s in (8, 4)]
    speed: list[dict] = []
    if not args.compiled_only:
        print(SPEED_HEADER, flush=True)
    for w in workloads if not args.compiled_only else []:
        w = Workload(w.name, w.title, w.func.to(device), w.y0.to(device))
        steps = mlp_steps if w.name == "mlp" else conv_steps
        speed += bench_speed(
            w,
            solvers if w.name == "mlp" else ["euler", "rk38"],
            steps,
            repeats if w.name == "mlp" else 3,
        )
    options = Compile(steps=args.compile_steps)
    print(COMPILED_HEADER.format(steps=options.steps), flush=True)
    compiled = []
    for w in workloads:
        w = Workload(w.name, w.title, w.func.to(device), w.y0.to(device))
        if args.quick:
            # The compiled rows' cold compilation (about 25 s each) would dominate the quick
            # preset: they run in the full suite only (and are tested in tests/test_compiled.py).
            plan = []
        elif w.name == "mlp":
            plan = [("euler", [10, 100]), ("rk38", [10, 100])]
        elif w.name == "conv8":
            plan = [("euler", [2, 10])]
        else:
            plan = []
        for solver, steps in plan:
            compiled += bench_compiled(w, solver, steps, 5 if args.quick else repeats, options)
    grad_steps = [10, 100] if args.quick else [10, 30, 100, 300]
    gradients, accuracy = [], []
    if not args.compiled_only:
        gradients = bench_gradients(solvers, grad_steps)
        accuracy = bench_accuracy(
            ["euler", "midpoint", "heun", "rk3", "rk4", "rk38"], [50, 100, 200, 400, 800]
        )
    results = {
        "machine": machine(),
        "command": "python -m benchmarks.run "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "torchdiffeq": getattr(torchdiffeq, "__version__", None),
        "torchode": getattr(torchode, "__version__", None) if torchode is not None else None,
        "quick": args.quick,
        "wall_s": time.time() - started,
        "workloads": {w.name: w.title for w in workloads},
        "speed": speed,
        "compiled": compiled,
        "gradients": gradients,
        "accuracy": accuracy,
    }
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    from .report import write_report

    write_report(results, out)
    written = ", ".join(str(path) for path in sorted(out.iterdir()) if path.is_file())
    print(f"wrote {written} in {results['wall_s']:.0f} s")
    return 0


def _check_args(args: argparse.Namespace) -> Path:
    """Check the arguments before anything is measured; returns the output folder."""
    args.threads = parse_threads(args.threads)
    if args.compile_steps < 1:
        raise ValueError(f"--compile-steps must be at least 1, got {args.compile_steps}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device; pass cpu or cuda") from None
    if device.type not in ("cpu", "cuda") or (
        device.type == "cuda" and not torch.cuda.is_available()
    ):
        available = "cpu, cuda" if torch.cuda.is_available() else "cpu"
        raise ValueError(f"--device {args.device!r} is not available here; available: {available}")
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as err:
        raise ValueError(
            f"--output-dir {str(out)!r} cannot be created or written ({err.strerror}); pass a "
            "writable folder"
        ) from None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
