"""``ac-audience-sync``: the composition root. The only place that builds real clients.

Subcommands: ``run`` (the service), ``check`` (config, broker, topic, token), ``explain`` and
``reconcile`` (the ledger, for support), ``redrive`` (dead letters back to the source topic),
``forget`` (erase emails from the ledger), ``emulator`` (the ActiveCampaign emulator), ``demo``
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
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from service import __version__
from service.app.settings import Settings, problems_of
from service.app.settings_loader import load_settings
from service.app.wiring import build_runner, ensure_topics, preview_start, preview_topics
from service.core.errors import ConfigError

T = TypeVar("T")

# Exit statuses of every command (README "Commands"); ``run`` uses 0, 1 and 2.
EXIT_OK = 0
EXIT_FAILED = 1  # check: a check failed; explain: no entry; reconcile: the list differs
EXIT_CONFIG = 2  # configuration (environment, librdkafka property, SASL refused), bad usage
EXIT_BROKER_UNREACHABLE = 3
EXIT_AC_UNREACHABLE = 4  # no answer, a timeout or a 5xx
EXIT_AC_REFUSED = 5  # the token (or the account) refused, or the request rejected

logger = logging.getLogger("service")


def _load(env: Mapping[str, str]) -> Settings | list[ConfigError]:
    """Settings, or every configuration problem: the environment first, then the librdkafka
    properties (by building the clients, as ``run`` will)."""
    from service.app.check import validate_kafka_clients

    try:
        settings = load_settings(env)
    except ConfigError as exc:
        return list(problems_of(exc))
    return validate_kafka_clients(settings) or settings


def _settings_or_exit(env: Mapping[str, str]) -> Settings:
    """For the CLI commands: on any problem, one line each on stderr and exit status 2."""
    loaded = _load(env)
    if isinstance(loaded, list):
        for problem in loaded:
            print(
                f"ac-audience-sync: configuration error: {problem.field}: {problem.why}",
                file=sys.stderr,
            )
        raise SystemExit(EXIT_CONFIG)
    return loaded


class _Stopper:
    """SIGTERM/SIGINT handlers, installed first thing in ``run``: a signal before the runner
    exists is remembered (start-up is abandoned), after that it asks the runner to stop. The
    handler only sets state: writing a log line from a signal handler can interrupt another
    write to the same stream."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._runner: Any = None
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signal.Signals(signum).name
        if self._runner is not None:
            self._runner.request_stop()

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def attach(self, runner: Any) -> None:
        self._runner = runner
        if self.requested:  # a signal between the end of start-up and now
            runner.request_stop()


class _Probes:
    """The health server's probes before the runner exists (start-up: alive, not ready) and
    the runner's afterwards."""

    def __init__(self) -> None:
        self.runner: Any = None

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        if self.runner is None:
            return True, {"starting": True}
        return self.runner.liveness()  # type: ignore[no-any-return]

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self.runner is None:
            return False, {"starting": True}
        return self.runner.readiness()  # type: ignore[no-any-return]


def _start_up(settings: Settings, registry: Any, stopper: _Stopper, preview: Any = None) -> Any:
    """``ensure_topics`` and ``build_runner`` on a helper thread, so that the main thread keeps
    handling signals while librdkafka calls block (listing topics waits up to 10 s for a broker
    that does not answer). Returns the runner, or None when a signal came first. A dry run
    (``preview``) creates no topic."""
    result: dict[str, Any] = {}
    done = threading.Event()

    def start() -> None:
        try:
            if preview is not None:
                preview.ledger_exists = preview_topics(settings)
                preview.start_offsets = preview_start(settings, preview.live_group)
            else:
                ensure_topics(settings)
            result["runner"] = build_runner(settings, registry, preview)
        except BaseException as exc:
            result["error"] = exc
        finally:
            done.set()

    threading.Thread(target=start, name="start-up", daemon=True).start()
    while not done.wait(0.05):
        if stopper.requested:
            return None
    if "error" in result:
        raise result["error"]
    return result["runner"]


