"""Every example (and `make demo`'s script) runs as a user would run it: its own
embedded broker, exit code 0, and the output it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agents.document import code_blocks, count_words, sections
from tests.conftest import ROOT

EXPECTED = {  # example -> a line fragment its output must contain
    "chain_fanout.py": ("services stopped: demo-researcher exit 0, demo-writer exit 0, "
                     "demo-editor exit 0"),
    "writing.py": "review: approved after 1 round(s)",
    "chain.py": "briefing.review",
    "gather.py": "timed out",
    "delegation.py": "workflow succeeded:",
    "supervision.py": "results: 30/30 jobs done",
    "pipeline.py": "extract",
    "events.py": "published",
    "llm.py": "3 tickets triaged, 1 dead-lettered",
}


def test_every_example_is_listed() -> None:
    assert sorted(EXPECTED) == sorted(p.name for p in (ROOT / "examples").glob("*.py"))


def run_example(name: str, *args: str) -> str:
    """`python -m examples.NAME ARGS` as the README says (from the repository root, no
    PYTHONPATH: agents/ and topics/ are not installed; no MESH_ variable of the test
    session leaks in: each example starts and stops its own broker): exit code 0 and
    the promised output; its output, whitespace collapsed."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MESH_") and k != "PYTHONPATH"}
    env.update(MESH_METRICS__HOST="127.0.0.1", COLUMNS="200")
    done = subprocess.run([sys.executable, "-m", f"examples.{name.removesuffix('.py')}",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert EXPECTED[name] in " ".join(output.split()), output[-4000:]
    return " ".join(output.split())


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"delegation.py"}))
def test_example_runs_on_its_own_embedded_broker(name: str) -> None:
    """Pass: exit code 0 and the promised output (see run_example)."""
    run_example(name)


def test_delegation_hosts_the_reference_mesh_and_writes_what_was_asked(
        tmp_path: Path) -> None:
    """Pass: the example runs every agent of agents/ in its one process (coordinator
    and the five specialists) and its request (800 words, a code sample, for
    developers) succeeds: the document it writes is within 10 % of 800 words, has
    sections and references, and a Python code block."""
    output = run_example("delegation.py", str(tmp_path))

    assert ("in this process: coordinator, researcher, analyst, coder, writer, reviewer"
            in output)
    assert "review approved after" in output
    written = re.search(r"document written to (\S+\.md)", output)
    assert written is not None, output
    path = Path(written[1])
    assert path.parent == tmp_path
    doc = path.read_text(encoding="utf-8")
    assert 720 <= count_words(doc) <= 880
    assert f"{count_words(doc)} words (asked 800 +-10 %)" in output
    assert len([s for s in sections(doc) if s != "References"]) >= 3
    assert "References" in sections(doc)
    assert "python" in [block.language for block in code_blocks(doc)]
