"""Every example (and `make demo`'s script) runs as a user would run it: its own
embedded broker, exit code 0, and the output it promises."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

EXPECTED = {  # example -> a line fragment its output must contain
    "chain_fanout.py": ("services stopped: demo-researcher exit 0, demo-writer exit 0, "
                     "demo-editor exit 0"),
    "writing.py": "review: approved after 1 round(s)",
    "chain.py": "briefing.review",
    "gather.py": "timed out",
    "delegation.py": "Report:",
    "supervision.py": "results: 30/30 jobs done",
    "pipeline.py": "extract",
    "events.py": "published",
    "llm.py": "3 tickets triaged, 1 dead-lettered",
}


def test_every_example_is_listed() -> None:
    assert sorted(EXPECTED) == sorted(p.name for p in (ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_on_its_own_embedded_broker(name: str) -> None:
    """Pass: run as the README says (`python -m examples.NAME` from the repository root,
    no PYTHONPATH: agents/ and topics/ are not installed), exit code 0 and the promised
    output; no MESH_ variable of the test session leaks in (each example starts and
    stops its own broker)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MESH_") and k != "PYTHONPATH"}
    env.update(MESH_METRICS__HOST="127.0.0.1", COLUMNS="200")
    done = subprocess.run([sys.executable, "-m", f"examples.{name.removesuffix('.py')}"],
                          cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert EXPECTED[name] in " ".join(output.split()), output[-4000:]
