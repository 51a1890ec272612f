"""Server test set-up: helper modules importable by name, fake-engine servers per test,
and one real server per session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fakes import KEY, FakeEngine, RecordingGatekeeper, running_server
from live import LiveServer, start_live_server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_live_server(tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gatekeeper() -> RecordingGatekeeper:
    return RecordingGatekeeper(keys=[KEY])


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def url(engine: FakeEngine, gatekeeper: RecordingGatekeeper) -> Iterator[str]:
    """A fake-engine server's base URL."""
    with running_server({"fake": engine}, gatekeeper) as base:
        yield base
