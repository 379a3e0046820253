"""The read-only commands for operators: ``check`` (configuration, broker, topics, registry,
token), ``explain`` (one email's ledger entry) and ``reconcile`` (a list in AC against the
ledger). They change nothing; their exit statuses are ``cli_common``'s (README "Commands").

Invariants: ``explain`` needs only the Kafka settings; ``reconcile`` reads AC through the rate
limiter in the ticks kept for tools (every tick with ``--exclusive``), retries AC's transient
failures a few times, and reports its progress on stderr for lists longer than one page.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from service.app.cli_common import (
    EXIT_AC_REFUSED,
    EXIT_AC_UNREACHABLE,
    EXIT_CONFIG,
    _broker_refused,
    _broker_unreachable,
    _load,
    _quiet,
    _retrying,
    _settings_or_exit,
    kafka_only_env,
    ledger_partitions,
)
from service.core.errors import ConfigError


def cmd_check(args: argparse.Namespace) -> int:
    """Exit statuses: see ``service/app/check.py`` (0 ok, 1 a check failed, 2 configuration,
    3 broker unreachable, 4 AC unreachable, 5 AC refused the token)."""
    from service.app.check import run_checks

    loaded = _load(os.environ)
    if isinstance(loaded, list):
        for problem in loaded:
            print(f"FAIL  configuration: {problem.field}: {problem.why}")
        return EXIT_CONFIG
    print("OK    configuration", flush=True)
    return run_checks(loaded, timeout=args.timeout)


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the ledger's record for one email. Needs only the Kafka settings. Exit statuses:
    0 found, 1 no entry, 2 configuration (or a malformed email), 3 broker unreachable."""
    from confluent_kafka import KafkaException

    from service.adapters.kafka_readers import kafka_log_reader
    from service.adapters.ledger_reads import read_entry
    from service.app.audit import explain_json, explain_lines
    from service.app.check import BrokerRefusedCredentials, BrokerUnreachable
    from service.core.model import is_valid_email, normalise_email

    settings = _settings_or_exit(kafka_only_env(os.environ))
    email = normalise_email(args.email)
    if not is_valid_email(email):
        print("ac-audience-sync explain: not a valid email address", file=sys.stderr)
        return EXIT_CONFIG
    try:
        partitions = ledger_partitions(settings, args.timeout)
        entry = read_entry(
            kafka_log_reader(_quiet(settings.consumer_config())),
            settings.kafka_ledger_topic,
            partitions,
            email,
        )
    except BrokerUnreachable as exc:
        return _broker_unreachable("explain", settings, str(exc))
    except BrokerRefusedCredentials as exc:
        return _broker_refused("explain", str(exc))
    except KafkaException as exc:
        return _broker_unreachable("explain", settings, settings.redact(str(exc)))
    except (ConfigError, LookupError) as exc:
        why = f"{exc.field}: {exc.why}" if isinstance(exc, ConfigError) else str(exc)
        print(f"ac-audience-sync explain: {why}", file=sys.stderr)
        return EXIT_CONFIG
    tolerance = settings.stale_event_tolerance_seconds
    tolerance_ms = None if tolerance is None else round(tolerance * 1000)
    if args.json:
        print(json.dumps(explain_json(email, entry, args.list, tolerance_ms), indent=2))
    else:
        print("\n".join(explain_lines(email, entry, args.list, tolerance_ms)))
    return 0 if entry is not None else 1


PROGRESS_EVERY_SECONDS = 2.0


