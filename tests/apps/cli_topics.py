"""Topics for the CLI tests, named from ``MESH_TEST_PREFIX``.

``mesh emit/tap/topics apply --topics tests.apps.cli_topics`` discover the topics
declared at module level here: the chain's ``Item`` topics (``<prefix>.in``,
``<prefix>.a`` ...) as :func:`tests.apps.stages.build` names them, so the CLI and
``mesh run tests.apps.stages:...`` agree on names, plus one topic with a config.
"""

from __future__ import annotations

import os

from mesh import Topic
from tests.apps.stages import Item, build

PREFIX = os.environ.get("MESH_TEST_PREFIX", "cli")
_chain = build(PREFIX).topics

items_in = _chain[f"{PREFIX}.in"]
items_a = _chain[f"{PREFIX}.a"]
items_b = _chain[f"{PREFIX}.b"]
items_out = _chain[f"{PREFIX}.out"]
items_fan1 = _chain[f"{PREFIX}.fan1"]
items_fan2 = _chain[f"{PREFIX}.fan2"]
# A topic with a declared config, for drift reports.
retained = Topic(f"{PREFIX}.retained", Item, key="key", partitions=2, retention_ms=3_600_000)
