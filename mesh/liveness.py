"""Watching the broker a running mesh depends on, so that losing it is loud.

aiokafka reconnects forever: an agent whose broker is gone would sit in its group
retrying, looking alive. :class:`BrokerWatch` asks the cluster for its id every
``runtime.broker_check_interval_s`` and raises :class:`~mesh.errors.BrokerLost` when

* no broker answered for ``runtime.broker_timeout_s`` (down, unreachable, hung);
* a broker answers with another cluster id than at start: a memory-only broker (the
  embedded one) restarted empty, or the cluster was recreated. The group's committed
  offsets and the topics' records are gone, so going on could skip work (a partition
  that refilled past the old position) or redo it without anyone deciding to;
* an agent's committed position is past the end of its partition's log (records the
  agent had handled are gone: a recreated topic, an unclean leader election).

The process then exits non-zero and its supervisor (systemd, Kubernetes, docker)
restarts it once the broker is back; uncommitted inputs are redelivered.

Example:
    >>> watch = BrokerWatch(settings, runners)  # doctest: +SKIP
    >>> await watch.run(stop_event)  # raises BrokerLost, or returns when stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mesh.config import MeshSettings
from mesh.errors import BrokerLost, TransportError
from mesh.transport import Admin

if TYPE_CHECKING:
    from mesh.runtime import AgentRunner

logger = logging.getLogger(__name__)


class BrokerWatch:
    """Fails the mesh when its broker is lost (see the module docstring)."""

    def __init__(self, settings: MeshSettings, runners: Sequence[AgentRunner]) -> None:
        self.settings, self.runners = settings, list(runners)
        self.cluster_id: str | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Check until ``stop`` is set; raise :class:`BrokerLost` when the broker is."""
        runtime = self.settings.runtime
        servers = self.settings.kafka.bootstrap_servers
        async with Admin(self.settings.kafka) as admin:
            self.cluster_id = await self._ask(admin)
            last_answer = time.monotonic()
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), runtime.broker_check_interval_s)
                if stop.is_set():
                    return
                try:
                    cluster = await self._ask(admin)
                except TransportError as exc:
                    silent = time.monotonic() - last_answer
                    if silent >= runtime.broker_timeout_s:
                        raise BrokerLost(
                            f"No broker at {servers} answered for {silent:.0f} s "
                            f"(last error: {exc}). Stopping instead of retrying silently; "
                            "restart the agent when the broker is back "
                            "(MESH_RUNTIME__BROKER_TIMEOUT_S sets the limit).") from exc
                    logger.warning("broker at %s not answering for %.0f s: %s", servers,
                                   silent, exc)
                    continue
                last_answer = time.monotonic()
                if cluster and self.cluster_id and cluster != self.cluster_id:
                    raise BrokerLost(
                        f"The broker at {servers} is now cluster {cluster!r}, not "
                        f"{self.cluster_id!r} as when the agents started: it restarted "
                        "empty (memory-only) or was recreated, and the committed offsets "
                        "are gone. Stopping instead of skipping or redoing work silently; "
                        "recreate the topics (mesh topics apply) and restart the agents.")
                for runner in self.runners:
                    runner.check_log_ends()

    async def _ask(self, admin: Admin) -> str | None:
        timeout = min(self.settings.runtime.broker_timeout_s, 10.0)
        try:
            async with asyncio.timeout(timeout):
                return await admin.cluster_id()
        except TimeoutError as exc:
            raise TransportError(f"no answer within {timeout:.0f} s") from exc
