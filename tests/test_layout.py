"""The package layout (docs/ARCHITECTURE.md): no import circle among tandem's modules, nothing below the
CLI imports it, and the architecture document's tree names exactly the modules that exist.

Imports are read with `ast` from the source, at every level: module-level ones and those inside
functions alike (a lazy import is still a dependency; it only moves the failure to run time). An
import of tandem.a.b.c is an edge to the module tandem.a.b.c (`from tandem.a.b import c` too, when
c is a module) and to each package above it that the importer is not inside of, since importing a
submodule runs those packages' __init__.py first. A package's own submodules importing one another
is counted like any other pair; only the implicit edge from a submodule to its own package is not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tandem"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name `module` imports, absolute; a relative import is resolved against it."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {name: set() for name in mods}
    for module, path in mods.items():
        for name in imported_names(module, path):
            while name and name not in mods:   # `from pkg.mod import function` -> pkg.mod
                name = name.rpartition(".")[0]
            while name:
                if name != module and not module.startswith(name + "."):
                    graph[module].add(name)
                name = name.rpartition(".")[0]
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_function_level_imports_and_parent_packages():
    graph = import_graph()
    # tandem/cli/models.py imports the engine inside a function only
    assert "tandem.infer.engine" in graph["tandem.cli.models"]
    # importing tandem.export.gguf runs tandem/export/__init__.py first
    assert "tandem.export" in graph["tandem.infer.backends"]


def test_no_import_circle_among_tandem_modules():
    assert circles(import_graph()) == []


def test_nothing_below_the_cli_imports_it():
    offenders = sorted(module for module, targets in import_graph().items()
                       if not module.startswith("tandem.cli") and any(t == "tandem.cli" or t.startswith("tandem.cli.")
                                                                      for t in targets))
    assert offenders == []


def architecture_tree() -> set[str]:
    """The .py paths named by the tree in docs/ARCHITECTURE.md's first code block: one entry per line,
    indented two spaces per level, folders ending in '/', anything after the name a comment."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"^```text\n(.*?)^```", text, re.S | re.M).group(1)
    folders, paths = [], set()
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        del folders[depth:]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        elif name.endswith(".py"):
            paths.add("/".join(folders + [name]))
    return paths


def test_architecture_tree_names_every_module_and_no_other():
    on_disk = {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py")}
    named = architecture_tree()
    assert sorted(on_disk - named) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(named - on_disk) == [], "docs/ARCHITECTURE.md names modules that do not exist"
