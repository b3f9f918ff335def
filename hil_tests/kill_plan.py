"""SIGKILL moments for the daemon soak tests (test_daemon.py on REST, test_daemon_evm.py on chain).

A plan names *which phase* of a slot each kill hits and whom it kills, never a wall-clock
moment: each moment is placed when its turn comes, in the first slot whose phase window is
still ahead. A fixed timetable drawn up front broke on a loaded machine: when a restart took
longer than the gap to the next moment, that moment was skipped, and CI once kept 2 kills of 6.
Placing each kill after the previous restart has finished loses none, only moves it a slot on.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

EDGE_PHASES = ("delivery-start", "metering", "reporting")
LATER_PHASES = ("mid-transfer", "bidding")


@dataclass
class Kill:
    phase: str
    victims: tuple[str, ...]
    fraction: float  # where in the phase's window of its slot, 0..1 (drawn from the seed)
    at: float = 0.0  # wall clock (epoch s) it was placed at
    done_at: float = 0.0
    transfer_active: dict | None = None  # per victim: was its router moving a trade at the kill
    last_line: dict | None = None  # per victim: the daemon's last event line before the kill


def kill_phases(slot_s: int, gate_s: int) -> dict[str, tuple[float, float]]:
    """Where in a slot (seconds after its edge E) each phase of the daemon's work falls.

    At an edge the ``slot_edge`` job STARTs the new slot's transfers, then STOPs and meters the
    slot that ended, then signs and sends the reports; the transfer then runs; orders for the
    market after next are placed or cancelled until its gate closes ``gate_s`` before its edge."""
    return {
        "delivery-start": (0.0, 0.12),
        "metering": (0.12, 0.5),
        "reporting": (0.5, 2.0),
        "mid-transfer": (3.0, 0.55 * slot_s),
        "bidding": (slot_s - gate_s - 2.0, slot_s - gate_s - 0.2),
    }


def plan_kills(rng: random.Random, count: int) -> list[Kill]:
    """``count`` kills, alternating an edge phase and a later one (two a slot when the machine
    keeps up), phases rotated so each comes up as often as the others, victims drawn from
    seller, buyer or both."""
    edge_phases, later_phases = list(EDGE_PHASES), list(LATER_PHASES)
    rng.shuffle(edge_phases)
    rng.shuffle(later_phases)
    plan = []
    for k in range(count):
        phase = edge_phases[(k // 2) % 3] if k % 2 == 0 else later_phases[(k // 2) % 2]
        victims = rng.choice([("seller",), ("buyer",), ("seller", "buyer"), ("seller", "buyer")])
        plan.append(Kill(phase=phase, victims=victims, fraction=rng.random()))
    return plan


def moment_in_phase(now: float, slot_s: int, window: tuple[float, float], fraction: float,
                    lead_s: float = 0.05) -> float:
    """The first moment at ``fraction`` of ``window`` (seconds after a slot edge) that is at
    least ``lead_s`` after ``now``: in this slot if it is still ahead, else in the next one."""
    low, high = window
    edge = now - now % slot_s
    at = edge + low + fraction * (high - low)
    while at < now + lead_s:
        at += slot_s
    return at


def run_kills(hood, plan: list[Kill], *, slot_s: int, gate_s: int, until: float, rng: random.Random,
              enough: Callable[[list[Kill]], bool] = lambda done: False) -> list[Kill]:
    """Kill and restart the victims of each planned kill in turn; stop at the end of the plan,
    when ``enough(done)`` holds, or when the next moment would fall at or after ``until`` (the
    last market: a kill later than that has no trade left to hurt). The victims restart in
    parallel, each as systemd would, after 0.1 to 1 s."""
    phases = kill_phases(slot_s, gate_s)
    done: list[Kill] = []
    for kill in plan:
        if enough(done):
            break
        kill.at = moment_in_phase(time.time(), slot_s, phases[kill.phase], kill.fraction)
        if kill.at >= until:
            break
        time.sleep(max(0.0, kill.at - time.time()))
        kill.transfer_active, kill.last_line = {}, {}
        for name in kill.victims:
            kill.transfer_active[name] = bool(hood.bench_status(name)["dgr"]["transfers"])
            kill.last_line[name] = (hood.houses[name].daemon.lines or ["-"])[-1][25:110]
            hood.kill_daemon(name)
        kill.done_at = time.time()
        done.append(kill)
        time.sleep(rng.uniform(0.1, 1.0))
        restarts = [threading.Thread(target=hood.start_daemon, args=(name,)) for name in kill.victims]
        for thread in restarts:
            thread.start()
        for thread in restarts:
            thread.join(60)
        for name in kill.victims:
            assert hood.houses[name].daemon.running, f"{name} did not come back after a kill"
    return done


def describe(kills: list[Kill], slot_s: int) -> list[str]:
    """One line per kill: its phase, where in the slot it landed, whom, and what was running."""
    lines = [f"{'phase':15} {'slot+s':>6} victims        transfer? last line"]
    for k in kills:
        lines.append(f"{k.phase:15} {k.done_at % slot_s:6.2f} {'+'.join(k.victims):14} {k.transfer_active} {k.last_line}")
    return lines


def kill_count(kills: list[Kill]) -> int:
    return sum(len(k.victims) for k in kills)


def phases_hit(kills: list[Kill]) -> Counter:
    return Counter(k.phase for k in kills)
