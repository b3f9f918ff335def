"""Meter reads, their plausibility judgement and the stored readings.

Every reader of a meter (the measure job, delivery metering at the slot edge) goes through
``read_plausible``, so all of them share one plausibility state and one counter scale: a start
counter taken from the journal and an end counter read here are then in the same units.
"""

from __future__ import annotations

import threading
from dataclasses import replace

from .context import Context

STALE_READINGS_FACTOR = 3  # a house reading older than 3 measure periods is not fresh enough to bid on


class Metering:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        config = ctx.config
        self.house = config.meter_by_role("house").name
        self.interchange = config.meter_by_role("interchange").name
        # Per-meter plausibility state and the lock that keeps a read and its judgement together.
        self._states: dict = {}
        self._locks = {m.name: threading.Lock() for m in config.meters}

    def measure(self) -> None:
        """Read every meter once (those that answered last time first), judge each reading with
        firmware.plausibility and journal only what it accepts, in continuous (re-baselined)
        counter units. Events: alarm.meter (first failure of a run), alarm.meter_implausible
        (each rejected reading), alarm.meter_reset (a reset or swap, re-baselined),
        meter.unavailable (max_failures reached: no order from this meter), meter.back."""
        from ..drivers.meter import MeterReadError

        ctx = self.ctx
        health = ctx.health
        if not health.clock_ok:
            # A reading's time comes from the board's clock: stamped by a clock the guard has
            # found wrong it would sit on the wrong side of a slot edge, and be judged against
            # the wrong elapsed time. None is taken until the clock is good (sim F5).
            return
        names = ctx.meters.read_order() if hasattr(ctx.meters, "read_order") else ctx.meters.names
        for name in names:
            try:
                stored = self.read_plausible(name)
            except MeterReadError as exc:
                if exc.kind in ("implausible", "pending"):
                    continue  # alarm.meter_implausible already emitted, or nothing wrong yet
                if health.meters_ok.get(name, True):
                    ctx.events.emit("alarm.meter", meter=name, detail=str(exc))
                health.meters_ok[name] = False
                continue
            if not health.meters_ok.get(name, True):
                ctx.events.emit("meter.back", meter=name)
            health.meters_ok[name] = True
            health.last_reading_ms[name] = stored.taken_at_ms
            self._journal(name, stored)

    def _journal(self, name: str, stored) -> None:
        self.ctx.journal.add_reading(name, stored.taken_at_ms, stored.import_energy_wh, stored.export_energy_wh,
                                     stored.power_w, import_energy_mwh=stored.import_energy_mwh,
                                     export_energy_mwh=stored.export_energy_mwh)

    def read_interchange(self):
        """One plausible reading of the interchange meter, journalled (delivery metering takes
        its slot-edge counters from journalled readings, so every one it reads is kept), or
        MeterReadError. Counters in mWh at ``import_energy_mwh`` / ``export_energy_mwh``."""
        stored = self.read_plausible(self.interchange)
        self.ctx.health.last_reading_ms[self.interchange] = stored.taken_at_ms
        self._journal(self.interchange, stored)
        return stored

    def read_plausible(self, name: str):
        """Read one meter and judge the reading: the reading as it may be stored (re-baselined
        counters), or MeterReadError — the driver's, or kind "implausible" for a rejected value.

        A per-meter lock keeps a read and its judgement together, so two jobs never judge
        readings out of order.
        """
        from ..drivers.meter import MeterReadError
        from ..plausibility import record_failure

        with self._locks[name]:
            try:
                reading = self.ctx.meters.read(name)
            except MeterReadError as exc:
                self._judged(name, record_failure(self.state(name), self.limits(name), str(exc)))
                raise
            stored = self._plausible(name, reading)
        if stored is None:
            if self.state(name).last is None:
                raise MeterReadError(f"meter {name}: first baseline not confirmed yet (agreeing readings needed)",
                                     kind="pending", meter=name)
            raise MeterReadError(f"meter {name}: implausible reading rejected (see alarm.meter_implausible)",
                                 kind="implausible", meter=name)
        return stored

    def _plausible(self, name: str, reading):
        """The reading as it may be stored (counters re-baselined after a meter reset or swap),
        or None when it is implausible: a counter that went backwards, a jump beyond the
        meter's max_power_w over the elapsed time, an impossible power. Rejected readings are
        never stored; see firmware/plausibility.py for the rules."""
        from ..plausibility import ACCEPTED, PENDING, REBASELINED, Sample, check_reading

        events = self.ctx.events
        sample = Sample(reading.taken_at_ms, reading.import_energy_wh, reading.export_energy_wh, reading.power_w)
        verdict = check_reading(self.state(name), sample, self.limits(name))
        self._judged(name, verdict)
        if verdict.outcome == PENDING:
            return None  # nothing judged wrong yet: the first baseline is being confirmed
        if verdict.outcome == REBASELINED:
            events.emit("alarm.meter_reset", meter=name, detail=verdict.reason,
                        import_wh=verdict.stored.import_energy_wh, export_wh=verdict.stored.export_energy_wh)
        elif verdict.outcome != ACCEPTED:
            events.emit("alarm.meter_implausible", meter=name, detail=verdict.reason)
            return None
        stored = verdict.stored
        # The fine (mWh) counters take the same whole-Wh offsets as the stored Wh counters.
        fine = {}
        for quantity in ("import_energy", "export_energy"):
            raw_mwh = getattr(reading, f"{quantity}_mwh", None)
            offset_wh = getattr(stored, f"{quantity}_wh") - getattr(reading, f"{quantity}_wh")
            fine[f"{quantity}_mwh"] = (getattr(stored, f"{quantity}_wh") * 1000 if raw_mwh is None
                                       else raw_mwh + offset_wh * 1000)
        return replace(reading, taken_at_ms=stored.taken_at_ms, import_energy_wh=stored.import_energy_wh,
                       export_energy_wh=stored.export_energy_wh, **fine)

    def _judged(self, name: str, verdict) -> None:
        """Keep a meter's new plausibility state; announce availability transitions once."""
        self._states[name] = verdict.state
        if verdict.became_unavailable:
            self.ctx.events.emit("meter.unavailable", meter=name, failures=verdict.state.failures,
                                 detail=verdict.reason)
        elif verdict.became_available:
            self.ctx.events.emit("meter.available", meter=name)

    def state(self, name: str):
        """A meter's plausibility state, seeded from the journal's last stored reading after a
        restart so the first reading of a new run is judged against it. Written under the
        meter's lock; readers (the bid jobs) only ever see a whole, immutable state."""
        from ..plausibility import Sample, seed

        state = self._states.get(name)
        if state is None:
            last = self.ctx.journal.last_reading(name)
            # setdefault: a state another thread stored meanwhile is newer than the journal's
            state = self._states.setdefault(name, seed(Sample(*last) if last is not None else None))
        return state

    def limits(self, name: str):
        from ..plausibility import Limits

        meter = next(m for m in self.ctx.config.meters if m.name == name)
        return Limits(max_power_w=meter.power_limit_w, max_failures=meter.max_failures)

    def house_data_problem(self) -> str | None:
        """Why the house meter's data must not be bid on now (unavailable after repeated
        failures, no good reading yet, or too old), or None when it is fresh."""
        from ..plausibility import unavailable_reason

        ctx = self.ctx
        limit_ms = STALE_READINGS_FACTOR * ctx.config.cadence.measure_seconds * 1000
        reason = unavailable_reason(self.state(self.house), self.limits(self.house), ctx.now_ms(), limit_ms)
        return None if reason is None else f"house meter {self.house} unavailable: {reason}"

    def fresh_house_data(self) -> bool:
        """True only when the house meter's last stored reading is fresh and the meter has not
        failed max_failures times since: never a stale value passed off as fresh."""
        return self.house_data_problem() is None
