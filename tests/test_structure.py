"""The package's shape: layers call downward only, through public names, in modules of one size.

Read from the source with ``ast`` (no imports run): every ``import`` counts, the ones inside
functions too, since a lazy import back up is still a cycle.
"""

import ast
import pathlib
import re
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / "jaxquant"
MAX_LINES = 400
# Files another change is splitting; each entry names why it may still be long.
LONG_FILES: dict[str, str] = {}
# Modules allowed to start processes; library code must not.
SUBPROCESS_ALLOWED: dict[str, str] = {}
# Imports back up that another change is removing. Each exemption above must still be needed:
# the tests fail once it is stale, so that it is deleted rather than left to hide a new case.
BACK_EDGES: dict[tuple[str, str], str] = {}
# Declared dependencies that are not imported by name, and why.
NOT_IMPORTED = {"jaxlib": "jax's own backend, pinned to jax's version"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """(imported module, names taken from it, line) for every import statement in ``module``."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, (), node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield _resolve(module, node), tuple(a.name for a in node.names), node.lineno


def _edges(module: str) -> set[str]:
    """The jaxquant modules ``module`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    out = set()
    for target, names, _ in _imports(module):
        if target in MODULES:
            out.add(target)
        for name in names:
            if f"{target}.{name}" in MODULES:
                out.add(f"{target}.{name}")
    out.discard(module)
    return out


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycles():
    graph = {m: _edges(m) for m in MODULES}
    assert graph["jaxquant._src.quantize"], "the parser found no imports: the check would pass vacuously"
    for source, target in BACK_EDGES:
        assert target in graph[source], f"{source} no longer imports {target}: delete it from BACK_EDGES"
        graph[source].discard(target)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_names_cross_modules():
    """Neither ``from jaxquant.x import _name`` nor ``module._name`` on an imported jaxquant module."""
    found = []
    for module, path in MODULES.items():
        aliases = set()
        for target, names, line in _imports(module):
            if target.split(".")[0] != "jaxquant":
                continue
            for name in names:
                if _private(name) and f"{target}.{name}" not in MODULES:
                    found.append(f"{module}:{line} imports {target}.{name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and _resolve(module, node).startswith("jaxquant"):
                base = _resolve(module, node)
                aliases |= {a.asname or a.name for a in node.names if f"{base}.{a.name}" in MODULES}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname for a in node.names if a.asname and a.name in MODULES}
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                found.append(f"{module}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_FILES), {k: v for k, v in long.items() if k not in LONG_FILES}
    assert set(LONG_FILES) <= set(long), f"no longer long, delete from LONG_FILES: {set(LONG_FILES) - set(long)}"


def test_the_library_starts_no_processes():
    found = [f"{m}:{line}" for m in MODULES if m not in SUBPROCESS_ALLOWED
             for target, names, line in _imports(m)
             if target.split(".")[0] == "subprocess" or (target == "os" and {"system", "popen"} & set(names))]
    assert not found, f"subprocess imported in {found}"
    for m in SUBPROCESS_ALLOWED:
        assert any(t == "subprocess" for t, _, _ in _imports(m)), f"delete {m} from SUBPROCESS_ALLOWED"


def _dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("-", "_")
    core = {name(r) for r in project["dependencies"]}
    extras = {name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return core, extras


def _third_party_imports() -> dict[str, str]:
    """Top-level names of the non-jaxquant, non-standard-library modules imported, with one place."""
    out = {}
    for module in MODULES:
        for target, _, line in _imports(module):
            top = target.split(".")[0]
            if top and top != "jaxquant" and top not in sys.stdlib_module_names:
                out.setdefault(top, f"{module}:{line}")
    return out


def test_every_core_dependency_is_imported():
    core, _ = _dependencies()
    imported = _third_party_imports()
    unused = {d for d in core - set(NOT_IMPORTED) if d not in imported}
    assert not unused, f"declared in [project] dependencies but imported nowhere in jaxquant/: {unused}"


def test_every_import_is_declared():
    core, extras = _dependencies()
    undeclared = {k: v for k, v in _third_party_imports().items() if k not in core | extras}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


@pytest.mark.parametrize("module", ["jaxquant._src.io", "jaxquant._src.quantize", "jaxquant._src.dequantize"])
def test_core_modules_need_only_core_dependencies(module):
    core, _ = _dependencies()
    seen, todo, outside = set(), [module], {}
    while todo:  # everything the module pulls in at import time or later, transitively
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += _edges(m)
        for target, _, line in _imports(m):
            top = target.split(".")[0]
            if top and top != "jaxquant" and top not in sys.stdlib_module_names and top not in core:
                outside[top] = f"{m}:{line}"
    assert not outside, f"{module} reaches packages outside the core dependencies: {outside}"
