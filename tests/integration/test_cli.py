"""The CLI as a user runs it: a real process, real broker, real emulator."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service.devtools.emulator.server import Emulator
from service.devtools.localbroker import create_topics
from tests.conftest import TOKEN
from tests.support.harness import run_cli

SENDER = "https://www.acme-corp.test"


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout=timeout)


@pytest.mark.parametrize(
    "sub",
    [
        [],
        ["run"],
        ["check"],
        ["explain"],
        ["reconcile"],
        ["redrive"],
        ["forget"],
        ["emulator"],
        ["demo"],
    ],
)
def test_help_on_every_subcommand(sub: list[str]) -> None:
    result = cli(*sub, "--help")
    assert result.returncode == 0
    assert "usage: ac-audience-sync" in result.stdout
    if sub in (["redrive"], ["forget"]):
        assert "examples:" in result.stdout
        assert "Exit status: 0" in " ".join(result.stdout.split())


def test_run_without_topic_exits_2_naming_it() -> None:
    result = cli(
        "run",
        env={
            "KAFKA_BOOTSTRAP_SERVERS": "x:9092",
            "AC_API_URL": "https://acct.api-us1.com",
            "AC_API_TOKEN": "tok-SECRET-1",
            "AC_LIST_SENDER_URL": SENDER,
        },
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["field"] == "KAFKA_TOPIC"
    assert "KAFKA_TOPIC" in json.loads(lines[0])["msg"]
    assert "tok-SECRET-1" not in result.stderr + result.stdout


def test_malformed_value_exits_2() -> None:
    result = cli(
        "run",
        env={
            "KAFKA_BOOTSTRAP_SERVERS": "x:9092",
            "KAFKA_TOPIC": "t",
            "AC_API_URL": "https://acct.api-us1.com",
            "AC_API_TOKEN": "tok",
            "AC_LIST_SENDER_URL": SENDER,
            "AC_RATE_LIMIT_PER_SECOND": "lots",
        },
    )
    assert result.returncode == 2
    assert "AC_RATE_LIMIT_PER_SECOND" in result.stderr


def test_run_reports_every_problem_at_once_as_json_lines_without_a_secret(
    tmp_path: Path,
) -> None:
    """Environment problems and a bad librdkafka property: exit 2, one JSON line each, no
    traceback, no secret value."""
    (tmp_path / "password").write_text("pw-FILE-SECRET-2\n")
    result = cli(
        "run",
        env={
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "AC_API_URL": "http://user:pw-URL-SECRET-3@acct.api-us1.com",
            "AC_API_TOKEN": "tok-SECRET-1",
            "AC_RATE_LIMIT_PER_SECOND": "tok-SECRET-1",
            "KAFKA_PROPERTY_SASL_PASSWORD_FILE": str(tmp_path / "password"),
            "KAFKA_PROPERTY_SASL_PASSWORD": "pw-SECRET-4",
        },
    )
    assert result.returncode == 2
    records = [json.loads(line) for line in result.stderr.strip().splitlines()]
    assert sorted(r["field"] for r in records) == [
        "AC_API_URL",
        "AC_LIST_SENDER_URL",
        "AC_RATE_LIMIT_PER_SECOND",
        "KAFKA_PROPERTY_SASL_PASSWORD",
        "KAFKA_TOPIC",
    ]
    assert {r["level"] for r in records} == {"ERROR"}
    everything = result.stdout + result.stderr
    for secret in ("tok-SECRET-1", "pw-FILE-SECRET-2", "pw-URL-SECRET-3", "pw-SECRET-4"):
        assert secret not in everything
    assert "Traceback" not in everything


def kafka_env(**extra: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "KAFKA_TOPIC": "t",
        "AC_API_URL": "https://acct.api-us1.com",
        "AC_API_TOKEN": "tok",
        "AC_LIST_SENDER_URL": SENDER,
        **extra,
    }


@pytest.mark.parametrize("command", ["run", "check"])
def test_a_bad_librdkafka_property_is_a_configuration_error(command: str) -> None:
    result = cli(
        command,
        env=kafka_env(
            KAFKA_PROPERTY_SESSION_TIMEOUT_MS="abc", KAFKA_PROPERTY_FETCH_WAIT_MAX_MS="soon"
        ),
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "KAFKA_PROPERTY_SESSION_TIMEOUT_MS" in output
    assert "KAFKA_PROPERTY_FETCH_WAIT_MAX_MS" in output
    assert "Traceback" not in output
    assert "OK    configuration" not in output


@pytest.mark.parametrize("command", ["run", "check"])
def test_sasl_without_credentials_names_the_variables_to_set(command: str) -> None:
    result = cli(
        command,
        env=kafka_env(
            KAFKA_PROPERTY_SECURITY_PROTOCOL="SASL_SSL",
            KAFKA_PROPERTY_SASL_MECHANISM="SCRAM-SHA-512",
        ),
    )
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "KAFKA_PROPERTY_SASL_USERNAME" in output
    assert "KAFKA_PROPERTY_SASL_PASSWORD_FILE" in output
    assert "Traceback" not in output
    assert "OK    configuration" not in output


def test_list_creation_with_the_example_sender_url_is_refused() -> None:
    result = cli("check", env=kafka_env(AC_LIST_SENDER_URL="https://www.example.com"))
    assert result.returncode == 2
    assert "FAIL  configuration: AC_LIST_SENDER_URL: is an example domain" in result.stdout


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
    assert result.returncode == 5
    assert "FAIL  ActiveCampaign token: refused" in result.stdout
    assert "wrong-token-XYZ" not in result.stdout + result.stderr


def test_check_says_token_refused_on_html_login_page(
    bootstrap: str, topic: str, emulator: Emulator
) -> None:
    emulator.account.set_faults({"html_login_on_bad_token": True}, 0.0)
    result = cli("check", env=check_env(bootstrap, topic, emulator.url, "wrong-token-XYZ"))
    assert result.returncode == 5
    assert "FAIL  ActiveCampaign token: refused" in result.stdout


def test_check_reports_missing_topic(bootstrap: str, emulator: Emulator) -> None:
    result = cli("check", env=check_env(bootstrap, "no-such-topic", emulator.url, TOKEN))
    assert result.returncode == 1
    assert "FAIL  topic: no-such-topic does not exist" in result.stdout


def test_check_reports_unreachable_broker(emulator: Emulator) -> None:
    result = cli(
        "check",
        "--timeout",
        "2",
        env=check_env(f"127.0.0.1:{closed_port()}", "t", emulator.url, TOKEN),
    )
    assert result.returncode == 3
    assert "FAIL  broker" in result.stdout
    assert "OK    ActiveCampaign token" in result.stdout  # the other checks still ran
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr == ""  # no librdkafka chatter


def test_check_reports_unreachable_activecampaign(bootstrap: str, topic: str) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = cli("check", "--timeout", "2", env=check_env(bootstrap, topic, url, TOKEN))
    assert result.returncode == 4
    assert f"FAIL  ActiveCampaign token: {url} unreachable" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


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


@pytest.mark.parametrize("command", [["explain", "a@example.com"], ["reconcile", "--list", "VIP"]])
def test_explain_and_reconcile_say_when_the_broker_is_unreachable(command: list[str]) -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed_port()}",
        "KAFKA_TOPIC": "t",
        "AC_API_URL": "https://acct.api-us1.com",
        "AC_API_TOKEN": TOKEN,
        "AC_LIST_SENDER_URL": SENDER,
    }
    result = cli(*command, "--timeout", "2", env=env, timeout=30)
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "the Kafka broker is unreachable" in lines[0]
    assert result.stdout == ""


def ledger_env(bootstrap: str, topic: str, url: str, token: str) -> dict[str, str]:
    create_topics(bootstrap, {f"{topic}.ledger": 6}, {"cleanup.policy": "compact"})
    return check_env(bootstrap, topic, url, token)


def test_reconcile_says_when_activecampaign_is_unreachable(bootstrap: str, topic: str) -> None:
    env = ledger_env(bootstrap, topic, f"http://127.0.0.1:{closed_port()}", TOKEN)
    env["AC_REQUEST_TIMEOUT_SECONDS"] = "1"
    result = cli("reconcile", "--list", "#1", env=env, timeout=120)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "ActiveCampaign" in result.stderr and "is unreachable" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_reconcile_says_when_activecampaign_refuses_the_token(
    bootstrap: str, topic: str, emulator: Emulator
) -> None:
    env = ledger_env(bootstrap, topic, emulator.url, "wrong-token-XYZ")
    result = cli("reconcile", "--list", "VIP", env=env)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "refused" in result.stderr
    assert "wrong-token-XYZ" not in result.stdout + result.stderr


def seed_list(emulator: Emulator, name: str, members: int) -> str:
    """A list with ``members`` subscribed contacts, written straight into the emulator."""
    account = emulator.account
    with account.lock:
        list_id = account._new_id()
        account.lists[list_id] = {
            "id": list_id,
            "name": name,
            "stringid": name.lower(),
            "sender_url": SENDER,
            "sender_reminder": "r",
            "cdate": "0",
        }
        for i in range(members):
            contact_id = account._new_id()
            email = f"member{i:04d}@example.com"
            account.contacts[contact_id] = {"id": contact_id, "email": email}
            account.email_index[email] = contact_id
            account.memberships[(contact_id, list_id)] = {"status": 1, "by": "api"}
    return list_id


def test_reconcile_shows_progress_on_stderr_for_a_long_list(
    bootstrap: str, topic: str, fast_emulator: Emulator
) -> None:
    seed_list(fast_emulator, "Big", 250)
    env = ledger_env(bootstrap, topic, fast_emulator.url, TOKEN)
    env["AC_RATE_LIMIT_PER_SECOND"] = "50"
    result = cli("reconcile", "--list", "Big", env=env)
    assert result.returncode == 1, result.stdout + result.stderr  # AC has members, ledger none
    assert "250 member(s) in AC, 250 difference(s)" in result.stdout
    progress = [line for line in result.stderr.splitlines() if "read from AC" in line]
    assert progress, result.stderr
    assert progress[-1].endswith("250 of 250 subscribed member(s) read from AC")


def test_explain_escapes_terminal_control_characters_in_what_it_prints(
    bootstrap: str, topic: str
) -> None:
    """A ledger entry whose ids and names carry escape sequences (they come from events)."""
    from confluent_kafka import Producer

    from service.core.ledger import LedgerEntry, ListState, SetBy
    from service.core.ledger_codec import LedgerCodec

    create_topics(bootstrap, {f"{topic}.ledger": 6}, {"cleanup.policy": "compact"})
    state = ListState(
        "VIP\x1b[2J", 1, SetBy.SERVICE, "ev\x1b]0;pwned\x07", 1, 2, 0, 0, "aud\x00", "A\x1b[31m"
    )
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(
        f"{topic}.ledger",
        key=b"esc@example.com",
        value=LedgerCodec().encode(LedgerEntry("7", 0, (state,))),
        partition=0,
    )
    assert producer.flush(10) == 0
    env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "KAFKA_TOPIC": topic}
    result = cli("explain", "esc@example.com", env=env)
    assert result.returncode == 0, result.stderr
    assert (
        "\x1b" not in result.stdout and "\x00" not in result.stdout and "\x07" not in result.stdout
    )
    assert r"ev\x1b]0;pwned\x07" in result.stdout
    assert r"aud\x00" in result.stdout


class RegistryStub:
    """A schema registry that wants basic auth: 200 on ``GET /subjects`` with the right
    credentials, 401 otherwise."""

    def __init__(self, user_info: str) -> None:
        import base64
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        wanted = "Basic " + base64.b64encode(user_info.encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.path == "/subjects" and self.headers.get("Authorization") == wanted
                body = b"[]" if ok else b'{"error_code": 401}'
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_check_asks_the_schema_registry_with_the_credentials_from_a_file(
    bootstrap: str, topic: str, emulator: Emulator, tmp_path: Path
) -> None:
    stub = RegistryStub("sync:sr-pw-51e0")
    try:
        env = check_env(bootstrap, topic, emulator.url, TOKEN)
        env["SCHEMA_REGISTRY_URL"] = stub.url
        env["SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO_FILE"] = str(tmp_path / "user-info")
        (tmp_path / "user-info").write_text("sync:sr-pw-51e0\n")
        good = cli("check", env=env)
        assert good.returncode == 0, good.stdout + good.stderr
        assert f"OK    schema registry: {stub.url} answered" in good.stdout
        (tmp_path / "user-info").write_text("sync:wrong-pw-77aa\n")
        bad = cli("check", env=env)
        assert bad.returncode == 1
        assert "FAIL  schema registry" in bad.stdout and "refused the credentials" in bad.stdout
        for output in (good.stdout + good.stderr, bad.stdout + bad.stderr):
            assert "sr-pw-51e0" not in output and "wrong-pw-77aa" not in output
    finally:
        stub.stop()
