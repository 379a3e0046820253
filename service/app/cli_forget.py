"""``ac-audience-sync forget``'s shell: the emails read and checked (nothing is written while one
is malformed), the settings (only Kafka's unless ``--delete-contact``), and a running service
or the broker's problems as an exit status. The command itself is ``forget.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from service.app.cli_common import (
    EXIT_CONFIG,
    EXIT_FAILED,
    _broker_unreachable,
    _kafka_errors,
    _retrying,
    _settings_or_exit,
    kafka_only_env,
)

T = TypeVar("T")


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
