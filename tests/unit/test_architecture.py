"""The dependency direction of docs/architecture.md, enforced on every module of mesh/.

Lower layers never import higher ones (a function-level import counts too), only
mesh/kafka/ talks to aiokafka, and only the CLI reads the views. A module over 500
lines must say why in its docstring.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

MESH = Path(__file__).resolve().parents[2] / "mesh"

# The layers, bottom up; a module may import its own layer and any layer below.
LAYERS: dict[str, int] = {
    "errors": 0, "config": 0,
    "topic": 1, "envelope": 1,
    "serde": 2,
    "kafka": 3,
    "agent": 4, "policy": 4, "state": 4,
    "runtime": 5,
    "resilience": 6,
    "patterns": 7,
    "llm": 8,
    "views": 9,
    "testing": 10, "cli": 10, "__init__": 10,
}
MAX_LINES = 500


def _modules() -> list[Path]:
    return sorted(MESH.rglob("*.py"))


def _unit(dotted: str) -> str:
    """The layer a dotted module name belongs to: mesh.kafka.reader -> kafka."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "__init__"


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mesh":  # from mesh import envelope: the submodule
                yield from ((node.lineno, f"mesh.{alias.name}") for alias in node.names)
            else:
                yield node.lineno, node.module


def _name(path: Path) -> str:
    return ".".join(path.relative_to(MESH.parent).with_suffix("").parts)


def test_layers_cover_every_top_level_module() -> None:
    tops = {p.stem if p.parent == MESH else p.relative_to(MESH).parts[0] for p in _modules()}
    assert tops <= set(LAYERS), f"place {sorted(tops - set(LAYERS))} in LAYERS and the doc"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(MESH)))
def test_imports_point_down(path: Path) -> None:
    me = _unit(_name(path))
    wrong = []
    for line, target in _imports(path):
        if target.split(".")[0] == "aiokafka" and me != "kafka":
            wrong.append(f"line {line}: {target} (only mesh/kafka/ imports aiokafka)")
        if target.split(".")[0] != "mesh":
            continue
        them = _unit(target)
        if them == "views" and me not in ("views", "cli"):
            wrong.append(f"line {line}: {target} (only the CLI imports views)")
        elif LAYERS[them] > LAYERS[me]:
            wrong.append(f"line {line}: {target} ({me} is below {them})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(MESH)))
def test_long_modules_say_why(path: Path) -> None:
    source = path.read_text()
    lines = source.count("\n")
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(source)) or ""
    assert f"over {MAX_LINES} lines" in doc, (
        f"{lines} lines: split it, or say in the docstring why it is over {MAX_LINES} lines")
