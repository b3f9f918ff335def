"""The invariants the simulation checks, after every step and at the end of a seed.

Each check compares what the firmware recorded or sent with what the simulated world knows to
be true (the router's physics, the ledger's database, the meters' true counters). The names are
the ones printed with a violation:

- ``exactly_once``: every signed message the journal stored reached the ledger exactly once,
  byte for byte (or reached it and was refused without being recorded: expired, ...; or was
  dropped unsent after its own expiry had truly passed), the ledger
  recorded nothing the journal does not hold, and no nonce was reused;
- ``delivered_le_contracted``: per trade, the reported delivered energy <= contracted;
- ``slot_energy``: per slot and direction, the sum a board reported equals what its router
  moved in that slot (as the interchange meter saw it), within tolerance: never more (nothing
  counted twice or in the wrong slot), and not less unless the interchange meter was faulty
  around that slot (reported unmetered);
- ``single_start``: no transfer starts twice for one trade;
- ``never_started``: a trade whose transfer the router never started reports 0 Wh (it moved
  nothing; Wh credited to it were another trade's);
- ``transfer_in_slot``: the router never runs past a transfer's end: a START's end time is at
  most the trade's slot end, it starts no earlier than the slot, and asks no more than contracted;
- ``link_lost_safe``: with the link lost, the router goes safe (no transfer runs longer than the
  watchdog after the last frame);
- ``router_resumes``: a START is not refused by a router left in safe/fault mode for more than
  two heartbeats while the link works and the daemon runs (issue 7, 2f: it must be resumed);
- ``order_fresh``: no order is signed from stale data (the house meter has not answered
  correctly for 3 measure periods) or from an implausible reading the journal stored, and none
  for a market whose gate has closed;
- ``trade_closed``: at the end, every trade is delivered and reported or failed and reported, and
  both parties' reports settled it (not the report deadline);
- ``job_raised``: a scheduled job let an exception escape (every job must catch what the world
  throws at it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

SPIKE_WH = 100_000  # the sim's spikes add 250 kWh; no house uses 100 kWh between two readings
ENERGY_TOLERANCE_WH = 2  # meter counters are whole Wh; +1 Wh per trade in the group on top


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str
    t: float


class Checker:
    """Observer of the world (called by the simulated devices and by the runner)."""

    def __init__(self, world):
        self.world = world
        self.violations: list[Violation] = []
        self.slot_checked: set[tuple[str, int, str]] = set()
        self.trade_cache: dict[int, dict] = {}

    def fail(self, invariant: str, detail: str) -> None:
        if not self.violations:
            self.world.trace_line(f"VIOLATION {invariant}: {detail}")
        self.violations.append(Violation(invariant, detail, self.world.now))

    # -- router ---------------------------------------------------------------------------

    def _trade(self, trade_id: int) -> dict | None:
        trade = self.trade_cache.get(trade_id)
        if trade is None:
            trade = self.world.ledger_store.trade(trade_id)
            if trade is not None:
                self.trade_cache[trade_id] = trade
        return trade

    def transfer_started(self, router, tr, now: float) -> None:
        house = self.world.house_by_router[router.name]
        house.starts[tr.trade_id] = house.starts.get(tr.trade_id, 0) + 1
        if house.starts[tr.trade_id] > 1:
            self.fail("single_start", f"{house.name}: trade {tr.trade_id} started {house.starts[tr.trade_id]} times "
                                      f"(again at t={self.world.rel(now)})")
        trade = self._trade(tr.trade_id)
        if trade is None:
            self.fail("transfer_in_slot", f"{house.name}: START of trade {tr.trade_id}, which the ledger does not know")
            return
        role = "seller" if tr.direction == "export" else "buyer"
        if trade[role]["device_id"] != house.device_id:
            self.fail("transfer_in_slot", f"{house.name}: START of trade {tr.trade_id} as {role}, but it is not this "
                                          f"device's side of the trade")
        slot_end = trade["market_id"] + self.world.slot_s
        skew_s = self.world.max_skew_s
        if tr.end_at > slot_end:
            self.fail("transfer_in_slot", f"{house.name}: trade {tr.trade_id} commanded to run until {tr.end_at}, "
                                          f"{tr.end_at - slot_end} s past its slot end {slot_end}")
        if now < trade["market_id"] - skew_s - 1:
            self.fail("transfer_in_slot", f"{house.name}: trade {tr.trade_id} started {trade['market_id'] - now:.1f} s "
                                          f"before its slot {trade['market_id']}")
        if tr.energy_wh > trade["energy_wh"]:
            self.fail("transfer_in_slot", f"{house.name}: trade {tr.trade_id} commanded {tr.energy_wh} Wh, contracted "
                                          f"{trade['energy_wh']} Wh")

    def start_refused(self, router, mode: str, now: float) -> None:
        """A START refused because the router is safe or faulted: fine while the cause lasts,
        a violation when the router has been left so with the link working and the daemon
        running for longer than two heartbeats (it should have been resumed)."""
        house = self.world.house_by_router[router.name]
        since = max(router.safe_since or now, house.started_at, router.link_restored_at(now))
        if now - since > 2 * self.world.heartbeat_s + 5:
            self.fail("router_resumes", f"{house.name}: START refused, router left in {mode} mode since "
                                        f"{self.world.rel(router.safe_since or now)} with the link up and the daemon running")

    # -- ledger ---------------------------------------------------------------------------

    def bad_message(self, message, detail: str) -> None:
        self.fail("exactly_once", f"the ledger got a message it cannot verify: {detail}")

    def ledger_received(self, fields: dict, message, body: dict, now_ms: int) -> None:
        house = self.world.house_by_device[fields["device_id"]]
        nonce = fields["nonce"]
        stored = self.world.journal_message(house, nonce)
        if stored is None:
            self.fail("exactly_once", f"{house.name}: the ledger got nonce {nonce}, which the journal does not hold")
        elif stored != (message.payload, message.signature):
            self.fail("exactly_once", f"{house.name}: nonce {nonce} reached the ledger with other bytes than the "
                                      f"journal stored")
        if body.get("code") == "nonce_conflict":
            self.fail("exactly_once", f"{house.name}: nonce {nonce} reused for a different message")
        if fields["type"] != "delivery_report" or body.get("status") != "accepted" or body.get("duplicate"):
            return
        trade = self.world.ledger_store.trade(fields["trade_id"])
        self.trade_cache[fields["trade_id"]] = trade
        if fields["energy_wh"] > trade["energy_wh"]:
            self.fail("delivered_le_contracted", f"{house.name}: trade {trade['trade_id']} reported {fields['energy_wh']} Wh "
                                                 f"of {trade['energy_wh']} Wh contracted")
        if fields["energy_wh"] > 0 and not house.starts.get(trade["trade_id"]):
            self.fail("never_started", f"{house.name}: trade {trade['trade_id']} reported {fields['energy_wh']} Wh "
                                       f"({fields['status']}), but its router never started a transfer for it")
        self._check_slot(house, trade["market_id"], fields["role"])

    def _check_slot(self, house, market_id: int, role: str) -> None:
        key = (house.name, market_id, role)
        if key in self.slot_checked:
            return
        mine = [t for t in self.world.ledger_store.market_trades(market_id) if t[role]["device_id"] == house.device_id]
        reports = []
        for t in mine:
            r = next((r for r in t["reports"] if r["role"] == role), None)
            if r is None:
                return  # not all of this slot's reports are in yet
            reports.append(r["energy_wh"])
        self.slot_checked.add(key)
        direction = "export" if role == "seller" else "import"
        moved = house.router.moved_by_slot.get((market_id, direction), 0.0)
        reported = sum(reports)
        contracted = sum(t["energy_wh"] for t in mine)
        # whole-Wh counters, plus the board's own metering tolerance (issue 7 l) per trade
        tol = ENERGY_TOLERANCE_WH + len(mine) * (1 + house.metering_tolerance_wh)
        where = (f"{house.name} slot {market_id} ({self.world.rel(market_id)}) {direction}: reported {reported} Wh "
                 f"over {len(mine)} trade(s), router moved {moved:.1f} Wh, contracted {contracted} Wh")
        if reported > moved + tol:
            self.fail("slot_energy", f"{where}: more reported than moved (counted in two slots or not moved)")
        elif reported < min(moved, contracted) - tol and not self.world.interchange_faulty(house, market_id):
            self.fail("slot_energy", f"{where}: energy moved but not reported")

    # -- after each step --------------------------------------------------------------------

    def after_step(self, house, job: str = "") -> None:
        world = self.world
        if house.raw is not None and house.alive and job != "heartbeat":  # a heartbeat signs nothing
            self._new_messages(house)
            self._new_readings(house)
        now = world.now
        for h in world.houses:
            r = h.router
            if r.transfers and not r.link_up(now) and now - r.last_frame_at > world.watchdog_s + 1:
                self.fail("link_lost_safe", f"{h.name}: link lost, no frame for {now - r.last_frame_at:.0f} s and the "
                                            f"router still transfers")

    def _new_messages(self, house) -> None:
        rows = house.raw.execute("SELECT nonce, kind, payload FROM outbox WHERE nonce > ? ORDER BY nonce",
                                 (house.seen_nonce,)).fetchall()
        if not rows:
            return
        house.seen_nonce = rows[-1][0]
        world = self.world
        for nonce, kind, payload in rows:
            if kind != "order":
                continue
            fields = json.loads(payload)
            signed_true = fields["issued_at"] - house.offset_at(world.now)
            gate_left = fields["market_id"] - signed_true
            if gate_left <= world.gate_s - world.max_skew_s - 1:
                self.fail("order_fresh", f"{house.name}: order nonce {nonce} for market {fields['market_id']} signed "
                                         f"{gate_left:.0f} s before delivery; the gate closes {world.gate_s} s before")
            last_good = house.house_meter.last_good_before(signed_true + 1)
            limit = 3 * world.measure_s + 2
            if last_good is None or signed_true - last_good > limit:
                age = "never" if last_good is None else f"{signed_true - last_good:.0f} s before"
                self.fail("order_fresh", f"{house.name}: order nonce {nonce} signed while the house meter last answered "
                                         f"correctly {age} (stale beyond {limit} s)")
            if house.implausible_stored:
                self.fail("order_fresh", f"{house.name}: order nonce {nonce} signed after an implausible reading "
                                         f"was journalled ({house.implausible_stored})")

    def _new_readings(self, house) -> None:
        """A spike (an absurd jump of the house meter's counters) must never be journalled: the
        counters of consecutive stored readings must not jump by more than a house can use."""
        if not house.house_meter.spike_ms:
            return
        rows = house.raw.execute("SELECT id, taken_at_ms, import_energy_wh, export_energy_wh FROM readings "
                                 "WHERE meter = 'house' AND id >= ? ORDER BY id", (house.seen_reading,)).fetchall()
        if not rows:
            return
        house.seen_reading = rows[-1][0]
        for (_, t0, i0, e0), (_, t1, i1, e1) in zip(rows, rows[1:]):
            if (i1 - i0) + (e1 - e0) > SPIKE_WH:
                house.implausible_stored = f"house counters jumped {(i1 - i0) + (e1 - e0)} Wh between board times {t0} and {t1} ms"

    # -- at the end -------------------------------------------------------------------------

    def final(self) -> None:
        world = self.world
        store = world.ledger_store
        for house in world.houses:
            if house.raw is None:
                self.fail("trade_closed", f"{house.name}: not running at the end")
                continue
            journal = {n: (k, p.encode("ascii"), bytes.fromhex(s), st, a) for n, k, p, s, st, a in house.raw.execute(
                "SELECT nonce, kind, payload, signature, state, answer FROM outbox")}
            ledger = {m["nonce"]: m for m in store.device_messages(house.device_id, 0, 1_000_000)}
            for nonce, (kind, payload, sig, state, answer) in sorted(journal.items()):
                at = ledger.get(nonce)
                if at is None:
                    if state == "rejected" and (house.device_id, nonce, payload, sig) in world.ledger.arrived:
                        continue  # it reached the ledger, which refused it without recording it (expired, ...)
                    if state == "expired" and json.loads(payload)["expires_at"] <= world.now:
                        continue  # dropped unsent once its own expiry passed (issue 7 j): the ledger would refuse it
                    self.fail("exactly_once", f"{house.name}: {kind} nonce {nonce} (outbox state {state}) never "
                                              f"reached the ledger")
                elif at["payload"].encode("ascii") != payload or bytes.fromhex(at["signature"]) != sig:
                    self.fail("exactly_once", f"{house.name}: nonce {nonce}: the ledger recorded other bytes")
            for nonce in sorted(set(ledger) - set(journal)):
                self.fail("exactly_once", f"{house.name}: the ledger recorded nonce {nonce}, which the journal lost")
            for trade_id, state, outcome in house.raw.execute("SELECT trade_id, state, outcome FROM deliveries"):
                if state != "reported" or outcome not in ("delivered", "failed"):
                    self.fail("trade_closed", f"{house.name}: delivery of trade {trade_id} ended {state}/{outcome}")
            trades, _ = store.device_trades(house.device_id, 0, 100_000)
            known = {row[0] for row in house.raw.execute("SELECT trade_id FROM trades")}
            for t in trades:
                if t["trade_id"] not in known:
                    self.fail("trade_closed", f"{house.name}: trade {t['trade_id']} never reached the journal")
                settlement = t["settlement"]
                if settlement is None or settlement["reason"] != "reports":
                    detail = trade_summary(store.trade(t["trade_id"]))
                    self.fail("trade_closed", f"{house.name}: trade {t['trade_id']} not settled by both reports: {detail}")
            for t in trades:
                role = "seller" if t["side"] == "sell" else "buyer"
                self._check_slot(house, t["market_id"], role)


def trade_summary(trade: dict) -> str:
    reports = ",".join(f"{r['role']}={r['energy_wh']}Wh/{r['status']}" for r in trade["reports"]) or "no reports"
    settled = trade["settlement"]["reason"] if trade["settlement"] else "unsettled"
    return f"{trade['energy_wh']} Wh in market {trade['market_id']}, {reports}, {settled}"
