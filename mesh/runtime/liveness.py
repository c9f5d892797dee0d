"""Watching the broker a running mesh depends on, so that losing it is loud.

aiokafka reconnects forever: an agent whose broker is gone would sit in its group
retrying, looking alive. :class:`BrokerWatch` asks the cluster for its id every
``runtime.broker_check_interval_s`` and raises :class:`~mesh.errors.BrokerLost` when

* no broker of the cluster answered for ``runtime.broker_timeout_s`` (down,
  unreachable, hung). Each check asks the brokers one after another until one answers,
  so a cluster failing over (one broker killed or restarting, leaders moving) is not a
  lost cluster: the others answer;
* a broker answers with another cluster id than at start: a memory-only broker (the
  embedded one) restarted empty, or the cluster was recreated. The group's committed
  offsets and the topics' records are gone, so going on could skip work (a partition
  that refilled past the old position) or redo it without anyone deciding to;
* an agent's handled position stays past the end of its partition's log for
  ``runtime.broker_timeout_s`` (records the agent had handled are gone: a recreated
  topic, an unclean leader election). Only a lasting gap counts: right after a leader
  change the new leader may report a high watermark below the old one until its
  followers have fetched, which is a cluster failing over, not records lost.

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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mesh.config import MeshSettings
from mesh.errors import BrokerLost, TransportError
from mesh.kafka.admin import Admin

if TYPE_CHECKING:
    from mesh.runtime.runner import AgentRunner

logger = logging.getLogger(__name__)


class Lasting:
    """Whether a condition has held, check after check, for ``limit`` seconds.

    Example:
        >>> gap = Lasting(30.0, clock=iter([0.0, 10.0, 31.0]).__next__)
        >>> gap.seen(), gap.seen(), gap.seen()
        (False, False, True)
    """

    def __init__(self, limit: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self._clock = limit, clock
        self.since: float | None = None

    def seen(self) -> bool:
        """The condition holds now: True once it has held for ``limit`` seconds."""
        now = self._clock()
        if self.since is None:
            self.since = now
        return now - self.since >= self.limit

    def cleared(self) -> None:
        """The condition does not hold now: start over."""
        self.since = None

    def held_for(self) -> float:
        """Seconds the condition has held (0 when it does not)."""
        return 0.0 if self.since is None else self._clock() - self.since


class BrokerWatch:
    """Fails the mesh when its broker is lost (see the module docstring)."""

    def __init__(self, settings: MeshSettings, runners: Sequence[AgentRunner]) -> None:
        self.settings, self.runners = settings, list(runners)
        self.cluster_id: str | None = None
        limit = settings.runtime.broker_timeout_s
        self._silent = Lasting(limit)
        self._behind = Lasting(limit)

    async def run(self, stop: asyncio.Event) -> None:
        """Check until ``stop`` is set; raise :class:`BrokerLost` when the broker is."""
        runtime = self.settings.runtime
        async with Admin(self.settings.kafka) as admin:
            self.cluster_id = await self._ask(admin)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), runtime.broker_check_interval_s)
                if stop.is_set():
                    return
                await self.check(admin)

    async def check(self, admin: Admin) -> None:
        """One check: the cluster answers, as itself, with every log past what the agents
        handled (or not for less than ``broker_timeout_s``)."""
        servers = self.settings.kafka.bootstrap_servers
        try:
            cluster = await self._ask(admin)
        except TransportError as exc:
            if self._silent.seen():
                raise BrokerLost(
                    f"No broker at {servers} answered for {self._silent.held_for():.0f} s "
                    f"(last error: {exc}). Stopping instead of retrying silently; "
                    "restart the agent when the broker is back "
                    "(MESH_RUNTIME__BROKER_TIMEOUT_S sets the limit).") from exc
            logger.warning("no broker at %s answering for %.0f s: %s", servers,
                           self._silent.held_for(), exc)
            return
        self._silent.cleared()
        if cluster and self.cluster_id and cluster != self.cluster_id:
            raise BrokerLost(
                f"The broker at {servers} is now cluster {cluster!r}, not "
                f"{self.cluster_id!r} as when the agents started: it restarted "
                "empty (memory-only) or was recreated, and the committed offsets "
                "are gone. Stopping instead of skipping or redoing work silently; "
                "recreate the topics (mesh topics apply) and restart the agents.")
        self._check_log_ends()

    def _check_log_ends(self) -> None:
        try:
            for runner in self.runners:
                runner.check_log_ends()
        except BrokerLost as exc:
            if self._behind.seen():
                raise BrokerLost(f"{exc} (for {self._behind.held_for():.0f} s)") from None
            logger.warning("%s Waiting up to %.0f s for it to pass (a leader change).", exc,
                           self._behind.limit)
            return
        self._behind.cleared()

    async def _ask(self, admin: Admin) -> str | None:
        """The cluster id from the first broker that answers: each attempt goes to
        another known broker (at random), all within one bound."""
        timeout = min(self.settings.runtime.broker_timeout_s, 10.0)
        attempts = max(1, len((self.settings.kafka.bootstrap_servers or "").split(",")))
        last: TransportError | None = None
        try:
            async with asyncio.timeout(timeout):
                for _ in range(attempts + 1):
                    try:
                        return await admin.cluster_id()
                    except TransportError as exc:
                        last = exc
        except TimeoutError as exc:
            raise TransportError(f"no answer within {timeout:.0f} s") from exc
        assert last is not None
        raise last
