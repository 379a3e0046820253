"""``make soak``: many seeded histories of the whole service, with what they covered.

    python -m tests.simulation.soak [--seeds N] [--start S] [--seed SEED] [--verbose]

Each seed is one history (``harness.run_history``). A failing seed prints the broken invariant
and the command that replays it; the exit status is the number of failing seeds (capped at 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections import Counter

from tests.simulation.harness import Profile, Report, Violation, run_history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seed", type=int, help="replay this one seed, verbosely")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--progress-crash",
        type=int,
        default=0,
        metavar="EVENTS",
        help="also run invariant 5 at this size: a backlog, a crash every 20 s of virtual time",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    began = time.monotonic()
    totals: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    failures: list[tuple[int, str]] = []
    for seed in seeds:
        try:
            report = run_history(seed, journal=args.seed is not None)
        except Violation as violation:
            failures.append((seed, str(violation)))
            print(f"FAIL {violation}", flush=True)
            continue
        except Exception:
            failures.append((seed, traceback.format_exc()))
            print(f"CRASH seed {seed}:\n{traceback.format_exc()}", flush=True)
            continue
        add(totals, faults, report)
        if args.verbose or args.seed is not None:
            print(f"ok   seed {seed}: {describe(report)}", flush=True)
    if args.progress_crash:
        crash = progress_under_crashes(args.progress_crash)
        print(crash, flush=True)
        if not crash.startswith("ok"):
            failures.append((-1, crash))
    elapsed = time.monotonic() - began
    histories = len(seeds)
    print(
        f"{histories} histories in {elapsed:.1f}s: {histories - len(failures)} passed, "
        f"{len(failures)} failed"
    )
    print(
        f"covered: {totals['events']} events, {totals['requests']} AC requests, "
        f"{totals['imports']} imports, {totals['commits']} commits, {totals['crashes']} crashes, "
        f"{totals['restarts']} restarts, {totals['rebalances']} graceful rebalances, "
        f"{totals['lost']} lost assignments, {totals['virtual']:.0f} virtual seconds, "
        f"{totals['checks']} invariant checks"
    )
    print("faults: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    for seed, _ in failures[:20]:
        print(f"  replay: make soak SEED={seed}")
    return 1 if failures else 0


def progress_under_crashes(events: int) -> str:
    """Invariant 5 at full size: one replica drains a backlog while it is killed every 20 s."""
    began = time.monotonic()
    profile = crash_profile(events)
    try:
        report = run_history(7, profile)
    except Violation as violation:
        return f"FAIL progress under crashes ({events} events): {violation}"
    return (
        f"ok   progress under crashes: {events} events drained in {report.virtual_seconds:.0f}s "
        f"of virtual time despite {report.crashes} crashes ({time.monotonic() - began:.0f}s)"
    )


def crash_profile(events: int) -> Profile:
    return Profile(
        partitions=6,
        replicas=1,
        emails=max(10, events // 5),
        audiences=5,
        events=events,
        duration=1.0,
        backlog=1.0,
        crashes=0,
        faults=0,
        max_pending=100_000,
        drain_limit=3600.0,
        crash_every=20.0,
    )


def add(totals: Counter[str], faults: Counter[str], report: Report) -> None:
    for name in (
        "events",
        "requests",
        "imports",
        "commits",
        "crashes",
        "restarts",
        "rebalances",
        "lost",
        "checks",
    ):
        totals[name] += getattr(report, name)
    totals["virtual"] += int(report.virtual_seconds)
    faults.update(report.faults)


def describe(report: Report) -> str:
    p = report.profile
    return (
        f"{p.partitions} partitions, {p.replicas} replicas, {report.events} events, "
        f"{report.requests} requests, {report.imports} imports, {report.crashes} crashes, "
        f"{report.virtual_seconds:.0f}s virtual, faults {dict(report.faults)}"
    )


if __name__ == "__main__":
    sys.exit(main())
