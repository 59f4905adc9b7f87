"""The import rules of docs/architecture.md, checked on the syntax tree of every module.

Every import counts, at module level or inside a function (a lazy import still needs what it
imports once the function runs), and torch-freedom is transitive (a torch-free module may not
import one that imports torch).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("devinterp", "callbacks", "analysis")
HEAVY = ("torch", "lightning")  # what a torch-free module may not load, directly or through ours

# layer -> the layers it may import (its own included)
ALLOWED: dict[str, set[str]] = {
    "store": {"store", "errors"},
    "errors": {"errors"},
    "language": {"language", "errors"},
    "core": {"core", "language", "store", "errors"},
    "metrics": {"metrics", "core", "language", "store", "errors"},
    "llc": {"llc", "core", "language", "store", "errors"},
    "callbacks": {"callbacks", "metrics", "core", "language", "store", "errors"},
    "analysis": {"analysis", "store", "errors", "language", "core", "metrics", "llc"},
    "cli": {"cli", "callbacks", "analysis", "metrics", "llc", "core", "language", "store", "errors"},
}
# layers, and modules of other layers, that must not load torch or lightning
TORCH_FREE_LAYERS = {"store", "errors"}
TORCH_ALLOWED_IN_ANALYSIS = ("analysis.report", "analysis.essential_dynamics")


def layer_of(module: str) -> str:
    """The layer a module of ours belongs to (docs/architecture.md, "Layers")."""
    parts = module.split(".")
    if parts[0] in ("callbacks", "analysis"):
        return parts[0]
    if module == "devinterp.__main__":
        return "cli"
    if module == "devinterp.errors":
        return "errors"
    if len(parts) > 1 and parts[1] in ("cli", "metrics", "llc", "store", "language"):
        return parts[1]
    return "core"


def torch_free(module: str) -> bool:
    """Whether a module must stay free of torch and lightning."""
    layer = layer_of(module)
    if layer == "analysis":
        return not module.startswith(TORCH_ALLOWED_IN_ANALYSIS)
    return layer in TORCH_FREE_LAYERS


def imported_names(source: str) -> set[str]:
    """Every absolute module name a source imports, at any depth of its syntax tree."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def read_tree(root: pathlib.Path) -> dict[str, str]:
    """Module name -> source, for every module of our packages under root."""
    sources = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            sources[".".join(parts)] = path.read_text()
    return sources


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (a name imported from a package resolves to the
    submodule where there is one), plus the third-party top-level names it imports."""
    graph = {}
    for module, source in sources.items():
        edges = set()
        for name in imported_names(source):
            if name.split(".")[0] in PACKAGES:
                while name not in sources and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in sources and name != module:
                    edges.add(name)
            else:
                edges.add(name.split(".")[0])
        graph[module] = edges
    return graph


def violations(sources: dict[str, str]) -> list[str]:
    """Every broken rule, one line each: a layer importing one it may not, a torch-free module
    reaching torch or lightning, a circle of imports."""
    graph = import_graph(sources)
    found = []
    for module, edges in sorted(graph.items()):
        for target in sorted(edges & sources.keys()):
            if layer_of(target) not in ALLOWED[layer_of(module)]:
                found.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    for module in sorted(m for m in graph if torch_free(m)):
        seen, stack = {module}, [(module, [module])]
        while stack:
            current, path = stack.pop()
            for target in sorted(graph[current]):
                if target in HEAVY:
                    found.append(f"{module} must stay torch-free but reaches {target}: {' -> '.join(path)}")
                    stack.clear()
                    break
                if target in sources and target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
    found += [f"import circle: {' -> '.join(cycle)}" for cycle in circles(graph, sources.keys())]
    return found


def circles(graph: dict[str, set[str]], ours) -> list[list[str]]:
    """One circle per strongly connected group of modules (a package importing its own submodules
    from its __init__ is not a circle)."""
    found = []
    for start in sorted(ours):
        stack = [(start, [start])]
        seen = set()
        while stack:
            current, path = stack.pop()
            for target in sorted(graph[current] & set(ours)):
                if start.startswith(target + ".") or target.startswith(start + "."):
                    continue  # a package and its own submodule
                if target == start:  # every other module on the path sorts after start: found once
                    found.append(path + [start])
                elif target not in seen and target > start:
                    seen.add(target)
                    stack.append((target, path + [target]))
    return found


def test_the_tree_keeps_the_import_rules():
    sources = read_tree(ROOT)
    assert len(sources) > 50  # the walk found the packages
    assert violations(sources) == []


PLANTED = {
    "callbacks imports analysis": (
        {"callbacks.writer": "from analysis.ordering import x", "analysis.ordering": ""},
        "callbacks.writer (callbacks) imports analysis.ordering (analysis)",
    ),
    "core imports a command": (
        {"devinterp.model": "def f():\n    from devinterp.cli.fit import g", "devinterp.cli.fit": ""},
        "devinterp.model (core) imports devinterp.cli.fit (cli)",
    ),
    "store reaches torch through core": (
        {"devinterp.store.timeline": "import devinterp.model", "devinterp.model": "import torch"},
        "devinterp.store.timeline must stay torch-free but reaches torch: devinterp.store.timeline -> "
        "devinterp.model",
    ),
    "a statistic imports torch": (
        {"analysis.onset": "import numpy\nimport torch.nn"},
        "analysis.onset must stay torch-free but reaches torch: analysis.onset",
    ),
    "a circle": (
        {"analysis.a": "from analysis.b import f", "analysis.b": "def g():\n    import analysis.a"},
        "import circle: analysis.a -> analysis.b -> analysis.a",
    ),
}


@pytest.mark.parametrize("case", PLANTED, ids=list(PLANTED))
def test_a_planted_violation_is_found(case):
    sources, message = PLANTED[case]
    assert message in violations(sources)


def test_the_planted_tree_without_its_violation_passes():
    sources = {"callbacks.writer": "from devinterp.store.timeline import x", "devinterp.store.timeline": ""}
    assert violations(sources) == []
