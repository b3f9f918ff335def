"""The trade poll: fetch this board's new trades from the ledger and journal them, scheduling
their deliveries in the same transaction (firmware.journal ``record_trades_checked``).

A listed trade that matches none of this board's orders (firmware/trade_matching.py) is
refused in that transaction: journalled in ``refused_trades``, alarmed once
(``alarm.trade_refused``), and never given a delivery, so the router is never told (issue 7 i).
Before that, each new trade must be confirmed in the ledger's signed record (trade_record.py,
issue 10 part 4): not in it = refused the same way; the ledger cannot be asked now = the trade
is left out of this batch and the cursor is not advanced, so the next poll fetches and asks again
(``trade.unconfirmed`` once per trade and process): it waits, unscheduled, and is never lost.
A refusal of the device itself (unregistered, revoked) does not raise out of the job: it alarms
once and the poll asks again only at the slow retry cadence (ledger_link.py, issue 7 h).
"""

from __future__ import annotations

from . import ledger_link, trade_record
from .context import Context


class TradePoller:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._waiting: set[int] = set()  # trade ids told as unconfirmed (told once)

    def poll(self) -> None:
        from ..ledger.base import LedgerRejected, LedgerUnavailable

        ctx = self.ctx
        if ledger_link.paused(ctx):
            return
        was_refused = ledger_link.refused_device(ctx) is not None
        try:
            trades, cursor = ctx.ledger.trades_since(ctx.key.device_id, ctx.journal.trade_cursor())
        except LedgerUnavailable as exc:
            ledger_link.unavailable(ctx, exc, job="poll_trades")
            return
        except LedgerRejected as exc:
            ledger_link.device_refused(ctx, exc.code, exc.detail, job="poll_trades")
            return
        ledger_link.answered(ctx, job="poll_trades")
        if was_refused:
            ledger_link.device_accepted(ctx, job="poll_trades")
            ledger_link.sync_account(ctx, job="poll_trades")  # the start-up nonce floor was never read
        refusals: dict[int, str] = {}
        waiting = []
        for trade in ctx.journal.unknown_trades(trades):
            verdict = trade_record.confirm(ctx, trade)
            if verdict == trade_record.WAIT:
                waiting.append(trade)
            elif verdict is not None:
                refusals[trade.trade_id] = verdict
        if waiting:
            for trade in waiting:
                if trade.trade_id not in self._waiting:
                    self._waiting.add(trade.trade_id)
                    ctx.events.emit("trade.unconfirmed", trade=trade.trade_id, market=trade.market_id,
                                    action="waits unscheduled; asked again at the next poll")
            held = {t.trade_id for t in waiting}
            trades = [t for t in trades if t.trade_id not in held]
            cursor = ctx.journal.trade_cursor()  # do not move past a trade still to confirm
        batch = ctx.journal.record_trades_checked(trades, cursor, refusals)
        for trade in trades:
            if trade.trade_id in batch.new_ids:
                ctx.events.emit("trade.contracted", trade=trade.trade_id, market=trade.market_id, side=trade.side,
                                energy_wh=trade.energy_wh, price=trade.price_per_kwh_minor, counterparty=trade.counterparty[:12])
        for trade, reason in batch.refused:
            ctx.events.emit("alarm.trade_refused", trade=trade.trade_id, market=trade.market_id, side=trade.side,
                            energy_wh=trade.energy_wh, price=trade.price_per_kwh_minor, order=trade.order_nonce,
                            counterparty=str(trade.counterparty)[:12], reason=reason,
                            action="journalled; no delivery, the router is not told")
