"""Puts the repository root on ``sys.path`` for ``python examples/NAME.py``.

The examples use the repository's reference mesh (``agents/``, ``topics/``), which is
not part of the installed library: ``pip install`` installs only ``mesh``, so a user's
own ``topics`` package never collides with it. Run as a script, an example sees its own
directory on the path, not the repository root; importing this module adds the root.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
