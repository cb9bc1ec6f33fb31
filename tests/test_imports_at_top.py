"""Library modules import mgll's own modules at the top, where a reader sees them.

Only the command-line layer (``mgll/cli.py`` and each package's ``cli.py`` / ``*_cli.py``)
imports inside functions: it registers a command without loading torch, and loads the library
module when the command runs. Every other function-level import of ``mgll.*`` is listed in
``ALLOWED`` with the reason it must stay inside its function. ``mgll COMMAND --help`` loads no
torch for every command (the reason the command layer exists).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mgll.cli import COMMAND_MODULES

SRC = Path(__file__).resolve().parent.parent / "src"

# (path under src/mgll, a folder ending in "/"; the module imported, "*" for any) -> why that
# import stays inside its function
ALLOWED: dict[tuple[str, str], str] = {
    ("benchmark/", "*"): "being reshaped on branch bench",
    ("__init__.py", "mgll.models.factory"): "mgll.from_pretrained loads on first use, so "
    "`import mgll` stays light",
    ("training/checkpoint.py", "mgll.training.config"): "load_model migrates a pretraining "
    "run's config; fine-tuning and segmentation read checkpoints without loading the "
    "pretraining config (test_import_graph.py)",
}


def _is_command_layer(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return name == "cli.py" or name.endswith("_cli.py")


def _is_allowed(relative: str, module: str) -> bool:
    return _is_command_layer(relative) or any(
        (relative == path or (path.endswith("/") and relative.startswith(path)))
        and allowed in ("*", module)
        for path, allowed in ALLOWED
    )


def _mgll_import(node: ast.AST) -> str | None:
    """The mgll module a node imports, or None (relative imports count as mgll's)."""
    if isinstance(node, ast.ImportFrom):
        if node.level or (node.module or "").split(".")[0] == "mgll":
            return "." * node.level + (node.module or "")
    elif isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == "mgll":
                return alias.name
    return None


def function_level_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of each mgll import inside a function of ``source``."""
    found = []
    for func in ast.walk(ast.parse(source)):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(func):
                if (module := _mgll_import(node)) is not None:
                    found.append((node.lineno, module))
    return sorted(set(found))


def test_the_scan_sees_an_import_inside_a_function():
    source = "import os\nfrom mgll.io import x\ndef f():\n    from mgll.eval import task\n"
    assert function_level_imports(source) == [(4, "mgll.eval")]
    nested = "class A:\n    def f(self):\n        if 1:\n            from . import y\n"
    assert function_level_imports(nested) == [(4, ".")]
    assert function_level_imports("def f():\n    import numpy\n") == []


def test_library_modules_import_mgll_at_the_top():
    found = []
    for path in sorted((SRC / "mgll").rglob("*.py")):
        relative = path.relative_to(SRC / "mgll").as_posix()
        for line, module in function_level_imports(path.read_text(encoding="utf-8")):
            if not _is_allowed(relative, module):
                found.append(f"src/mgll/{relative}:{line}: {module}")
    assert not found, "import at the top (or add to ALLOWED, saying why):\n" + "\n".join(found)


def test_every_allow_list_entry_still_exists():
    for path, _ in ALLOWED:
        assert (SRC / "mgll" / path).exists(), f"ALLOWED names a missing path: {path}"


@pytest.mark.parametrize(
    "argv",
    [["--help"], *([c, "--help"] for c in COMMAND_MODULES)],
    ids=["mgll", *COMMAND_MODULES],
)
def test_help_loads_no_torch(argv):
    """``mgll --help`` and ``mgll COMMAND --help`` stay fast: the command layer loads no torch."""
    code = (
        "import sys\nfrom mgll.cli import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert out.stderr.strip().splitlines()[-1] == "False", out.stderr
    assert out.stdout.startswith("usage: mgll")
