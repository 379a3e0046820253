"""Retry back-off. Pure: the caller supplies the random draw.

``delay = d/2 + jitter * d/2`` with ``d = min(cap, base * 2**attempt)``: exponential, capped,
never less than half the nominal step (so a storm of retries cannot collapse onto ``now``), and
spread by jitter so replicas and workers do not retry in lockstep.
"""

from __future__ import annotations


def backoff_delay(attempt: int, jitter: float, *, base: float = 0.5, cap: float = 60.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based). ``jitter`` in [0, 1)."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    nominal = min(cap, base * float(2 ** min(attempt, 32)))
    return nominal / 2 + jitter * nominal / 2
