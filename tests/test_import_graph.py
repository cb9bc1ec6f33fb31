"""The package's import graph has no circle, counting imports inside functions too (an import
moved into a function hides a circle from Python but not from a reader)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _graph() -> dict[str, set[str]]:
    modules = {}
    for path in (SRC / "mgll").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                # a package and its own modules import each other by design (re-exports)
                related = target.startswith(name + ".") or name.startswith(target + ".")
                if target in modules and target != name and not related:
                    graph[name].add(target)
    return graph


def _find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_finder_sees_a_circle():
    assert _find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    circle = _find_circle(_graph())
    assert circle is None, " -> ".join(circle or [])


def test_every_text_tower_type_and_pooling_a_config_accepts_has_its_builder():
    from mgll.models.config import POOLING_NAMES, TEXT_TOWER_TYPES
    from mgll.models.text_towers import POOLINGS, TEXT_TOWER_BUILDERS

    assert sorted(TEXT_TOWER_BUILDERS) == sorted(TEXT_TOWER_TYPES)
    assert sorted(POOLINGS) == sorted(POOLING_NAMES)


def test_fine_tuning_and_segmentation_load_neither_the_trainer_nor_the_pretraining_config():
    """They read their configs through mgll.schema, and mgll.training's own names load on first
    use: importing a training module does not load the trainer (nor open_clip through it)."""
    code = (
        "import sys, mgll.eval.finetune, mgll.segmentation.run, mgll.training.epochs; "
        "print(sorted(m for m in ('mgll.training.trainer', 'mgll.training.config') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    from mgll.training import RunConfig, train  # the names themselves still load

    assert callable(train) and RunConfig.__name__ == "RunConfig"
