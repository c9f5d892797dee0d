"""Settings for every mesh process, read from the environment.

All settings use the ``MESH_`` prefix, nested with ``__``::

    MESH_KAFKA__BOOTSTRAP_SERVERS=broker:9092
    MESH_KAFKA__SECURITY_PROTOCOL=SASL_SSL
    MESH_KAFKA__SASL_MECHANISM=SCRAM-SHA-512
    MESH_KAFKA__SASL_PLAIN_USERNAME=agent
    MESH_KAFKA__SASL_PLAIN_PASSWORD=...        # a SecretStr: never logged
    MESH_SCHEMA_REGISTRY__URL=http://registry:8081
    MESH_RUNTIME__MAX_MESSAGE_BYTES=1048576

When ``MESH_KAFKA__BOOTSTRAP_SERVERS`` is unset the mesh starts its embedded broker and
uses the *embedded profile*: short group timings, because the embedded broker holds a
join for about half the session timeout, and a fetch wait that keeps idle hops quick
(the embedded broker holds an empty fetch for about half of it). With a bootstrap server
the *kafka profile* applies (``MESH_KAFKA__PROFILE=embedded|kafka`` forces one): Kafka's
own timings, no embedded workaround.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI"]


class KafkaSettings(BaseModel):
    """How to reach the Kafka cluster; passed through to aiokafka."""

    model_config = ConfigDict(hide_input_in_errors=True)  # errors must not echo secrets

    bootstrap_servers: str | None = None
    profile: Literal["auto", "embedded", "kafka"] = "auto"
    client_id: str = "mesh"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    request_timeout_ms: int = Field(default=30_000, gt=0)
    session_timeout_ms: int | None = Field(default=None, gt=0)
    heartbeat_interval_ms: int | None = Field(default=None, gt=0)
    max_poll_interval_ms: int = Field(default=300_000, gt=0)
    # >= 50 on the embedded broker only (checked below); Apache Kafka takes any wait
    fetch_max_wait_ms: int | None = Field(default=None, ge=0)
    # aiokafka's linger_ms: how long a batch that is not full waits for more records.
    # The mesh's producers (the transactional one too) gather a partition's records
    # while its previous batch is on its way and hand each batch over closed, so their
    # batches go at once; raw aiokafka clients given these settings (bench/) linger.
    linger_ms: int = Field(default=5, ge=0)
    max_batch_size: int = Field(default=262_144, gt=0)
    # acks=0 would make "committed after the broker acknowledged" untrue: not offered.
    acks: Literal["all", "1"] = "all"
    # The idempotent producer: a retried send after a leader change is written once.
    # None: on with the kafka profile and acks=all; off with the embedded profile (the
    # embedded broker refuses InitProducerId).
    idempotence: bool | None = None
    # Static group membership (KIP-345), opt-in: a replica that restarts with the same id
    # within the session timeout gets its partitions back without a rebalance. A static
    # member does not leave its group on a clean stop, so its partitions wait for the
    # session timeout before moving to another replica. Unique per replica (a pod name);
    # the same id may be used in every group the process joins.
    group_instance_id: str | None = Field(default=None, min_length=1, max_length=249)
    # What readers (mesh tap, TopicReader, state tables) and at-least-once agents see of
    # transactional topics: read_committed hides open and aborted transactions (needed
    # downstream of exactly-once agents, which always read committed themselves).
    isolation_level: Literal["read_uncommitted", "read_committed"] = "read_uncommitted"

    @model_validator(mode="after")
    def _check_sasl(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(
                f"security_protocol={self.security_protocol} needs MESH_KAFKA__SASL_MECHANISM "
                "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)."
            )
        if (self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
                and (not self.sasl_plain_username or self.sasl_plain_password is None)):
            raise ValueError(f"sasl_mechanism={self.sasl_mechanism} needs "
                             "MESH_KAFKA__SASL_PLAIN_USERNAME and MESH_KAFKA__SASL_PLAIN_PASSWORD.")
        if self.idempotence and self.acks != "all":
            raise ValueError(
                f"idempotence=True with acks={self.acks}: the idempotent producer needs "
                "acks=all. Set MESH_KAFKA__ACKS=all or MESH_KAFKA__IDEMPOTENCE=false.")
        if (self.embedded_profile and self.fetch_max_wait_ms is not None
                and self.fetch_max_wait_ms < 50):
            raise ValueError(
                f"fetch_max_wait_ms={self.fetch_max_wait_ms} with the embedded profile: the "
                "embedded broker needs >= 50 (with less its fetches return nothing). Raise "
                "MESH_KAFKA__FETCH_MAX_WAIT_MS, or use Apache Kafka (MESH_KAFKA__PROFILE=kafka).")
        return self

    @property
    def embedded(self) -> bool:
        """True when no cluster is configured: the mesh starts its embedded broker."""
        return not self.bootstrap_servers

    @property
    def embedded_profile(self) -> bool:
        """True when talking to the embedded broker (timings tuned to its behaviour)."""
        return self.profile == "embedded" or (self.profile == "auto" and self.embedded)

    @property
    def idempotent_producer(self) -> bool:
        """Whether producers are idempotent (``idempotence``, else on for the kafka
        profile with acks=all: a send retried after a leader change is written once)."""
        if self.idempotence is not None:
            return self.idempotence
        return self.acks == "all" and not self.embedded_profile

    def group_timings(self) -> dict[str, int]:
        """Session, heartbeat and fetch-wait settings.

        The embedded profile works around the embedded broker: short sessions (it holds a
        join for about half the session timeout) and a 100 ms fetch wait (an empty fetch
        is held for about half of it and does not wake on new data). The ``kafka``
        profile keeps Kafka's own behaviour: a fetch wakes as soon as data arrives, so
        the 500 ms wait costs an idle consumer nothing and a busy hop no latency.
        """
        if self.embedded_profile:
            session, heartbeat, fetch_wait = 6_000, 500, 100
        else:
            session, heartbeat, fetch_wait = 10_000, 3_000, 500
        return {
            "session_timeout_ms": self.session_timeout_ms or session,
            "heartbeat_interval_ms": self.heartbeat_interval_ms or heartbeat,
            "fetch_max_wait_ms": (fetch_wait if self.fetch_max_wait_ms is None
                                  else self.fetch_max_wait_ms),
        }

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every aiokafka client gets: connection and security.

        Secrets are unwrapped only here, at the boundary with aiokafka.
        """
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_plain_username
            if self.sasl_plain_password is not None:
                kwargs["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs["ssl_context"] = self.ssl_context()
        return kwargs

    def ssl_context(self) -> ssl.SSLContext:
        """A TLS context from the CA, client certificate and key files."""
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile:
            password = self.ssl_password.get_secret_value() if self.ssl_password else None
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password)
        return context


