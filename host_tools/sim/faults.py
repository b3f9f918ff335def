"""What a seed draws beyond the houses: faults and process kills, all before the drain phase.

Kinds (counted in the final ``faults=`` figure, one per drawn fault):
- meters (house or interchange): timeout, CRC error and Modbus-exception windows, a spike (one
  absurd reading), a counter reset;
- router: NAK of the next START/STOP/HEARTBEAT (codes 35 CAPACITY, 50 INTERNAL), dropped frames
  (requests or replies, fewer or more than the driver's retries), link loss for a while, a latched
  hardware fault, a reboot;
- ledger: outages, 5xx answers before or after the message was applied, slow answers (within or
  beyond the adapter's timeout: the answer is lost after the ledger applied the message),
  duplicated deliveries of a request;
- clocks: a constant skew within or beyond the guard's bound, and clock jumps (an NTP step that
  is corrected later);
- kills: at the Nth hooked operation of a house (journal commit, router command, ledger call),
  before it or right after it.
"""

from __future__ import annotations


def draw_faults(world) -> int:
    rng = world.rng
    start, stop = world.now, world.drain_start - 60
    span = stop - start
    count = 0
    intensity = rng.choice((0, 1, 2, 3, 4, 6, 8))

    def when() -> float:
        return start + rng.random() * span

    def until(t: float, duration: float) -> float:
        return min(t + duration, world.drain_start)  # every fault is over when the drain begins

    for _ in range(intensity):
        house = rng.choice(world.houses)
        kind = rng.choice(("meter", "meter", "router", "router", "router", "ledger", "ledger", "clock"))
        t = when()
        count += 1
        if kind == "meter":
            interchange = rng.random() < 0.5
            faults = house.ix_faults if interchange else house.house_faults
            sub = rng.choice(("timeout", "crc", "exception", "spike", "reset"))
            if sub == "spike":
                faults.spikes.append(t)
            elif sub == "reset":
                faults.resets.append(t)
            else:
                faults.windows.append((t, until(t, rng.choice((10, 60, 300, 900))), sub))
            if interchange and sub in ("spike", "reset"):
                house.ix_events.append(t)
        elif kind == "router":
            rf = house.router_faults
            sub = rng.choice(("nak", "drop", "drop", "link", "latch", "reboot"))
            if sub == "nak":
                rf.naks.append((t, rng.choice(("START", "START", "STOP", "HEARTBEAT")), rng.choice((35, 50))))
            elif sub == "drop":
                rf.drops.append((t, rng.choice(("request", "reply")), rng.randint(1, 2 * (world_retries() + 1))))
            elif sub == "link":
                rf.link_down.append((t, until(t, rng.choice((5, 30, 120, 600)))))
            elif sub == "latch":
                rf.latch.append(t)
            else:
                rf.reboots.append(t)
        elif kind == "ledger":
            sub = rng.choice(("outage", "5xx_before", "5xx_after", "slow", "slow_lost", "duplicate"))
            if sub == "outage":
                world.ledger_faults.outages.append((t, until(t, rng.choice((20, 120, 600, 1200)))))
            else:
                world.ledger_faults.shots.append((t, sub))
        else:
            if rng.random() < 0.5:
                bound = world.max_skew_s
                beyond = rng.random() < 0.25
                house.base_offset = (rng.uniform(3, 30) * rng.choice((-1, 1)) if beyond
                                     else rng.uniform(-bound, bound) * 0.75)
            else:
                house.jumps.append((t, until(t, rng.choice((60, 300, 900))), rng.choice((-1, 1)) * rng.choice((5, 60, 600))))
    for q in (world.ledger_faults.shots,):
        q.sort()
    for h in world.houses:
        rf = h.router_faults
        for q in (rf.naks, rf.drops, rf.latch, rf.reboots, h.house_faults.spikes, h.house_faults.resets,
                  h.ix_faults.spikes, h.ix_faults.resets):
            q.sort()
    kills = rng.choice((0, 0, 1, 1, 2, 3))
    for _ in range(kills):
        house = rng.choice(world.houses)
        house.hooks.plan[rng.randint(1, 400)] = rng.choice(("before", "after"))
    return count


def world_retries() -> int:
    from .runner import DGR_RETRIES

    return DGR_RETRIES
