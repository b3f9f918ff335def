"""The trade poll: fetch this board's new trades from the ledger and journal them, scheduling
their deliveries in the same transaction (firmware.journal ``record_trades``)."""

from __future__ import annotations

import logging

from .context import Context

log = logging.getLogger(__name__)


class TradePoller:
    def __init__(self, ctx: Context):
        self.ctx = ctx

    def poll(self) -> None:
        from ..ledger.base import LedgerUnavailable

        ctx = self.ctx
        try:
            trades, cursor = ctx.ledger.trades_since(ctx.key.device_id, ctx.journal.trade_cursor())
        except LedgerUnavailable as exc:
            ctx.health.ledger_reachable = False
            log.debug("trade poll failed: %s", exc)
            return
        new_ids = ctx.journal.record_trades(trades, cursor)
        for trade in trades:
            if trade.trade_id in new_ids:
                ctx.events.emit("trade.contracted", trade=trade.trade_id, market=trade.market_id, side=trade.side,
                                energy_wh=trade.energy_wh, price=trade.price_per_kwh_minor, counterparty=trade.counterparty[:12])
