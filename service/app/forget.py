"""``ac-audience-sync forget``: erase emails from the ledger (and, asked, their AC contacts).

Per email (normalised, as the ledger keys it): a tombstone (a null value, the same key) in
every ledger partition whose latest value for the email is an entry, and every import intent
that names the email rewritten without it (``service/core/erasure.py``). Compaction then drops
the older records. With ``--delete-contact``: ``GET /contacts?email=`` and
``DELETE /contacts/{id}`` through the tools' ticks of the request budget.

**The service must be stopped.** A running replica holds the entries of its partitions in
memory (restored when it was assigned them) and writes an email's whole entry from memory
whenever that email's work touches it: a new event, and also work that outlives the event's
commit (contact ids learned after an import, at background priority). Such a write after the
tombstone would bring the erased entry back. So ``forget`` asks the broker about the consumer
group first and writes nothing while it has members (exit status 1); a replica started after
``forget`` restores its partitions from the ledger, tombstones included, and holds nothing of
the email. It checks the group again after writing: a replica that started meanwhile may have
restored before the tombstone, and must be restarted.

Nothing here prints or logs an email: results name the input's position and the email's hash
(``EMAIL_HASH_KEY``, as in the service's logs).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.app.audit import printable
from service.app.settings import Settings
from service.core.erasure import Erasure, latest_values, plan_erasure
from service.core.ledger import INTENT_PREFIX
from service.core.model import is_valid_email, normalise_email

WRITE_TIMEOUT_SECONDS = 60.0


class GroupActive(Exception):
    """The service's consumer group has members: a replica is running."""


@dataclass(frozen=True)
class Options:
    delete_contact: bool
    dry_run: bool
    json: bool
    exclusive: bool
    timeout: float


@dataclass
class Outcome:
    position: int  # 1-based: the argument, or the line of --from-file
    email: str  # never printed
    email_hash: str
    partitions: tuple[int, ...] = ()
    intents: int = 0
    contact: dict[str, Any] | None = None  # {"id": ..., "deleted": bool} or {"error": ...}

    def as_json(self) -> dict[str, Any]:
        return {
            "input": self.position,
            "email_hash": self.email_hash,
            "in_ledger": bool(self.partitions),
            "ledger_partitions": list(self.partitions),
            "intents_rewritten": self.intents,
            "contact": self.contact,
        }


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    group: str = ""
    written: bool = False


def read_emails(
    email: str | None, from_file: str | None, read: Callable[[str], str]
) -> tuple[list[tuple[int, str]], list[str]]:
    """The emails, normalised, in input order with their positions (duplicates dropped), and
    the problems (one line each, never the email itself): any problem and nothing is done."""
    if from_file is not None:
        lines = read(from_file).splitlines()
        entries = [
            (number, line)
            for number, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    else:
        entries = [(1, email or "")]
    problems: list[str] = []
    seen: set[str] = set()
    found: list[tuple[int, str]] = []
    for number, raw in entries:
        normal = normalise_email(raw)
        if not is_valid_email(normal):
            where = f"line {number}" if from_file is not None else "the argument"
            problems.append(f"{where}: not a valid email address")
            continue
        if normal not in seen:
            seen.add(normal)
            found.append((number, normal))
    if not found and not problems:
        problems.append("no email given")
    return found, problems


def group_state(settings: Settings, timeout: float) -> str | None:
    """None when the service's consumer group has no member (or does not exist); else what
    the broker says of it."""
    from confluent_kafka import ConsumerGroupState, KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    from service.app.logs import quiet_kafka_logger

    config: dict[str, Any] = {**settings.producer_config(), "logger": quiet_kafka_logger()}
    admin = AdminClient(config)
    group = settings.kafka_group_id
    future = admin.describe_consumer_groups([group], request_timeout=timeout)[group]
    try:
        description = future.result(timeout=timeout + 5)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if error is not None and error.code() == KafkaError.GROUP_ID_NOT_FOUND:
            return None
        raise
    members = len(description.members or [])
    if description.state in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD) and not members:
        return None
    return f"state {description.state.name.lower()}" + (f", {members} member(s)" if members else "")


