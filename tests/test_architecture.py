"""The package's import graph, read from the source (module-level AND function-local imports): no import
circles, no import upward across the layers below, and nothing imports the command-line entry point."""

import ast
from pathlib import Path

from conftest import ROOT

# lower layers never import higher ones (same layer: allowed, circles are checked separately)
LAYERS = [
    {"errors", "distributed", "paths", "config_files", "memory", "optimizers", "stats"},
    {"losses", "segmenters", "assets", "tracking"},
    {"models", "cache"},
    {"data"},
    {"sampling", "scorers", "export"},
    {"evaluation", "modules"},
    {"rewards", "callbacks"},
    {"strategies", "lightning_cli"},
    {"train", "segments"},
    {"study"},
    {"cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in (root / "amrlhf").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = _modules(root)

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                target = owner(name) if name.startswith("amrlhf") else None
                if target and target != mod and not (mod.startswith(target + ".") and name == target):
                    graph[mod].add(target)
    return graph


def _top(mod: str) -> str:
    return mod.split(".")[1] if "." in mod else mod


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _without_own_package(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exporting its submodules is not a circle through the package."""
    return {m: {t for t in ts if t != m.rpartition(".")[0]} for m, ts in graph.items()}


def test_no_import_circles_even_through_function_local_imports():
    assert _circles(_without_own_package(_graph())) == []


def test_no_upward_imports_across_layers():
    graph = _graph()
    unknown = sorted({_top(m) for m in graph} - set(RANK) - {"amrlhf"})
    assert not unknown, f"place these in LAYERS: {unknown}"
    upward = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                    if m != "amrlhf" and t != "amrlhf" and RANK[_top(t)] > RANK[_top(m)])
    assert upward == []


def test_nothing_imports_the_command_line():
    graph = _graph()
    assert sorted(m for m, ts in graph.items() if "amrlhf.cli" in ts) == ["amrlhf.__main__"]


def test_the_check_finds_a_circle_hidden_in_a_function(tmp_path):
    """What the checks above would have said of the layout before: `paths` imported `assets` inside a
    function while `assets` imports `paths` at the top."""
    pkg = tmp_path / "amrlhf"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "paths.py").write_text("def resolve():\n    from amrlhf import assets\n    return assets\n")
    (pkg / "assets.py").write_text("from amrlhf.paths import resolve\n")
    graph = _graph(tmp_path)
    assert graph["amrlhf.paths"] == {"amrlhf.assets"}
    assert _circles(_without_own_package(graph)) == [["amrlhf.assets", "amrlhf.paths"]]

