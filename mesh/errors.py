"""The mesh's errors. Each class says whether retrying can help.

Retriable errors are retried (with backoff); the rest go straight to the dead-letter
topic. The hierarchy::

    MeshError                       retriable=False
    ├── ConfigError                 bad settings or declarations
    │   └── TopicDrift              broker topic differs from its declaration
    ├── SchemaDrift                 committed .avsc files differ from the models
    ├── InputError                  a record the mesh cannot accept (-> dead letters)
    │   ├── DecodeError             bytes that are not a mesh event
    │   │   └── UnknownSchema       framing fine, writer schema unknown
    │   ├── PayloadInvalid          decoded, but fails the payload model
    │   ├── PayloadTooLarge         above runtime.max_message_bytes
    │   ├── HeaderInvalid           an envelope built with invalid ids (headers never raise)
    │   └── SignatureInvalid        a task not signed with the plan key (forged, altered)
    ├── HandlerError                user code failed (retriable per instance)
    ├── Held                        not now: hold the partition, retry the same input later
    │   └── BreakerOpen             a circuit breaker guarding a downstream is open
    └── TransportError              retriable=True: broker unreachable, timeouts
        ├── BrokerUnavailable       the embedded broker did not start / answer
        ├── BrokerLost              a running agent's broker went away or lost its data
        ├── CommitFailed            the group rebalanced before a commit landed
        └── UnreadableBatch         retriable=False: a fetched batch the client cannot
                                    read (codec missing, corrupt): the agent stops
"""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error the mesh raises.

    Attributes:
        retriable: whether trying the same thing again may succeed.
    """

    retriable: bool = False


class ConfigError(MeshError):
    """Settings or declarations that cannot work; fix the configuration."""


class TopicDrift(ConfigError):
    """The topic on the broker differs from its declaration."""


class SchemaDrift(MeshError):
    """The committed Avro schemas differ from the payload models."""


class InputError(MeshError):
    """A consumed record the mesh cannot accept; it goes to the dead-letter topic."""


class DecodeError(InputError):
    """The bytes are not an Avro event in a framing the mesh knows."""


class UnknownSchema(DecodeError):
    """The framing names a writer schema that is not known for this topic."""


class PayloadInvalid(InputError):
    """The record decoded, but its content does not satisfy the payload model."""


class PayloadTooLarge(InputError):
    """The record is larger than the mesh's own size limit."""


class HeaderInvalid(InputError):
    """A mesh header is present but malformed (not UTF-8, not a number, ...)."""


class SignatureInvalid(InputError):
    """Work that is not signed with the mesh's plan key: missing, wrong or altered
    signature, or a signed task on another specialist's topic. Never retriable (the
    same bytes fail the same way); the task goes to the dead-letter topic and its work
    is not done. The fix is configuration: every coordinator and specialist of a mesh
    sets the same ``MESH_SECURITY__PLAN_KEY``."""


class HandlerError(MeshError):
    """User code failed; ``retriable`` says whether another attempt may succeed.

    Raise it from a handler to choose explicitly::

        raise HandlerError("search API said 429", retriable=True)
    """

    def __init__(self, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


class Held(MeshError):
    """The input cannot be handled *now* (a downstream is known to be down): the runtime
    keeps it, pauses the agent's partitions (still polling, so it stays in its group)
    and hands the same input to the handler again at ``until`` (epoch seconds). It is
    neither a failure nor a retry: nothing goes to retry or dead-letter topics."""

    retriable = True

    def __init__(self, message: str, *, until: float) -> None:
        super().__init__(message)
        self.until = until


class BreakerOpen(Held):
    """A circuit breaker is open (or its half-open probes are taken)."""


class TransportError(MeshError):
    """The broker could not be reached or did not answer in time."""

    retriable = True


class BrokerUnavailable(TransportError):
    """The embedded broker did not start or does not answer metadata requests."""


class BrokerLost(TransportError):
    """A running agent's broker stayed unreachable past ``runtime.broker_timeout_s``,
    answered as another cluster, or lost records the agent had committed: the agent
    stops (loudly) instead of retrying forever or skipping work silently."""


class CommitFailed(TransportError):
    """An offset commit was refused because the group rebalanced; the partition's new
    owner re-reads from the last committed offset (at-least-once)."""


class UnreadableBatch(TransportError):
    """A fetched record batch the Kafka client cannot read at all: compressed with a
    codec whose library is missing (or unknown), or corrupt. No record of it can be
    isolated and dead-lettered, and every refetch fails the same way, so the agent stops
    once, loudly, naming where (``topic``, ``partition``, ``offset`` of the batch, when
    the client says) and the fix, instead of retrying or skipping the batch silently."""

    retriable = False

    def __init__(self, message: str, *, topic: str | None = None,
                 partition: int | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.topic, self.partition, self.offset = topic, partition, offset


def is_retriable(error: BaseException) -> bool:
    """Whether ``error`` may go away on another attempt.

    Mesh errors say so themselves (an :class:`InputError` never: the same bytes fail the
    same way; ``HandlerError(..., retriable=False)`` is how user code says "do not
    retry"). Any other exception is retriable: failures in user code are rarely typed
    and are mostly transient (a flaky API, a timeout), which is what the seed article,
    Dapr and most agent frameworks assume. A retry policy can narrow this
    (``RetryPolicy(retry_on=...)``); circuit breakers count failures by the same rule.

    Example:
        >>> is_retriable(ValueError("flaky")), is_retriable(DecodeError("garbage"))
        (True, False)
    """
    if isinstance(error, MeshError):
        return error.retriable
    return isinstance(error, Exception)
