"""``ac-audience-sync run``: the service (and ``run --dry-run``, the preview), from the first
instant to its exit status.

Invariants:
- SIGTERM and SIGINT are honoured from the first instant: handlers are installed first
  (``_Stopper``); a signal during start-up (which may block in librdkafka, on a helper thread)
  leaves at once with status 0, having started nothing; once running, it asks the runner to
  stop;
- the health server answers from before start-up (alive, not ready) until the end;
- exit statuses: 0 after a clean stop, 2 for a configuration error (each problem one JSON
  line), 1 for a crash.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, NoReturn

from service import __version__
from service.app.cli_common import EXIT_CONFIG, _load
from service.app.settings import Settings, problems_of
from service.app.wiring import build_runner, ensure_topics, preview_start, preview_topics
from service.core.errors import ConfigError

logger = logging.getLogger("service")


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
