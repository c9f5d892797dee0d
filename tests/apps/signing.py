"""The writer of the delegation test mesh (:mod:`tests.apps.delegation`) as its own
process, for the plan-signing tests:

    MESH_TEST_PREFIX=<prefix> MESH_SECURITY__PLAN_KEY=<key> mesh run tests.apps.signing:writer

Its key comes from the environment, like any deployed specialist's; what it ran is
what it answered on ``<prefix>.results``.
"""

from __future__ import annotations

import os

from tests.apps.delegation import build

app = build(os.environ.get("MESH_TEST_PREFIX", "signing-test"))
writer = next(s for s in app.specialists if s.name == "writer")
