"""Settings of the Python runtime for a long-running consumer (process-wide, set once at start).

The cyclic garbage collector is the one that matters. The pipeline keeps up to
``MAX_PENDING_CHANGES`` pending changes alive, each a few container objects, and with CPython's
default thresholds (a young collection every 700 allocations, a full one whenever the old
generation grew by a quarter) the collector re-scans that live set again and again: measured on
the decode-and-coalesce path it cost more than half the per-record time (``benchmarks/cpu.py``).
Nothing in the pipeline relies on cycles being freed promptly (pending changes, events and
offsets are acyclic; they are freed by reference counting when taken or completed), so:

- ``gc.freeze()`` moves everything alive at start (modules, schemas, clients) out of the
  collector's sight for good;
- young collections run every ``YOUNG_THRESHOLD`` allocations instead of 700. The garbage cycles
  that do occur (exceptions with tracebacks, httpx internals) are still collected, a little
  later: at most that many objects wait, a few megabytes.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000
OLDER_THRESHOLD = 20


def tune_gc() -> tuple[int, int, int]:
    """Apply the settings above; return the previous thresholds."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, OLDER_THRESHOLD, OLDER_THRESHOLD)
    return previous
