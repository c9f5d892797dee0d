"""The half-open probe budget of a circuit breaker, shared by replicas through Kafka's log order.

A half-open :class:`~mesh.resilience.breaker.CircuitBreaker` lets at most
``half_open_probes`` probe calls through. :class:`ProbeBudget` decides which calls are
probes: in memory for a local breaker, through *claims* in the breaker topic for a shared
one (the breaker writes the records; the budget counts them and decides).

Shared probe budget, from Kafka's log order. A half-open period is an *epoch*, named by
the version of its half-open record. A replica that wants a probe produces a *claim*
(key ``<breaker>/probe/<epoch>/<replica>/<nonce>``, a
:class:`~mesh.resilience.breaker.BreakerRecord`) to the partition of the breaker's state
key (set explicitly), then follows that partition until it reads its claim back. The
claim wins if fewer than ``half_open_probes`` claims of the epoch come before it in the
log. Every reader sees the same order, so:

* at most ``half_open_probes`` probes run per half-open epoch across all replicas, as
  long as every replica reads the breaker partition up to its claim (one that cannot
  read it back within :data:`CLAIM_TIMEOUT` seconds holds the call: it never probes);
* a replica that has already read ``half_open_probes`` claims of the epoch is refused
  without writing one; a claim read back after its epoch ended is void: the call goes
  through if the breaker closed and is held if it reopened;
* claims are removed by tombstones, so compaction drops them: a losing or void claim at
  once by its writer, a probe's claim when the probe settles, and every claim of the
  epoch by whoever ends it (written after the transition, in the same partition). The
  first ``half_open_probes`` claims stay while their epoch lasts, so a replica that
  starts mid-epoch counts them;
* a probe that never reports (its replica was killed, the call cancelled) would leave
  the epoch without probes: ``probe_timeout`` seconds after the epoch began, the next
  call starts a new half-open epoch with a fresh budget;
* a probe costs a round trip before the call: the claim is acknowledged and read back
  (on the embedded broker about ``fetch_max_wait_ms / 2`` plus a poll).

A local breaker (no settings) counts its probes in memory.

Example:
    >>> import asyncio
    >>> budget = ProbeBudget("llm", size=1)  # local: counted in memory
    >>> [asyncio.run(budget.take(epoch=7)).granted for _ in range(2)]
    [True, False]
    >>> budget.new_state(8)  # the breaker applied a new record: a fresh budget
    >>> asyncio.run(budget.take(epoch=8)).granted
    True
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_PROBE = "/probe/"
CLAIM_TIMEOUT = 30.0  # seconds to read a probe claim back before holding the call

WriteClaim = Callable[[str, int | None], Awaitable[None]]
"""``write(key, epoch)`` produces a claim of ``epoch``; ``write(key, None)`` its tombstone."""


def is_claim_key(key: str) -> bool:
    """Whether a key of the breaker topic is a probe claim rather than a breaker's state.

    Example:
        >>> is_claim_key("llm/probe/7/host:12/3f2a"), is_claim_key("llm")
        (True, False)
    """
    return _PROBE in key


@dataclass(frozen=True, slots=True)
class Probe:
    """The budget's answer to a call in a half-open epoch.

    ``granted``: the call is a probe, and ``claim`` is its claim's key when the budget is
    shared (tombstoned when the probe settles). Refused: ``why`` names the claim that
    lost or went void (empty when the budget was known taken), or ``unread`` says the
    claim ``claim`` was not read back within :data:`CLAIM_TIMEOUT`.
    """

    granted: bool
    claim: str | None = None
    why: str = ""
    unread: bool = False


class ProbeBudget:
    """The probes of one breaker's half-open epochs; see the module docstring.

    Local until :meth:`share` gives it the breaker's claim writer and follower; then each
    probe is a claim read back from the log. The breaker calls :meth:`new_state` for every
    record it applies and :meth:`count` for every claim it reads, and asks
    :meth:`claims_of` which claims to tombstone when it ends an epoch.

    Example:
        >>> budget = ProbeBudget("llm", size=2, replica="host:12")
        >>> budget.owns("llm/probe/3/host:12/3f2a"), budget.owns("search/probe/3/h:1/9c")
        (True, False)
    """

    def __init__(self, breaker: str, size: int, *, replica: str = "local") -> None:
        self.breaker, self.size, self.replica = breaker, size, replica
        self._prefix = breaker + _PROBE
        self._version = 0  # of the breaker's record: the current epoch while half-open
        self._local = 0  # probes granted in the current half-open period (local mode)
        self._claims: dict[int, dict[str, int]] = {}  # epoch -> claim key -> rank in the log
        self._pending: dict[str, asyncio.Future[int]] = {}  # own claims not read back yet
        self._write: WriteClaim | None = None
        self._follower: asyncio.Task[None] | None = None

    def share(self, write: WriteClaim, follower: asyncio.Task[None]) -> None:
        """Count probes through claims: ``write`` produces them to the breaker's
        partition, which ``follower`` reads back (calling :meth:`count`)."""
        self._write, self._follower = write, follower

    def unshare(self) -> None:
        """Count in memory again (the breaker stopped following its topic)."""
        self._write = self._follower = None

    def owns(self, key: str) -> bool:
        """Whether ``key`` is a probe claim of this budget's breaker."""
        return key.startswith(self._prefix)

    def new_state(self, version: int) -> None:
        """The breaker applied its record of ``version`` (a new state or a new half-open
        epoch): a fresh local budget, and the claims of ended epochs forgotten."""
        self._version = version
        self._local = 0
        self._claims = {e: c for e, c in self._claims.items() if e >= version}

    def count(self, key: str) -> None:
        """Rank a claim read from the log among its epoch's claims, in log order."""
        epoch_text = key[len(self._prefix):].split("/", 1)[0]
        if not epoch_text.isdigit():
            return
        epoch = int(epoch_text)
        claims = self._claims.get(epoch)
        if claims is None:
            if epoch < self._version and key not in self._pending:
                return  # an ended epoch's claim, replayed or read late: it decides nothing
            claims = self._claims[epoch] = {}
        rank = claims.setdefault(key, len(claims))
        waiter = self._pending.get(key)
        if waiter is not None and not waiter.done():
            waiter.set_result(rank)

    def claims_of(self, epoch: int) -> list[str]:
        """The keys of the claims of ``epoch`` read so far, in log order."""
        return list(self._claims.get(epoch, ()))

    async def take(self, epoch: int) -> Probe:
        """A probe of half-open ``epoch`` if the budget allows (a claim that wins in log
        order when shared), else a refusal. A lost or void claim is tombstoned here."""
        write, follower = self._write, self._follower
        if write is None or follower is None:  # local: this instance's count is the budget
            if self._local >= self.size:
                return Probe(granted=False)
            self._local += 1
            return Probe(granted=True)
        if len(self._claims.get(epoch, ())) >= self.size:
            return Probe(granted=False)  # known taken: no claim written
        key = f"{self._prefix}{epoch}/{self.replica}/{uuid.uuid4().hex[:8]}"
        rank = await self._claim(key, epoch, write, follower)
        if rank is None:
            return Probe(granted=False, claim=key, unread=True)
        if self._version == epoch and rank < self.size:
            return Probe(granted=True, claim=key)
        await write(key, None)  # lost, or its epoch ended: remove it now
        return Probe(granted=False, why=f" (claim {rank + 1} of epoch {epoch})")

    async def _claim(self, key: str, epoch: int, write: WriteClaim,
                     follower: asyncio.Task[None]) -> int | None:
        """Write a probe claim and follow the partition up to it; returns its rank among
        the claims of ``epoch`` in log order (0 = first), or None if it was not read back
        within :data:`CLAIM_TIMEOUT`."""
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[key] = waiter
        try:
            await write(key, epoch)
            watched: list[asyncio.Future[Any]] = [waiter, follower]
            await asyncio.wait(watched, timeout=CLAIM_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._pending.pop(key, None)
        if waiter.done():
            return waiter.result()
        waiter.cancel()
        if follower.done() and not follower.cancelled() and follower.exception():
            logger.error("breaker %s: its follower failed: %r", self.breaker,
                         follower.exception())
        return None
