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

from tests.simulation.harness import Report, Violation, run_history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seed", type=int, help="replay this one seed, verbosely")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    began = time.monotonic()
    totals: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    failures: list[tuple[int, str]] = []
    for seed in seeds:
        try:
            report = run_history(seed)
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
