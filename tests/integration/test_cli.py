"""The CLI as a user runs it: a real process, real broker, real emulator."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import create_topics
from tests.conftest import TOKEN
from tests.support.harness import run_cli

SENDER = "https://www.acme-corp.test"


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout=timeout)


@pytest.mark.parametrize(
    "sub", [[], ["run"], ["check"], ["explain"], ["reconcile"], ["emulator"], ["demo"]]
)
def test_help_on_every_subcommand(sub: list[str]) -> None:
    result = cli(*sub, "--help")
    assert result.returncode == 0
    assert "usage: ac-audience-sync" in result.stdout


def test_run_without_topic_exits_2_naming_it() -> None:
    result = cli(
        "run",
        env={
            "KAFKA_BOOTSTRAP_SERVERS": "x:9092",
            "AC_API_URL": "https://acct.api-us1.com",
            "AC_LIST_SENDER_URL": SENDER,
            "AC_API_TOKEN": "tok-SECRET-1",
        },
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "KAFKA_TOPIC" in lines[0]
    assert "tok-SECRET-1" not in result.stderr + result.stdout


def test_malformed_value_exits_2() -> None:
    result = cli(
        "run",
        env={
            "KAFKA_BOOTSTRAP_SERVERS": "x:9092",
            "KAFKA_TOPIC": "t",
            "AC_API_URL": "https://acct.api-us1.com",
            "AC_LIST_SENDER_URL": SENDER,
            "AC_API_TOKEN": "tok",
            "AC_RATE_LIMIT_PER_SECOND": "lots",
        },
    )
    assert result.returncode == 2
    assert "AC_RATE_LIMIT_PER_SECOND" in result.stderr


def check_env(bootstrap: str, topic: str, url: str, token: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "KAFKA_TOPIC": topic,
        "AC_API_URL": url,
        "AC_API_TOKEN": token,
        "AC_LIST_SENDER_URL": SENDER,
    }


def test_check_passes_with_good_setup(bootstrap: str, topic: str, emulator: Emulator) -> None:
    result = cli("check", env=check_env(bootstrap, topic, emulator.url, TOKEN))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK    ActiveCampaign token" in result.stdout
    assert f"OK    topic: {topic} has 6 partition(s)" in result.stdout


def test_check_says_token_refused(bootstrap: str, topic: str, emulator: Emulator) -> None:
    result = cli("check", env=check_env(bootstrap, topic, emulator.url, "wrong-token-XYZ"))
    assert result.returncode != 0
    assert "FAIL  ActiveCampaign token: refused" in result.stdout
    assert "wrong-token-XYZ" not in result.stdout + result.stderr


def test_check_says_token_refused_on_html_login_page(
    bootstrap: str, topic: str, emulator: Emulator
) -> None:
    emulator.account.set_faults({"html_login_on_bad_token": True}, 0.0)
    result = cli("check", env=check_env(bootstrap, topic, emulator.url, "wrong-token-XYZ"))
    assert result.returncode != 0
    assert "FAIL  ActiveCampaign token: refused" in result.stdout


def test_check_reports_missing_topic(bootstrap: str, emulator: Emulator) -> None:
    result = cli("check", env=check_env(bootstrap, "no-such-topic", emulator.url, TOKEN))
    assert result.returncode != 0
    assert "FAIL  topic: no-such-topic does not exist" in result.stdout


def test_check_reports_unreachable_broker(emulator: Emulator) -> None:
    result = cli("check", "--timeout", "2", env=check_env("127.0.0.1:1", "t", emulator.url, TOKEN))
    assert result.returncode != 0
    assert "FAIL  broker" in result.stdout


def test_emulator_subcommand_serves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import socket
    import time

    import httpx

    from service.devtools.localbroker import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "emulator", "--port", str(port), "--token", "abc"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        assert (
            httpx.get(
                f"http://127.0.0.1:{port}/api/3/lists", headers={"Api-Token": "abc"}
            ).status_code
            == 200
        )
        assert (
            httpx.get(
                f"http://127.0.0.1:{port}/api/3/lists", headers={"Api-Token": "no"}
            ).status_code
            == 403
        )
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_a_ledger_with_another_partition_count_is_refused(
    bootstrap: str, topic: str, emulator: Emulator
) -> None:
    create_topics(bootstrap, {f"{topic}.ledger": 3}, {"cleanup.policy": "compact"})
    env = check_env(bootstrap, topic, emulator.url, TOKEN)
    checked = cli("check", env=env)
    assert checked.returncode != 0
    assert f"FAIL  ledger topic: {topic}.ledger has 3 partition(s), the source topic 6" in (
        checked.stdout
    )
    ran = cli("run", env=env)
    assert ran.returncode == 2
    assert "KAFKA_LEDGER_TOPIC" in ran.stderr and "must be equal" in ran.stderr


def test_explain_rejects_a_malformed_email_and_a_missing_ledger(bootstrap: str) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_TOPIC": "never-created"}
    bad = cli("explain", "not-an-email", env=env)
    assert bad.returncode == 2 and "not a valid email" in bad.stderr
    missing = cli("explain", "a@example.com", env=env)
    assert missing.returncode == 2 and "never-created.ledger does not exist" in missing.stderr
