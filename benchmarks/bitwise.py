"""Fixed-step results and gradients against another commit's, bit for bit, in float64.

    python -m benchmarks.bitwise --reference c726942 --output-dir benchmarks/results/bitwise

A refactoring of the numerics must not change a fixed-step result: this runs a handful of
fixed-seed problems per gradient mode (solutions, and the gradients of a loss with respect to
``y0``, the output times and the parameters, and the evaluation counts) with the package at
``--reference`` (exported with ``git archive`` into a temporary folder) and with the working
tree's, each in a subprocess of its own, and compares them with ``torch.equal``. Writes
``results.json`` and ``report.md``; exits 1 if any number differs, except that the compiled
cases (``compiled-*``: a compiled graph's arithmetic order is the compiler's, and the compiled
adjoint's accumulation order changed when its backward step became the executor's augmented
method) pass within a relative 1e-12.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import write_atomic

ROOT = Path(__file__).resolve().parents[1]


class _MLP(nn.Module):
    """A small time-dependent MLP, optionally with dropout (replayed draws)."""

    def __init__(self, dim: int = 4, hidden: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(dim + 1, hidden)
        self.out = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.expand(y.shape[0], 1)
        return self.out(self.drop(torch.tanh(self.inp(torch.cat([y, tt], dim=1)))))


def _cases() -> dict[str, dict[str, Any]]:
    """name -> odeint keyword arguments (besides the dynamics, ``y0`` and ``t``)."""
    from torchode_adjoint import Checkpoint, Compile, Reversible

    aot = Compile(backend="aot_eager", steps=2)
    cases: dict[str, dict[str, Any]] = {}
    for solver in ("euler", "midpoint", "rk4", "rk38"):
        cases[f"backprop-{solver}"] = dict(solver=solver, adjoint="backprop")
        cases[f"adjoint-{solver}"] = dict(solver=solver, adjoint="adjoint")
        cases[f"checkpoint-{solver}"] = dict(solver=solver, adjoint="checkpoint")
        cases[f"reversible-{solver}"] = dict(solver=solver, adjoint="reversible")
    cases["checkpoint3-euler"] = dict(solver="euler", adjoint=Checkpoint(every=3))
    cases["backprop-reversible_heun"] = dict(solver="reversible_heun", adjoint="backprop")
    cases["reversible-reversible_heun"] = dict(solver="reversible_heun", adjoint="reversible")
    cases["reversible-heun-lam0.9"] = dict(solver="heun", adjoint=Reversible(coupling=0.9))
    cases["one-step-per-interval-rk4-adjoint"] = dict(solver="rk4", adjoint="adjoint", step=None)
    cases["compiled-adjoint-rk4"] = dict(solver="rk4", adjoint="adjoint", compile=aot)
    cases["compiled-backprop-rk4"] = dict(solver="rk4", adjoint="backprop", compile=aot)
    cases["compiled-checkpoint-euler"] = dict(solver="euler", adjoint="checkpoint", compile=aot)
    cases["compiled-reversible-rk4"] = dict(solver="rk4", adjoint="reversible", compile=aot)
    return cases


def _run_case(kwargs: dict[str, Any], *, dropout: float, decreasing: bool) -> dict[str, Any]:
    import warnings

    from torchode_adjoint import NFECounter, odeint

    torch.manual_seed(0)
    f = _MLP(dropout=dropout).double()
    y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    times = [1.0, 0.63, 0.0] if decreasing else [0.0, 0.37, 0.5, 1.0]
    t = torch.tensor(times, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(times) - 1, 3, 4, dtype=torch.float64)
    nfe = NFECounter()
    kwargs = {"step": 0.07, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a FutureWarning for heun, fallback warnings
        sol = odeint(f, y0, t, nfe=nfe, **kwargs)
        loss = (sol[1:] * w).sum() + (sol[-1] ** 2).sum()
        params = list(f.parameters())
        grads = torch.autograd.grad(loss, [y0, t, *params])
    return {
        "solution": sol.detach(),
        "grad_y0": grads[0],
        "grad_t": grads[1],
        **{f"grad_p{i}": g for i, g in enumerate(grads[2:])},
        "nfe": torch.tensor([nfe.forward, nfe.backward]),
    }


def dump(path: Path) -> None:
    """Run every case with the importable package and save the results to ``path``."""
    out: dict[str, dict[str, Any]] = {}
    for name, kwargs in _cases().items():
        for variant, dropout, decreasing in (
            ("", 0.0, False),
            ("-decreasing", 0.0, True),
            ("-dropout", 0.3, False),
        ):
            torch.manual_seed(1)
            try:
                out[name + variant] = _run_case(kwargs, dropout=dropout, decreasing=decreasing)
            except Exception as err:  # noqa: BLE001 - an error is a result to compare too
                out[name + variant] = {"error": f"{type(err).__name__}: {err}"}
    torch.save(out, path)


def export_src(rev: str, into: Path) -> Path:
    """The package source at commit ``rev``, exported into ``into``; its ``src`` folder."""
    archive = into / "src.tar"
    with archive.open("wb") as fh:
        subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, check=True, stdout=fh)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _dump_with(src: Path, path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
    code = f"import pathlib, benchmarks.bitwise as b; b.dump(pathlib.Path({str(path)!r}))"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def compare(reference: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case: equal bit for bit, or which entries differ and by how much."""
    rows = []
    for name in sorted(set(reference) | set(current)):
        ref, cur = reference.get(name), current.get(name)
        if ref is None or cur is None:
            rows.append({"case": name, "equal": False, "differs": ["missing"], "max_abs": None})
            continue
        differs, worst = [], 0.0
        for key in sorted(set(ref) | set(cur)):
            a, b = ref.get(key), cur.get(key)
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                if a.shape == b.shape and torch.equal(a, b):
                    continue
                if a.shape == b.shape and a.is_floating_point():
                    worst = max(worst, float((a - b).abs().max()))
            elif a == b:
                continue
            differs.append(key)
        rows.append({"case": name, "equal": not differs, "differs": differs, "max_abs": worst})
    return rows