def find_traces(settings: Settings, partitions: list[int], emails: Sequence[str]) -> Erasure:
    """Read the whole ledger topic (last write wins per key, as compaction keeps it) and plan
    the writes that erase ``emails``."""
    from service.adapters.kafka_readers import kafka_log_reader
    from service.adapters.ledger_store import RESTORE_BATCH, Intent
    from service.app.logs import quiet_kafka_logger

    targets = frozenset(emails)
    wanted_keys = {e.encode() for e in targets}
    prefix = INTENT_PREFIX.encode()
    config = {**settings.consumer_config(), "logger": quiet_kafka_logger()}
    reader = kafka_log_reader(config)(settings.kafka_ledger_topic, partitions)
    records: list[tuple[int, bytes, bytes | None]] = []
    try:
        while not reader.done():
            records += [
                r
                for r in reader.read(RESTORE_BATCH, 0.1)
                if r[1] in wanted_keys or r[1].startswith(prefix)
            ]
    finally:
        reader.close()

    def without(value: bytes, named: frozenset[str]) -> bytes:
        intent = Intent.decode("-", value)
        kept = tuple(e for e in intent.emails if e not in named)
        return Intent(intent.intent_id, intent.batch_id, kept, intent.submitted_at).encode()

    latest = latest_values(records, lambda key: key in targets or key.startswith(INTENT_PREFIX))
    return plan_erasure(latest, targets, lambda value: Intent.decode("-", value).emails, without)


def write_erasure(settings: Settings, erasure: Erasure) -> list[str]:
    """Produce the tombstones and intent rewrites to the ledger topic; the failures (redacted)."""
    from confluent_kafka import Producer

    from service.app.logs import quiet_kafka_logger

    producer = Producer({**settings.producer_config(), "logger": quiet_kafka_logger()})
    failures: list[str] = []
    acked = 0

    def delivered(err: Any, _msg: Any) -> None:
        nonlocal acked
        if err is None:
            acked += 1
        else:
            failures.append(settings.redact(err.str()))

    writes = erasure.writes()
    for partition, key, value in writes:
        while True:
            try:
                producer.produce(
                    settings.kafka_ledger_topic,
                    key=key.encode(),
                    value=value,
                    partition=partition,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.1)
    deadline = time.monotonic() + WRITE_TIMEOUT_SECONDS
    while len(producer) and time.monotonic() < deadline:
        producer.flush(1.0)
    if acked + len(failures) < len(writes):
        failures.append("no acknowledgement from the broker in time")
    return failures


def delete_contacts(
    settings: Settings, outcomes: Sequence[Outcome], exclusive: bool, retrying: Any
) -> int:
    """Look up and delete each email's AC contact; the exit status (0, or 4/5 on the first
    failure: the rest are not asked, a new run asks them again)."""
    from service.adapters.ac_http import AcTool
    from service.app.check import ac_exit_code
    from service.app.cli_common import EXIT_AC_REFUSED, EXIT_AC_UNREACHABLE, EXIT_OK
    from service.core import acapi
    from service.core.errors import AccountBlocked, ApiError

    tool = AcTool(
        settings.ac_base_url,
        lambda: settings.current_token().reveal(),
        rate=settings.ac_rate_limit_per_second,
        guard=settings.ac_rate_guard_seconds,
        tools_every=settings.ac_tools_tick_every,
        timeout=settings.ac_request_timeout_seconds,
        exclusive=exclusive,
    )
    try:
        for outcome in outcomes:
            try:
                # A call is a generator, used up by one attempt: a new one per attempt.
                email = outcome.email
                contact_id = retrying(
                    lambda email=email: tool.call(acapi.find_contact(email)),
                    "finding the contact",
                )
                if contact_id is None:
                    outcome.contact = {"id": None, "deleted": False}
                    continue
                gone = retrying(
                    lambda found=contact_id: tool.call(acapi.delete_contact(found)),
                    "deleting the contact",
                )
                outcome.contact = {"id": contact_id, "deleted": bool(gone)}
            except ApiError as exc:
                code = ac_exit_code(exc)
                refused = isinstance(exc, AccountBlocked) or code != EXIT_AC_UNREACHABLE
                outcome.contact = {"error": settings.redact(str(exc))}
                print(
                    f"ac-audience-sync forget: ActiveCampaign ({settings.ac_api_url}) "
                    f"{'refused the request' if refused else 'is unreachable'}: "
                    f"{settings.redact(str(exc))}",
                    file=sys.stderr,
                )
                return EXIT_AC_REFUSED if refused else EXIT_AC_UNREACHABLE
    finally:
        tool.close()
    return EXIT_OK


