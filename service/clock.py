"""The one real clock. Everything else takes ``now`` as an argument or a ``Clock``.

``monotonic`` orders events within this process (windows, back-offs, deadlines); ``wall`` is
shared with other replicas and with AC (request ticks, import minutes, event ages); ``sleep``
is the only real wait outside the consumer's own ``consume(timeout)``. The simulation
(``tests/simulation/``) replaces this object with virtual time.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
