"""The house rules of the package layout (README, "Architecture"): each room imports only
rooms below it, there are no import cycles, and the cache is a pure format library."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ldpipe"

# room -> the rooms it may import (besides itself).  Layers, bottom up:
#   root | config | metrics, data, models | cache | distill | engine | chain | cli
# ``root``: ldpipe/__init__.py (the version) and the shared leaf modules beside it, which
# import nothing from ldpipe but the version
ROOT_MODULES = {"errors", "files", "provenance"}
BELOW_CACHE = {"root", "config", "data", "models", "metrics"}
ALLOWED = {
    "root": set(),
    "config": {"root"},
    "metrics": set(),  # standalone: nothing from ldpipe at all
    "data": {"root", "config"},
    "models": {"root", "config"},
    "cache": {"root", "config", "models"},
    "distill": BELOW_CACHE | {"cache"},  # target sources, criteria: below the runners
    "engine": BELOW_CACHE | {"cache", "distill"},
    "chain": BELOW_CACHE | {"cache", "engine", "distill"},
    "cli": BELOW_CACHE | {"cache", "engine", "distill", "chain"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ROOT_MODULES:
        return "root"
    room = parts[1]
    return {"__main__": "cli"}.get(room, room)


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports() -> dict[str, set[str]]:
    """ldpipe module -> the ldpipe modules it imports (anywhere but under TYPE_CHECKING)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        name = _module_name(path)
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        out: set[str] = set()
        for node in ast.walk(tree):
            if _in_type_checking(node, parents):
                continue
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.split(".")[0] == "ldpipe"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "ldpipe":
                    continue
                subs = [f"{target}.{a.name}" for a in node.names]  # ``from . import codec``
                subs = [s for s in subs if (PKG.parent / Path(*s.split("."))).with_suffix(".py").exists()]
                out |= set(subs) if len(subs) == len(node.names) else {target, *subs}
        graph[name] = out
    return graph


def test_graph_is_read():
    graph = _imports()
    assert "ldpipe.cache.store" in graph and "ldpipe.cli" in graph
    assert "ldpipe.cache.codec" in graph["ldpipe.cache.store"]  # ``from . import codec as C``
    assert "ldpipe.distill.criterion" in graph["ldpipe.engine.train"]


def test_each_room_imports_only_rooms_below_it():
    bad = []
    for module, targets in _imports().items():
        room = _room(module)
        for target in targets:
            other = _room(target)
            if other != room and other not in ALLOWED[room]:
                bad.append(f"{module} ({room}) imports {target} ({other})")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_cache_is_a_pure_format_library():
    for module, targets in _imports().items():
        if _room(module) == "cache":
            assert not {t for t in targets if _room(t) in ("engine", "distill", "chain", "cli")}, module


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_modules_stay_small():
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert not {m: n for m, n in sizes.items() if n > 400}, sizes


def test_benchmark_files_stay_small():
    bench = PKG.parent / "benchmarks"
    sizes = {str(p.relative_to(bench)): len(p.read_text().splitlines()) for p in bench.rglob("*.py")}
    assert sizes and not {m: n for m, n in sizes.items() if n > 400}, sizes


def test_distillation_is_a_criterion_not_a_hook():
    """The loop reaches distillation only through the criterion it is given: no ``Hook``
    class (the old six-method extension point) anywhere, and the training loop imports no
    teacher source."""
    hooks = [f"{_module_name(p)}.{node.name}" for p in PKG.rglob("*.py")
             for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ClassDef)
             and node.name == "Hook"]
    assert not hooks, hooks
    graph = _imports()
    assert not {t for t in graph["ldpipe.engine.train"] | graph["ldpipe.engine.step"]
                if t.startswith(("ldpipe.distill.cached", "ldpipe.distill.online"))}
    assert {t for t in graph["ldpipe.engine.student"] if t.startswith("ldpipe.distill")}
