"""Ledger restore time and memory for 1,000,000 emails. Prints figures, asserts nothing.

Run with ``make bench-ledger`` (or ``python benchmarks/ledger.py --emails N``). It starts the
local broker, writes one ledger record per email (the service's own codec and partitioning: 12
partitions; a third of the emails hold two lists, UUID event ids, numeric contact ids), then
restores every partition in a fresh process the way a replica does on assignment, and reports:
the restore time, records per second, the in-memory index's own bytes per email (every packed
value, key and dict slot, measured with ``sys.getsizeof``) and the process's resident memory
before and after (peak included).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from confluent_kafka import Producer

from service.core.ledger import LedgerEntry, ListState, SetBy
from service.core.ledger_codec import LedgerCodec
from service.devtools.localbroker import LocalBroker, create_topics

PARTITIONS = 12


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def entry_for(i: int) -> LedgerEntry:
    lists = [
        ListState(
            f"Audience {chr(65 + i % 5)}",
            1 if i % 4 else 2,
            SetBy.SERVICE if i % 50 else SetBy.PERSON,
            str(uuid.UUID(int=i * 7919 + 1)),
            1_767_225_600_000 + i,
            1_767_225_601_000 + i,
            i % PARTITIONS,
            i // PARTITIONS,
            f"aud-{i % 5}",
            f"Audience {chr(65 + i % 5)}",
            "spring" if i % 2 else None,
            "B" if i % 3 else None,
        )
    ]
    if i % 3 == 0:
        lists.append(lists[0]._replace(list="Audience Z", audience_id="aud-z", audience_name="Z"))
    return LedgerEntry(str(100_000 + i), 0, tuple(lists))


def write(bootstrap: str, topic: str, emails: int) -> float:
    codec = LedgerCodec()
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 50, "batch.num.messages": 10000}
    )
    started = time.monotonic()
    for i in range(emails):
        value = codec.encode(entry_for(i))
        while True:
            try:
                producer.produce(
                    topic,
                    key=f"person{i:07d}@example.com".encode(),
                    value=value,
                    partition=i % PARTITIONS,
                )
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    producer.flush(120)
    return time.monotonic() - started


def restore(bootstrap: str, topic: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """In a fresh process, as a replica restores on assignment."""
    from service.adapters.ledger_store import LedgerStore

    before = rss_mb()
    store = LedgerStore(
        topic, producer=None, consumer_config={"bootstrap.servers": bootstrap, "group.id": "bench"}
    )
    stats = store.restore(list(range(PARTITIONS)))
    after = rss_mb()
    index_bytes = 0
    for emails in store.index.partitions.values():
        index_bytes += sys.getsizeof(emails)
        index_bytes += sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in emails.items())
    sample = store.get(5 % PARTITIONS, "person0000005@example.com")
    out.put(
        {
            "records": stats.records,
            "emails": stats.emails,
            "seconds": stats.seconds,
            "rss_before_mb": before,
            "rss_after_mb": after,
            "rss_peak_mb": rss_mb("VmHWM"),
            "index_bytes": index_bytes,
            "sample_ok": sample == entry_for(5),
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=1_000_000)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {multiprocessing.cpu_count()} cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )
    broker = LocalBroker().start()
    try:
        topic = "bench.ledger"
        create_topics(broker.bootstrap, {topic: PARTITIONS}, {"cleanup.policy": "compact"})
        seconds = write(broker.bootstrap, topic, args.emails)
        print(f"wrote {args.emails:,} ledger records in {seconds:.1f}s")
        spawn = multiprocessing.get_context("spawn")  # a fresh process: honest RSS figures
        queue = spawn.Queue()
        child = spawn.Process(target=restore, args=(broker.bootstrap, topic, queue))
        child.start()
        result = queue.get(timeout=1800)
        child.join(60)
    finally:
        broker.stop()
    emails = result["emails"]
    print(json.dumps(result, indent=2))
    print(
        f"\nrestore: {emails:,} emails ({result['records']:,} records) in "
        f"{result['seconds']:.1f}s = {result['records'] / result['seconds']:,.0f} records/s"
    )
    print(
        f"memory: index {result['index_bytes'] / emails:.0f} bytes/email "
        f"({result['index_bytes'] / 2**20:.0f} MiB); process RSS "
        f"{result['rss_before_mb']:.0f} -> {result['rss_after_mb']:.0f} MiB "
        f"(+{(result['rss_after_mb'] - result['rss_before_mb']) * 2**20 / emails:.0f} bytes/email), "
        f"peak {result['rss_peak_mb']:.0f} MiB; spot check {'ok' if result['sample_ok'] else 'FAILED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
