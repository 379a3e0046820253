"""The operations package, checked by the real tools: hadolint, kubernetes-validate, promtool,
and the wheel installed the way the Dockerfile installs it, run as a non-root user."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def run(*cmd: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_dockerfile_is_hadolint_clean() -> None:
    result = run(str(BIN / "hadolint"), "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_the_run_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["ac-audience-sync", "run"]' in text
    assert "EXPOSE 9108" in text
    assert "HEALTHCHECK" not in text
    assert text.count("FROM ") == 2  # multi-stage


BASE_RESOURCES = [
    "configmap.yaml",
    "secret.example.yaml",
    "deployment.yaml",
    "service.yaml",
    "poddisruptionbudget.yaml",
]


@pytest.mark.parametrize("name", BASE_RESOURCES)
def test_manifests_validate_against_current_kubernetes(name: str) -> None:
    result = run(
        str(BIN / "kubernetes-validate"), "--strict", "-k", "1.37.0", str(DEPLOY / "base" / name)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_lists_every_base_file_and_overlay_points_at_base() -> None:
    kustomization = yaml.safe_load((DEPLOY / "base/kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in (DEPLOY / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    overlay = yaml.safe_load((DEPLOY / "overlays/production/kustomization.yaml").read_text())
    assert overlay["resources"] == ["../../base"]
    for patch in overlay["patches"]:
        assert (DEPLOY / "overlays/production" / patch["path"]).exists()


def test_deployment_promises() -> None:
    deployment = yaml.safe_load((DEPLOY / "base/deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    config = yaml.safe_load((DEPLOY / "base/configmap.yaml").read_text())["data"]
    assert pod["terminationGracePeriodSeconds"] > float(config["SHUTDOWN_GRACE_SECONDS"])
    assert "AC_API_TOKEN" not in config
    secret = yaml.safe_load((DEPLOY / "base/secret.example.yaml").read_text())
    assert secret["stringData"]["token"].startswith("REPLACE")


def test_prometheusrule_carries_exactly_the_plain_rules() -> None:
    plain = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())
    operator = yaml.safe_load((DEPLOY / "base/prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == plain["groups"]


def test_every_alert_links_to_an_existing_runbook_section() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())["groups"][0]["rules"]
    sections = {
        h.lower() for h in re.findall(r"^## (\S+)", (DEPLOY / "RUNBOOK.md").read_text(), re.M)
    }
    for rule in rules:
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor in sections, rule["alert"]


def test_promtool_check_and_unit_tests_for_every_alert() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/install-test-deps"
    check = run(promtool, "check", "rules", str(DEPLOY / "prometheus/rules.yml"))
    assert check.returncode == 0, check.stdout + check.stderr
    test = run(promtool, "test", "rules", str(DEPLOY / "prometheus/rules.test.yml"))
    assert test.returncode == 0, test.stdout + test.stderr
    alerts = {
        r["alert"]
        for r in yaml.safe_load((DEPLOY / "prometheus/rules.yml").read_text())["groups"][0]["rules"]
    }
    tested = {
        case["alertname"]
        for t in yaml.safe_load((DEPLOY / "prometheus/rules.test.yml").read_text())["tests"]
        for case in t["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert alerts == tested


def test_dashboard_is_templated_and_covers_the_asks() -> None:
    dash = json.loads((DEPLOY / "grafana/ac-audience-sync.json").read_text())
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"namespace", "pod"} <= names
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for metric in (
        "ac_sync_events_consumed_total",
        "ac_sync_changes_applied_total",
        "ac_sync_events_coalesced_total",
        "ac_sync_consumer_lag",
        "ac_sync_ac_requests_total",
        "ac_sync_ac_rate_limited_total",
        "ac_sync_ac_request_duration_seconds_bucket",
        "ac_sync_ratelimit_wait_seconds_bucket",
        "ac_sync_dlq_records_total",
        "ac_sync_changes_pending",
        "ac_sync_event_to_applied_seconds_bucket",
        "ac_sync_auth_rejected",
        "ac_sync_imports_total",
        "ac_sync_import_budget_left",
        "ac_sync_gc_pause_seconds_bucket",
    ):
        assert metric in exprs, metric


def test_wheel_installs_like_the_dockerfile_and_runs_as_non_root(tmp_path: Path) -> None:
    """Build stage: ``pip wheel .``; runtime: install from those wheels only, run unprivileged."""
    work = Path(tempfile.mkdtemp(prefix="wheel-"))
    os.chmod(work, 0o755)
    try:
        wheels = work / "wheels"
        build = run(
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-cache-dir",
            "--wheel-dir",
            str(wheels),
            str(ROOT),
        )
        assert build.returncode == 0, build.stderr
        venv = work / "venv"
        assert run(sys.executable, "-m", "venv", str(venv)).returncode == 0
        install = run(
            str(venv / "bin/pip"),
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            str(wheels),
            "ac-audience-sync==0.1.0",
        )
        assert install.returncode == 0, install.stderr
        for path in [work, *work.rglob("*")]:
            if path.is_dir():
                os.chmod(path, 0o755)
        probe = (
            "import os, sys; from service.core.codec import load_reader_schema; load_reader_schema();"
            "print(os.geteuid())"
        )
        command = [str(venv / "bin/ac-audience-sync"), "--help"]
        python = [str(venv / "bin/python"), "-c", probe]
        if os.geteuid() == 0:  # as root (CI), drop to nobody exactly like USER in the Dockerfile
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            command, python = prefix + command, prefix + python
        helped = run(*command, cwd=work)
        assert helped.returncode == 0, helped.stderr
        assert "usage: ac-audience-sync" in helped.stdout
        uid = run(*python, cwd=work)
        assert uid.returncode == 0, uid.stderr  # the schema ships inside the wheel
        assert uid.stdout.strip() != "0"
    finally:
        shutil.rmtree(work, ignore_errors=True)
