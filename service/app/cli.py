"""``ac-audience-sync``: the command line, its argparse wiring and dispatch. With the ``cli_*``
modules, the composition root: the only place that builds real clients.

Subcommands: ``run`` (the service; ``cli_run``), ``check`` (config, broker, topic, token),
``explain`` and ``reconcile`` (the ledger, for support; ``cli_support``), ``redrive`` (dead
letters back to the source topic; ``cli_redrive``), ``forget`` (erase emails from the ledger;
``cli_forget``), ``emulator`` (the ActiveCampaign emulator) and ``demo`` (everything end to end
on this machine; ``cli_dev``). Exit statuses: ``cli_common``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from service import __version__
from service.app.cli_dev import cmd_demo, cmd_emulator
from service.app.cli_forget import cmd_forget
from service.app.cli_redrive import cmd_redrive
from service.app.cli_run import cmd_run
from service.app.cli_support import cmd_check, cmd_explain, cmd_reconcile


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
