"""One seed of the simulation: draw the neighbourhood and its faults, run the real firmware on a
virtual clock, check the invariants after every step.

The scheduler is a priority queue of (true time, order, house, incarnation, job). Each house
runs the jobs `dgc run` schedules (firmware/scheduler/daemon.py), at the cadences of its board
config, by its own (possibly skewed) clock. A step is one job of one house. A planned kill
raises ``SimulatedKill`` inside a journal commit, a router command or a ledger call; the house's
process is then dropped (its SQLite connection closed: an open transaction rolls back) and
restarted from the same journal file after a restart delay, exactly as systemd restarts
`dgc run`: measure, recover, then the jobs. Devices and the ledger keep their state.
"""

from __future__ import annotations

import heapq
import io
import logging
import os
import random
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import coincurve

from firmware.jitter import bid_offset_ms
from firmware.config import parse_config
from firmware.journal import Journal
from firmware.keystore import DeviceKey
from firmware.market import MarketRules
from firmware.scheduler.events import EventLog
from host_tools.bench_ledger.store import LedgerStore

from .devices import (KillableConnection, KillHooks, MeterFaults, RouterFaults, SimDgrClient, SimMeter,
                      SimMeterSet, SimRouter, SimulatedKill)
from .invariants import Checker
from .ledger import LedgerFaults, SimLedgerClient, SimLedgerService
from .profiles import CommunityProfile, Profile, SyntheticProfile
from .sut import build_controller

SLOT_S = 1800
GATE_S = 900
MARKETS_AHEAD = 2
MEASURE_S = 300
REVIEW_S = 300
POLL_S = 300
OUTBOX_S = 300
CLOCK_S = 600
HEARTBEAT_S = 60
WATCHDOG_S = 180.0
MAX_SKEW_MS = 2000
LEDGER_TIMEOUT_S = 2.0
DGR_TIMEOUT_S = 0.5
DGR_RETRIES = 2
REPORT_DEADLINE_S = 4 * SLOT_S
LEDGER_ID = "dgc-sim"
EPOCH0 = 1_798_761_600  # 2027-01-01T00:00:00Z, a slot boundary
CONFIG_TEMPLATE = """
[board]
name = "{name}"
state_dir = "{state_dir}"
key_file = "{state_dir}/device.key"
[ledger]
url = "http://127.0.0.1:1"
ledger_id = "{ledger_id}"
authority_public_key = "{authority}"
timeout_ms = {ledger_timeout_ms}
max_clock_skew_ms = {max_skew_ms}
message_ttl_seconds = 900
[market]
slot_seconds = {slot_s}
markets_ahead = {markets_ahead}
lot_wh = 100
gate_closure_seconds = {gate_s}
price_min_per_kwh_minor = 1000
price_max_per_kwh_minor = 4000
[cadence]
measure_seconds = {measure_s}
bid_seconds = {slot_s}
review_seconds = {review_s}
review_horizon_seconds = {horizon_s}
poll_trades_seconds = {poll_s}
outbox_seconds = {outbox_s}
clock_check_seconds = {clock_s}
[policy]
buy_limit_per_kwh_minor = {buy}
sell_floor_per_kwh_minor = {sell}
max_order_wh = 3000
[[bus]]
name = "rs485"
port = "/dev/null"
baudrate = 9600
[[meter]]
name = "house"
bus = "rs485"
unit_id = 1
model = "sdm630"
role = "house"
[[meter]]
name = "interchange"
bus = "rs485"
unit_id = 2
model = "sdm120"
role = "interchange"
[dgr]
port = "/dev/null"
timeout_ms = {dgr_timeout_ms}
retries = {dgr_retries}
heartbeat_seconds = {heartbeat_s}
"""



def jobs_of(config) -> tuple[tuple[str, int], ...]:
    """The jobs `dgc run` schedules (firmware/scheduler/daemon.py) and their intervals from the
    board config; slot_edge is aligned to the board's slot edges and not listed."""
    c = config.cadence
    return (("measure", c.measure_seconds), ("bid", c.bid_seconds), ("review", c.review_seconds),
            ("poll_trades", c.poll_trades_seconds), ("flush_outbox", c.outbox_seconds),
            ("deliveries_tick", max(1, c.poll_trades_seconds)), ("heartbeat", max(1, config.dgr.heartbeat_seconds)),
            ("check_clock", c.clock_check_seconds))


