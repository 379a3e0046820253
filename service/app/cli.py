"""``ac-audience-sync``: the composition root. The only place that builds real clients.

Subcommands: ``run`` (the service), ``check`` (config, broker, topic, token), ``explain`` and
``reconcile`` (the ledger, for support), ``emulator`` (the ActiveCampaign emulator), ``demo``
(everything end to end on this machine).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from service import __version__
from service.app.settings import Settings, load_settings, problems_of
from service.app.wiring import build_runner, ensure_topics
from service.core.errors import ConfigError

logger = logging.getLogger("service")

EXIT_CONFIG = 2


def _settings_or_exit(env: Mapping[str, str]) -> Settings:
    try:
        return load_settings(env)
    except ConfigError as exc:
        for problem in problems_of(exc):
            print(
                f"ac-audience-sync: configuration error: {problem.field}: {problem.why}",
                file=sys.stderr,
            )
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings_or_exit(os.environ)
    from prometheus_client import CollectorRegistry

    from service.app.health import HealthServer
    from service.app.logs import configure_logging
    from service.app.runtime import tune_gc

    configure_logging(settings.log_level)
    registry = CollectorRegistry()
    try:
        ensure_topics(settings)
    except ConfigError as exc:
        print(f"ac-audience-sync: configuration error: {exc.field}: {exc.why}", file=sys.stderr)
        return EXIT_CONFIG
    runner = build_runner(settings, registry)
    health = HealthServer(
        (settings.metrics_host, settings.metrics_port), registry, runner.liveness, runner.readiness
    ).start()
    logger.info(
        "ac-audience-sync started",
        extra={
            "version": __version__,
            "metrics_port": health.port,
            "rate_limit_per_second": settings.ac_rate_limit_per_second,
        },
    )

    def stop(signum: int, _frame: Any) -> None:
        logger.info("signal received; stopping", extra={"signal": signal.Signals(signum).name})
        runner.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    faulthandler.enable()  # a crash in native code still prints the Python stacks
    faulthandler.register(signal.SIGUSR1)  # stack dump of every thread, for a stuck process
    tune_gc()  # after start-up, so that what start-up made is frozen
    code = int(runner.run())
    health.stop()
    return code


def cmd_check(args: argparse.Namespace) -> int:
    from service.app.check import run_checks

    try:
        settings = load_settings(os.environ)
    except ConfigError as exc:
        for problem in problems_of(exc):
            print(f"FAIL  configuration: {problem.field}: {problem.why}")
        return EXIT_CONFIG
    print("OK    configuration")
    return run_checks(settings, timeout=args.timeout)


def cmd_emulator(args: argparse.Namespace) -> int:
    from service.devtools.emulator.server import Emulator

    token = args.token or os.environ.get("AC_API_TOKEN")
    if not token:
        print("ac-audience-sync emulator: give --token or set AC_API_TOKEN", file=sys.stderr)
        return EXIT_CONFIG
    low, _, high = args.latency_ms.partition("-")
    emulator = Emulator(
        args.host,
        args.port,
        tokens={token},
        rate_limit=args.rate_limit,
        import_delay=args.import_delay,
    )
    if float(high or low or 0):
        emulator.account.set_faults({"latency_ms": [float(low), float(high or low)]}, 0.0)
    print(
        f"ActiveCampaign emulator on {emulator.url} (inspect: {emulator.url}/_emulator/state)",
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        emulator.serve_forever()
    return 0


def _ledger_partitions(settings: Settings) -> list[int]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(dict(settings.producer_config()))
    # All topics, not the one: asking for one by name lets a broker auto-create it.
    metadata = admin.list_topics(timeout=10)
    topic = metadata.topics.get(settings.kafka_ledger_topic)
    if topic is None or topic.error is not None or not topic.partitions:
        raise ConfigError(
            "KAFKA_LEDGER_TOPIC", f"{settings.kafka_ledger_topic} does not exist (has `run` run?)"
        )
    return sorted(topic.partitions)


def cmd_explain(args: argparse.Namespace) -> int:
    """Print the ledger's record for one email. Needs only the Kafka settings."""
    from service.adapters.ledger_store import read_entries
    from service.app.audit import explain_json, explain_lines
    from service.core.model import is_valid_email, normalise_email

    settings = _settings_or_exit(kafka_only_env(os.environ))
    email = normalise_email(args.email)
    if not is_valid_email(email):
        print("ac-audience-sync explain: not a valid email address", file=sys.stderr)
        return EXIT_CONFIG
    try:
        partitions = _ledger_partitions(settings)
    except ConfigError as exc:
        print(f"ac-audience-sync: {exc.field}: {exc.why}", file=sys.stderr)
        return EXIT_CONFIG
    entries = read_entries(
        settings.consumer_config(), settings.kafka_ledger_topic, partitions, email
    )
    entry = entries.get(email)
    if args.json:
        print(json.dumps(explain_json(email, entry, args.list), indent=2))
    else:
        print("\n".join(explain_lines(email, entry, args.list)))
    return 0 if entry is not None else 1


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Compare AC's membership of one list with the ledger; change nothing."""
    import httpx
    from prometheus_client import CollectorRegistry

    from service.adapters.activecampaign import ActiveCampaignClient
    from service.adapters.ledger_store import read_list
    from service.adapters.ratelimit import RateLimitedTransport, RateLimiter
    from service.app.audit import differences, differences_json
    from service.core.errors import ApiError
    from service.metrics import Metrics

    settings = _settings_or_exit(os.environ)
    label = args.list
    try:
        partitions = _ledger_partitions(settings)
    except ConfigError as exc:
        print(f"ac-audience-sync: {exc.field}: {exc.why}", file=sys.stderr)
        return EXIT_CONFIG
    # The same limiter as the service: reconcile shares the account's budget with it.
    limiter = RateLimiter(settings.ac_rate_limit_per_second, clock=time.time)
    http = httpx.Client(
        base_url=settings.ac_base_url + "/",
        transport=RateLimitedTransport(httpx.HTTPTransport(retries=0), limiter),
        timeout=httpx.Timeout(settings.ac_request_timeout_seconds),
    )
    client = ActiveCampaignClient(
        http, lambda: settings.current_token().reveal(), Metrics(CollectorRegistry())
    )
    try:
        list_id = label[1:] if label.startswith("#") else client.find_list(label)
        if list_id is None:
            print(f"ac-audience-sync reconcile: no list named {label!r} in AC", file=sys.stderr)
            return EXIT_CONFIG
        ac_status = {e: 2 for e in client.list_members(list_id, 2)}
        ac_status.update({e: 1 for e in client.list_members(list_id, 1)})
    except ApiError as exc:
        print(f"ac-audience-sync reconcile: ActiveCampaign: {exc}", file=sys.stderr)
        return 3
    finally:
        limiter.close()
        http.close()
    entries = read_list(settings.consumer_config(), settings.kafka_ledger_topic, partitions, label)
    found = differences(label, entries, ac_status)
    in_ledger = sum(1 for e in entries.values() if e.state(label) is not None)
    if args.json:
        print(differences_json(label, found, in_ledger, len(ac_status)))
    else:
        print(
            f"list {label!r}: {in_ledger} email(s) in the ledger, {len(ac_status)} member(s) in AC, "
            f"{len(found)} difference(s)"
        )
        for item in found:
            print(f"  {item.email}: ledger {item.ledger}, AC {item.ac}: {item.meaning}")
    return 1 if found else 0


