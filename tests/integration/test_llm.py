"""An LLM agent as its own service: `mesh run tests.apps.llm:agent` on the broker, with
a pydantic-ai FunctionModel that never leaves the process."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh import Codec, Envelope, apply_topics, derive_event_id
from mesh.envelope import CAUSATION_ID, EVENT_ID
from mesh.kafka.base import OutRecord
from mesh.kafka.embedded import free_port
from tests.apps.llm import Article, Summary, build
from tests.conftest import BrokerUnderTest
from tests.faults.test_outage import lag_drained
from tests.support import AgentProcess, event_id, inject, read_all, wait_for_count

pytestmark = pytest.mark.broker_agnostic


async def test_a_flaky_model_summarises_every_article_through_the_retry_topic(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: 6 articles in; the model answers 503 to the first call for each, so each
    goes once through <topic>.retry.1, then its typed Summary (the article's id, first
    sentence and word count) reaches the summaries topic, one per article, caused by
    its article and with the derived event id; nothing is dead-lettered; the agent's
    consumer lag returns to 0 and it stops with exit code 0."""
    agent = build(prefix, "flaky")
    articles, summaries = agent.consumes[0], agent.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, agent.all_topics)
    codec = Codec()
    sent = [Article(article_id=f"a{n}", title=f"Article {n}",
                    text=f"Kafka keeps {n} logs. Agents read them. The end.")
            for n in range(6)]
    records = []
    for article in sent:
        event = Envelope.new(article, source="test", key=article.article_id.encode())
        value, fingerprint = codec.encode(articles, article)
        records.append(OutRecord(articles.name, value, event.key,
                                 tuple(event.with_payload(article, schema=fingerprint)
                                       .headers())))
    port = free_port()
    log = (tmp_path / "agent.log").open("wb")
    proc = AgentProcess(broker, "tests.apps.llm:agent", prefix=prefix, log=log,
                        env={"LLM_TEST_MODEL": "flaky", "MESH_METRICS__PORT": str(port)})
    proc.start()
    try:
        await inject(settings, records)
        out = await wait_for_count(settings, [summaries.name], len(sent), timeout=120)
        await lag_drained(port, timeout=60)
    finally:
        code = proc.terminate()
        log.close()
    assert code == 0, (tmp_path / "agent.log").read_text()[-3000:]
    got = {}
    for record in out:
        summary = await codec.decode(summaries, record.value or b"")
        assert isinstance(summary, Summary)
        headers = dict(record.headers)
        got[summary.article_id] = (summary, headers[CAUSATION_ID].decode(),
                                   headers[EVENT_ID].decode())
    assert set(got) == {a.article_id for a in sent}
    for article, record in zip(sent, records, strict=True):
        summary, causation, output_id = got[article.article_id]
        input_id = dict(record.headers)[EVENT_ID].decode()
        assert summary.summary == f"Kafka keeps {article.article_id[1:]} logs."
        assert summary.words == len(article.text.split())
        assert causation == input_id
        assert output_id == derive_event_id(agent.name, input_id, 0)
    retried = await read_all(settings, [f"{articles.name}.retry.1"])
    assert sorted(event_id(r) for r in retried) == sorted(
        dict(r.headers)[EVENT_ID].decode() for r in records)
    assert await read_all(settings, [articles.dlq_name]) == []
