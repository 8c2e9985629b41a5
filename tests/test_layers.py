"""The package's imports point down the layers: no cycle, and the solver layer imports no mode.

Read from the source with ``ast`` (every ``import`` and ``from . import``, inside functions and
``TYPE_CHECKING`` blocks too), so a type-only or a lazy import counts like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "torchode_adjoint"

# How a solve is differentiated: the modes/ folder. Nothing below may import one of these.
MODES = {
    "modes",
    "modes.base",
    "modes.adjoint",
    "modes.checkpoint",
    "modes.reversible",
    "modes.per_sample",
}
# Data, numerics and the executor: tableaus, the registry, methods and their steps (solvers/),
# the step controllers (controllers/), states, one call of the dynamics, the VJP, the compiled
# step, the executor.
SOLVER_LAYER = {
    "solvers",
    "solvers.tableau",
    "solvers.registry",
    "solvers.protocol",
    "solvers.runge_kutta",
    "solvers.methods",
    "solvers.reversible_coupling",
    "solvers.reversible_heun",
    "controllers",
    "controllers.fixed",
    "controllers.error",
    "controllers.per_sample",
    "_executor",
    "_per_sample",
    "_structure",
    "_rng",
    "_compat",
    "_warnings",
    "_vjp",
    "_compiled",
    "_dynamics",
    "_reads",
    "_temporal_norm",
    "_layers",
    "_spec",
}


def _source(name: str) -> str:
    path = PACKAGE / f"{name.replace('.', '/')}.py"
    return (path if path.exists() else PACKAGE / name / "__init__.py").read_text()


def _module_name(path: Path) -> str:
    """``solvers.tableau`` for ``solvers/tableau.py``; a subpackage's ``__init__`` is the
    subpackage (``solvers``); the package's own stays ``__init__``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if len(parts) > 1 and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (relative or absolute)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if path.name == "__init__.py":  # a (sub)package: its relative imports are its own
            package = "" if name == "__init__" else name
        else:
            package = name.rsplit(".", 1)[0] if "." in name else ""
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    module = ".".join([*base, node.module] if node.module else base)
                elif node.module and node.module.startswith("torchode_adjoint"):
                    module = node.module.removeprefix("torchode_adjoint").lstrip(".")
                else:
                    continue
                targets.add(module)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("torchode_adjoint."):
                        targets.add(alias.name.removeprefix("torchode_adjoint."))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (each found once, as a path that closes on itself)."""
    found, state = [], {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_graph_reader_sees_relative_type_only_and_lazy_imports() -> None:
    graph = import_graph()
    assert "solvers.tableau" in graph["solvers.registry"]  # a plain relative import
    assert "_executor" in graph["modes.base"]  # one folder up
    assert "_dynamics" in graph["modes.base"]
    # The reader's own rules, on a made-up graph: a cycle is found, a chain is not.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_solver_layer_imports_no_gradient_mode() -> None:
    graph = import_graph()
    assert SOLVER_LAYER <= set(graph), SOLVER_LAYER - set(graph)
    upward = {(m, t) for m in SOLVER_LAYER for t in graph[m] if t in MODES}
    assert not upward, sorted(upward)


def test_modes_ask_for_methods_and_capabilities_never_for_method_classes() -> None:
    # A mode gets its method from the solver layer (as_method, as_reversible, tableau_of) and
    # asks a method for what it can do; it never tests or builds a method class itself.
    classes = {"RungeKutta", "Coupled", "ReversibleHeun"}
    found = []
    for name in sorted(MODES):
        tree = ast.parse(_source(name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in classes:
                found.append((name, node.id, node.lineno))
            elif isinstance(node, ast.alias) and node.name in classes:
                found.append((name, node.name, 0))
    assert not found, found


def _calls_of(attrs: set[str]) -> list[tuple[str, str, str, str, int]]:
    """Every call ``<receiver>.<attr>(...)`` in the package for ``attr`` in ``attrs``: (module,
    enclosing top-level name, receiver, attr, line)."""
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for top in tree.body:
            where = getattr(top, "name", "<module>")
            for node in ast.walk(top):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in attrs
                ):
                    receiver = ast.unparse(node.func.value)
                    calls.append((_module_name(path), where, receiver, node.func.attr, node.lineno))
    return calls


def _step_calls() -> list[tuple[str, str, str, int]]:
    """Every call ``<receiver>.step(...)`` in the package: (module, enclosing class or
    function, receiver, line)."""
    return [(m, w, r, line) for m, w, r, _, line in _calls_of({"step"})]


def test_only_the_executor_calls_a_methods_step() -> None:
    # Every solve's steps (forward, replay, backward, the non-finite replay) run through an
    # Executor: the one place that decides eager or compiled. A method's step is called inside
    # `Executor` and the compiled step function it builds, nowhere else; elsewhere `.step(` is
    # an Executor's.
    calls = _step_calls()
    methods = {(m, w) for m, w, r, _ in calls if r not in {"executor", "eager", "self"}}
    assert methods == {("_executor", "Executor"), ("_executor", "_compiled_steps")}, sorted(
        c for c in calls if c[2] not in {"executor", "eager", "self"}
    )
    selfs = {(m, w) for m, w, r, _ in calls if r == "self"}
    assert selfs <= {("_executor", "Executor")}, sorted(selfs)


def test_one_loop_drives_every_pass() -> None:
    # The forward passes, the replays (checkpoint, non-finite), the continuous adjoint's and the
    # reversible mode's backward passes: each is a controller that `run_steps` drives, and
    # `run_steps` is the only caller of an executor's `step` and `advance`. A step path's own
    # `advance` (moving past an accepted step) is the error-controlled controller's.
    calls = _calls_of({"step", "advance"})
    inside_executor = {("_executor", "Executor"), ("_executor", "_compiled_steps")}
    drivers = {
        (m, w)
        for m, w, r, a, _ in calls
        if (m, w) not in inside_executor and not (a == "advance" and r == "self.path")
    }
    assert drivers == {("_executor", "run_steps")}, sorted(
        c for c in calls if (c[0], c[1]) not in inside_executor
    )


def test_methods_declare_their_capabilities() -> None:
    # The loop reads what a method can do from the method (error order, interpolant, the
    # derivative it carries, whether it compiles); it never probes with getattr.
    from torchode_adjoint.solvers.protocol import MethodBase

    tree_modes = ["_executor", "_prepare", "modes.reversible", "modes.checkpoint", "modes.adjoint"]
    probes = []
    capabilities = {"error_order", "interpolates", "interpolate", "derivative", "compilable",
                    "choose", "coupling"}  # fmt: skip
    for name in tree_modes:
        tree = ast.parse(_source(name))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"getattr", "hasattr"}
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in capabilities
            ):
                probes.append((name, node.args[1].value, node.lineno))
    assert not probes, probes
    for cap in ("error_order", "interpolates", "compilable", "derivative", "interpolate"):
        assert hasattr(MethodBase, cap)


def test_the_folders_are_the_layers() -> None:
    # solvers/ (data and methods) imports no controller and no mode; controllers/ no mode; every
    # module of modes/ is a mode and every module of solvers/ and controllers/ sits below them.
    graph = import_graph()
    folders = {m.split(".")[0] for m in graph if "." in m}
    assert {"solvers", "controllers", "modes"} <= folders, folders
    assert {m for m in graph if m.startswith("modes")} == MODES
    for module, targets in graph.items():
        if module.startswith("solvers"):
            above = {t for t in targets if t.startswith(("controllers", "modes", "_executor"))}
            assert not above, (module, above)
        if module.startswith("controllers"):
            above = {t for t in targets if t.startswith(("modes", "_executor"))}
            assert not above, (module, above)
