"""Forecast -> policy -> signed orders -> outbox: the bid and review jobs.

The decision itself is pure (firmware.forecast, firmware.policy); this module gathers its
inputs from the journal and the router, refuses to decide on stale data or a bad clock, and
turns the policy's actions into signed, journalled messages.
"""

from __future__ import annotations

import threading
from typing import Callable

from ..policy import CancelOrder, PlaceOrder, reconcile_market
from . import ledger_link, trade_record
from .clock_guard import check_step
from .context import Context
from .metering import Metering

# Backpressure (the bid and review jobs against the outbox). A chain takes one message a block,
# and a bid with price curves signs faster than that: without a bound the backlog outgrew the
# messages' life and they expired unsent (EVM SIGKILL test: 146 of a seller's 371). So the queue
# of messages not sent yet is kept within what the outbox sends in this share of a message's life
# (measured: Health.outbox_send_ms), leaving the rest of it for restarts, reports signed at slot
# edges (never held back) and a loaded machine. A market's actions are signed together or not at
# all, nearest market first; the rest wait for the next run. The queue may always hold a few (one
# market's curve); with the pace not measured yet (a restart), no more than that.
QUEUE_SHARE_OF_TTL = 1 / 4
MIN_QUEUE_MESSAGES = 8


class Trading:
    def __init__(self, ctx: Context, metering: Metering, *, flush_outbox: Callable[[], None]):
        self.ctx = ctx
        self.metering = metering
        self._flush_outbox = flush_outbox
        self._decide_lock = threading.Lock()
        self._ledger_bound_known = False
        self._last_market: int | None = None
        self._deferring = False

    def bid(self) -> None:
        """Forecast every open market and bring the house's orders in line (every slot)."""
        ctx = self.ctx
        self._decide(self.open_markets(ctx.now()), "bid")

    def review(self) -> None:
        """Review the near markets more often than the full bid, cancelling what no longer fits."""
        ctx = self.ctx
        now = ctx.now()
        near = [m for m in self.open_markets(now) if m - now <= ctx.config.cadence.review_horizon_seconds]
        if near:
            self._decide(near, "review")

    def open_markets(self, now: int) -> list[int]:
        """The markets open for orders by the board's rules that the ledger will also open.

        A ledger may bound its market day (the bench ledger's ``--last-market``, in its
        ``GET /v1/info`` as ``last_market_id``): an order for a market after it can only be
        refused, so none is signed (the demo's log used to show one refusal per such market)."""
        last = self._ledger_last_market()
        return [m for m in self.ctx.rules.open_markets(now) if last is None or m <= last]

    def _ledger_last_market(self) -> int | None:
        """The ledger's last market, asked once (again at the next bid if the ledger did not answer)."""
        from ..ledger.base import LedgerError

        if self._ledger_bound_known:
            return self._last_market
        info = getattr(self.ctx.ledger, "info", None)
        if info is None:
            self._ledger_bound_known = True
            return None
        try:
            answer = info()
        except LedgerError:
            return None
        self._ledger_bound_known = True
        value = answer.get("last_market_id") if isinstance(answer, dict) else None
        self._last_market = value if type(value) is int else None
        if self._last_market is not None:
            self.ctx.events.emit("ledger.last_market", market=self._last_market,
                                 detail="the ledger opens no market after this one: none is bid for")
        return self._last_market

    def _decide(self, markets: list[int], why: str) -> None:
        ctx = self.ctx
        check_step(ctx)
        if not ctx.health.clock_ok:
            ctx.events.emit("bid.skipped", reason=ctx.health.clock_problem or "clock skew beyond bound",
                            skew_ms=ctx.health.clock_skew_ms)
            return
        refusal = ledger_link.refused_device(ctx)
        if refusal is not None:
            return  # alarm.ledger_refused said it once; an order signed now would only be refused
        if not trade_record.may_trade(ctx):
            return  # alarm.ledger_unpinned said it once: no pinned ledger key, every trade would be refused
        problem = self.metering.house_data_problem()
        if problem is not None:
            ctx.events.emit("bid.skipped", reason=problem)
            return
        if not markets:
            return
        with self._decide_lock:
            room = self._queue_room()  # under the lock: the bid and the review share one queue
            if room > 0:
                self._decide_markets(markets, why, room)
        self._flush_outbox()  # a no-op while the outbox job is sending

    def _decide_markets(self, markets: list[int], why: str, room: int) -> None:
        """Bring each market's orders in line, nearest first, within ``room`` messages."""
        ctx = self.ctx
        journal, rules = ctx.journal, ctx.rules
        now = ctx.now()
        forecast = self._forecast(markets, now)
        if not forecast:
            ctx.events.emit("bid.skipped", reason="no complete slot of meter history yet")
            return
        desired = self._desired(forecast, now)
        placed = cancelled = waiting = 0
        for index, market_id in enumerate(markets):
            if not rules.gate_open(market_id, now):
                continue
            traded = {side: journal.traded_wh(market_id, side) for side in ("buy", "sell")}
            actions = reconcile_market(
                market_id, desired.get(market_id), journal.orders_in_market(market_id), traded, rules.lot_wh
            )
            if actions and len(actions) > room and placed + cancelled > 0:
                waiting = len(markets) - index  # the next run takes them, the queue permitting
                break
            room -= len(actions)
            for action in actions:
                if isinstance(action, PlaceOrder):
                    self._place(action)
                    placed += 1
                elif isinstance(action, CancelOrder):
                    self._cancel(action)
                    cancelled += 1
        if placed or cancelled:
            ctx.events.emit(f"{why}.done", markets=len(markets), placed=placed, cancelled=cancelled,
                            **({"waiting": waiting} if waiting else {}))

    def _queue_room(self) -> int:
        """How many messages this run may sign; at 0 none, said once an episode (``bid.deferred``)
        and once when it is over (``bid.resumed``)."""
        ctx = self.ctx
        journal = ctx.journal
        room_s = ctx.config.ledger.message_ttl_seconds * QUEUE_SHARE_OF_TTL
        oldest = journal.pending_outbox(limit=1, never_sent=True)
        waited_s = ctx.now() - oldest[0].message.fields["issued_at"] if oldest else 0
        unsent = journal.unsent_count()
        send_ms = ctx.health.outbox_send_ms
        if send_ms is None:  # not measured since the start: unlimited only with nothing queued
            limit = MIN_QUEUE_MESSAGES if unsent else 1 << 30
        else:
            limit = max(MIN_QUEUE_MESSAGES, int(room_s * 1000 // max(1, send_ms)))
        behind = waited_s > room_s or unsent >= limit
        if behind and not self._deferring:
            ctx.events.emit("bid.deferred", reason="outbox behind", queued=unsent, oldest_s=waited_s,
                            send_ms="-" if send_ms is None else send_ms,
                            detail="no new order until the ledger has taken what is queued")
        elif self._deferring and not behind:
            ctx.events.emit("bid.resumed", queued=unsent)
        self._deferring = behind
        return 0 if behind else limit - unsent

    def _forecast(self, markets: list[int], now: int) -> dict:
        """The forecast of each market from the journal's readings: [forecast] method "robust"
        (load and PV apart, weekday-aware median, optional clear-sky PV: firmware/forecast.py,
        issue 8) or "baseline" (the smoothed same-slot net energy, as before)."""
        from ..forecast import SLOTS_PER_DAY, Site, forecast_net_wh, forecast_slots, history_seconds, slot_net_energy

        ctx = self.ctx
        fc, slot_s = ctx.config.forecast, ctx.rules.slot_seconds
        # The baseline's day is 48 slots unless configured (as it always was); the robust
        # forecast's is a real day unless configured (a bench compresses it: board_configs/sim.toml).
        day_s = fc.day_seconds or (slot_s * SLOTS_PER_DAY if fc.method == "baseline" else 86_400)
        since_ms = (now - history_seconds(fc.history_days, day_s, slot_s)) * 1000
        net = slot_net_energy(ctx.journal.readings(self.metering.house, since_ms), slot_s)  # export - import
        if fc.method == "baseline":
            return forecast_net_wh(net, markets, slot_seconds=slot_s, history_days=fc.history_days,
                                   smoothing_percent=fc.smoothing_percent, day_seconds=day_s)
        pv_meter = next((m.name for m in ctx.config.meters if m.role == "pv"), None)
        pv = slot_net_energy(ctx.journal.readings(pv_meter, since_ms), slot_s) if pv_meter else {}  # generation: export
        load = {slot: pv.get(slot, 0) - value for slot, value in net.items()}
        site = Site(fc.site_latitude_millideg / 1000, fc.site_longitude_millideg / 1000) if fc.clear_sky_pv else None
        return forecast_slots(load, pv, markets, now_s=now, slot_seconds=slot_s, day_seconds=day_s,
                              history_days=fc.history_days, weekday_aware=fc.weekday_aware, site=site)

    def _desired(self, forecast: dict, now: int) -> dict:
        """The policy's orders: [policy] strategy "tariff" (reservation prices from the grid's
        tariffs, ramped towards the gate: firmware/policy.py, issue 8) or "baseline" (fixed limits)."""
        from ..policy import Battery, PriceRamp, Tariffs, desired_orders

        ctx = self.ctx
        pol, rules = ctx.config.policy, ctx.rules
        soc = self._battery_soc()
        if pol.strategy == "baseline":
            return desired_orders(forecast, rules, pol, soc)
        battery = None
        if pol.battery_capacity_wh and soc is not None:
            battery = Battery(pol.battery_capacity_wh, pol.battery_capacity_wh * soc // 100,
                              pol.battery_capacity_wh * pol.battery_reserve_percent // 100, pol.battery_power_w,
                              pol.battery_efficiency_percent, pol.battery_efficiency_percent)
        return desired_orders(
            forecast, rules, pol, soc,
            tariffs=Tariffs(pol.retail_per_kwh_minor, pol.feed_in_per_kwh_minor, pol.band_min_per_kwh_minor,
                            pol.band_max_per_kwh_minor, pol.subsidy_percent),
            now_s=now, ramp=PriceRamp(pol.price_ramp_seconds, max(1, ctx.config.cadence.review_seconds)),
            sell_quantile_percent=pol.sell_quantile_percent, buy_quantile_percent=pol.buy_quantile_percent,
            router_power_w=0, battery=battery, curve_steps=pol.curve_steps, battery_sales=pol.battery_sales,
            battery_sell_quantile_percent=pol.battery_sell_quantile_percent)

    def _battery_soc(self) -> int | None:
        ctx = self.ctx
        if ctx.config.policy.battery_capacity_wh <= 0:
            return None
        from ..drivers.dgr import DgrError

        try:
            return ctx.dgr.status().soc_percent
        except DgrError as exc:
            ctx.events.emit("alarm.dgr", detail=f"no state of charge: {exc}")
            return None

    def _place(self, action: PlaceOrder) -> None:
        ctx = self.ctx
        ttl = ctx.config.ledger.message_ttl_seconds

        def build(nonce: int) -> dict:
            return ctx.fields("order", nonce, ttl, market_id=action.market_id, side=action.side,
                              energy_wh=action.energy_wh, price_per_kwh_minor=action.price_per_kwh_minor)

        message = ctx.journal.enqueue_order(build, ctx.key)
        f = message.fields
        ctx.events.emit("order.signed", nonce=f["nonce"], market=f["market_id"], side=f["side"],
                        energy_wh=f["energy_wh"], price=f["price_per_kwh_minor"])

    def _cancel(self, action: CancelOrder) -> None:
        ctx = self.ctx
        ttl = ctx.config.ledger.message_ttl_seconds

        def build(nonce: int) -> dict:
            return ctx.fields("cancel", nonce, ttl, market_id=action.market_id, order_nonce=action.order_nonce)

        message = ctx.journal.enqueue_cancel(action.order_nonce, build, ctx.key)
        ctx.events.emit("cancel.signed", nonce=message.fields["nonce"], order=action.order_nonce,
                        market=action.market_id, reason=action.reason)