@dataclass
class SeedResult:
    seed: int
    steps: int = 0
    kills: int = 0
    faults: int = 0
    trades: int = 0
    violations: list = field(default_factory=list)
    trace: list[str] = field(default_factory=list)


class _NullStream(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


class _TraceStream(io.TextIOBase):
    """EventLog's stream: lines go to the trace with the virtual time (the EventLog's own stamp
    is the real clock's, meaningless here, so it is dropped)."""

    def __init__(self, world, house: str):
        self._world, self._house = world, house

    def write(self, s: str) -> int:
        for line in s.splitlines():
            parts = line.split(" ", 2)
            self._world.trace_line(f"{self._house} | {parts[2] if len(parts) == 3 else line}")
        return len(s)


class House:
    def __init__(self, world: "World", idx: int, rng: random.Random, profile: Profile):
        self.world = world
        self.idx = idx
        self.name = f"house-{idx + 1}"
        self.profile = profile
        self.pv = profile.has_pv(self.name)
        buy, sell = 2600 + rng.randrange(0, 5) * 100, 1900 + rng.randrange(0, 5) * 100
        state_dir = world.tmp / self.name
        self.config = parse_config(CONFIG_TEMPLATE.format(
            name=self.name, state_dir=state_dir, ledger_id=LEDGER_ID, ledger_timeout_ms=int(LEDGER_TIMEOUT_S * 1000),
            max_skew_ms=MAX_SKEW_MS, slot_s=SLOT_S, markets_ahead=MARKETS_AHEAD, gate_s=GATE_S, measure_s=MEASURE_S,
            review_s=REVIEW_S, horizon_s=2 * SLOT_S, poll_s=POLL_S, outbox_s=OUTBOX_S, clock_s=CLOCK_S, buy=buy,
            sell=sell, dgr_timeout_ms=int(DGR_TIMEOUT_S * 1000), dgr_retries=DGR_RETRIES, heartbeat_s=HEARTBEAT_S,
            authority=world.ledger_store.authority_public_key.hex()),
            state_dir / "board.toml")
        self.jobs = dict(jobs_of(self.config))
        self.metering_tolerance_wh = int(getattr(self.config.meter_by_role("interchange"), "tolerance_wh", 0))
        self.key = DeviceKey(coincurve.PrivateKey(rng.randbytes(32)))
        self.device_id = self.key.device_id
        self.bid_offset_ms = bid_offset_ms(self.device_id, self.config.cadence.bid_seconds, self.config.cadence.bid_jitter_seconds)
        self.journal_path = state_dir / "journal.sqlite3"
        self.hooks = KillHooks()
        self.hooks.on_kill = lambda what, phase: world.trace_line(f"{self.name} KILL {phase} {what}")
        self.base_offset = 0.0
        self.jumps: list[tuple[float, float, float]] = []  # (from, to, seconds added to the board clock)
        self.house_faults = MeterFaults()
        self.ix_faults = MeterFaults()
        self.ix_events: list[float] = []  # times of interchange spikes and resets (the lists above are consumed)
        self.router_faults = RouterFaults()
        self._t = world.now
        self._imp = self._exp = 0.0
        self._power = 0.0
        self.house_meter = SimMeter("house", 1, self._house_counters, self.house_faults)
        self.router = SimRouter(f"dgr-{self.name}", heartbeat_timeout_s=WATCHDOG_S, max_power_w=10_000,
                                max_transfers=4, faults=self.router_faults, slot_seconds=SLOT_S,
                                observer=world.checker)
        self.ix_meter = SimMeter("interchange", 2, self._ix_counters, self.ix_faults)
        self.meters = SimMeterSet({"house": self.house_meter, "interchange": self.ix_meter}, world.sync,
                                  self.board_ms)
        self.controller = None
        self.journal = None
        self.raw = None
        self.alive = False
        self.incarnation = 0
        self.seen_nonce = 0
        self.seen_reading = 0
        self.implausible_stored: str | None = None
        self.starts: dict[int, int] = {}
        self.safe_since: float | None = None
        self.sessions = 0
        self.started_at = 0.0

    # -- clocks ---------------------------------------------------------------------------

    def offset_at(self, t: float) -> float:
        if self.world.draining:
            return 0.0
        off = self.base_offset
        for a, b, d in self.jumps:
            if a <= t < b:
                off += d
        return off

    def board_s(self) -> float:
        now = self.world.now
        return now + self.offset_at(now)

    def board_ms(self) -> int:
        return int(self.board_s() * 1000)

    # -- the house's own energy (what the house meter sees) ----------------------------------

    def _house_counters(self) -> tuple[float, float, float]:
        t1 = self.world.now
        t = self._t
        while t < t1:
            slot = int(t // SLOT_S) * SLOT_S
            b = min(t1, slot + SLOT_S)
            load_wh, pv_wh = self.profile.slot_energy(self.name, slot)
            net_w = (load_wh - pv_wh) * 3600.0 / SLOT_S
            self._power = net_w
            energy = net_w * (b - t) / 3600.0
            if energy >= 0:
                self._imp += energy
            else:
                self._exp -= energy
            t = b
        self._t = max(self._t, t1)
        return self._imp, self._exp, self._power

    def _ix_counters(self) -> tuple[float, float, float]:
        r = self.router
        power = sum(t.power_w if t.direction == "import" else -t.power_w for t in r.transfers.values())
        return r.import_wh, r.export_wh, power


class World:
    def __init__(self, seed: int, *, trace: bool, tmp: Path, profile: Profile | None = None, n_slots: int = 3,
                 profile_dir: str | None = None):
        self.seed = seed
        self.rng = random.Random(seed)
        self.trace_enabled = trace
        self.trace: list[str] = []
        self.tmp = tmp
        self.slot_s, self.gate_s, self.measure_s, self.heartbeat_s = SLOT_S, GATE_S, MEASURE_S, HEARTBEAT_S
        self.max_skew_s = MAX_SKEW_MS / 1000
        self.watchdog_s = WATCHDOG_S
        rng = self.rng
        day = rng.randrange(0, 365)
        hour_slot = rng.randrange(16, 30) if rng.random() < 0.85 else rng.randrange(0, 48)
        self.t0 = EPOCH0 + day * 86_400 + hour_slot * SLOT_S  # the first slot edge after the start
        self.now = float(self.t0 - 120)
        self.first_market = self.t0 + SLOT_S  # bids need one complete slot of history first
        self.last_market = self.first_market + (n_slots - 1) * SLOT_S
        self.drain_start = self.last_market + SLOT_S
        self.end = self.drain_start + SLOT_S // 2
        self.draining = False
        self.draining_done = False
        self.checker = Checker(self)
        rules = MarketRules(slot_seconds=SLOT_S, markets_ahead=MARKETS_AHEAD, lot_wh=100, gate_closure_seconds=GATE_S,
                            price_min_per_kwh_minor=1000, price_max_per_kwh_minor=4000)
        self.ledger_store = LedgerStore(":memory:", rules, REPORT_DEADLINE_S, last_market_id=self.last_market,
                                        ledger_id=LEDGER_ID)  # its record's blocks name the ledger the boards pin
        self.ledger_faults = LedgerFaults()
        self.ledger = SimLedgerService(self.ledger_store, ledger_id=LEDGER_ID, clock=lambda: self.now,
                                       delay=self.delay, faults=self.ledger_faults, observer=self.checker,
                                       timeout_s=LEDGER_TIMEOUT_S)
        n = rng.randint(2, 6)
        names = [f"house-{i + 1}" for i in range(n)]
        if profile is None and profile_dir is not None:
            profile = CommunityProfile(Path(profile_dir), self.t0, names, rng)
        self.profile = profile or SyntheticProfile(rng, names)
        self.houses = [House(self, i, rng, self.profile) for i in range(n)]
        self.house_by_router = {h.router.name: h for h in self.houses}
        self.house_by_device = {h.device_id: h for h in self.houses}
        for h in self.houses:
            self.ledger.public_keys[h.device_id] = h.key.public_key
            self.ledger_store.register_device(h.key.public_key.hex(), h.name, 10**12, int(self.now * 1000))
        self.queue: list = []
        self.seq = 0
        self.result = SeedResult(seed)
        self.faults_drawn = 0

    # -- time -------------------------------------------------------------------------------

    def rel(self, t: float) -> str:
        return f"{t - self.t0:+.1f}s"

    def trace_line(self, text: str) -> None:
        if self.trace_enabled:
            self.trace.append(f"{self.rel(self.now):>10} {text}")

    def sync(self) -> float:
        now = self.now
        for h in self.houses:
            rf = h.router_faults
            r = h.router
            while rf.drops and rf.drops[0][0] <= now:
                _, which, count = rf.drops.pop(0)
                if which == "request":
                    r.pending_drop_request += count
                else:
                    r.pending_drop_reply += count
            while rf.naks and rf.naks[0][0] <= now:
                _, verb, code = rf.naks.pop(0)
                r.pending_naks.append((verb, code))
            r.advance(now)
        return now

    def delay(self, seconds: float) -> None:
        self.now += seconds

    def interchange_faulty(self, house: House, market_id: int) -> bool:
        """Was the interchange meter faulty around this slot (then an unmetered report is allowed)?"""
        lo, hi = market_id - SLOT_S, market_id + 3 * SLOT_S  # a reset just before the slot shifts its start edge
        f = house.ix_faults
        return any(a < hi and b > lo for a, b, _ in f.windows) or any(lo <= t < hi for t in house.ix_events)

    def journal_message(self, house: House, nonce: int):
        if house.raw is None:
            return None
        row = house.raw.execute("SELECT payload, signature FROM outbox WHERE nonce = ?", (nonce,)).fetchone()
        return None if row is None else (row[0].encode("ascii"), bytes.fromhex(row[1]))

    # -- scheduling -----------------------------------------------------------------------------

    def schedule(self, t: float, house: House, job: str) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, house.idx, house.incarnation, job))

    def start_house(self, house: House) -> None:
        """What `dgc run` does at start: open the journal, build the controller, measure, recover."""
        house.sessions += 1
        house.started_at = self.now
        journal = Journal(house.journal_path, clock_ms=house.board_ms)
        house.journal = journal
        house.raw = journal._db  # the sqlite3 connection: closed when the process dies
        journal._db = KillableConnection(house.raw, house.hooks)
        dgr = SimDgrClient(house.router, session=f"{self.rng.getrandbits(32):08x}", retries=DGR_RETRIES,
                           timeout_s=DGR_TIMEOUT_S, world_sync=self.sync, world_delay=self.delay, hooks=house.hooks,
                           board_clock=house.board_s)
        stream = _TraceStream(self, house.name) if self.trace_enabled else _NullStream()
        events = EventLog(house.name, stream=stream)
        house.controller = build_controller(house.config, journal=journal, key=house.key, meters=house.meters, dgr=dgr,
                                            ledger=SimLedgerClient(self.ledger, house.hooks, house.board_ms), events=events,
                                            clock=house.board_s)
        # The board's monotonic clock is the true (virtual) time: a clock step moves board_s only,
        # as an NTP step moves time.time() and not time.monotonic() (daemon.py sets the latter).
        house.controller.ctx.monotonic = lambda: self.now
        house.alive = True
        if hasattr(house.controller, "greet_router"):  # daemon.py: the router first (issue 7 o)
            house.controller.greet_router()
        house.controller.measure()
        house.controller.recover()
        now = self.now
        off = house.offset_at(now)
        board_now = now + off
        self.schedule(house.config.market.next_slot_start(int(board_now)) - off, house, "slot_edge")
        for job, interval in house.jobs.items():
            # the first bid after the board's per-device jitter, as daemon.py (A3, firmware/jitter.py)
            self.schedule(now + house.bid_offset_ms / 1000 if job == "bid" else now + interval, house, job)

    def kill_house(self, house: House, why: str) -> None:
        self.result.kills += 1
        self.trace_line(f"{house.name} process killed ({why}); restart from the journal")
        house.incarnation += 1
        house.alive = False
        house.controller = None
        try:
            house.raw.close()  # SQLite rolls back a transaction the process did not commit
        except sqlite3.Error:
            pass
        house.raw = None
        house.journal = None
        self.schedule(self.now + self.rng.uniform(1.0, 15.0), house, "start")

    def reschedule(self, house: House, job: str, t: float) -> None:
        if job == "slot_edge":
            off = house.offset_at(self.now)
            nxt = house.config.market.next_slot_start(int(self.now + off + 0.5)) - off
            self.schedule(max(nxt, self.now + 1), house, job)
            return
        interval = house.jobs[job]
        nxt = t + interval
        if nxt <= self.now:  # coalesce missed runs, like APScheduler
            nxt = self.now + interval - (self.now - t) % interval
        self.schedule(nxt, house, job)

    # -- the run ----------------------------------------------------------------------------------

    def run(self, *, calm: bool = False, mutate=None) -> SeedResult:
        """``calm``: no faults and no kills (tests); ``mutate(world)`` breaks the world on purpose
        (tests of the checkers) after the faults are drawn and before anything runs."""
        from .faults import draw_faults

        self.faults_drawn = 0 if calm else draw_faults(self)
        if mutate is not None:
            mutate(self)
        self._history()
        for h in self.houses:
            self.schedule(self.now + self.rng.uniform(0, 90), h, "start")
        checker = self.checker
        result = self.result
        while self.queue:
            t, _, idx, inc, job = heapq.heappop(self.queue)
            if t > self.end:
                break
            if t > self.now:
                self.now = t
            if not self.draining and self.now >= self.drain_start:
                self._begin_drain()
            house = self.houses[idx]
            if inc != house.incarnation:
                continue
            result.steps += 1
            self.trace_line(f"{house.name} {job}")
            self.sync()
            try:
                if job == "start":
                    self.start_house(house)
                else:
                    getattr(house.controller, job)()
                    self.reschedule(house, job, t)
            except SimulatedKill as kill:
                self.kill_house(house, str(kill))
            except Exception as exc:  # a job must not raise: the daemon would log it and go on
                checker.fail("job_raised", f"{house.name} {job}: {type(exc).__name__}: {exc}")
                if job == "start":
                    self.kill_house(house, "start-up failed")
                else:
                    self.reschedule(house, job, t)
            checker.after_step(house, job)
            if checker.violations:
                break
        if not checker.violations:
            self.now = max(self.now, float(self.end))
            self.sync()
            self.draining_done = True
            checker.final()
        result.faults = self.faults_drawn
        result.trades = self.ledger_store.stats()["trades"]
        result.violations = list(checker.violations[:1])
        result.trace = self.trace
        return result

    def _history(self) -> None:
        """The boards ran before the simulated window: their journals hold the readings of the
        last two slots (written with the journal's own API), so the plausibility baseline and
        the forecast have data from the first step, as on a board that was merely restarted."""
        start, now = self.now - 2 * SLOT_S, self.now
        for h in self.houses:
            h._t = start
            journal = Journal(h.journal_path, clock_ms=h.board_ms)
            t = start
            while t < now:
                self.now = t
                imp, exp, power = h._house_counters()
                journal.add_reading("house", h.board_ms(), int(imp), int(exp), int(power))
                h.house_meter.good_reads.append(t)  # data the board may bid on (order_fresh)
                journal.add_reading("interchange", h.board_ms(), 0, 0, 0)
                t += MEASURE_S
            journal.close()
            self.now = now

    def _begin_drain(self) -> None:
        """Faults are over and clocks are right: the last trades must now close cleanly."""
        self.draining = True
        self.trace_line("drain: faults off, kills disarmed, clocks corrected")
        for h in self.houses:
            h.hooks.armed = False

    def close(self) -> None:
        for h in self.houses:
            if h.raw is not None:
                try:
                    h.raw.close()
                except sqlite3.Error:
                    pass
        self.ledger_store.close()


def _tmp_root() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def run_seed(seed: int, *, trace: bool = False, n_slots: int = 3, profile: Profile | None = None,
             profile_dir: str | None = None, calm: bool = False, mutate=None) -> SeedResult:
    """Run one seed; ``calm`` draws no faults or kills, ``mutate(world)`` (tests) may break the
    world before it runs."""
    tmp = Path(tempfile.mkdtemp(prefix=f"dgc-sim-{seed}-", dir=_tmp_root()))
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # the injected faults make the firmware log a lot; the trace says it all
    try:
        world = World(seed, trace=trace, tmp=tmp, profile=profile, n_slots=n_slots, profile_dir=profile_dir)
        try:
            return world.run(calm=calm, mutate=mutate)
        finally:
            world.close()
    finally:
        logging.disable(previous)
        shutil.rmtree(tmp, ignore_errors=True)
