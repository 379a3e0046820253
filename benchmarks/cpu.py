"""CPU-only benchmark: events decoded and coalesced per second on one core, against a plain
``fastavro.schemaless_reader`` loop over the same bytes (the ceiling).

The service reads records of its own layout with ``service/core/fast_decode.py`` and leaves the rest
to fastavro (decision 004). The benchmark prints the share it read, and the same pipeline with
fastavro decoding every record, so the two sources of speed can be told apart.

Run: ``make bench`` (or ``.venv/bin/python benchmarks/cpu.py``). Prints figures; asserts nothing.
"""

from __future__ import annotations

import gc
import io
import platform
import time
import zlib
from typing import Any

import fastavro

from service.app.runtime import COLLECT_INTERVAL_SECONDS, Collector, tune_gc
from service.core.coalesce import Coalescer
from service.core.codec import EventDecoder, load_reader_schema
from service.core.errors import PoisonMessage
from service.core.event_validation import EmailCache
from service.core.fast_decode import read_event
from service.core.lists import ListNamer
from service.devtools.samples import make_samples
from service.pipeline.loop import CONSUME_BATCH


def bare_fastavro(values: list[bytes], schema: Any) -> float:
    began = time.perf_counter()
    for value in values:
        fastavro.schemaless_reader(io.BytesIO(value), schema, None)
    return len(values) / (time.perf_counter() - began)


def decode_and_coalesce(
    values: list[tuple[int, int, bytes]],
    schema: Any,
    kept: list[Coalescer] | None = None,
    *,
    fast_reader: bool = True,
) -> float:
    """What the runner does per consumed batch: decode and validate it, then name the list and
    coalesce record by record; between batches, the scheduled garbage collection (it runs when
    its schedule says so, as in the runner's loop)."""
    decoder = EventDecoder(schema, fast_reader=fast_reader)
    coalescer = Coalescer(window=5.0)
    list_for = ListNamer("{audience_name}", {})
    collector = Collector()
    began = time.perf_counter()
    for start in range(0, len(values), CONSUME_BATCH):
        collector.maybe_collect(time.monotonic())
        batch = values[start : start + CONSUME_BATCH]
        events = decoder.decode_batch([value for _, _, value in batch])
        for (partition, offset, value), event in zip(batch, events, strict=True):
            if isinstance(event, PoisonMessage):
                continue
            coalescer.add(partition, list_for(event), event, value, offset, 0.0)
    rate = len(values) / (time.perf_counter() - began)
    if kept is not None:
        kept.append(coalescer)
    return rate


def full_collection(pending: Coalescer) -> float:
    """Seconds one scheduled full collection takes with ``pending`` alive (the price paid once
    per ``COLLECT_INTERVAL_SECONDS`` instead of per object)."""
    began = time.perf_counter()
    gc.collect()
    return time.perf_counter() - began


def main(events: int = 200_000) -> None:
    # Both loops read with the schema the service reads with (occurred_at as a plain long).
    schema = load_reader_schema(logical_types=False)
    samples = make_samples(events=events, emails=20_000, audiences=5, seed=1)
    values = [value for _, value in samples.records]
    # Records are keyed by email, so one email's events share a partition (12, as in the
    # end-to-end run); offsets count per partition.
    numbered: list[tuple[int, int, bytes]] = []
    next_offset = [0] * 12
    for key, value in samples.records:
        partition = zlib.crc32(key) % 12
        numbered.append((partition, next_offset[partition], value))
        next_offset[partition] += 1
    tune_gc()  # as ``service run`` does at start (see service/app/runtime.py)
    best_bare = max(bare_fastavro(values, schema) for _ in range(3))
    best_ours = max(decode_and_coalesce(numbered, schema) for _ in range(3))
    best_fastavro = max(decode_and_coalesce(numbered, schema, fast_reader=False) for _ in range(3))
    email_of = EmailCache()
    read_here = 0
    for value in values:
        try:
            read_here += read_event(value, 0, email_of) is not None
        except PoisonMessage:
            read_here += 1
    kept: list[Coalescer] = []
    decode_and_coalesce(numbered, schema, kept)
    pause = full_collection(kept[0])
    print(
        f"machine: {platform.machine()} {platform.python_implementation()} {platform.python_version()}"
    )
    print(f"events: {events} over 20000 emails and 5 audiences (best of 3, one core)")
    print(f"bare fastavro.schemaless_reader : {best_bare:12,.0f} events/s (ceiling)")
    print(f"decode + validate + coalesce    : {best_ours:12,.0f} events/s")
    print(f"ratio to the ceiling            : {best_ours / best_bare:12.2f}")
    print(
        f"records read by fast_decode     : {read_here / len(values):12.1%} (the rest by fastavro)"
    )
    print(
        f"same, fastavro for every record : {best_fastavro:12,.0f} events/s"
        f" = {best_fastavro / best_bare:.2f} of the ceiling"
    )
    print(
        f"scheduled full collection       : {pause * 1000:12.0f} ms with {len(kept[0]):,} pending"
        f" changes, once every {COLLECT_INTERVAL_SECONDS:.0f} s"
        f" ({pause / COLLECT_INTERVAL_SECONDS:.2%} of one core)"
    )


if __name__ == "__main__":
    main()
