"""Typed topic declarations: ``Topic[Model]``.

A topic names its payload model, the field its records are keyed by, and the
partitions and configs ``mesh topics apply`` creates it with. Order is kept per key:
records with the same key go to the same partition.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from mesh.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
DLQ_SUFFIX = ".dlq"


@dataclass(frozen=True, slots=True)
class Topic(Generic[M]):
    """A Kafka topic whose records carry ``model`` payloads.

    Args:
        name: the Kafka topic name.
        model: the pydantic payload model; its Avro schema is the topic's value schema.
        key: the payload field records are keyed (and so partitioned) by; ``None``
            spreads records over partitions with no per-key order.
        partitions: partition count; bounds the parallelism of a consumer group.
        compacted: ``cleanup.policy=compact`` (the latest value per key is kept).
        retention_ms: ``retention.ms``; ``None`` keeps the broker default.
        replication: replication factor; ``None`` (the default) takes the cluster's size
            capped at 3 when the topic is created (1 on a single broker, 3 on a cluster),
            so a declaration works on a development broker and survives a broker loss
            on a cluster.
        segment_ms: ``segment.ms``: how old the active segment may grow before it rolls
            (the log cleaner and retention only act on rolled segments).
        min_cleanable_dirty_ratio: ``min.cleanable.dirty.ratio`` of a compacted topic:
            the share of not-yet-compacted log that makes the cleaner run (0-1).
        delete_retention_ms: ``delete.retention.ms`` of a compacted topic: how long a
            tombstone stays readable after compaction (a reader rebuilding a table
            slower than this may miss a delete).
        configs: any other topic configs (they win over the three options above).
        dead_letters: whether ``<name>.dlq`` is declared with it.

    Example:
        >>> class Order(BaseModel):
        ...     order_id: str
        >>> orders = Topic("shop.orders", Order, key="order_id", partitions=6)
        >>> orders.dlq_name
        'shop.orders.dlq'
    """

    name: str
    model: type[M]
    key: str | None = None
    partitions: int = 3
    compacted: bool = False
    retention_ms: int | None = None
    replication: int | None = None
    configs: Mapping[str, str] = field(default_factory=dict, hash=False)
    dead_letters: bool = True
    segment_ms: int | None = None
    min_cleanable_dirty_ratio: float | None = None
    delete_retention_ms: int | None = None

    def __post_init__(self) -> None:
        longest = self.name + (DLQ_SUFFIX if self.dead_letters else "")
        if not _NAME.match(self.name) or self.name in (".", "..") or len(longest) > 249:
            raise ConfigError(
                f"Topic name {self.name!r} is not valid: use 1-249 of letters, digits, "
                "'.', '_' and '-' (not '.' or '..'), leaving room for the '.dlq' suffix."
            )
        if not (isinstance(self.model, type) and issubclass(self.model, BaseModel)):
            raise ConfigError(
                f"Topic {self.name!r}: model must be a pydantic BaseModel class, "
                f"got {self.model!r}."
            )
        if self.key is not None and self.key not in self.model.model_fields:
            known = ", ".join(self.model.model_fields) or "none"
            raise ConfigError(
                f"Topic {self.name!r}: key field {self.key!r} is not a field of "
                f"{self.model.__name__} (fields: {known}). Name an existing field or None."
            )
        if self.partitions < 1 or (self.replication is not None and self.replication < 1):
            raise ConfigError(
                f"Topic {self.name!r}: partitions ({self.partitions}) and replication "
                f"({self.replication}) must be at least 1."
            )
        if self.min_cleanable_dirty_ratio is not None and not (
                0.0 <= self.min_cleanable_dirty_ratio <= 1.0):
            raise ConfigError(
                f"Topic {self.name!r}: min_cleanable_dirty_ratio="
                f"{self.min_cleanable_dirty_ratio} is not a share: use 0 to 1.")
        for option, least in (("segment_ms", 1), ("delete_retention_ms", 0)):
            value = getattr(self, option)
            if value is not None and value < least:
                raise ConfigError(f"Topic {self.name!r}: {option}={value} is below {least}.")
        object.__setattr__(self, "configs", MappingProxyType(dict(self.configs)))

    @property
    def dlq_name(self) -> str:
        """The dead-letter topic for records consumed from this topic."""
        return self.name + DLQ_SUFFIX

    def key_of(self, payload: M) -> bytes | None:
        """The record key for ``payload``: its key field as UTF-8, or ``None``."""
        if self.key is None:
            return None
        value = getattr(payload, self.key)
        return None if value is None else str(value).encode()

    def broker_configs(self) -> dict[str, str]:
        """The topic configs to create it with."""
        configs = dict(self.configs)
        if self.compacted:
            configs["cleanup.policy"] = "compact"
        if self.retention_ms is not None:
            configs["retention.ms"] = str(self.retention_ms)
        options = {"segment.ms": self.segment_ms,
                   "min.cleanable.dirty.ratio": self.min_cleanable_dirty_ratio,
                   "delete.retention.ms": self.delete_retention_ms}
        for name, value in options.items():
            if value is not None:
                configs.setdefault(name, str(value))
        return configs

    def __repr__(self) -> str:
        return f"Topic({self.name!r}, {self.model.__name__}, key={self.key!r})"


class TopicBundle(ABC):
    """The topics of one pattern instance, declared together so their names, keys and
    partition counts agree (``GatherTopics.named("research", Question)``).

    :func:`discover_topics` declares every member of a bundle bound at module level, so
    a ``topics/`` module binds the bundle once instead of each of its topics. A bundle
    of your own subclasses this and lists its topics in :meth:`all`.
    """

    __slots__ = ()

    @abstractmethod
    def all(self) -> list[Topic[Any]]:
        """Every topic of the bundle, for ``apply_topics`` and discovery."""


def collect_topics(objects: Iterable[Any]) -> dict[str, Topic[Any]]:
    """Index topic declarations by name; the same name declared twice differently fails."""
    found: dict[str, Topic[Any]] = {}
    for obj in objects:
        if not isinstance(obj, Topic):
            continue
        other = found.get(obj.name)
        if other is not None and other != obj:
            raise ConfigError(
                f"Topic {obj.name!r} is declared twice with different settings: "
                f"{other!r} and {obj!r}. Keep one declaration and import it."
            )
        found[obj.name] = obj
    return found


def discover_topics(*module_names: str) -> dict[str, Topic[Any]]:
    """Every ``Topic`` declared at module level in the named modules and their submodules,
    with every member of each :class:`TopicBundle` declared there.

    Example:
        >>> sorted(discover_topics("topics"))  # doctest: +SKIP
        ['demo.drafts', 'demo.questions', ...]
    """
    objects: list[Any] = []
    for name in module_names:
        try:
            top = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
                raise  # the module exists; something it imports does not
            raise ConfigError(
                f"Cannot import {name!r} to find the declared topics: {exc}. Run from your "
                "project's root (the directory holding your topics/ package), or name the "
                "module(s) declaring your topics with -t/--topics (e.g. -t myapp.topics)."
            ) from exc
        for module in _walk(top):
            objects.extend(_members(vars(module).values()))
    return collect_topics(objects)


def _members(values: Iterable[Any]) -> Iterable[Any]:
    """``values`` with each topic bundle replaced by its topics."""
    for value in values:
        yield from value.all() if isinstance(value, TopicBundle) else (value,)


def _walk(module: ModuleType) -> Iterable[ModuleType]:
    yield module
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), module.__name__ + "."):
        yield importlib.import_module(info.name)
