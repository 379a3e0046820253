"""``ac-audience-sync demo``: the whole path on this machine, no configuration needed.

Starts the local broker and the ActiveCampaign emulator, produces sample events over several
audiences, runs the real service (``ac-audience-sync run`` as a child process) until every
offset is committed, stops it with SIGTERM and prints what AC now holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import LocalBroker, committed_offsets, create_topics, free_port
from service.devtools.samples import make_samples, produce, subscribed

TOKEN = "demo-token-not-a-secret"  # noqa: S105 - the emulator's own token, not a real one


def peak_per_second(times: list[float], window: float = 1.0) -> int:
    """Most events inside any ``window``-second span (sliding, half-open)."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def _get(url: str) -> Any:
    """A GET of the emulator's inspection API (it wants the emulator's token)."""
    request = urllib.request.Request(url, headers={"Api-Token": TOKEN})  # noqa: S310 - local
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - local emulator
        return json.loads(response.read())


# What the child keeps of this process's environment: how to find programs and libraries, the
# locale and the time zone. Nothing else: a shell's real AC_API_TOKEN, KAFKA_PROPERTY_* or
# SCHEMA_REGISTRY_* must neither reach the demo's service nor change what it does.
CHILD_ENVIRONMENT = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


def child_environment(parent: dict[str, str], settings: dict[str, str]) -> dict[str, str]:
    """The demo service's whole environment: ``settings`` and the few variables above."""
    env = {name: parent[name] for name in CHILD_ENVIRONMENT if name in parent}
    env.update(settings)
    return env


def run_demo(*, events: int, emails: int, audiences: int, rate_limit: float) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ac-sync-demo-"))
    broker = LocalBroker(log_path=workdir / "broker.log").start()
    emulator = Emulator(tokens={TOKEN}, rate_limit=rate_limit, import_delay=1.0).start()
    emulator.account.set_faults({"latency_ms": [20, 80]}, 0.0)
    topic, group = "cdp.audience-membership", "ac-audience-sync-demo"
    metrics_port = free_port()
    service: subprocess.Popen[bytes] | None = None
    try:
        print(f"broker   : {broker.bootstrap} (Tansu, in memory)")
        print(f"emulator : {emulator.url}  (state: {emulator.url}/_emulator/state)")
        create_topics(broker.bootstrap, {topic: 6, f"{topic}.dlq": 6})
        samples = make_samples(
            events=events, emails=emails, audiences=audiences, invalid_ratio=0.01
        )
        ends = produce(broker.bootstrap, topic, samples.records)
        print(
            f"produced : {events} events, {emails} emails, {audiences} audiences, "
            f"{samples.invalid} with invalid emails"
        )
        env = child_environment(
            dict(os.environ),
            {
                "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
                "KAFKA_TOPIC": topic,
                "KAFKA_GROUP_ID": group,
                "KAFKA_PROPERTY_SESSION_TIMEOUT_MS": "6000",
                "AC_API_URL": emulator.url,
                "AC_API_TOKEN": TOKEN,
                "AC_LIST_SENDER_URL": "https://www.ac-audience-sync.test",
                "AC_RATE_LIMIT_PER_SECOND": f"{rate_limit:g}",
                "COALESCE_WINDOW_SECONDS": "2",
                "COMMIT_INTERVAL_SECONDS": "1",
                "METRICS_PORT": str(metrics_port),
            },
        )
        log_path = workdir / "service.log"
        started = time.monotonic()
        with open(log_path, "wb") as log:
            service = subprocess.Popen(
                [sys.executable, "-m", "service", "run"], env=env, stdout=log, stderr=log
            )
        print(
            f"service  : pid {service.pid}, metrics http://127.0.0.1:{metrics_port}/metrics, "
            f"log {log_path}"
        )
        last_report = 0.0
        while True:
            if service.poll() is not None:
                print(f"the service exited early with status {service.returncode}; see {log_path}")
                return 1
            committed = committed_offsets(broker.bootstrap, group, topic, list(ends))
            lag = sum(max(0, end - max(0, committed.get(p, 0))) for p, end in ends.items())
            now = time.monotonic()
            if now - last_report >= 5:
                print(f"  {now - started:6.1f}s  lag {lag}")
                last_report = now
            if lag == 0:
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        metrics_text = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        service.send_signal(signal.SIGTERM)
        service.wait(60)
        state = _get(f"{emulator.url}/_emulator/state")
        log = _get(f"{emulator.url}/_emulator/requests")["requests"]
        print(
            f"\nlag reached zero after {elapsed:.1f}s; the service stopped with status {service.returncode}\n"
        )
        print("ActiveCampaign now holds:")
        exact = True
        wanted = subscribed(samples.expected)
        held = subscribed({n: d["members"] for n, d in state["lists"].items()})
        for name in sorted(samples.expected):
            members = state["lists"].get(name, {}).get("members", {})
            on_list = sum(1 for s in members.values() if s == 1)
            unsubscribed = sum(1 for s in members.values() if s == 2)
            matches = held.get(name, set()) == wanted.get(name, set())
            exact &= matches
            print(
                f"  {name:<14} {on_list:5d} subscribed  {unsubscribed:5d} unsubscribed  "
                f"{'= expected' if matches else '!= EXPECTED'}"
            )
        peak = peak_per_second([r["t"] for r in log])
        statuses: dict[int, int] = {}
        for r in log:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        dlq = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics_text.splitlines()
            if line.startswith("ac_sync_dlq_records_total")
        )
        print(
            f"\nrequests : {len(log)} ({1000 * len(log) / events:.0f} per 1000 events), "
            f"by status {dict(sorted(statuses.items()))}"
        )
        print(f"peak     : {peak} requests in one second (limit {rate_limit:g})")
        print(f"DLQ      : {dlq:.0f} records in {topic}.dlq")
        print(f"metrics  : were at http://127.0.0.1:{metrics_port}/metrics; log in {log_path}")
        return 0 if exact else 1
    finally:
        if service is not None and service.poll() is None:
            service.kill()
        emulator.stop()
        broker.stop()
