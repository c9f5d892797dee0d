"""Unit tests for mesh.config: settings from the environment, handed to aiokafka."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import aiokafka
import pytest
from pydantic import SecretStr, ValidationError

from mesh.config import KafkaSettings, MeshSettings

PASSWORD = "pw-0f3c9e-never-logged"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MESH_"):
            monkeypatch.delenv(name)


@pytest.fixture
def sasl_ssl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_KAFKA__BOOTSTRAP_SERVERS", "broker-1:9093,broker-2:9093")
    monkeypatch.setenv("MESH_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("MESH_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("MESH_KAFKA__SASL_PLAIN_USERNAME", "agent")
    monkeypatch.setenv("MESH_KAFKA__SASL_PLAIN_PASSWORD", PASSWORD)


@pytest.fixture
def tls_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A self-signed certificate and its key, named in the TLS settings."""
    if shutil.which("openssl") is None:  # `cryptography` is not installed in this venv
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=mesh-test-ca"],
                   check=True, capture_output=True)
    monkeypatch.setenv("MESH_KAFKA__SSL_CAFILE", str(cert))
    monkeypatch.setenv("MESH_KAFKA__SSL_CERTFILE", str(cert))
    monkeypatch.setenv("MESH_KAFKA__SSL_KEYFILE", str(key))
    return cert, key


@pytest.mark.usefixtures("sasl_ssl_env")
def test_nested_env_vars_configure_sasl_ssl() -> None:
    kafka = MeshSettings().kafka

    assert kafka.bootstrap_servers == "broker-1:9093,broker-2:9093"
    assert kafka.security_protocol == "SASL_SSL"
    assert kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert kafka.sasl_plain_username == "agent"
    assert isinstance(kafka.sasl_plain_password, SecretStr)
    assert kafka.sasl_plain_password.get_secret_value() == PASSWORD


@pytest.mark.usefixtures("sasl_ssl_env")
def test_client_kwargs_carry_sasl_credentials_and_a_tls_context() -> None:
    kwargs = MeshSettings().kafka.client_kwargs()

    assert kwargs["bootstrap_servers"] == "broker-1:9093,broker-2:9093"
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "agent"
    assert kwargs["sasl_plain_password"] == PASSWORD
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)


@pytest.mark.usefixtures("sasl_ssl_env")
async def test_aiokafka_clients_accept_the_client_kwargs(tls_files: tuple[Path, Path]) -> None:
    settings = MeshSettings()
    kwargs = settings.kafka.client_kwargs()

    producer = aiokafka.AIOKafkaProducer(**kwargs)
    consumer = aiokafka.AIOKafkaConsumer("t", group_id="g", **kwargs,
                                         **settings.kafka.group_timings())
    try:
        for client in (producer.client, consumer._client):
            assert client._security_protocol == "SASL_SSL"
            assert client._sasl_mechanism == "SCRAM-SHA-512"
            assert client._sasl_plain_username == "agent"
            assert client._sasl_plain_password == PASSWORD
            assert client._ssl_context is kwargs["ssl_context"]
    finally:
        await producer.stop()
        await consumer.stop()
    ca_subjects = [cert["subject"] for cert in kwargs["ssl_context"].get_ca_certs()]
    assert ((("commonName", "mesh-test-ca"),),) in ca_subjects


def test_tls_context_follows_check_hostname(tls_files: tuple[Path, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_KAFKA__SECURITY_PROTOCOL", "SSL")
    monkeypatch.setenv("MESH_KAFKA__SSL_CHECK_HOSTNAME", "false")

    context = MeshSettings().kafka.client_kwargs()["ssl_context"]

    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_sasl_without_mechanism_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")

    with pytest.raises(ValidationError, match="MESH_KAFKA__SASL_MECHANISM"):
        MeshSettings()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
def test_sasl_password_mechanism_without_credentials_is_a_validation_error(
        mechanism: str) -> None:
    with pytest.raises(ValidationError):
        KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism)


def test_oauthbearer_is_rejected_or_given_a_token_provider() -> None:
    try:
        kafka = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER")
    except ValidationError:
        return
    assert kafka.client_kwargs().get("sasl_oauth_token_provider") is not None


def test_secrets_never_appear_in_repr_str_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("MESH_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("MESH_KAFKA__SASL_PLAIN_USERNAME", "agent")
    monkeypatch.setenv("MESH_KAFKA__SASL_PLAIN_PASSWORD", PASSWORD)
    monkeypatch.setenv("MESH_KAFKA__SSL_PASSWORD", PASSWORD + "-ssl")
    monkeypatch.setenv("MESH_SCHEMA_REGISTRY__URL", "http://registry:8081")
    monkeypatch.setenv("MESH_SCHEMA_REGISTRY__PASSWORD", PASSWORD + "-registry")
    settings = MeshSettings()
    assert settings.kafka.sasl_plain_password is not None  # the env really was read

    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "pw-0f3c9e" not in text


def test_embedded_profile_has_shorter_group_timings_than_kafka() -> None:
    embedded = KafkaSettings().group_timings()
    kafka = KafkaSettings(bootstrap_servers="broker:9092").group_timings()

    assert KafkaSettings().embedded_profile
    assert embedded == {"session_timeout_ms": 6_000, "heartbeat_interval_ms": 500,
                        "fetch_max_wait_ms": 100}
    assert kafka == {"session_timeout_ms": 10_000, "heartbeat_interval_ms": 3_000,
                     "fetch_max_wait_ms": 500}


def test_profile_and_explicit_timings_override_the_defaults() -> None:
    forced = KafkaSettings(bootstrap_servers="127.0.0.1:9092", profile="embedded")
    tuned = KafkaSettings(bootstrap_servers="broker:9092", session_timeout_ms=45_000)

    assert forced.group_timings()["session_timeout_ms"] == 6_000
    assert tuned.group_timings()["session_timeout_ms"] == 45_000
    assert MeshSettings().with_bootstrap("b:1", embedded=True).kafka.embedded_profile
    assert not MeshSettings().with_bootstrap("b:1").kafka.embedded_profile


def test_a_settings_error_never_echoes_the_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad setting beside a password: the validation error names the problem but
    not the password (pydantic would otherwise print the input)."""
    monkeypatch.setenv("MESH_KAFKA__SSL_PASSWORD", "hunter2secret")
    monkeypatch.setenv("MESH_KAFKA__SASL_PLAIN_PASSWORD", "s3cr3t-sasl")
    monkeypatch.setenv("MESH_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")  # no mechanism: invalid
    with pytest.raises(ValidationError) as info:
        MeshSettings()
    text = str(info.value)
    assert "SASL_MECHANISM" in text
    assert "hunter2secret" not in text and "s3cr3t-sasl" not in text
