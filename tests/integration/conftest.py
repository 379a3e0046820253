"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.devtools.emulator.server import Emulator
from tests.conftest import TOKEN
from tests.support.harness import ServiceProcess

FAST = "200"  # functional tests run AC and the service at a raised limit; limit tests use 5


@pytest.fixture
def fast_emulator() -> Iterator[Emulator]:
    """The emulator at a raised rate limit, for tests that are not about the limit."""
    emu = Emulator(tokens={TOKEN}, rate_limit=float(FAST), import_delay=0.3, seed=5).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def services() -> Iterator[list[ServiceProcess]]:
    """Service processes a test starts; any still running are killed afterwards."""
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        service.stop()
