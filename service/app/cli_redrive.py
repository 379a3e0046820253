"""``ac-audience-sync redrive``'s shell: its options read into ``Criteria`` (``--reason`` checked
against the dead-letter reasons), the Kafka settings, and the broker's problems as an exit
status. The command itself is ``redrive.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from service.app.cli_common import EXIT_CONFIG, _kafka_errors, _settings_or_exit, kafka_only_env


def _reasons(values: Sequence[str] | None) -> frozenset[str] | None:
    from service.metrics import DLQ_REASONS

    if not values:
        return None
    named = {r.strip() for value in values for r in value.split(",") if r.strip()}
    unknown = sorted(named - set(DLQ_REASONS))
    if unknown:
        raise ValueError(
            f"unknown reason(s) {', '.join(unknown)}; the reasons are {', '.join(DLQ_REASONS)}"
        )
    return frozenset(named)


def cmd_redrive(args: argparse.Namespace) -> int:
    """Put dead-lettered records back on the source topic (``service/app/redrive.py``). Exit
    statuses: 0 done (a dry run: reported), 1 some records could not be checked or written
    (run again), 2 configuration or usage, 3 broker unreachable."""
    from service.app.redrive import Options, run
    from service.app.redrive_topics import Progress
    from service.core.redrive import Criteria, parse_time

    now = time.time()
    try:
        criteria = Criteria(
            reasons=_reasons(args.reason),
            partitions=frozenset(args.partition) if args.partition else None,
            from_offset=args.from_offset,
            to_offset=args.to_offset,
            since_ms=parse_time(args.since, now) if args.since else None,
            until_ms=parse_time(args.until, now) if args.until else None,
            limit=args.limit,
        )
    except ValueError as exc:
        print(f"ac-audience-sync redrive: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    settings = _settings_or_exit(kafka_only_env(os.environ))
    options = Options(criteria, args.execute, args.json, args.timeout)
    return _kafka_errors("redrive", settings, lambda: run(settings, options, Progress("redrive")))
