"""The runtime package's shape: no import cycle, stages that never reach the supervisor or the link, a config
schema that imports no domain module, and no import of ``training/``.

Imports are read from the source (``ast``), so those under ``TYPE_CHECKING`` and inside functions count
as much as module-level ones: a cycle hidden in a function is still a cycle for the reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"

MAX_LINES = 700
# What agent/config.py may import of the agent: leaf helpers that import nothing of the agent but errors.
CONFIG_MAY_IMPORT = {"agent.errors", "agent.topics", "agent.template", "agent.payloads", "agent.paths"}

# What a stage may import besides its own helpers: the records, the config, the errors, the callables it
# is handed (ports), topic names, log throttling, the queue type, counters and the atomic file writer.
COMMON = {"agent", "agent.messages", "agent.config", "agent.errors", "agent.ports", "agent.topics",
          "agent.logutil", "agent.queues", "agent.counts", "agent.atomic_file"}
STAGE_HELPERS: dict[str, set[str]] = {
    "agent.voice": {"agent.audio", "agent.features", "agent.kws", "agent.recognizer", "agent.adaptation",
                    "agent.sequence", "agent.arbitration", "agent.paths", "agent.capture",
                    "agent.intent_payloads"},
    "agent.arbitration": set(),
    "agent.anomaly.stage": {"agent.anomaly.streams", "agent.anomaly.group"},
    "agent.anomaly.streams": {"agent.anomaly.detector", "agent.anomaly.group"},
    "agent.anomaly.group": {"agent.anomaly.detector"},
    "agent.anomaly.detector": set(),
    "agent.telemetry_stage": {"agent.telemetry"},
    "agent.homeassistant": {"agent.discovery", "agent.state", "agent.actions"},
    "agent.dispatch": {"agent.actions"},
}
# Never reachable from a stage, directly or through its helpers.
SUPERVISOR_SIDE = {"agent.app", "agent.wiring", "agent.mqtt_link", "agent.outbox", "agent.sdnotify",
                   "agent.cli", "agent.validate", "agent.health"}


def module_name(path: Path) -> str:
    parts = path.relative_to(AGENT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(AGENT.rglob("*.py"))}


def imported_names(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, wherever the import statement is. ``from m import n``
    gives both ``m`` and ``m.n``, since ``n`` may be a submodule."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every ``agent`` module ``path`` imports (``from agent import voice`` imports the submodule)."""
    return imported_names(path) & known


def import_graph() -> dict[str, set[str]]:
    known = modules()
    names = set(known)
    return {name: imports_of(path, names) - {name} for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_import_graph_is_read_from_every_statement() -> None:
    graph = import_graph()
    assert "agent.app" in graph["agent.wiring"]
    assert "agent.voice" in graph["agent.wiring"]  # imported inside a function
    assert "agent.adaptation" in graph["agent.voice"]  # imported under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]


def test_no_import_cycle_in_the_runtime_package() -> None:
    found = [sorted(c) for c in cycles(import_graph())]
    assert found == [], f"import cycles in agent/: {found}"


def test_stages_import_only_records_config_errors_and_their_own_helpers() -> None:
    graph = import_graph()
    for stage, helpers in STAGE_HELPERS.items():
        extra = graph[stage] - COMMON - helpers
        assert extra == set(), f"{stage} imports {sorted(extra)}"


def test_no_stage_reaches_the_supervisor_or_the_link() -> None:
    graph = import_graph()
    for stage in STAGE_HELPERS:
        reached = reachable(graph, stage) & SUPERVISOR_SIDE
        assert reached == set(), f"{stage} reaches {sorted(reached)}"


def test_stages_do_not_import_each_other() -> None:
    graph = import_graph()
    voice_side = {"agent.voice", "agent.arbitration"}
    for stage in STAGE_HELPERS:
        others = {s for s in STAGE_HELPERS if s.split(".")[:2] != stage.split(".")[:2]}
        if stage in voice_side:
            others -= voice_side
        crossing = graph[stage] & others
        assert crossing == set(), f"{stage} imports the stage module(s) {sorted(crossing)}"


def test_no_runtime_module_is_over_700_lines() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_the_config_schema_imports_no_domain_module() -> None:
    graph = import_graph()
    assert graph["agent.config"] - {"agent"} <= CONFIG_MAY_IMPORT
    for helper in CONFIG_MAY_IMPORT:
        assert graph[helper] - {"agent"} <= {"agent.errors"}, f"{helper} is no leaf: {sorted(graph[helper])}"


def test_the_runtime_never_imports_training() -> None:
    for path in AGENT.rglob("*.py"):
        assert "training" not in {name.split(".")[0] for name in imported_names(path)}, path
