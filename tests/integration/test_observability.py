"""A real Prometheus scrapes the real service; every dashboard, recording and alert expression must
parse and every metric it names must have data (the recorded SLI series too, evaluated by the real
rules). The whole log and metrics output is scanned for PII."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import free_port
from service.devtools.samples import make_samples, produce
from tests.conftest import TOKEN
from tests.support.harness import ServiceProcess, service_env, wait_for_lag_zero

ROOT = Path(__file__).parents[2]
# Every metric name: the service's own (ac_sync_...), recorded series (level:metric:operation),
# and the process collector's (process_...). Names of other exporters (up, kube-state-metrics')
# are not the service's to feed.
NAME = re.compile(r"(?<![\w:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?=\s*[{\[)]|\s*$|\s+[-+*/>]|\s+and\b)")


def start_prometheus(tmp_path: Path, target_port: int) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is installed by scripts/install-test-deps"
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy/prometheus/rules.yml")],
        "scrape_configs": [
            {
                "job_name": "ac-audience-sync",
                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with open(tmp_path / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/-/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError("prometheus did not become ready")


def query(url: str, expr: str) -> dict:  # type: ignore[type-arg]
    answer = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    return answer  # type: ignore[no-any-return]


def dashboard_exprs() -> list[str]:
    """The panels' queries with every dashboard variable as Grafana would fill it in."""
    dash = json.loads((ROOT / "deploy/grafana/ac-audience-sync.json").read_text())
    values = {"__rate_interval": "1m"}
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            values[variable["name"]] = variable["allValue"]  # "All"
        elif variable["type"] == "custom":
            values[variable["name"]] = variable["current"]["value"]
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    filled = []
    for expr in exprs:
        text = expr
        for name in sorted(values, key=len, reverse=True):
            text = text.replace("$" + name, values[name])
        assert "$" not in text, text
        filled.append(text)
    return filled


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def recorded_names() -> set[str]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads that the service (or its rules) must feed."""
    names = set(NAME.findall(re.sub(r'"[^"]*"', '""', expr)))
    return {n for n in names if n.startswith(("ac_sync_", "process_")) or ":" in n}


def test_prometheus_scrapes_and_every_expression_has_data(
    bootstrap: str, topic: str, fast_emulator: Emulator, tmp_path: Path
) -> None:
    samples = make_samples(events=1500, emails=150, audiences=3, invalid_ratio=0.02, seed=21)
    service = ServiceProcess(
        service_env(
            bootstrap,
            topic,
            "g-prom",
            fast_emulator,
            AC_RATE_LIMIT_PER_SECOND="50",
            LOG_LEVEL="DEBUG",
        ),
        tmp_path / "svc",
    )
    prometheus, url = start_prometheus(tmp_path, service.metrics_port)
    try:
        service.start()
        # Prometheus scrapes the service before the first event is produced, so every counter's
        # increase happens under its eyes and the rates below are defined.
        deadline = time.monotonic() + 60
        while not query(url, 'up{job="ac-audience-sync"} == 1')["data"]["result"]:
            assert time.monotonic() < deadline, "Prometheus never scraped the service"
            time.sleep(0.5)
        ends = produce(bootstrap, topic, samples.records)
        wait_for_lag_zero(bootstrap, "g-prom", topic, ends, timeout=120, services=[service])
        time.sleep(8)  # several scrapes after the work, so rate() over 1m has points
        metrics_text = service.metrics()
        exprs = dashboard_exprs() + rule_exprs()
        assert len(exprs) > 50
        names: set[str] = set()
        for expr in exprs:
            answer = query(url, expr)
            assert answer["status"] == "success", (expr, answer)
            names |= metric_names(expr)
        assert recorded_names() <= names  # the dashboard reads the recorded SLIs
        # process_* come from prometheus_client's process collector, which the service must
        # register: test_service_exports_the_process_metrics checks those on their own.
        missing = [
            n
            for n in sorted(names)
            if not n.startswith("process_")
            and not query(url, f'count({{__name__="{n}"}})')["data"]["result"]
        ]
        assert missing == [], f"expressions name metrics the service does not feed: {missing}"
        # The SLIs on real data. The samples' occurred_at is 2026-01-01 (make_samples): every
        # event is applied months after it occurred, so all of them are late; no AC request failed.
        late = query(url, "namespace:ac_sync_events_applied_late:ratio_rate5m")["data"]["result"]
        errors = query(url, "namespace:ac_sync_ac_request_errors:ratio_rate5m")["data"]["result"]
        assert [float(s["value"][1]) for s in late] == [1.0], late
        # (0, or NaN when each request series was first scraped with its final value: a series
        # labelled by endpoint and code only exists from its first request on)
        assert [float(s["value"][1]) > 0 for s in errors] == [False], errors
        groups = httpx.get(url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) == len(rule_exprs())
        assert {r["health"] for r in rules} == {"ok"}
        # So the freshness burn-rate alerts are raised by the real rules on the real service's
        # series, and so is the dead-letter share (2% of the samples are invalid on purpose,
        # above the 1% threshold); nothing else.
        raised = {
            r["name"]: r["state"]
            for r in rules
            if r["type"] == "alerting" and r["state"] != "inactive"
        }
        assert set(raised) == {
            "AcSyncFreshnessBudgetBurnFast",
            "AcSyncFreshnessBudgetBurnSlow",
            "AcSyncDeadLetterRateHigh",
        }, raised
        # (the fast burn's `for` is 2 minutes: on a slow machine it may already fire)
        assert raised["AcSyncDeadLetterRateHigh"] == raised["AcSyncFreshnessBudgetBurnSlow"]
        assert raised["AcSyncDeadLetterRateHigh"] == "pending"
        assert raised["AcSyncFreshnessBudgetBurnFast"] in {"pending", "firing"}
        assert query(url, 'up{job="ac-audience-sync"}')["data"]["result"][0]["value"][1] == "1"
        # Series count stays bounded: no label carries user data.
        series = sum(1 for line in metrics_text.splitlines() if line and not line.startswith("#"))
        assert series < 500
    finally:
        prometheus.terminate()
        prometheus.wait(10)
        service.terminate()
    # Privacy: the whole log and the metrics of the run hold no raw email and no token.
    everything = service.log_text() + metrics_text
    assert TOKEN not in everything
    assert not re.search(r"person\d{5}@example\.com", everything, re.I)
    assert not re.search(r"broken-\d+-at-example\.com", everything, re.I)
    # The patterns above would see a raw email of this run (so their silence means something):
    # the samples' own records carry them, and the service logged about those records.
    raw = b"".join(value or b"" for _, value in samples.records).decode("latin-1")
    assert re.search(r"person\d{5}@example\.com", raw)
    assert re.search(r"broken-\d+-at-example\.com", raw)
    assert service.log_text().count("record to dead-letter topic") >= 10


def test_service_exports_the_process_metrics(
    bootstrap: str, topic: str, fast_emulator: Emulator, tmp_path: Path
) -> None:
    """The dashboard's CPU and memory panels and AcSyncMemoryNearLimit read prometheus_client's
    process collector (process_cpu_seconds_total, process_resident_memory_bytes, ...), which the
    service registers on its own registry."""
    service = ServiceProcess(
        service_env(bootstrap, topic, "g-process", fast_emulator), tmp_path / "svc"
    ).start()
    try:
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and "ac_sync_build_info" not in text:
            try:
                text = service.metrics()
            except httpx.HTTPError:
                time.sleep(0.2)
        assert "ac_sync_build_info" in text, service.log_text()
        exported = {
            line.split("{")[0].split()[0] for line in text.splitlines() if line[:1].isalpha()
        }
        wanted = {
            n
            for e in dashboard_exprs() + rule_exprs()
            for n in metric_names(e)
            if n.startswith("process_")
        }
        assert wanted >= {"process_cpu_seconds_total", "process_resident_memory_bytes"}
        assert wanted <= exported, f"not exported: {sorted(wanted - exported)}"
    finally:
        service.terminate()
