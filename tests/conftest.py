"""The test bed: a real Kafka-protocol broker per session and the AC emulator per test.

``ACSYNC_TEST_BOOTSTRAP=host:port`` uses an external broker instead of starting Tansu.
No process outlives the session: the broker is stopped in the fixture's teardown.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import LocalBroker, create_topics

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker | str]:
    external = os.environ.get("ACSYNC_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    log = Path(tmp_path_factory.mktemp("broker")) / "tansu.log"
    local = LocalBroker(log_path=log).start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def bootstrap(broker: LocalBroker | str) -> str:
    return broker if isinstance(broker, str) else broker.bootstrap


@pytest.fixture
def topic(bootstrap: str) -> str:
    """A fresh topic (6 partitions) and its DLQ for one test."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    create_topics(bootstrap, {name: 6, f"{name}.dlq": 6})
    return name


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(tokens={TOKEN}, rate_limit=5.0, import_delay=0.5, seed=1).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def collector_off() -> Iterator[None]:
    """Automatic garbage collection off, as ``service run`` has it (service/app/runtime.py)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