def _exit_now(code: int) -> NoReturn:
    """Leave at once: start-up threads may be blocked in librdkafka, and nothing was started
    that needs closing (no consumer joined the group, nothing to commit)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_run(args: argparse.Namespace) -> int:
    """The service. Exit statuses: 0 after a clean stop (SIGTERM/SIGINT, also during start-up),
    2 for a configuration error (each problem one JSON line), 1 for a crash (one JSON line
    with the traceback). ``--dry-run`` (or ``AC_DRY_RUN=true``): the preview, which stops by
    itself once the topic is read (``--follow``: on a signal) and prints its report."""
    stopper = _Stopper()  # before anything slow: SIGTERM is honoured from the first instant
    from prometheus_client import CollectorRegistry, ProcessCollector

    from service.app.health import HealthServer
    from service.app.logs import configure_logging
    from service.app.runtime import tune_gc

    configure_logging("INFO")
    faulthandler.enable()  # a crash in native code still prints the Python stacks
    faulthandler.register(signal.SIGUSR1)  # stack dump of every thread, for a stuck process
    loaded = _load(os.environ)
    if isinstance(loaded, list):
        for problem in loaded:
            _log_config_error(problem)
        return EXIT_CONFIG
    settings = loaded
    preview = None
    if getattr(args, "dry_run", False) or settings.dry_run:
        from service.app.preview import Preview, preview_problems, preview_settings

        problems = preview_problems(settings, exclusive=args.exclusive)
        for problem in problems:
            _log_config_error(problem)
        if problems:
            return EXIT_CONFIG
        preview = Preview(
            live_group=settings.kafka_group_id, follow=args.follow, exclusive=args.exclusive
        )
        settings = preview_settings(settings)
    logging.getLogger().setLevel(settings.log_level)
    if stopper.requested:
        logger.info("stopped before start-up", extra={"signal": stopper.signal})
        return 0
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_* series: RSS, CPU, open files
    probes = _Probes()
    try:
        health = HealthServer(
            (settings.metrics_host, settings.metrics_port),
            registry,
            probes.liveness,
            probes.readiness,
        ).start()
    except OSError as exc:
        where = f"{settings.metrics_host}:{settings.metrics_port}"
        _log_config_error(ConfigError("METRICS_PORT", f"cannot listen on {where}: {exc.strerror}"))
        return EXIT_CONFIG
    logger.info(
        "ac-audience-sync starting",
        extra={
            "version": __version__,
            "metrics_port": health.port,
            "rate_limit_per_second": settings.ac_rate_limit_per_second,
            "dry_run": preview is not None,
        },
    )
    if preview is not None:
        shared = not preview.exclusive and settings.ac_tools_tick_every > 0
        logger.info(
            "dry run: nothing is written to ActiveCampaign, the ledger or the dead-letter topic",
            extra={
                "group": settings.kafka_group_id,
                "starts_where": preview.live_group,
                "ac_budget": "the ticks kept for tools" if shared else "a budget of its own",
                "follow": preview.follow,
            },
        )
    try:
        runner = _start_up(settings, registry, stopper, preview)
    except ConfigError as exc:
        for problem in problems_of(exc):
            _log_config_error(problem)
        health.stop()
        return EXIT_CONFIG
    if runner is None:
        logger.info(
            "stopped during start-up; nothing was started", extra={"signal": stopper.signal}
        )
        health.stop()
        _exit_now(0)
    stopper.attach(runner)
    probes.runner = runner
    tune_gc()  # after start-up, so that what start-up made is frozen
    code = int(runner.run())
    health.stop()
    if preview is not None:
        _print_report(preview, as_json=args.json)
    logger.info("exiting", extra={"status": code, "signal": stopper.signal})
    return code


def _print_report(preview: Any, *, as_json: bool) -> None:
    from service.app.preview import render

    data = preview.summary()
    preview.log()
    if as_json:
        print(json.dumps(data, indent=2), flush=True)
    else:
        print("\n".join(render(data)), flush=True)


def _log_config_error(problem: ConfigError) -> None:
    logger.error(
        "configuration error: %s: %s", problem.field, problem.why, extra={"field": problem.field}
    )


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


def cmd_emulator(args: argparse.Namespace) -> int:
    from service.devtools.emulator.server import Emulator, emulator_token

    # Never $AC_API_TOKEN: in a production pod that is the real account's token.
    token = emulator_token(args.token, os.environ)
    if not token:
        print("ac-audience-sync emulator: give --token or set EMULATOR_TOKEN", file=sys.stderr)
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


def _quiet(config: Mapping[str, Any]) -> dict[str, Any]:
    """A client config whose librdkafka log lines are dropped: a CLI command answers in one
    line, not with librdkafka's connection attempts."""
    from service.app.logs import quiet_kafka_logger

    return {**config, "logger": quiet_kafka_logger()}


