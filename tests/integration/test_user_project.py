"""A user's own project: the installed `mesh` command run from a fresh directory that
holds the project's own ``topics/`` package, the way a newcomer starts.

The library installs only ``mesh``: the repository's reference ``agents/`` and ``topics/``
are not importable outside it, so a user's ``topics`` package never collides with them.
Topic discovery (``mesh topics apply``, ``emit``, ``-t``) imports the user's modules
from the working directory, as ``mesh run`` does. Every command is the venv's ``mesh``
script (not ``python -m``, which would put the working directory on the path by
itself), with no PYTHONPATH, against the session broker.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from mesh import Codec, Topic
from tests.conftest import ROOT, BrokerUnderTest
from tests.support import read_all

pytestmark = pytest.mark.broker_agnostic

MESH = str(Path(sys.executable).parent / "mesh")
TIMEOUT_S = 60.0


class Question(BaseModel):
    """Declared again, field for field, in the user's project: same Avro schema."""

    qid: str
    text: str


TOPICS_PACKAGE = '''
from pydantic import BaseModel

from mesh import Topic


class Question(BaseModel):
    """Declared again, field for field, in the user's project: same Avro schema."""

    qid: str
    text: str


questions = Topic("{prefix}.questions", Question, key="qid", partitions=2)
'''

SUBMODULE = '''
from pydantic import BaseModel

from mesh import Topic


class Answer(BaseModel):
    qid: str
    answer: str


answers = Topic("{prefix}.answers", Answer, key="qid")
'''


@pytest.fixture
def env(broker: BrokerUnderTest) -> dict[str, str]:
    """The session broker's environment as a user has it: no PYTHONPATH to the repo."""
    env = broker.env()
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture
def project(tmp_path: Path, prefix: str) -> Path:
    """A fresh project: ``topics/`` with a topic in its ``__init__`` and one in a
    submodule, and ``myapp/declarations.py`` for ``-t``."""
    (tmp_path / "topics").mkdir()
    (tmp_path / "topics" / "__init__.py").write_text(TOPICS_PACKAGE.format(prefix=prefix))
    (tmp_path / "topics" / "answers.py").write_text(SUBMODULE.format(prefix=prefix))
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "declarations.py").write_text(
        SUBMODULE.format(prefix=f"{prefix}.app"))
    return tmp_path


def _mesh(cwd: Path, env: dict[str, str], *args: str,
          stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESH, *args], cwd=cwd, env=env, input=stdin, text=True,
                          capture_output=True, timeout=TIMEOUT_S, check=False)


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return (f"mesh {' '.join(result.args[1:])} exited {result.returncode}\n--- stdout\n"
            f"{result.stdout}--- stderr\n{result.stderr}")


def _applied(stdout: str) -> set[str]:
    """The topic names `mesh topics apply` printed (``created  NAME`` / ``ok  NAME``)."""
    return {line.split()[1] for line in stdout.splitlines() if len(line.split()) >= 2}


@pytest.mark.parametrize("repo_on_path", [False, True], ids=["user", "repo-on-pythonpath"])
async def test_topics_apply_in_a_fresh_project_creates_the_users_topics_only(
        project: Path, env: dict[str, str], prefix: str, repo_on_path: bool) -> None:
    """Pass: `mesh topics apply` with no -t, run in the project, applies the topics of
    the project's topics/ package and its submodules (and the mesh's own audit topic),
    none of the repository's demo topics, even with the repository on PYTHONPATH (the
    working directory comes first). Failed when the library installed a top-level
    `topics` package: the bundled one was applied instead, exit 0."""
    if repo_on_path:
        env = {**env, "PYTHONPATH": str(ROOT)}
    result = _mesh(project, env, "topics", "apply")

    assert result.returncode == 0, _explain(result)
    applied = _applied(result.stdout)
    assert f"{prefix}.questions" in applied and f"{prefix}.answers" in applied
    assert {name for name in applied if not name.startswith(prefix)} <= {"mesh.audit"}, (
        _explain(result))


async def test_emit_to_a_users_topic_produces_the_event(
        project: Path, env: dict[str, str], broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: after `mesh topics apply`, `mesh emit PREFIX.questions JSON` in the project
    exits 0 and the topic holds that event, which decodes with the same model defined
    here (one Avro schema for one model, wherever it is declared)."""
    assert (applied := _mesh(project, env, "topics", "apply")).returncode == 0, (
        _explain(applied))
    topic = f"{prefix}.questions"

    result = _mesh(project, env, "emit", topic, '{"qid": "q1", "text": "why kafka?"}')

    assert result.returncode == 0, _explain(result)
    [record] = await read_all(broker.settings(), [topic])
    assert record.key == b"q1"
    decoded = await Codec().decode(Topic(topic, Question, key="qid"), record.value)
    assert decoded == Question(qid="q1", text="why kafka?")


async def test_dash_t_names_a_users_module_found_from_the_working_directory(
        project: Path, env: dict[str, str], prefix: str) -> None:
    """Pass: `-t myapp.declarations` imports the project's module from the working
    directory, with no PYTHONPATH, and applies exactly its topics."""
    result = _mesh(project, env, "topics", "apply", "-t", "myapp.declarations")

    assert result.returncode == 0, _explain(result)
    assert _applied(result.stdout) == {f"{prefix}.app.answers", f"{prefix}.app.answers.dlq",
                                       "mesh.audit"}, _explain(result)


async def test_a_directory_without_topics_fails_naming_the_module_and_the_fix(
        tmp_path: Path, env: dict[str, str]) -> None:
    """Pass: in a directory with no topics/ package, `mesh topics apply` exits 1 with an
    error naming the module `topics` and `-t`, and applies nothing (no demo topics)."""
    result = _mesh(tmp_path, env, "topics", "apply")

    assert result.returncode == 1, _explain(result)
    message = " ".join(result.stderr.split())
    assert "'topics'" in message and "-t/--topics" in message, _explain(result)
    assert result.stdout == ""


def test_the_installed_library_holds_mesh_and_no_topics_or_agents_package(
        tmp_path: Path) -> None:
    """Pass: outside the repository, with no PYTHONPATH, `import mesh` works and
    `import topics` / `import agents` fail: the distribution installs only `mesh`."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    found = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print([u.find_spec(n) is not "
         "None for n in ('mesh', 'topics', 'agents')])"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
        check=False)

    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[True, False, False]"
