"""Unit tests for mesh.topic: declarations, keys, configs and discovery."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from mesh.errors import ConfigError
from mesh.topic import Topic, collect_topics, discover_topics
from tests.conftest import ROOT


class Order(BaseModel):
    order_id: str
    customer: int | None = None


class Refund(BaseModel):
    order_id: str


@pytest.mark.parametrize("name", ["", "has space", "ümlaut", "a/b", "x" * 250])
def test_invalid_name_raises_config_error_naming_the_rule(name: str) -> None:
    with pytest.raises(ConfigError, match="1-249 of letters, digits"):
        Topic(name, Order)


@pytest.mark.parametrize("name", [".", ".."])
def test_names_kafka_reserves_raise_config_error(name: str) -> None:
    with pytest.raises(ConfigError):
        Topic(name, Order)


def test_name_too_long_for_its_dead_letter_topic_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        Topic("x" * 249, Order)


def test_key_that_is_not_a_model_field_raises_config_error_listing_fields() -> None:
    with pytest.raises(ConfigError, match=r"'orderid' is not a field of Order "
                                          r"\(fields: order_id, customer\)"):
        Topic("shop.orders", Order, key="orderid")


@pytest.mark.parametrize("bad", [{"partitions": 0}, {"partitions": -3}, {"replication": 0}])
def test_partitions_or_replication_below_one_raise_config_error(bad: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="must be at least 1"):
        Topic("shop.orders", Order, **bad)


def test_model_that_is_not_a_pydantic_class_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="pydantic BaseModel"):
        Topic("shop.orders", dict)  # type: ignore[type-var]


def test_key_of_encodes_the_key_field_as_utf8() -> None:
    by_id = Topic("shop.orders", Order, key="order_id")
    by_customer = Topic("shop.orders", Order, key="customer")

    assert by_id.key_of(Order(order_id="ø-1")) == "ø-1".encode()
    assert by_customer.key_of(Order(order_id="o", customer=42)) == b"42"
    assert by_customer.key_of(Order(order_id="o")) is None
    assert Topic("shop.orders", Order).key_of(Order(order_id="o")) is None


def test_dlq_name_appends_dlq() -> None:
    assert Topic("shop.orders", Order).dlq_name == "shop.orders.dlq"


def test_broker_configs_for_compacted_topic_with_retention() -> None:
    topic = Topic("shop.orders", Order, compacted=True, retention_ms=86_400_000,
                  configs={"min.insync.replicas": "2"})

    assert topic.broker_configs() == {"cleanup.policy": "compact",
                                      "retention.ms": "86400000",
                                      "min.insync.replicas": "2"}
    assert Topic("shop.orders", Order).broker_configs() == {}


def test_configs_cannot_be_changed_after_declaration() -> None:
    configs = {"segment.ms": "1000"}
    topic = Topic("shop.orders", Order, configs=configs)
    configs["segment.ms"] = "5"

    assert topic.configs["segment.ms"] == "1000"
    with pytest.raises(TypeError):
        topic.configs["segment.ms"] = "5"  # type: ignore[index]


def test_collect_topics_rejects_one_name_declared_twice_differently() -> None:
    with pytest.raises(ConfigError, match="'shop.orders' is declared twice"):
        collect_topics([Topic("shop.orders", Order), Topic("shop.orders", Refund)])


def test_collect_topics_accepts_an_identical_redeclaration_and_skips_other_objects() -> None:
    found = collect_topics([Topic("shop.orders", Order, key="order_id"), "not a topic",
                            Topic("shop.orders", Order, key="order_id")])

    assert list(found) == ["shop.orders"]


def test_discover_topics_finds_the_demo_topics() -> None:
    found = discover_topics("topics")

    assert {"demo.articles", "demo.drafts", "demo.fact-checks", "demo.findings",
            "demo.requests"} <= set(found)
    assert found["demo.requests"].key == "request_id"


def test_discover_topics_declares_every_member_of_the_bundles_bound_in_topics() -> None:
    """Pass: topics/ binds each pattern's bundle once (no member re-bound), and discovery
    still declares every topic the committed schemas/ describe."""
    exported = {p.name.removesuffix(".avsc") for p in (ROOT / "schemas").glob("*.avsc")}

    found = discover_topics("topics")

    assert set(found) == exported - {"mesh.audit"}


def test_discover_topics_expands_a_bundle_of_ones_own(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shop_topics.py").write_text(
        "from dataclasses import dataclass\n"
        "from pydantic import BaseModel\n"
        "from mesh.topic import Topic, TopicBundle\n"
        "class Order(BaseModel):\n"
        "    order_id: str\n"
        "@dataclass(frozen=True)\n"
        "class ShopTopics(TopicBundle):\n"
        "    orders: Topic\n"
        "    refunds: Topic\n"
        "    def all(self):\n"
        "        return [self.orders, self.refunds]\n"
        "shop = ShopTopics(Topic('shop.orders', Order), Topic('shop.refunds', Order))\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert sorted(discover_topics("shop_topics")) == ["shop.orders", "shop.refunds"]
