"""The bouncing-ball example: its quick path fits gravity and restitution in every mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "bouncing_ball.py"


def _example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("bouncing_ball", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_the_observed_bounce_times_are_the_closed_form_ones() -> None:
    # From rest at height x0: the first bounce at sqrt(2 x0 / g), each later one after
    # 2 e^k v1 / g, with v1 = sqrt(2 g x0).
    example = _example()
    ball = example.Ball(9.8, 0.7)
    with torch.no_grad():
        times, states = example.bounces(
            ball, torch.tensor([5.0, 0.0], dtype=torch.float64), 3, "backprop", 0.05
        )
    v1 = (2 * 9.8 * 5.0) ** 0.5
    expected = [v1 / 9.8, v1 / 9.8 + 2 * 0.7 * v1 / 9.8, v1 / 9.8 + 2 * (0.7 + 0.49) * v1 / 9.8]
    assert torch.allclose(times, torch.tensor(expected, dtype=torch.float64), atol=1e-9)
    assert abs(float(states[0][1]) - 0.7 * v1) < 1e-9  # the bounce reverses and damps v


def test_the_quick_path_fits_the_ball_in_every_mode(tmp_path: Path) -> None:
    example = _example()
    argv = ["--quick", "--iterations", "25", "--output-dir", str(tmp_path), "--no-progress",
            "--threads", "1"]  # fmt: skip
    assert example.main(argv) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["mode"] for r in records] == list(example.MODES)
    for r in records:
        assert r["final_loss"] < 0.1 * r["first_loss"], r["mode"]
        assert abs(r["gravity"] - example.START["gravity"]) > 1.0  # it moved towards 9.8
    # rk4 integrates free fall exactly: every mode's gradient is the same.
    g = [r["gravity"] for r in records]
    assert max(g) - min(g) < 1e-6, g
    assert (tmp_path / "report.md").exists() and (tmp_path / "bouncing_ball.png").exists()


def test_the_quick_preset_learns_both_constants_within_two_percent(tmp_path: Path) -> None:
    example = _example()
    argv = ["--quick", "--modes", "backprop", "--output-dir", str(tmp_path), "--no-progress",
            "--threads", "1"]  # fmt: skip
    assert example.main(argv) == 0
    (r,) = json.loads((tmp_path / "results.json").read_text())
    assert abs(r["gravity"] / example.TRUE["gravity"] - 1) < 0.02, r["gravity"]
    assert abs(r["restitution"] / example.TRUE["restitution"] - 1) < 0.02, r["restitution"]