class SchemaRegistrySettings(BaseModel):
    """A Confluent-compatible schema registry; when set, the Confluent framing is used."""

    model_config = ConfigDict(hide_input_in_errors=True)

    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    # Writer schemas of single-object values by fingerprint (`mesh schemas export` keeps
    # them); a relative path is taken from the working directory.
    history_dir: Path = Path("schemas/history")


class RuntimeSettings(BaseModel):
    """How agents run: limits, concurrency, retries, shutdown."""

    max_message_bytes: int = Field(default=1_048_576, gt=0)
    # Inputs an agent replica handles at once (Agent(concurrency=) overrides), and how
    # many inputs of a partition may be taken past its committed offset.
    concurrency: int = Field(default=16, gt=0)
    max_uncommitted: int = Field(default=1000, gt=0)
    max_records_per_poll: int = Field(default=500, gt=0)
    commit_interval_ms: int = Field(default=200, ge=0)
    # The whole shutdown, from the stop to the exit, every step that may wait for a
    # broker included (runner.Deadline); below Kubernetes' default 30 s grace period.
    shutdown_timeout_s: float = Field(default=25.0, gt=0)
    # An agent whose broker does not answer for this long stops with an error rather
    # than retrying silently forever; a broker that answers as another cluster (a new
    # cluster id: a memory-only broker restarted, a recreated cluster) stops it at once.
    broker_timeout_s: float = Field(default=30.0, gt=0)
    broker_check_interval_s: float = Field(default=2.0, gt=0)
    auto_offset_reset: Literal["earliest", "none"] = "earliest"
    # Exactly-once (consume-transform-produce in Kafka transactions, brokers with
    # transactions only: Apache Kafka) for every agent; Agent(exactly_once=) overrides
    # it per agent. One transaction per consumed partition at a time takes that
    # partition's records as they come, for up to transaction_max_ms (Kafka Streams'
    # exactly-once commit interval is 100 ms too) or transaction_max_records; downstream
    # read_committed readers see its outputs at its commit.
    exactly_once: bool = False
    transaction_max_records: int = Field(default=500, gt=0)
    transaction_max_ms: int = Field(default=100, gt=0)
    # The broker aborts (and fences) a transaction open longer than this.
    transaction_timeout_ms: int = Field(default=60_000, gt=0)


