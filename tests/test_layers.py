"""The package's imports point down the layers: no cycle, and the solver layer imports no mode.

Read from the source with ``ast`` (every ``import`` and ``from . import``, inside functions and
``TYPE_CHECKING`` blocks too), so a type-only or a lazy import counts like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "torchode_adjoint"

# How a solve is differentiated. Nothing in the solver layer below may import one of these.
MODES = {"_mode", "_adjoint", "_checkpoint", "_reversible"}
# Data, numerics and the executor: tableaus and the registry, methods and their steps, the
# record of steps, states, one call of the dynamics, the VJP, the compiled step, the executor.
SOLVER_LAYER = {
    "_tableau",
    "_solvers",
    "_step",
    "_runge_kutta",
    "_methods",
    "_executor",
    "_coupled",
    "_reversible_heun",
    "_grid",
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


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (relative or absolute)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
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
    assert "_tableau" in graph["_solvers"]  # a plain relative import
    assert "_dynamics" in graph["_mode"]
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
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id in classes:
                found.append((name, node.id, node.lineno))
            elif isinstance(node, ast.alias) and node.name in classes:
                found.append((name, node.name, 0))
    assert not found, found


def _step_calls() -> list[tuple[str, str, str, int]]:
    """Every call ``<receiver>.step(...)`` in the package: (module, enclosing class or
    function, receiver, line)."""
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for top in tree.body:
            where = getattr(top, "name", "<module>")
            for node in ast.walk(top):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "step"
                ):
                    receiver = ast.unparse(node.func.value)
                    calls.append((_module_name(path), where, receiver, node.lineno))
    return calls


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


def test_methods_declare_their_capabilities() -> None:
    # The loop reads what a method can do from the method (error order, interpolant, the
    # derivative it carries, whether it compiles); it never probes with getattr.
    from torchode_adjoint._step import MethodBase

    tree_modes = ["_executor", "_prepare", "_reversible", "_checkpoint", "_adjoint"]
    probes = []
    capabilities = {"error_order", "interpolates", "interpolate", "derivative", "compilable",
                    "choose", "coupling"}  # fmt: skip
    for name in tree_modes:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
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
