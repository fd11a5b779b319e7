"""The package's layout shows the pipeline: every import of convlad by convlad (at module level or
inside a function) runs down the rooms of docs/library.md, never back up, and no module imports
itself round a cycle. Read from the source, so a new module is checked as soon as it exists."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "convlad"

# docs/library.md's rooms, top to bottom: a module may import from its own room and the rooms above
ROOMS = [
    ("basics", ["progress", "storage", "runtime"]),
    ("pixels", ["images", "views", "backbones", "functional", "extract", "cache"]),
    ("the descriptor", ["encoding", "verify", "local_codec", "local_whitening", "pairs", "second_look", "whitening",
                        "pipeline", "reference"]),
    ("index", ["index"]),
    ("the search", ["search", "explain", "groups"]),
    ("serving", ["serving"]),
    ("study", ["study"]),
    ("the command line", ["cli_common", "cli_study", "cli", "__main__", "__init__"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """Each module's imports of other convlad modules (dotted, under convlad)."""
    mods = {module_name(p): p for p in SRC.rglob("*.py")}
    out = {}
    for name, path in mods.items():
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        got = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            target = [*base, *(node.module.split(".") if node.module else [])]
            for alias in node.names:  # `from . import x` names a module; `from .m import f` a member
                full = ".".join([*target, alias.name])
                got.add(full if full in mods else ".".join(target))
        out[name] = {g for g in got if g and g != name}
    return out


def room_of(module: str) -> int:
    head = module.split(".")[0]
    for i, (_, members) in enumerate(ROOMS):
        if head in members:
            return i
    raise AssertionError(f"{module}: in no room of docs/library.md's layout (tests/test_layout.py's ROOMS)")


def test_every_import_runs_down_the_rooms():
    up = [(m, t) for m, ts in imports().items() for t in ts
          if m != "__init__" and room_of(t) > room_of(m)]  # the package's lazy public names are its front door
    assert not up, "imports that run back up: " + ", ".join(f"{m} → {t}" for m, t in up)


def test_no_import_cycles():
    graph = imports()
    graph.pop("__init__", None)
    seen, path, cycles = set(), [], []

    def visit(m):
        if m in path:
            cycles.append(path[path.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if t in graph and not m.startswith(t + "."):  # a module inside a package it belongs to
                visit(t)
        path.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


@pytest.mark.parametrize("public", ["ConvVLAD", "Config", "VLAD", "PCAWhitening", "IndexStore"])
def test_public_imports_keep_working(public):
    import convlad

    assert getattr(convlad, public).__name__ == public