class _Progress:
    """One stderr line every few seconds while a long list is read (more than one page)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last = time.monotonic()

    def __call__(self, status: int, read: int, total: int, *, final: bool = False) -> None:
        from service.app.audit import STATUS_WORDS, quoted
        from service.core.acapi import PAGE_SIZE

        now = time.monotonic()
        if total <= PAGE_SIZE or (not final and now - self.last < PROGRESS_EVERY_SECONDS):
            return
        self.last = now
        print(
            f"ac-audience-sync reconcile: list {quoted(self.label)}: {read} of {total} "
            f"{STATUS_WORDS[status]} member(s) read from AC",
            file=sys.stderr,
            flush=True,
        )


def _members(tool: Any, list_id: str, status: int, progress: _Progress) -> dict[str, str]:
    """Every contact with ``status`` on the list, by keyset pages (stable while the list
    changes), with progress and retries."""
    from service.core import acapi

    result: dict[str, str] = {}
    after: int | None = None
    while True:
        # A call is a generator, used up by one attempt: a new one per attempt (a retry of
        # the same generator would return None).
        def read(after: int | None = after) -> acapi.Page:
            page: acapi.Page = tool.call(
                acapi.contacts_page(list_id=list_id, status=status, id_greater=after)
            )
            return page

        page = _retrying(read, "reading members")
        result.update(page.contacts)
        done = len(page.contacts) < acapi.PAGE_SIZE or page.last_id < 0
        progress(status, len(result), max(page.total, len(result)), final=done)
        if done:
            return result
        after = page.last_id


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Compare AC's membership of one list with the ledger; change nothing. Exit statuses:
    0 they agree, 1 they differ, 2 configuration (or no such list), 3 broker unreachable,
    4 AC unreachable, 5 AC refused the token or the request."""
    from confluent_kafka import KafkaException

    from service.adapters.ac_http import AcTool
    from service.adapters.kafka_readers import kafka_log_reader
    from service.adapters.ledger_reads import read_list
    from service.app.audit import differences, differences_json, printable, quoted
    from service.app.check import BrokerRefusedCredentials, BrokerUnreachable
    from service.core import acapi
    from service.core.errors import AccountBlocked, ApiError, PermanentApiError

    settings = _settings_or_exit(os.environ)
    label = args.list
    try:
        partitions = ledger_partitions(settings, args.timeout)
    except BrokerUnreachable as exc:
        return _broker_unreachable("reconcile", settings, str(exc))
    except BrokerRefusedCredentials as exc:
        return _broker_refused("reconcile", str(exc))
    except ConfigError as exc:
        print(f"ac-audience-sync reconcile: {exc.field}: {exc.why}", file=sys.stderr)
        return EXIT_CONFIG
    # The tools' ticks of the account budget: reconcile shares the 5/s with the service
    # (``--exclusive`` when the service is stopped: every tick).
    tool = AcTool(
        settings.ac_base_url,
        lambda: settings.current_token().reveal(),
        rate=settings.ac_rate_limit_per_second,
        guard=settings.ac_rate_guard_seconds,
        tools_every=settings.ac_tools_tick_every,
        timeout=settings.ac_request_timeout_seconds,
        exclusive=args.exclusive,
    )
    progress = _Progress(label)
    try:
        list_id = (
            label[1:]
            if label.startswith("#")
            else _retrying(lambda: tool.call(acapi.find_list(label)), "finding the list")
        )
        if list_id is None:
            print(
                f"ac-audience-sync reconcile: no list named {quoted(label)} in AC", file=sys.stderr
            )
            return EXIT_CONFIG
        ac_status = {e: 2 for e in _members(tool, list_id, 2, progress)}
        ac_status.update({e: 1 for e in _members(tool, list_id, 1, progress)})
    except ApiError as exc:
        refused = isinstance(exc, AccountBlocked | PermanentApiError)
        what = "refused the request" if refused else "is unreachable"
        print(
            f"ac-audience-sync reconcile: ActiveCampaign ({settings.ac_api_url}) {what}: "
            f"{settings.redact(str(exc))}",
            file=sys.stderr,
        )
        return EXIT_AC_REFUSED if refused else EXIT_AC_UNREACHABLE
    finally:
        tool.close()
    if len(ac_status) > PROGRESS_MIN_MEMBERS:
        print("ac-audience-sync reconcile: reading the ledger", file=sys.stderr, flush=True)
    try:
        entries = read_list(
            kafka_log_reader(_quiet(settings.consumer_config())),
            settings.kafka_ledger_topic,
            partitions,
            label,
        )
    except KafkaException as exc:
        return _broker_unreachable("reconcile", settings, settings.redact(str(exc)))
    found = differences(label, entries, ac_status)
    in_ledger = sum(1 for e in entries.values() if e.state(label) is not None)
    if args.json:
        print(differences_json(label, found, in_ledger, len(ac_status)))
    else:
        print(
            f"list {quoted(label)}: {in_ledger} email(s) in the ledger, {len(ac_status)} "
            f"member(s) in AC, {len(found)} difference(s)"
        )
        for item in found:
            print(f"  {printable(item.email)}: ledger {item.ledger}, AC {item.ac}: {item.meaning}")
    return 1 if found else 0


PROGRESS_MIN_MEMBERS = 1000
