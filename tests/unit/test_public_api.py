"""The public API: ``mesh.__all__`` is sorted, every name in it imports, the patterns are
exported and imported only when used."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

import mesh
from tests.conftest import ROOT


def test_all_is_sorted_without_duplicates() -> None:
    assert mesh.__all__, "the public API is empty"
    assert mesh.__all__ == sorted(set(mesh.__all__))


def test_every_name_in_all_is_importable_from_mesh() -> None:
    star: dict[str, Any] = {}
    exec("from mesh import *", star)  # raises AttributeError for a listed name that is missing
    for name in mesh.__all__:
        exec(f"from mesh import {name}", {})

    assert sorted(k for k in star if k != "__builtins__") == sorted(mesh.__all__)


def test_every_pattern_exports_its_main_classes_and_topic_bundle() -> None:
    patterns = {"Chain", "Gather", "GatherRule", "GatherTopics", "Pipeline", "PipelineTopics",
                "Stage", "EventBus", "EventContext", "Coordinator", "DelegationTopics",
                "Specialist", "Supervisor", "SupervisorPolicy", "WorkerService",
                "WorkerTopics", "TopicBundle"}

    assert patterns <= set(mesh.__all__)
    assert all(issubclass(getattr(mesh, name), mesh.TopicBundle)
               for name in ("GatherTopics", "PipelineTopics", "DelegationTopics",
                            "WorkerTopics", "EventBus"))


def test_importing_mesh_imports_no_pattern_until_one_is_used() -> None:
    """Pass: `import mesh` (every `mesh run`) leaves the patterns unimported; the first
    use of an exported pattern imports its module."""
    probe = ("import sys, mesh\n"
             "before = sorted(m for m in sys.modules if m.startswith('mesh.patterns.'))\n"
             "from mesh import Gather\n"
             "print(before, Gather.__module__, 'mesh.patterns.gather' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "mesh.patterns.gather", "True"]


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Chane'"):
        mesh.Chane  # noqa: B018