def ledger_partitions(settings: Settings, timeout: float) -> list[int]:
    from service.app.check import list_topics

    metadata = list_topics(settings, timeout)
    topic = metadata.topics.get(settings.kafka_ledger_topic)
    if topic is None or topic.error is not None or not topic.partitions:
        raise ConfigError(
            "KAFKA_LEDGER_TOPIC", f"{settings.kafka_ledger_topic} does not exist (has `run` run?)"
        )
    return sorted(topic.partitions)


def _broker_refused(command: str, detail: str) -> int:
    from service.app.check import REFUSED_HINT

    print(
        f"ac-audience-sync {command}: the Kafka broker refused the credentials ({detail}): "
        f"{REFUSED_HINT}",
        file=sys.stderr,
    )
    return EXIT_CONFIG


def _broker_unreachable(command: str, settings: Settings, detail: str) -> int:
    print(
        f"ac-audience-sync {command}: the Kafka broker is unreachable "
        f"({settings.kafka_bootstrap_servers}: {detail})",
        file=sys.stderr,
    )
    return EXIT_BROKER_UNREACHABLE


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


RECONCILE_ATTEMPTS = 4
PROGRESS_EVERY_SECONDS = 2.0


def _retrying(call: Callable[[], T], what: str, command: str = "reconcile") -> T:
    """``call`` again after a transient AC failure (a few times, with back-off): one 5xx must
    not end a reconcile that has read thousands of members."""
    from service.core.errors import RateLimited, TransientApiError

    for attempt in range(RECONCILE_ATTEMPTS):
        try:
            return call()
        except (TransientApiError, RateLimited) as exc:
            if attempt == RECONCILE_ATTEMPTS - 1:
                raise
            wait = min(30.0, exc.retry_after if isinstance(exc, RateLimited) else 2.0**attempt)
            print(
                f"ac-audience-sync {command}: {what}: ActiveCampaign answered {exc}; "
                f"retrying in {wait:g}s",
                file=sys.stderr,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


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


def _kafka_errors(command: str, settings: Settings, work: Callable[[], int]) -> int:
    """``work()``, with the broker's and the topics' problems as one line and an exit status."""
    from confluent_kafka import KafkaException

    from service.app.check import BrokerRefusedCredentials, BrokerUnreachable

    try:
        return work()
    except BrokerUnreachable as exc:
        return _broker_unreachable(command, settings, str(exc))
    except BrokerRefusedCredentials as exc:
        return _broker_refused(command, str(exc))
    except KafkaException as exc:
        return _broker_unreachable(command, settings, settings.redact(str(exc)))
    except (ConfigError, LookupError) as exc:
        why = f"{exc.field}: {exc.why}" if isinstance(exc, ConfigError) else str(exc)
        print(f"ac-audience-sync {command}: {why}", file=sys.stderr)
        return EXIT_CONFIG


def _reasons(values: Sequence[str] | None) -> frozenset[str] | None:
    from service.metrics import DLQ_REASONS

    if not values:
        return None
    named = {r.strip() for value in values for r in value.split(",") if r.strip()}
    unknown = sorted(named - set(DLQ_REASONS))
    if unknown:
        raise ValueError(
            f"unknown reason(s) {', '.join(unknown)}; the reasons are {', '.join(DLQ_REASONS)}"
        )
    return frozenset(named)


def cmd_redrive(args: argparse.Namespace) -> int:
    """Put dead-lettered records back on the source topic (``service/app/redrive.py``). Exit
    statuses: 0 done (a dry run: reported), 1 some records could not be checked or written
    (run again), 2 configuration or usage, 3 broker unreachable."""
    from service.app.redrive import Options, run
    from service.app.redrive_topics import Progress
    from service.core.redrive import Criteria, parse_time

    now = time.time()
    try:
        criteria = Criteria(
            reasons=_reasons(args.reason),
            partitions=frozenset(args.partition) if args.partition else None,
            from_offset=args.from_offset,
            to_offset=args.to_offset,
            since_ms=parse_time(args.since, now) if args.since else None,
            until_ms=parse_time(args.until, now) if args.until else None,
            limit=args.limit,
        )
    except ValueError as exc:
        print(f"ac-audience-sync redrive: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    settings = _settings_or_exit(kafka_only_env(os.environ))
    options = Options(criteria, args.execute, args.json, args.timeout)
    return _kafka_errors("redrive", settings, lambda: run(settings, options, Progress("redrive")))


def cmd_forget(args: argparse.Namespace) -> int:
    """Erase emails from the ledger (``service/app/forget.py``). Exit statuses: 0 done, 1 the
    service is running (nothing written) or started meanwhile, 2 configuration or usage (a
    malformed email: nothing written), 3 broker unreachable, 4 AC unreachable, 5 AC refused."""
    from pathlib import Path

    from service.app.forget import (
        BrokerWriteFailed,
        GroupActive,
        Options,
        read_emails,
        run,
    )

    if (args.email is None) == (args.from_file is None):
        print("ac-audience-sync forget: give an EMAIL or --from-file, not both", file=sys.stderr)
        return EXIT_CONFIG

    def read(path: str) -> str:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")

    try:
        emails, problems = read_emails(args.email, args.from_file, read)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"ac-audience-sync forget: cannot read {args.from_file}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if problems:
        for problem in problems:
            print(f"ac-audience-sync forget: {problem}", file=sys.stderr)
        print("ac-audience-sync forget: nothing was written", file=sys.stderr)
        return EXIT_CONFIG
    env = os.environ if args.delete_contact else kafka_only_env(os.environ)
    settings = _settings_or_exit(env)
    options = Options(args.delete_contact, args.dry_run, args.json, args.exclusive, args.timeout)

    def retrying(call: Callable[[], T], what: str) -> T:
        return _retrying(call, what, "forget")

    def work() -> int:
        try:
            return run(settings, options, emails, retrying)
        except GroupActive as exc:
            print(
                f"ac-audience-sync forget: the service is running (consumer group "
                f"{settings.kafka_group_id}: {exc}); nothing was written. Stop every replica "
                "first (kubectl scale --replicas=0), run forget, then start it again",
                file=sys.stderr,
            )
            return EXIT_FAILED
        except BrokerWriteFailed as exc:
            return _broker_unreachable("forget", settings, f"a ledger write failed: {exc}")

    return _kafka_errors("forget", settings, work)


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


class _WithExamples(argparse.HelpFormatter):
    """The description wrapped as usual; the epilog's examples as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ac-audience-sync",
        description="Keep ActiveCampaign lists in step with CDP audience events from Kafka. "
        "Configured through environment variables (see the README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the service",
        description="Run the sync service until SIGTERM. Exit status: 0 after SIGTERM/SIGINT "
        "(also during start-up), 2 configuration error (one JSON line per problem), 1 crash.",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="preview (also AC_DRY_RUN=true): consume with the group KAFKA_PREVIEW_GROUP_ID "
        "(default <KAFKA_GROUP_ID>.preview), read ActiveCampaign, write nothing to it nor to "
        "the ledger or the DLQ; stop once the topic is read and print what would happen per "
        "list",
    )
    run.add_argument("--json", action="store_true", help="with --dry-run: print the report as JSON")
    run.add_argument(
        "--follow",
        action="store_true",
        help="with --dry-run: keep reading until SIGTERM/SIGINT (the report is logged every 30 s)",
    )
    run.add_argument(
        "--exclusive",
        action="store_true",
        help="with --dry-run: use every tick of the request budget (only while no live "
        "deployment runs; by default the preview sends in the ticks kept for tools, "
        "AC_TOOLS_TICK_EVERY)",
    )
    run.set_defaults(func=cmd_run)

    check = sub.add_parser(
        "check",
        help="check config, broker, topic and token",
        description="Check the configuration, that the broker answers, that the topic exists and "
        "that ActiveCampaign accepts the token. Exit status: 0 all passed, 1 a check failed, "
        "2 configuration error, 3 broker unreachable, 4 ActiveCampaign unreachable, "
        "5 ActiveCampaign refused the token.",
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
    emulator.add_argument("--token", help="the accepted Api-Token (default: $EMULATOR_TOKEN)")
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
        "when it was applied. Reads the ledger topic only. Exit status: 0 found, 1 no entry, "
        "2 configuration error, 3 broker unreachable.",
    )
    explain.add_argument("email", help="the email (matched in its normalised form)")
    explain.add_argument("--list", help="only this list (its name, or #id)")
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)"
    )
    explain.set_defaults(func=cmd_explain)

    reconcile = sub.add_parser(
        "reconcile",
        help="compare a list in AC with the ledger (read-only)",
        description="Read the list's members from ActiveCampaign (through the rate limiter) and "
        "print where they differ from the ledger: manual edits, people who unsubscribed "
        "themselves. Changes nothing. Progress goes to stderr for long lists. Exit status: "
        "0 they agree, 1 they differ, 2 configuration error or no such list, 3 broker "
        "unreachable, 4 ActiveCampaign unreachable, 5 ActiveCampaign refused the token or "
        "the request.",
    )
    reconcile.add_argument("--list", required=True, help="the list (its name, or #id)")
    reconcile.add_argument("--json", action="store_true", help="print JSON")
    reconcile.add_argument(
        "--exclusive",
        action="store_true",
        help="use every tick of the request budget (only while the service is stopped; by "
        "default reconcile sends in the ticks kept for tools, AC_TOOLS_TICK_EVERY)",
    )
    reconcile.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)"
    )
    reconcile.set_defaults(func=cmd_reconcile)

    redrive = sub.add_parser(
        "redrive",
        help="put dead-lettered records back on the source topic",
        formatter_class=_WithExamples,
        description="Read the dead-letter topic, select records (by reason, source partition "
        "and offsets, time), show the counts per reason and what would happen to each, and "
        "with --execute write the records to redrive to their source partition with their "
        "key, value and headers and a redrive.* group naming the redrive (a record is never "
        "redriven twice: its copy on the source topic is its receipt). Reasons whose cause is "
        "the record itself (invalid_email, undecodable, ...) and records that failed again "
        "after a redrive are reported, not redriven, unless --reason names them; records "
        "that still fail to decode with the current configuration, or that a later event of "
        "the same email and list supersedes, are never redriven. Reads KAFKA_* (and the "
        "schema registry and list naming settings); progress on stderr. Exit status: 0 done, "
        "1 some records could not be checked or written (run again), 2 configuration error "
        "or bad usage, 3 broker unreachable.",
        epilog="""examples:
  ac-audience-sync redrive                          # dry run: counts per reason
  ac-audience-sync redrive --reason list_missing --since 24h --execute
  ac-audience-sync redrive --partition 3 --from-offset 1200 --to-offset 1300 --json
  ac-audience-sync redrive --reason ac_rejected --since 2025-01-31T00:00:00Z --limit 10 --execute
""",
    )
    redrive.add_argument(
        "--reason",
        action="append",
        metavar="REASON",
        help="only this dlq.reason (repeat, or comma-separated); naming a reason also redrives "
        "it when it is not redriven by default (after a fix)",
    )
    redrive.add_argument(
        "--partition", type=int, action="append", metavar="P", help="only this source partition"
    )
    redrive.add_argument(
        "--from-offset", type=int, metavar="N", help="only source offsets >= N (inclusive)"
    )
    redrive.add_argument(
        "--to-offset", type=int, metavar="N", help="only source offsets <= N (inclusive)"
    )
    redrive.add_argument(
        "--since",
        metavar="WHEN",
        help="only records parked at or after WHEN: ISO 8601 (UTC unless an offset is given) "
        "or a duration ago (30m, 12h, 7d)",
    )
    redrive.add_argument("--until", metavar="WHEN", help="only records parked before WHEN")
    redrive.add_argument(
        "--limit", type=int, metavar="N", help="redrive at most N records (in source order)"
    )
    mode = redrive.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_false",
        dest="execute",
        help="report only (the default)",
    )
    mode.add_argument("--execute", action="store_true", help="write the records to redrive")
    redrive.add_argument("--json", action="store_true", help="print JSON")
    redrive.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)"
    )
    redrive.set_defaults(func=cmd_redrive, execute=False)

    forget = sub.add_parser(
        "forget",
        help="erase emails from the ledger (and their AC contacts)",
        formatter_class=_WithExamples,
        description="Write the ledger tombstone of each email (in every partition holding its "
        "entry) and rewrite the import intents naming it, so that compaction leaves nothing "
        "of it; with --delete-contact also delete its ActiveCampaign contact (through the "
        "tools' ticks of the request budget). The service must be stopped: a running replica "
        "holds the entries in memory and could write them back, so forget writes nothing "
        "while the consumer group has members. Emails are never printed (input position and "
        "email_hash instead). Exit status: 0 done, 1 the service is running (nothing "
        "written) or started meanwhile (restart it), 2 configuration error or a malformed "
        "email (nothing written), 3 broker unreachable, 4 ActiveCampaign unreachable, "
        "5 ActiveCampaign refused the token or the request.",
        epilog="""examples:
  kubectl -n crm-sync scale deploy/ac-audience-sync --replicas=0
  ac-audience-sync forget person@example.com --delete-contact
  ac-audience-sync forget --from-file erasure-requests.txt --json   # one email a line, # comments
  ac-audience-sync forget --from-file - --dry-run < erasure-requests.txt
  kubectl -n crm-sync scale deploy/ac-audience-sync --replicas=1
""",
    )
    forget.add_argument("email", nargs="?", help="the email (matched in its normalised form)")
    forget.add_argument(
        "--from-file", metavar="PATH", help="emails, one a line ('-': stdin); '#' comments"
    )
    forget.add_argument(
        "--delete-contact",
        action="store_true",
        help="also delete the AC contact (GET /contacts?email=, DELETE /contacts/{id})",
    )
    forget.add_argument(
        "--exclusive",
        action="store_true",
        help="use every tick of the request budget for --delete-contact (by default the ticks "
        "kept for tools, AC_TOOLS_TICK_EVERY; other tools may be running)",
    )
    forget.add_argument(
        "--dry-run",
        action="store_true",
        help="say what would be written; write nothing, ask AC nothing (allowed while the "
        "service runs)",
    )
    forget.add_argument("--json", action="store_true", help="print JSON")
    forget.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)"
    )
    forget.set_defaults(func=cmd_forget)

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