class MetricsSettings(BaseModel):
    """The Prometheus endpoint of an agent process."""

    enabled: bool = True
    port: int = Field(default=0, ge=0, le=65535)  # 0: a free port, logged at start
    host: str = "0.0.0.0"


class AuditSettings(BaseModel):
    """What agents publish to the audit topic (``mesh.audit``)."""

    enabled: bool = True
    payloads: bool = False  # headers, ids and sizes always; payloads only when asked


class TracingSettings(BaseModel):
    """OpenTelemetry spans around handler runs (needs the ``otel`` extra and a tracer
    provider the process configured; without them the W3C ids still travel)."""

    enabled: bool = True


class SecuritySettings(BaseModel):
    """Keys the mesh signs and checks with."""

    model_config = ConfigDict(hide_input_in_errors=True)

    plan_key: SecretStr | None = None  # HMAC key: the coordinator signs plans, specialists check


class LlmSettings(BaseModel):
    """The model LLM agents use, when the deployment picks it (``MESH_LLM__*``).

    ``model`` is a pydantic-ai model name, ``provider:name`` (``openai:gpt-4o-mini``,
    ``anthropic:claude-sonnet-4-0``, ``ollama:llama3.2``, ``test``); unset, agents that
    read it run without a model (offline). ``base_url`` points the provider at another
    endpoint: with ``openai:`` (or no prefix) any OpenAI-compatible chat-completions
    server (vLLM, Ollama, LM Studio, a gateway). ``api_key`` is a secret, unwrapped only
    when the model is built (:func:`mesh.llm.model_from_settings`); unset, the provider's
    usual variable applies (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, ...).
    """

    model_config = ConfigDict(hide_input_in_errors=True)  # errors must not echo the key

    model: str | None = Field(default=None, min_length=1)
    base_url: str | None = None
    api_key: SecretStr | None = None
    # Seconds one model request may take (each attempt); local models on a CPU are slow.
    timeout_s: float = Field(default=120.0, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    # The provider SDK's own retries of one request. 0: the mesh retries, through its
    # retry topics (non-blocking, audited, counted by the breaker); the SDK's retries
    # would hold a handler slot and hide an outage from the breaker.
    max_retries: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check_llm(self) -> LlmSettings:
        if self.model is None and (self.base_url is not None or self.api_key is not None):
            raise ValueError(
                "MESH_LLM__BASE_URL or MESH_LLM__API_KEY is set but MESH_LLM__MODEL is not: "
                "name the model (e.g. MESH_LLM__MODEL=openai:gpt-4o-mini, or "
                "openai:llama3.2 for an OpenAI-compatible endpoint), or unset them.")
        if self.base_url is not None:
            scheme, _, rest = self.base_url.partition("://")
            if scheme not in ("http", "https") or not rest:
                raise ValueError("MESH_LLM__BASE_URL must be an http:// or https:// URL "
                                 "(e.g. http://127.0.0.1:11434/v1): fix it.")
            if "@" in rest.split("/", 1)[0]:
                raise ValueError("MESH_LLM__BASE_URL carries credentials (user:password@): "
                                 "put the key in MESH_LLM__API_KEY, a secret, instead.")
        return self


class MeshSettings(BaseSettings):
    """Everything a mesh process reads from its environment (``MESH_`` prefix)."""

    model_config = SettingsConfigDict(
        env_prefix="MESH_", env_nested_delimiter="__", extra="ignore", frozen=True,
        hide_input_in_errors=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    schema_registry: SchemaRegistrySettings = SchemaRegistrySettings()
    runtime: RuntimeSettings = RuntimeSettings()
    metrics: MetricsSettings = MetricsSettings()
    audit: AuditSettings = AuditSettings()
    tracing: TracingSettings = TracingSettings()
    security: SecuritySettings = SecuritySettings()
    llm: LlmSettings = LlmSettings()
    log_level: str = "INFO"

    def with_bootstrap(self, servers: str, *, embedded: bool = False) -> MeshSettings:
        """A copy pointing at ``servers``; ``embedded`` keeps the embedded profile."""
        update: dict[str, Any] = {"bootstrap_servers": servers}
        if embedded:
            update["profile"] = "embedded"
        kafka = self.kafka.model_copy(update=update)
        return self.model_copy(update={"kafka": kafka})
