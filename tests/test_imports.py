"""The import graph of ltm, launcher, data_prep and bench runs one way.

Built with `ast` from the source (no module is imported): every `import` and `from ... import` counts, at module
level or inside a function, because a function-level import is still a dependency, only a later one. Two checks:
- no cycle between modules;
- the layers, lowest first: data_prep -> ltm -> launcher -> bench. A package may import the ones below it, never
  the ones above (data_prep is the shard writer both sides share, launcher submits ltm's jobs, bench measures all);
- inside ltm, its rooms in the same way (`LTM_ROOMS`): the data flow data -> train -> checkpoints -> eval, with the
  users of a trained model (deploy, sweep, reproduce) above it.

bench's scripts run with bench/ on sys.path (`python bench/gpu.py`), so there a bare `import step` is bench/step.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_prep", "ltm", "launcher", "bench")  # lowest layer first
LAYER = {p: i for i, p in enumerate(PACKAGES)}
# ltm's rooms, lowest first; rooms on one line may not import each other (train and eval are two uses of the same
# checkpoints). A module directly in ltm/ is its own room on the ground floor, except the local launcher below it
# (it imports nothing of ltm, so the process that only starts ranks stays light) and the CLI on top.
LTM_ROOMS: tuple[tuple[str, ...], ...] = (
    ("ltm.launch",),
    ("ltm", "ltm.config", "ltm.distributed", "ltm.env", "ltm.files"),
    ("ltm.models", "ltm.data"),
    ("ltm.checkpoint",),
    ("ltm.train", "ltm.eval"),
    ("ltm.deploy", "ltm.sweep"),
    ("ltm.reproduce",),
    ("ltm.cli",),
)
MAX_TOP_MODULES = 8  # modules directly in ltm/: the CLI, config, distributed environment, local launches, env
# check, file helpers

# Known upward imports that are being moved right now, each (importer, imported) module names; empty when no move
# is under way. The last one, ltm.reproduce -> launcher, went when the reproduce plans' SLURM submission moved into
# launcher/reproduce.py (issue 29).
PENDING_MOVES: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[module_name(path)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies in (`ltm.data.shards.video_id` -> `ltm.data.shards`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The known modules `module` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        target = _resolve(name, modules)
        if target is None and module.startswith("bench."):  # bench/ on sys.path: `import step`
            target = _resolve(f"bench.{name}", modules)
        if target is not None and target != module:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:  # `from pkg import submodule` depends on the submodule itself
                add(f"{base}.{alias.name}")
    return found


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Depth-first search with colours."""
    colour: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def _pending(importer: str, imported: str) -> bool:
    return any((importer == a or importer.startswith(a + ".")) and (imported == b or imported.startswith(b + "."))
               for a, b in PENDING_MOVES)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]] and not _pending(m, t))


def ltm_room(module: str) -> str | None:
    """`ltm.eval.report.html` -> `ltm.eval`; a module directly in ltm/ is its own room; None outside ltm."""
    parts = module.split(".")
    return None if parts[0] != "ltm" else ".".join(parts[:2])


def ltm_upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from one of ltm's rooms into a room on its own floor or above."""
    floor = {room: i for i, rooms in enumerate(LTM_ROOMS) for room in rooms}
    bad = []
    for m, targets in graph.items():
        a = ltm_room(m)
        for t in targets:
            b = ltm_room(t)
            if a is None or b is None or a == b:
                continue
            if a not in floor or b not in floor:
                bad.append((m, t))  # a new room must be given its floor
            elif floor[b] >= floor[a]:
                bad.append((m, t))
    return sorted(bad)


def test_graph_sees_the_packages() -> None:
    graph = import_graph()
    assert {"ltm.train.trainer", "ltm.data", "data_prep.shards", "launcher.submit", "bench.gpu"} <= set(graph)
    assert "ltm.config" in graph["ltm.train.trainer"]  # module-level import
    assert "ltm.data.dali" in graph["ltm.data"]  # function-level import


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_against_the_layers() -> None:
    bad = upward_imports(import_graph())
    assert not bad, ("imports against the layers (data_prep -> ltm -> launcher -> bench):\n"
                     + "\n".join(f"  {m} imports {t}" for m, t in bad))


def test_pending_moves_are_still_pending() -> None:
    """An allow-list entry whose import is gone is removed, so the list never hides a new one."""
    graph = import_graph()
    for a, b in PENDING_MOVES:
        assert any((m == a or m.startswith(a + ".")) and any(t == b or t.startswith(b + ".") for t in ts)
                   for m, ts in graph.items()), f"PENDING_MOVES lists {a} -> {b}, which no longer exists"


def test_checks_catch_a_planted_cycle_and_upward_import() -> None:
    graph = {"ltm.a": {"ltm.b"}, "ltm.b": {"ltm.c"}, "ltm.c": {"ltm.a"}, "data_prep.x": {"bench.y"}, "bench.y": set()}
    assert find_cycle(graph) == ["ltm.a", "ltm.b", "ltm.c", "ltm.a"]
    assert upward_imports(graph) == [("data_prep.x", "bench.y")]


def test_no_import_against_ltms_rooms() -> None:
    bad = ltm_upward_imports(import_graph())
    assert not bad, ("imports against ltm's rooms (LTM_ROOMS, lowest first: "
                     + " -> ".join("/".join(r) for r in LTM_ROOMS) + "):\n"
                     + "\n".join(f"  {m} imports {t}" for m, t in bad))


def test_rooms_check_catches_a_planted_upward_import() -> None:
    graph = {"ltm.models.backbone": {"ltm.train.trainer"}, "ltm.train.trainer": {"ltm.eval.metrics"},
             "ltm.eval.report.html": {"ltm.eval.metrics", "ltm.files"}, "ltm.newroom.x": {"ltm.config"}}
    assert ltm_upward_imports(graph) == [("ltm.models.backbone", "ltm.train.trainer"),
                                         ("ltm.newroom.x", "ltm.config"), ("ltm.train.trainer", "ltm.eval.metrics")]


def test_ltm_top_level_holds_few_modules() -> None:
    """New modules land in the room of their concern, not beside the CLI."""
    top = sorted(p.name for p in (ROOT / "ltm").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_MODULES, f"{len(top)} modules directly in ltm/: {top}"
