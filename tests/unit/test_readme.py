"""Every code block of the README runs, so the README cannot drift from the code.

* Python blocks run in order in one namespace (each builds on the ones before it), then
  every ``test_*`` coroutine they define is awaited and the shop agents they declare
  are driven through :class:`mesh.testing.InMemoryMesh`. A block whose first line names
  a file (``# topics/qa.py``) is a file of a user's project: it is written into a fresh
  project directory, where a separate Python process imports it, as ``mesh run`` would,
  and runs the tour's app.
* Shell blocks: every ``mesh`` command line is parsed by the real CLI (each subcommand,
  argument and option must exist; ``[optional]`` parts are parsed too, ``<value>``
  placeholders become values); ``make`` targets must exist in the Makefile; scripts and
  files named must exist. The commands' behaviour is tested by the CLI tests.
"""

from __future__ import annotations

import inspect
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer

try:  # typer >= 0.2x vendors click; older ones depend on it
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click import ClickException  # type: ignore[no-redef]

from mesh.cli import app as cli_app
from mesh.testing import InMemoryMesh

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FILE_LINE = re.compile(r"^# ([\w/]+\.py)\n")


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line, code) of the README's fenced blocks in ``lang``."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1) == lang]


def test_the_readme_has_python_and_shell_blocks() -> None:
    assert len(blocks("python")) >= 8 and len(blocks("sh")) >= 3


def test_python_blocks_of_a_user_project_run_as_its_files(tmp_path: Path) -> None:
    files = [(line, code) for line, code in blocks("python") if FILE_LINE.match(code)]
    assert files, "the tour shows the files of a project"
    for _, code in files:
        path = tmp_path / FILE_LINE.match(code).group(1)  # type: ignore[union-attr]
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(code)
    driver = textwrap.dedent('''
        import asyncio
        from mesh.testing import InMemoryMesh
        from agents.qa import app
        from topics.qa import Question, answers, questions

        async def main():
            async with InMemoryMesh(app) as mesh:
                await mesh.emit(questions, Question(qid="q1", text="hi"))
                await mesh.drain()
                print([a.text for a in mesh.payloads(answers)])

        asyncio.run(main())
    ''')
    done = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "['HI']"


async def test_python_blocks_run_in_order_and_their_agents_work() -> None:
    namespace: dict[str, Any] = {"__name__": "readme"}
    for line, code in blocks("python"):
        if FILE_LINE.match(code):
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
        except Exception as exc:  # pragma: no cover - the message is the report
            pytest.fail(f"README.md block at line {line} raised {type(exc).__name__}: {exc}")
    tests = [f for name, f in namespace.items()
             if name.startswith("test_") and inspect.iscoroutinefunction(f)]
    assert tests, "the testing section shows a test"
    for test in tests:
        await test()
    await _drive_the_shop(namespace)


async def _drive_the_shop(ns: dict[str, Any]) -> None:
    """The shop snippets do what their comments say."""
    Order, orders = ns["Order"], ns["orders"]
    async with InMemoryMesh([ns["count"], ns["pricer"], ns["enrich"]],
                            fast_retries=True) as mesh:
        for n in range(3):
            await mesh.emit(orders, Order(order_id=f"o{n}", sku="tea", qty=2))
        await mesh.drain()
        counted = sorted(r.ordered_so_far for r in mesh.payloads(ns["receipts"]))
        quotes = mesh.payloads(ns["quotes"])
    # enrich answers 2 per order; count keeps state per sku: 2, then 4, then 6
    assert counted == [2, 2, 2, 2, 4, 6]
    # No broker here, so the breaker (its state is a compacted topic) cannot start: the
    # primary fails for good and the fallback level answers every order, as it should.
    assert sorted(q.price for q in quotes) == [20.0, 20.0, 20.0]


def _mesh_command() -> Any:
    return typer.main.get_command(cli_app)


def _parse(argv: list[str]) -> None:
    """Parse ``argv`` with the real CLI down to the leaf command, without running it."""
    command: Any = _mesh_command()
    ctx = command.make_context("mesh", list(argv), resilient_parsing=False)
    while hasattr(command, "resolve_command"):  # a group: go down to its subcommand
        rest = [*ctx._protected_args, *ctx.args]  # noqa: SLF001 - click keeps them here
        assert rest, f"`mesh {' '.join(argv)}` names no subcommand"
        name, command, args = command.resolve_command(ctx, rest)
        assert command is not None, f"`mesh {' '.join(argv)}`: no command {name!r}"
        ctx = command.make_context(name or "", args, parent=ctx)


def _variants(line: str) -> list[str]:
    """The line with its ``[optional]`` parts, and without them."""
    without = re.sub(r"\s*\[[^\]]*\]", "", line)
    with_all = re.sub(r"\[([^\]]*)\]", r"\1", line)
    return [without] if without == with_all else [without, with_all]


def _shell_lines() -> list[tuple[int, str]]:
    found = []
    for line, code in blocks("sh"):
        for n, text in enumerate(code.splitlines()):
            if text.strip():
                found.append((line + 1 + n, text.strip()))
    return found


@pytest.mark.parametrize(("line", "text"), _shell_lines(), ids=lambda v: str(v)[:40])
def test_shell_lines_name_real_commands_options_and_files(line: int, text: str) -> None:
    for variant in _variants(text):
        for part in re.sub(r"<([\w-]+)>", r"\1", variant).split(" && "):
            _check(shlex.split(part, comments=True), line)


def _check(words: list[str], line: int) -> None:
    if not words or words[0] in ("export", "pip", "cd", "curl", "docker", "kubectl"):
        return
    if words[0] == "mesh":
        try:
            _parse(words[1:])
        except ClickException as exc:
            pytest.fail(f"README.md:{line}: `{' '.join(words)}`: {exc.format_message()}")
        return
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(words[1:]) <= set(targets), f"README.md:{line}: no make target {words[1:]}"
        return
    if words[0].endswith("python") or words[0].endswith("python3"):
        script = next((w for w in words[1:] if w.endswith(".py")), None)
        assert script is None or (ROOT / script).exists(), f"README.md:{line}: {script}"
        return
    pytest.fail(f"README.md:{line}: a shell line the README test does not know: {words}")

