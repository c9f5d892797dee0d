"""Unit tests for mesh.serde.codec: framing choice, and a Confluent registry over real HTTP.

``FakeSchemaRegistry`` is a stdlib HTTP server on 127.0.0.1 that answers the three calls
python-schema-registry-client makes (lookup, register, fetch by id), as Confluent does.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from mesh.config import SchemaRegistrySettings
from mesh.errors import UnknownSchema
from mesh.serde.codec import Codec
from mesh.topic import Topic

FIRST_ID = 258  # 0x0102: a byte-order mix-up shows in the frame


class Order(BaseModel):
    order_id: str
    qty: int


orders = Topic("shop.orders", Order, key="order_id")


class FakeSchemaRegistry:
    """Subjects, ids and a log of every request, shared with the handler thread."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.schemas: dict[int, str] = {}  # id -> schema JSON text
        self.subjects: dict[str, list[int]] = {}  # subject -> ids, one per version
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _id_of(self, schema: str) -> int | None:
        wanted = json.loads(schema)
        return next((i for i, s in self.schemas.items() if json.loads(s) == wanted), None)

    def answer(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        with self._lock:
            self.requests.append((method, path))
            parts = path.strip("/").split("/")
            if method == "POST" and len(parts) == 2 and parts[0] == "subjects":
                schema_id = self._id_of(body["schema"])
                versions = self.subjects.get(parts[1], [])
                if schema_id is None or schema_id not in versions:
                    return 404, {"error_code": 40403, "message": "Schema not found"}
                return 200, {"subject": parts[1], "id": schema_id,
                             "version": versions.index(schema_id) + 1,
                             "schema": body["schema"]}
            if method == "POST" and len(parts) == 3 and parts[2] == "versions":
                schema_id = self._id_of(body["schema"])
                if schema_id is None:
                    schema_id = FIRST_ID + len(self.schemas)
                    self.schemas[schema_id] = body["schema"]
                self.subjects.setdefault(parts[1], []).append(schema_id)
                return 200, {"id": schema_id}
            if method == "GET" and parts[:2] == ["schemas", "ids"] and len(parts) == 3:
                schema = self.schemas.get(int(parts[2]))
                if schema is None:
                    return 404, {"error_code": 40403, "message": "Schema not found"}
                return 200, {"schema": schema}
            return 404, {"error_code": 404, "message": f"no route {method} {path}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                code, answer = registry.answer(self.command, self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                """Keep the test output quiet: no access log."""

        return Handler

    def __enter__(self) -> FakeSchemaRegistry:
        # a short poll interval keeps shutdown() (which waits for one poll) quick
        threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSchemaRegistry]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with FakeSchemaRegistry() as fake:
        yield fake


def _settings(registry: FakeSchemaRegistry) -> SchemaRegistrySettings:
    return SchemaRegistrySettings(url=registry.url)


async def test_without_registry_encode_writes_single_object() -> None:
    codec = Codec()

    data, fingerprint = codec.encode(orders, Order(order_id="o1", qty=2))

    assert not codec.uses_registry
    assert data[:2] == b"\xc3\x01" and data[2:10].hex() == fingerprint
    assert await codec.decode(orders, data) == Order(order_id="o1", qty=2)


async def test_confluent_frame_without_registry_raises_unknown_schema_naming_the_setting() -> None:
    body = Codec().serde(Order).body(Order(order_id="o1", qty=2))

    with pytest.raises(UnknownSchema, match="MESH_SCHEMA_REGISTRY__URL"):
        await Codec().decode(orders, b"\x00" + (7).to_bytes(4, "big") + body)


async def test_prepare_registers_the_value_schema_under_topic_value(
        registry: FakeSchemaRegistry) -> None:
    codec = Codec(_settings(registry))

    await codec.prepare([orders])

    assert registry.subjects == {"shop.orders-value": [FIRST_ID]}
    assert json.loads(registry.schemas[FIRST_ID]) == codec.serde(Order).schema
    assert registry.requests == [("POST", "/subjects/shop.orders-value"),
                                 ("POST", "/subjects/shop.orders-value/versions")]


async def test_encode_with_registry_writes_zero_and_big_endian_schema_id(
        registry: FakeSchemaRegistry) -> None:
    codec = Codec(_settings(registry))
    await codec.prepare([orders])

    data, _ = codec.encode(orders, Order(order_id="o1", qty=2))

    assert data[:5] == b"\x00\x00\x00\x01\x02"
    assert data[5:] == codec.serde(Order).body(Order(order_id="o1", qty=2))


async def test_fresh_codec_decodes_confluent_bytes_by_fetching_the_schema_by_id(
        registry: FakeSchemaRegistry) -> None:
    writer = Codec(_settings(registry))
    await writer.prepare([orders])
    data, _ = writer.encode(orders, Order(order_id="o1", qty=2))
    reader = Codec(_settings(registry))

    assert await reader.decode(orders, data) == Order(order_id="o1", qty=2)
    assert await reader.decode(orders, data) == Order(order_id="o1", qty=2)

    assert registry.requests.count(("GET", f"/schemas/ids/{FIRST_ID}")) == 1  # then cached


async def test_inputs_decoded_at_once_that_meet_a_new_schema_id_wait_for_one_fetch(
        registry: FakeSchemaRegistry) -> None:
    """Pass: eight values of one unknown id decoded concurrently (eight keys' workers)
    all decode, with one request to the registry for that id."""
    writer = Codec(_settings(registry))
    await writer.prepare([orders])
    values = [writer.encode(orders, Order(order_id=f"o{i}", qty=i))[0] for i in range(8)]
    reader = Codec(_settings(registry))

    decoded = await asyncio.gather(*(reader.decode(orders, v) for v in values))

    assert decoded == [Order(order_id=f"o{i}", qty=i) for i in range(8)]
    assert registry.requests.count(("GET", f"/schemas/ids/{FIRST_ID}")) == 1


async def test_codec_with_registry_still_decodes_single_object_bytes(
        registry: FakeSchemaRegistry) -> None:
    data = Codec().encode(orders, Order(order_id="o1", qty=2))[0]

    assert await Codec(_settings(registry)).decode(orders, data) == Order(order_id="o1", qty=2)
    assert registry.requests == []


async def test_schema_id_missing_from_registry_raises_unknown_schema(
        registry: FakeSchemaRegistry) -> None:
    body = Codec().serde(Order).body(Order(order_id="o1", qty=2))

    with pytest.raises(UnknownSchema, match="999"):
        await Codec(_settings(registry)).decode(orders, b"\x00" + (999).to_bytes(4, "big") + body)

    assert registry.requests == [("GET", "/schemas/ids/999")]


class OrderV2(BaseModel):
    order_id: str
    qty: int
    note: str | None = None


OrderV2.__name__ = "Order"  # the next version of Order: same name and namespace


class Invoice(BaseModel):
    invoice_id: str


async def test_registry_writer_of_an_older_version_resolves_to_the_topic_model(
        registry: FakeSchemaRegistry) -> None:
    """Pass: Confluent bytes written with Order (v1) decode as OrderV2 on a v2 reader."""
    writer = Codec(_settings(registry))
    await writer.prepare([orders])
    data, _ = writer.encode(orders, Order(order_id="o1", qty=2))

    decoded = await Codec(_settings(registry)).decode(Topic("shop.orders", OrderV2), data)

    assert decoded == OrderV2(order_id="o1", qty=2)


async def test_registry_writer_of_another_model_raises_unknown_schema_naming_the_id(
        registry: FakeSchemaRegistry) -> None:
    invoices = Topic("shop.invoices", Invoice)
    writer = Codec(_settings(registry))
    await writer.prepare([invoices])
    data, _ = writer.encode(invoices, Invoice(invoice_id="i1"))

    with pytest.raises(UnknownSchema, match=f"shop.orders: schema id {FIRST_ID} is .*Invoice"):
        await Codec(_settings(registry)).decode(orders, data)


async def test_single_object_of_an_older_version_decodes_with_a_learned_schema(
        tmp_path: Path) -> None:
    """Pass: no history directory; Codec.learn(v1's schema) makes v1 bytes decode as v2."""
    codec = Codec(history=tmp_path)
    data = Codec(history=tmp_path).encode(orders, Order(order_id="o1", qty=2))[0]
    with pytest.raises(UnknownSchema, match=data[2:10].hex()):
        await codec.decode(Topic("shop.orders", OrderV2), data)

    codec.learn(codec.serde(Order).schema)

    assert await codec.decode(Topic("shop.orders", OrderV2), data) == OrderV2(order_id="o1",
                                                                              qty=2)


def test_default_history_is_schemas_history_under_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    assert Codec().history.directory == tmp_path / "schemas" / "history"
