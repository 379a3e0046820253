"""The invariants, checked during the run (commits, memory) and after it (final state).

1. the final AC state equals the oracle: last write wins per email and list, and a person's
   own opt-out is never overridden;
2. never more than 5 requests in any 1 s of AC's arrival log, never more than 100 imports in
   any 60 s, account-wide, across crashes and rebalances;
3. a committed offset never passes a change that is neither recorded in the ledger (which is
   written only after AC confirmed it) nor parked in the DLQ; commits never go backwards;
4. the compacted ledger agrees with AC for every email it holds (a state that is not verified,
   an import's subscription, may show AC's 2: that is what "not verified" says);
5. progress: the committed offsets reach the end of every partition;
6. no crash but the injected ones (the world re-raises any other exception); memory (pending
   changes, tracked offsets, outstanding imports) stays within the configured bounds.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from service.core.ledger import SetBy
from service.pipeline.loop import CONSUME_BATCH

if TYPE_CHECKING:
    from tests.simulation.harness import Simulation


class Checks:
    def __init__(self, sim: Simulation, *, journal: bool = False) -> None:
        self.sim = sim
        self.journaling = journal  # who each request touched (replays of one seed only)
        self.verify_reads: dict[tuple[str, str], list[float]] = {}
        self._by_key: dict[int, dict[tuple[str, str], list[int]]] = {}
        self.journal: dict[str, list[str]] = {}
        self.confirmed: dict[tuple[str, str], list[float]] = {}  # non-pending ledger records
        self._indexed: dict[int, int] = {}
        sim.account.on_arrival = self._arrival

    def _fail(self, invariant: str, detail: str) -> None:
        from tests.simulation.harness import Violation

        raise Violation(self.sim.seed, invariant, detail)

    # ---- AC's log: who asked whether an exit still held ---------------------------------

    def _arrival(self, arrival: object, body: object) -> None:
        if self.journaling:
            self._journal(arrival, body)
        query = getattr(arrival, "detail", {}).get("query", {})
        if getattr(arrival, "path", "").endswith("/contacts") and query.get("status") == ["1"]:
            account = self.sim.account.account
            list_id = (query.get("listid") or [""])[0]
            name = account.lists.get(list_id, {}).get("name")
            if name is None:
                return
            emails = [e.lower() for e in query.get("email", [])]
            for cid in query.get("ids[]", []):
                contact = account.contacts.get(cid)
                if contact is not None:
                    emails.append(contact["email"].strip().lower())
            for email in emails:
                self.verify_reads.setdefault((email, name), []).append(self.sim.world.now)

    def _journal(self, arrival: Any, body: Any) -> None:
        """Who each request touched, for ``explain`` (debugging a failed seed)."""
        account = self.sim.account.account
        path, now = arrival.path, round(arrival.at - 1_000_000, 3)
        note = f"{now} {arrival.replica} {arrival.method} {path.removeprefix('/api/3/')} -> {arrival.status}"
        if isinstance(body, dict):
            if "contact" in body and isinstance(body["contact"], dict):
                self.journal.setdefault(str(body["contact"].get("email", "")).lower(), []).append(
                    note
                )
            if "contactList" in body and isinstance(body["contactList"], dict):
                row = body["contactList"]
                contact = account.contacts.get(str(row.get("contact")), {})
                list_name = account.lists.get(str(row.get("list")), {}).get("name")
                email = str(contact.get("email", "")).lower()
                self.journal.setdefault(email, []).append(f"{note} {list_name}={row.get('status')}")
            for entry in body.get("contacts") or []:
                if isinstance(entry, dict):
                    subs = [
                        account.lists.get(str(s.get("listid")), {}).get("name")
                        for s in entry.get("subscribe", [])
                    ]
                    uns = [
                        account.lists.get(str(s.get("listid")), {}).get("name")
                        for s in entry.get("unsubscribe", [])
                    ]
                    self.journal.setdefault(str(entry.get("email", "")).lower(), []).append(
                        f"{note} import +{subs} -{uns}"
                    )
        query = arrival.detail.get("query", {})
        for email in query.get("email", []):
            self.journal.setdefault(email.lower(), []).append(f"{note} {query}")
        for cid in query.get("ids[]", []):
            contact = account.contacts.get(cid)
            if contact:
                self.journal.setdefault(contact["email"].lower(), []).append(
                    f"{note} ids[] listid={query.get('listid')} status={query.get('status')}"
                )
        if "contactLists" in path:
            cid = path.split("/")[-2]
            contact = account.contacts.get(cid)
            if contact:
                self.journal.setdefault(contact["email"].lower(), []).append(note)

    def explain(self, email: str, audience: str) -> str:
        sim = self.sim
        lines = [f"{email} / {audience}:"]
        for partition, records in sim.oracle.records.items():
            for index, event in enumerate(records):
                if event.email == email and event.audience == audience:
                    lines.append(f"  event p{partition}@{index} {event.action}")
        if (email, audience) in sim.oracle.opted_out:
            lines.append(
                f"  opted out at {sim.oracle.opted_out[(email, audience)] - 1_000_000:.3f}"
            )
        lines += ["  AC: " + n for n in self.journal.get(email, [])]
        for partition in range(sim.profile.partitions):
            for record in sim.cluster.log("cdp.audience.ledger", partition):
                if record.key == email.encode() and record.value:
                    state = sim.codec.decode(record.value).state(audience)
                    lines.append(
                        f"  ledger @{record.timestamp_ms / 1000 - 1_000_000:.3f} {record.producer}: {state}"
                    )
        lines.append(f"  committed {sim.committed}")
        return "\n".join(lines)

    # ---- people who opt out themselves --------------------------------------------------

    def people(self, start: float) -> None:
        """Schedule the workload's opt-outs: some before the service starts, others at random
        moments, each only if the person is subscribed right then (an effective opt-out)."""
        sim = self.sim
        account = sim.account.account
        for email, audience in sim.workload.opted_out_before:
            list_id = next((i for i, lst in account.lists.items() if lst["name"] == audience), None)
            if list_id is None:
                list_id = account._new_id()
                account.lists[list_id] = {
                    "id": list_id,
                    "name": audience,
                    "stringid": f"pre-{list_id}",
                    "sender_url": "https://x",
                    "sender_reminder": "r",
                    "cdate": "0",
                }
            contact_id, _ = account._upsert_contact({"email": email})
            account._set_membership(contact_id, list_id, 2, "self", start - 60.0)
            sim.oracle.opted_out.setdefault((email, audience), start - 1.0)
        for at in sim.workload.opt_out_times:
            sim.world.at(start + at, self._opt_out)

    def _opt_out(self) -> None:
        sim = self.sim
        account = sim.account.account
        keys = sim.oracle.keys
        if not keys:
            return
        email, audience = sim.world.rng.choice(keys)
        contact_id = account.email_index.get(email)
        list_id = next((i for i, lst in account.lists.items() if lst["name"] == audience), None)
        if contact_id is None or list_id is None:
            return
        membership = account.memberships.get((contact_id, list_id))
        if membership is None or membership["status"] != 1:
            return
        account.self_unsubscribe(email, audience)
        now = sim.world.now
        sim.oracle.opted_out.setdefault((email, audience), now)
        # The documented unknowable race: the person opts out after the service checked the
        # exit ("still subscribed") and before the outcome of its unsubscribe is recorded (a
        # crash can stretch that until the next owner reads AC again).
        last_check = max(
            (x for x in self.verify_reads.get((email, audience), []) if x <= now), default=None
        )
        last_record = max(
            (x for x in self.confirmed.get((email, audience), []) if x <= now), default=None
        )
        if last_check is not None and (last_record is None or last_record < last_check):
            sim.oracle.exempt.add((email, audience))

    # ---- during the run -------------------------------------------------------------------

    def commit(self, partition: int, previous: int, offset: int) -> None:
        """Invariant 3 for the records between the previous commit and this one.

        Record ``i`` of a key may complete only when the change that covers it settles; that
        change may have merged later records of the key (``j >= i``), so ``i`` is covered when
        the ledger holds a state of the key from ``i`` on, or a state that one of the key's
        records from ``i`` on asks for (a skip: nothing to write), or nothing at all while one
        of them is an exit (nothing of ours to undo), or one of them is parked, or one of them
        is not committed yet (it supersedes ``i``; nothing is lost)."""
        sim = self.sim
        records = sim.oracle.records.get(partition, [])
        view = sim.ledger_view.get(partition, {})
        by_key = self._index(partition)
        last: dict[tuple[str, str], int] = {}
        for index in range(previous, min(offset, len(records))):
            event = records[index]
            self.sim.report.checks += 1
            if event.kind != "valid" or event.email in sim.oracle.excluded:
                if event.kind != "valid" and (partition, index) not in sim.parked:
                    self._fail("3 commit", f"p{partition}@{index} committed before it was parked")
                continue
            if event.late:
                # A late copy changes nothing (its staleness is by construction; invariant 1
                # proves the guard skipped it): the key's own records before it are checked.
                continue
            last[(event.email, event.audience)] = index
        for key, index in last.items():
            later = [j for j in by_key[key] if j >= index and not records[j].late]
            if any((partition, j) in sim.parked for j in later):
                continue
            if any(j >= offset for j in later):
                # A later record of the key is not committed by this commit: it is read again
                # after any crash, and its change supersedes this one (the read-ahead of a
                # backlog completes such records at once).
                continue
            entry = view.get(key[0])
            state = entry.state(key[1]) if entry else None
            intents = {1 if records[j].action == "ENTERED" else 2 for j in later}
            if state is None:
                if 2 in intents:
                    continue  # an exit of a contact never ours: nothing to record
            elif state.source_offset >= index:
                continue
            elif state.status in intents or (1 in intents and state.set_by is not SetBy.SERVICE):
                continue  # the ledger already held it (a skip), or a kept opt-out
            event = records[index]
            held = (
                f"status {state.status} from offset {state.source_offset}" if state else "nothing"
            )
            self._fail(
                "3 commit",
                f"p{partition}@{index} ({event.action} {key[1]}) committed; the ledger holds {held}",
            )

    def _index(self, partition: int) -> dict[tuple[str, str], list[int]]:
        records = self.sim.oracle.records.get(partition, [])
        index = self._by_key.setdefault(partition, {})
        seen = self._indexed.get(partition, 0)
        for i in range(seen, len(records)):
            event = records[i]
            if event.kind == "valid":
                index.setdefault((event.email, event.audience), []).append(i)
        self._indexed[partition] = len(records)
        return index

    def memory(self) -> None:
        for loop in self.sim.loops:
            s = loop.settings
            pending = (
                len(loop.coalescer) + loop.delivery.pending() + loop.dispatcher.changes_in_flight()
            )
            tracked = len(loop.tracker)
            if pending > s.max_pending_changes + 2 * CONSUME_BATCH + 600:
                self._fail("6 memory", f"{pending} pending changes (bound {s.max_pending_changes})")
            if tracked > s.max_tracked_offsets + 2 * CONSUME_BATCH * 6:
                self._fail("6 memory", f"{tracked} tracked offsets (bound {s.max_tracked_offsets})")

    # ---- after the run ------------------------------------------------------------------

    def final(self) -> None:
        sim = self.sim
        self.rates()
        if not sim.report.drained:
            lag = {
                p: len(sim.cluster.log("cdp.audience", p)) - sim.committed.get(p, 0)
                for p in range(sim.profile.partitions)
            }
            self._fail(
                "5 progress",
                f"not drained after {sim.profile.drain_limit:.0f}s: lag {lag}\n{self.loops()}",
            )
        account = sim.account.account
        snapshot = account.snapshot(sim.world.now)
        members = {name: data["members"] for name, data in snapshot["lists"].items()}
        wrong = []
        for (email, audience), subscribed in sorted(sim.oracle.expected().items()):
            sim.report.checks += 1
            status = members.get(audience, {}).get(email)
            if (status == 1) != subscribed:
                opted = (email, audience) in sim.oracle.opted_out
                wrong.append(
                    f"{email} {audience}: AC {status}, want {'1' if subscribed else 'not 1'}"
                    f"{' (opted out)' if opted else ''}"
                )
        if wrong:
            email, audience = wrong[0].split(" ", 1)[0], wrong[0].split(" ", 1)[1].split(":")[0]
            story = f"\n{self.explain(email, audience)}" if self.journaling else ""
            self._fail("1 final state", f"{len(wrong)} wrong, e.g. {wrong[:3]}{story}")
        sim.cluster.compact("cdp.audience.ledger")
        from service.adapters.ledger_reads import read_all

        ledger = read_all(
            sim.cluster.readers(), "cdp.audience.ledger", list(range(sim.profile.partitions))
        )
        for email, entry in ledger.items():
            for state in entry.lists:
                if entry.state(state.list) is None or state.pending:
                    continue  # no state, or an uncertain one (honestly so)
                if (email, state.list) in sim.oracle.opted_out:
                    continue  # changed in AC behind the service's back, by the person
                sim.report.checks += 1
                status = members.get(state.list, {}).get(email)
                if state.status == 1 and status != 1 and state.verified:
                    wrong.append(f"{email} {state.list}: ledger 1 (verified), AC {status}")
                exit_seen = state.set_by is SetBy.UNKNOWN and not state.verified
                if state.status == 2 and status == 1 and not exit_seen:  # AC not asked: no claim
                    wrong.append(f"{email} {state.list}: ledger 2 ({state.set_by.name}), AC 1")
            if entry.contact_id is not None:
                actual = account.email_index.get(email)
                if actual is not None and actual != entry.contact_id:
                    wrong.append(f"{email}: ledger contact {entry.contact_id}, AC {actual}")
        if wrong:
            self._fail("4 ledger = AC", f"{len(wrong)} differ, e.g. {wrong[:3]}")

    def loops(self) -> str:
        """What each live replica holds (to see why a partition does not move)."""
        lines = []
        for name, replica in self.sim.replicas.items():
            if not replica.actor.alive:
                continue
            loop = replica.loop
            d = loop.delivery
            heads = {
                p: (s.tracked[0] if s.tracked else None, len(s.tracked))
                for p, s in loop.tracker._partitions.items()
            }
            imports = [
                (i.import_id, i.state.name, i.adopted, len(i.all_emails()))
                for i in d.lifecycle.imports.values()
            ]
            lines.append(
                f"  {name}: assigned {sorted(loop.ownership.assigned)} "
                f"restoring {sorted(loop.ownership.restoring)} pauses {loop.pauses.reasons} "
                f"heads {heads} pending {len(loop.coalescer)} held {len(d.desk.held)} "
                f"adopted {len(d.desk.adopted)} waiting_lists {list(d.lists.waiting)} "
                f"verify {d.verification.pending()} ready {len(d.single)}/{len(d.importing.ready)} "
                f"preparing {list(d.importing.preparing)} inflight {len(loop.dispatcher.inflight)} "
                f"imports {imports} gate {loop.confirm.gate.closed} "
                f"source-held {loop.source.held_records()}"
            )
        return "\n".join(lines)

    def rates(self) -> None:
        arrivals = sorted(a.at for a in self.sim.account.arrivals)
        j = 0
        for i, at in enumerate(arrivals):
            while arrivals[j] <= at - 1.0:
                j += 1
            if i - j + 1 > 5:
                self._fail("2 rate", f"{i - j + 1} requests in the second ending at {at:.3f}")
        imports = sorted(a.at for a in self.sim.account.arrivals if a.contacts > 1)
        j = 0
        for i, at in enumerate(imports):
            while imports[j] <= at - 60.0:
                j += 1
            if i - j + 1 > 100:
                self._fail("2 imports", f"{i - j + 1} imports in the minute ending at {at:.3f}")
        self.sim.report.checks += len(arrivals) + len(imports)
        statuses = Counter(a.status for a in self.sim.account.arrivals)
        self.sim.report.faults["ac_429_answers"] = statuses.get(429, 0)
