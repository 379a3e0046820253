"""A real Prometheus scrapes the real service; every dashboard and alert expression must parse and
every metric it names must have data. The whole log and metrics output is scanned for PII."""

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
METRIC = re.compile(r"\b(ac_sync_[a-z_]+)\b")


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
    dash = json.loads((ROOT / "deploy/grafana/ac-audience-sync.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return [
        e.replace("$namespace", ".*").replace("$pod", ".*").replace("$__rate_interval", "1m")
        for e in exprs
    ]


def rule_exprs() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_prometheus_scrapes_and_every_expression_has_data(
    bootstrap: str, topic: str, fast_emulator: Emulator, tmp_path: Path
) -> None:
    samples = make_samples(events=1500, emails=150, audiences=3, invalid_ratio=0.02, seed=21)
    ends = produce(bootstrap, topic, samples.records)
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
    ).start()
    prometheus, url = start_prometheus(tmp_path, service.metrics_port)
    try:
        wait_for_lag_zero(bootstrap, "g-prom", topic, ends, timeout=120, services=[service])
        time.sleep(8)  # several scrapes after the work, so rate() over 1m has points
        metrics_text = service.metrics()
        exprs = dashboard_exprs() + rule_exprs()
        assert len(exprs) > 30
        names: set[str] = set()
        for expr in exprs:
            answer = query(url, expr)
            assert answer["status"] == "success", (expr, answer)
            names |= set(METRIC.findall(expr))
        missing = [
            n
            for n in sorted(names)
            if not query(url, f'count({{__name__="{n}"}})')["data"]["result"]
        ]
        assert missing == [], f"expressions name metrics the service does not export: {missing}"
        rules = httpx.get(url + "/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
        assert {r["health"] for r in rules} == {"ok"}
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
    assert "email_hash" in service.log_text() or "record to dead-letter topic" in service.log_text()