def kafka_only_env(env: Mapping[str, str]) -> dict[str, str]:
    """``explain`` reads only Kafka: stand-ins for the AC settings it never uses."""
    merged = dict(env)
    merged.setdefault("AC_API_URL", "https://unused.invalid")
    if not merged.get("AC_API_TOKEN") and not merged.get("AC_API_TOKEN_FILE"):
        merged["AC_API_TOKEN"] = "unused"  # noqa: S105 - a stand-in, never sent
    merged["AC_CREATE_LISTS"] = "false"  # explain creates nothing: no sender URL needed
    return merged


def cmd_demo(args: argparse.Namespace) -> int:
    from service.devtools.demo import run_demo

    return run_demo(
        events=args.events, emails=args.emails, audiences=args.audiences, rate_limit=args.rate_limit
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ac-audience-sync",
        description="Keep ActiveCampaign lists in step with CDP audience events from Kafka. "
        "Configured through environment variables (see the README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the service", description="Run the sync service until SIGTERM."
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check",
        help="check config, broker, topic and token",
        description="Check the configuration, that the broker answers, that the topic exists and "
        "that ActiveCampaign accepts the token. Exits non-zero on any failure.",
    )
    check.add_argument("--timeout", type=float, default=10.0, help="seconds per check (default 10)")
    check.set_defaults(func=cmd_check)

    emulator = sub.add_parser(
        "emulator",
        help="run the ActiveCampaign emulator",
        description="Serve an emulated ActiveCampaign v3 API (lists, contacts, bulk import) with "
        "AC's rate limit, plus an inspection API under /_emulator/.",
    )
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8080)
    emulator.add_argument("--token", help="the accepted Api-Token (default: $AC_API_TOKEN)")
    emulator.add_argument(
        "--rate-limit", type=float, default=5.0, help="requests per second (default 5)"
    )
    emulator.add_argument(
        "--import-delay", type=float, default=2.0, help="seconds before an import completes"
    )
    emulator.add_argument("--latency-ms", default="0", help="added latency, e.g. 100-300")
    emulator.set_defaults(func=cmd_emulator)

    explain = sub.add_parser(
        "explain",
        help="why an email is (not) in a list, from the ledger",
        description="Print what the service last applied for one email, per list: status, "
        "who set it, the event that set it (id, time, audience, campaign, treatment group) and "
        "when it was applied. Reads the ledger topic only. Exit 1 when there is no entry.",
    )
    explain.add_argument("email", help="the email (matched in its normalised form)")
    explain.add_argument("--list", help="only this list (its name, or #id)")
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.set_defaults(func=cmd_explain)

    reconcile = sub.add_parser(
        "reconcile",
        help="compare a list in AC with the ledger (read-only)",
        description="Read the list's members from ActiveCampaign (through the rate limiter) and "
        "print where they differ from the ledger: manual edits, people who unsubscribed "
        "themselves. Changes nothing. Exit 0 when they agree, 1 when they differ.",
    )
    reconcile.add_argument("--list", required=True, help="the list (its name, or #id)")
    reconcile.add_argument("--json", action="store_true", help="print JSON")
    reconcile.set_defaults(func=cmd_reconcile)

    demo = sub.add_parser(
        "demo",
        help="run everything end to end locally",
        description="Start a local broker and the emulator, produce sample events, run the "
        "service until the lag is zero, and print what ActiveCampaign now holds.",
    )
    demo.add_argument("--events", type=int, default=2000)
    demo.add_argument("--emails", type=int, default=120)
    demo.add_argument("--audiences", type=int, default=3)
    demo.add_argument(
        "--rate-limit",
        type=float,
        default=5.0,
        help="AC's requests per second for the emulator and the service (default 5)",
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
