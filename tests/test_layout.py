"""The repository's floor plan, checked from the code's own imports (ast, nothing is imported).

Each room sits on a floor; an import may point down or sideways, never up, and the graph has no cycle. A new file
must be given a floor here, so the plan and the code cannot drift apart silently.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FLOORS = {
    0: ["kernels", "common", "viz"],
    1: ["formats", "vlm"],
    2: ["data", "model", "eval", "detector_ap", "cache", "runs"],
    3: ["trainer", "world"],
    4: ["train_teacher", "train_student", "infer"],
    5: ["bench", "demo", "ablation"],
}
FLOOR = {room: f for f, rooms in FLOORS.items() for room in rooms}
BUDGET = {   # issue 20's ceilings, in lines
    "model.py": 800, "vlm.py": 400, "formats.py": 950, "eval.py": 1050, "detector_ap.py": 280,
    "trainer.py": 850, "runs.py": 400, "cache.py": 280, "train_teacher.py": 450, "train_student.py": 450,
    "infer.py": 800, "common.py": 500, "data.py": 900, "README.md": 300,
}


def _sources():
    """path -> (room, module name) for every project file outside tests/."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".git") or rel.parts[0].startswith("."):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out[path] = (rel.parts[0].removesuffix(".py"), module)
    return out


def _imports(path, module):
    """The project modules one file imports (absolute names), top-level or not."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:                      # relative: resolve against the package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _graph():
    src = _sources()
    modules = {module: room for room, module in src.values()}
    graph = {}
    for path, (room, module) in src.items():
        graph[module] = {m for m in _imports(path, module) if m in modules and m != module}
    return graph, modules


def test_every_room_has_a_floor():
    rooms = {room for room, _ in _sources().values()}
    assert rooms - set(FLOOR) == set(), "give each new file a floor in tests/test_layout.py"


def test_no_import_points_up():
    graph, modules = _graph()
    up = [(a, b) for a, deps in graph.items() for b in deps
          if FLOOR[modules[b]] > FLOOR[modules[a]]]
    assert up == []


def test_no_import_cycle():
    graph, _ = _graph()
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_private_name_crosses_files():
    src = _sources()
    crossing = []
    for path, (_, module) in src.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level:
                crossing += [f"{module} <- {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossing == []


def test_line_budgets():
    over = {name: n for name, limit in BUDGET.items()
            if (n := len((ROOT / name).read_text().splitlines())) > limit}
    assert over == {}


def test_checker_sees_a_planted_cycle(tmp_path, monkeypatch):
    """The cycle search finds a cycle that is there (so the two tests above can fail)."""
    a, b = tmp_path / "data.py", tmp_path / "eval.py"
    a.write_text("import eval\n")
    b.write_text("from data import X\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph, _ = _graph()
    assert graph == {"data": {"eval"}, "eval": {"data"}}
