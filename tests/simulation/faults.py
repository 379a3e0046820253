"""The fault schedule of one history, drawn from its seed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.simulation.harness import Simulation

AC_FAULTS: dict[str, dict[str, Any]] = {
    "ac_5xx": {"error_5xx_ratio": 0.3},
    "ac_timeouts": {"timeout_ratio": 0.2, "timeout_seconds": 5.0},
    "ac_slow": {"latency_ms": [300.0, 1500.0]},
    "ac_429_storm": {"storm_429_ratio": 0.5, "storm_429_retry_after": 3, "storm_429_seconds": 20},
    "ac_outage": {"error_5xx_ratio": 1.0},
    "ac_token_refused": {"auth_failure": True},
    "ac_imports_stuck": {"import_stuck_ratio": 0.3},
    "ac_import_info_404": {"import_info_404_ratio": 0.3},
}
KAFKA_FAULTS: dict[str, dict[str, Any]] = {
    "produce_fails": {"produce_fail": 0.2},
    "produce_fails_after_landing": {"produce_fail_after_landing": 0.2},
    "acks_slow": {"ack_delay": (0.05, 0.8)},
    "commits_fail": {"commit_fail": 0.4},
}
PROCESS_FAULTS = ("crash", "lost", "bounce", "scale")


def schedule(sim: Simulation, start: float, duration: float) -> float:
    """Schedule the history's faults; return when the last one is over."""
    world, p = sim.world, sim.profile
    rng = world.rng
    end = start + duration + 5.0
    for _ in range(p.crashes):
        at = start + rng.uniform(1.0, duration + 3.0)
        world.at(at, lambda: _crash(sim, restart_after=rng.uniform(0.5, 10.0)))
    for _ in range(p.faults):
        kind = rng.choice([*AC_FAULTS, *KAFKA_FAULTS, *PROCESS_FAULTS])
        at = start + rng.uniform(0.0, duration)
        length = rng.uniform(3.0, 45.0)
        end = max(end, at + length + 1.0)
        if kind in AC_FAULTS:
            world.at(at, lambda k=kind: _ac(sim, k, on=True))
            world.at(at + length, lambda k=kind: _ac(sim, k, on=False))
        elif kind in KAFKA_FAULTS:
            world.at(at, lambda k=kind: _kafka(sim, k, on=True))
            world.at(at + length, lambda k=kind: _kafka(sim, k, on=False))
        elif kind == "crash":
            world.at(at, lambda: _crash(sim, restart_after=rng.uniform(0.5, 5.0)))
        elif kind == "lost":
            world.at(at, lambda: _lost(sim))
        elif kind == "bounce":
            world.at(at, lambda: _bounce(sim))
        elif kind == "scale":
            world.at(at, lambda n=length: _scale(sim, n))
        sim.report.faults[kind] = sim.report.faults.get(kind, 0) + 1
    return end


def _live(sim: Simulation) -> list[Any]:
    return [r for r in sim.replicas.values() if r.actor.alive]


def _crash(sim: Simulation, restart_after: float) -> None:
    live = _live(sim)
    if not live:
        return
    victim = sim.world.rng.choice(live)
    victim.crash()
    sim.report.crashes += 1

    def restart() -> None:
        sim.start_replica()
        sim.report.restarts += 1

    sim.world.after(restart_after, restart)


def _lost(sim: Simulation) -> None:
    live = _live(sim)
    if live:
        victim = sim.world.rng.choice(live)
        sim.cluster.lose("ac-sync", victim.name)
        sim.report.lost += 1


def _bounce(sim: Simulation) -> None:
    """A graceful restart (SIGTERM, a rolling deploy)."""
    live = _live(sim)
    if not live:
        return
    victim = sim.world.rng.choice(live)
    victim.loop.request_stop()
    sim.world.after(sim.world.rng.uniform(1.0, 8.0), sim.start_replica)
    sim.report.rebalances += 1


def _scale(sim: Simulation, length: float) -> None:
    """One more replica for a while (partitions move to it and back)."""
    extra = sim.start_replica()
    sim.report.rebalances += 1
    sim.world.after(length, extra.loop.request_stop)


def _ac(sim: Simulation, kind: str, *, on: bool) -> None:
    account = sim.account.account
    if on:
        account.set_faults(AC_FAULTS[kind], sim.world.now)
    else:
        account.set_faults({}, sim.world.now)


def _kafka(sim: Simulation, kind: str, *, on: bool) -> None:
    for name, value in KAFKA_FAULTS[kind].items():
        setattr(sim.cluster, name, value if on else _DEFAULTS[name])


_DEFAULTS: dict[str, Any] = {
    "produce_fail": 0.0,
    "produce_fail_after_landing": 0.0,
    "ack_delay": (0.002, 0.02),
    "commit_fail": 0.0,
}
