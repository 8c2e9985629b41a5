"""The documentation builds warning-free, lists every public name, and its code runs."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import torchode_adjoint

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.rst"))
MODULES = [
    "torchode_adjoint.solvers.tableau",
    "torchode_adjoint.solvers.registry",
    "torchode_adjoint.controllers.fixed",
    "torchode_adjoint._odeint",
    "torchode_adjoint._block",
    "torchode_adjoint._layers",
    "torchode_adjoint._check",
    "torchode_adjoint._temporal_norm",
    "torchode_adjoint.measure",
    "torchode_adjoint.models.cifar10",
]


def _python_blocks(text: str, markdown: bool) -> list[str]:
    if markdown:
        return re.findall(r"```python\n(.*?)```", text, flags=re.S)
    blocks = []
    for m in re.finditer(r"\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", text):
        lines = [line[3:] for line in m.group(1).splitlines()]
        blocks.append("\n".join(lines))
    return blocks


# The pages that show Python code; a page without any is not a test case.
PAGES_WITH_CODE = [
    p
    for p in PAGES + [ROOT / "README.md"]
    if _python_blocks(p.read_text(), markdown=p.suffix == ".md")
]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.name)
def test_code_in_the_docs_runs(page: Path) -> None:
    blocks = _python_blocks(page.read_text(), markdown=page.suffix == ".md")
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102 - our own docs


def test_every_python_block_of_the_docs_is_extracted_for_running() -> None:
    pages = [p for p in PAGES if "code-block:: python" in p.read_text()]
    assert len(pages) >= 3
    for p in pages:
        text = p.read_text()
        assert len(_python_blocks(text, markdown=False)) == text.count("code-block:: python")


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_sphinx_builds_without_warnings_and_documents_every_public_name(tmp_path: Path) -> None:
    pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install '.[docs]'")
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-W", "-b", "html", str(ROOT / "docs"), str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (out / "api.html").read_text()
    for name in torchode_adjoint.__all__:
        if name != "__version__":
            assert f"torchode_adjoint.{name}" in api, name
    # Tables render as tables: the gradient-modes table has its header and one row per mode
    # (a simple table whose cells wrap onto new lines renders every wrapped line as a row).
    page = (out / "gradient_modes.html").read_text()
    table = page[page.index("<table") : page.index("</table>")]
    assert table.count("<tr") == 1 + 4, table[:2000]


def test_the_readme_is_a_readme() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    # The two Quickstart commands, exactly the test command CI runs.
    assert "python examples/cifar10_compare.py --quick" in text
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    assert "\npython -m pytest -q\n" in text


def test_each_readme_code_block_runs_on_its_own() -> None:
    # A reader copies one block, not the page: each must define what it uses.
    for block in _python_blocks((ROOT / "README.md").read_text(), markdown=True):
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own docs


def test_the_install_texts_state_the_torch_range_of_pyproject() -> None:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if d.startswith("torch")]
    low, high = re.fullmatch(r"torch>=([\d.]+),<([\d.]+)", torch_dep).groups()
    stated = f">= {low}, < {high}"
    for page in (ROOT / "README.md", ROOT / "docs" / "getting_started.rst"):
        text = page.read_text()
        assert stated in text, (page.name, stated)
        # No other torch range anywhere on the install lines.
        for found in re.findall(r"\(>= ?[\d.]+(?:, < ?[\d.]+)?\)", text):
            assert found == f"({stated})", (page.name, found)
    assert deps == [torch_dep], "the install texts say torch is the only runtime dependency"


def test_the_torchdiffeq_page_states_both_libraries_defaults() -> None:
    text = " ".join((ROOT / "docs" / "torchdiffeq.rst").read_text().split())
    for fact in ('``dopri5`` at ``rtol=1e-7``, ``atol=1e-9``', 'solver="euler"``', "``step=0.1``",
                 "continuous adjoint (``adjoint=True``)", "backpropagates"):  # fmt: skip
        assert fact in text, fact


def test_the_suite_turns_every_warning_of_the_library_into_an_error() -> None:
    # A test that triggers one of the project's warnings without asserting it fails; a new
    # warning class must be listed too.
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    filters = config["tool"]["pytest"]["ini_options"]["filterwarnings"]
    classes = [
        name
        for name in torchode_adjoint.__all__
        if isinstance(getattr(torchode_adjoint, name), type)
        and issubclass(getattr(torchode_adjoint, name), Warning)
    ]
    assert len(classes) >= 3
    for name in classes:
        assert f"error::torchode_adjoint.{name}" in filters, name