COMPILED_TOLERANCE = 1e-12


def _passes(row: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Equal bit for bit; a compiled case within ``COMPILED_TOLERANCE`` of the largest entry."""
    if row["equal"]:
        return True
    if not row["case"].startswith("compiled-") or row["max_abs"] is None:
        return False
    if any(k in ("error", "nfe") for k in row["differs"]):
        return False
    ref = reference[row["case"]]
    scale = max(float(ref[k].abs().max()) for k in row["differs"])
    return bool(row["max_abs"] <= COMPILED_TOLERANCE * scale)


def main(argv: list[str] | None = None) -> int:
    """Compare the working tree's fixed-step results with ``--reference``'s; 0 when all equal."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="the commit to compare against")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/bitwise"))
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _dump_with(export_src(args.reference, folder), folder / "reference.pt")
        _dump_with(ROOT / "src", folder / "current.pt")
        reference = torch.load(folder / "reference.pt", weights_only=True)
        rows = compare(reference, torch.load(folder / "current.pt", weights_only=True))
        for r in rows:
            r["passes"] = _passes(r, reference)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True)
    current = head + (" with uncommitted changes to src/" if dirty.stdout.strip() else "")
    result = {"reference": args.reference, "current": current, "torch": torch.__version__}
    write_atomic(args.output_dir / "results.json", json.dumps({**result, "rows": rows}, indent=1))
    equal = sum(r["equal"] for r in rows)
    passing = sum(r["passes"] for r in rows)
    lines = [
        "# Fixed-step results bit for bit against another commit",
        "",
        f"Reference `{args.reference}`, current `{current}`, PyTorch {torch.__version__}, "
        "float64. Each case: the solution and the gradients of one loss with respect to `y0`, "
        "the output times and every parameter, and the evaluation counts (forward, backward).",
        "",
        f"**{equal} of {len(rows)} cases equal bit for bit; {passing} of {len(rows)} pass** "
        f"(compiled cases may differ by a relative {COMPILED_TOLERANCE:g}: a compiled graph's "
        "arithmetic order is the compiler's).",
        "",
        "| case | equal bit for bit | passes | differing entries | largest difference |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        diff = ", ".join(r["differs"]) or "-"
        worst = "-" if r["equal"] else f"{r['max_abs']:.3g}"
        ok = "yes" if r["passes"] else "NO"
        lines.append(f"| {r['case']} | {'yes' if r['equal'] else 'no'} | {ok} | {diff} | {worst} |")
    write_atomic(args.output_dir / "report.md", "\n".join(lines) + "\n")
    print("\n".join(lines[4:6]))
    return 0 if passing == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
