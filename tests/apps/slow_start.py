"""stage1 of :mod:`tests.apps.stages` behind an import that takes 2 s, as loading a large
model would: for stopping a replica that is still starting."""

from __future__ import annotations

import time

from tests.apps.stages import stage1

time.sleep(2)  # the slow import under test
agent = stage1
