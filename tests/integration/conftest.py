"""Fixtures shared by the integration tests that drive the `mesh` command."""

from __future__ import annotations

import pytest

from tests.conftest import BrokerUnderTest
from tests.integration.test_cli import RENDERING_VARIABLES, Cli


@pytest.fixture
def cli(broker: BrokerUnderTest, prefix: str, mesh_cli: list[str]) -> Cli:
    """`mesh` pointed at the session broker, finding this test's topics; output to pipes."""
    env = broker.env(MESH_TEST_PREFIX=prefix)
    for name in RENDERING_VARIABLES:
        env.pop(name, None)
    return Cli(tuple(mesh_cli), env)