def report_json(report: Report, settings: Settings, options: Options) -> dict[str, Any]:
    outcomes = report.outcomes
    return {
        "dry_run": options.dry_run,
        "ledger_topic": settings.kafka_ledger_topic,
        "consumer_group": settings.kafka_group_id,
        "replicas_running": report.group or None,
        "written": report.written,
        "emails": [o.as_json() for o in outcomes],
        "tombstones": sum(len(o.partitions) for o in outcomes),
        "intents_rewritten": sum(o.intents for o in outcomes),
        "contacts_deleted": sum(1 for o in outcomes if o.contact and o.contact.get("deleted")),
    }


def report_lines(summary: Mapping[str, Any]) -> list[str]:
    verb = "would be" if summary["dry_run"] else "were"
    running = summary["replicas_running"]
    lines = [
        f"ledger {summary['ledger_topic']}: {len(summary['emails'])} email(s); consumer group "
        f"{summary['consumer_group']}: "
        + (f"replicas running ({running})" if running else "no replica running")
    ]
    done = "to tombstone" if summary["dry_run"] else "tombstoned"
    for item in summary["emails"]:
        ledger = (
            f"ledger entry in partition(s) {', '.join(map(str, item['ledger_partitions']))} {done}"
            if item["in_ledger"]
            else "not in the ledger"
        )
        if item["intents_rewritten"]:
            ledger += f"; named by {item['intents_rewritten']} import intent(s), {verb} rewritten"
        contact = item["contact"]
        if contact is None:
            what = "AC contact not asked"
        elif "error" in contact:
            what = f"AC contact not deleted: {printable(contact['error'])}"
        elif contact["id"] is None:
            what = "no AC contact"
        else:
            what = (
                f"AC contact {printable(contact['id'])} "
                f"{'deleted' if contact['deleted'] else 'already gone'}"
            )
        lines.append(f"  input {item['input']} (email_hash {item['email_hash']}): {ledger}; {what}")
    lines.append(
        f"{summary['tombstones']} tombstone(s) and {summary['intents_rewritten']} intent "
        f"rewrite(s) {verb} written"
        + ("" if summary["dry_run"] else "; compaction removes the older records")
    )
    return lines


def run(
    settings: Settings,
    options: Options,
    emails: Sequence[tuple[int, str]],
    retrying: Any,
) -> int:
    """Everything after the input and the configuration were checked: raises
    ``BrokerUnreachable``, ``BrokerRefusedCredentials``, ``KafkaException`` or
    ``ConfigError`` for the command's shell to turn into an exit status."""
    from service.app.cli_common import EXIT_FAILED, EXIT_OK, ledger_partitions
    from service.app.logs import EmailHasher

    partitions = ledger_partitions(settings, options.timeout)
    state = group_state(settings, options.timeout)
    if state is not None and not options.dry_run:
        raise GroupActive(state)
    key = settings.email_hash_key.reveal().encode() if settings.email_hash_key else None
    hasher = EmailHasher(key)
    erasure = find_traces(settings, partitions, [e for _, e in emails])
    report = Report(
        group=state or "",
        outcomes=[
            Outcome(
                position,
                email,
                hasher(email),
                erasure.partitions_of(email),
                erasure.intents_naming(email),
            )
            for position, email in emails
        ],
    )
    status = EXIT_OK
    if not options.dry_run:
        failures = write_erasure(settings, erasure)
        if failures:
            raise BrokerWriteFailed(failures[0])
        report.written = True
        after = group_state(settings, options.timeout)
        if after is not None:
            print(
                "ac-audience-sync forget: a replica of the service started while forget ran "
                f"(consumer group {settings.kafka_group_id}: {after}); it may have read the "
                "ledger before the tombstones: restart it",
                file=sys.stderr,
            )
            status = EXIT_FAILED
        if options.delete_contact:
            status = max(
                status, delete_contacts(settings, report.outcomes, options.exclusive, retrying)
            )
    summary = report_json(report, settings, options)
    if options.json:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(report_lines(summary)))
    return status


class BrokerWriteFailed(Exception):
    """The broker did not acknowledge a write."""
