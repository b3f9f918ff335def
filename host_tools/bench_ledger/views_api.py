"""Read-only views of the bench ledger for people: the list of markets and the per-device summary.

Why a module of its own: these endpoints serve engineers watching a bench or a pilot
(`dgc-host ledger markets`, `dgc-host ledger summary`, the demo's closing table), not boards.
They only read, through LedgerStore's public read methods, after the same sweep every other
answer gets, so a market's state always reflects the ledger's current time.

- GET /v1/markets is public and shows aggregates only (as the public book does): counts and
  volumes per market, never who is behind them.
- GET /v1/summary names every device with its energy and money: operator only.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from firmware.market import MarketRules

from .store import INT64_MAX, LedgerStore

MARKET_STATES = ("not_trading", "open", "gate_closed", "delivering", "reporting", "settled")
DEFAULT_PAST_MARKETS = 48  # how far back the list reaches by default (a day of 30-min slots)
MAX_LISTED_MARKETS = 500


def market_state(rules: MarketRules, market_id: int, now_s: int, *, unsettled_trades: int,
                 last_market_id: int | None) -> str:
    """A market's phase at ``now_s``: open -> gate_closed -> delivering -> reporting -> settled.

    'reporting' is a market whose slot has ended with trades still waiting for reports (or the
    deadline); 'not_trading' is one ahead whose gate is open but takes no orders (beyond the
    ledger's last market, or not yet within markets_ahead)."""
    if now_s >= rules.slot_end(market_id):
        return "reporting" if unsettled_trades else "settled"
    if now_s >= market_id:
        return "delivering"
    if not rules.gate_open(market_id, now_s):
        return "gate_closed"
    beyond_last = last_market_id is not None and market_id > last_market_id
    too_far = market_id > rules.next_slot_start(now_s) + (rules.markets_ahead - 1) * rules.slot_seconds
    return "not_trading" if beyond_last or too_far else "open"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class MarketRow(_Strict):
    market_id: int = Field(description="the slot start, UTC epoch seconds")
    state: Literal[MARKET_STATES]  # type: ignore[valid-type]
    orders: int = Field(description="orders ever placed in this market")
    open_orders: int
    open_bid_wh: int = Field(description="open buy quantity, all devices together")
    open_ask_wh: int = Field(description="open sell quantity, all devices together")
    trades: int
    traded_wh: int = Field(description="contracted energy")
    settled_trades: int
    delivered_wh: int = Field(description="settled energy (what both meters confirmed)")
    shortfall_wh: int
    paid_milli_minor: int = Field(description="money paid for settled energy")
    price_low_per_kwh_minor: Optional[int] = Field(description="lowest trade price; null without trades")
    price_high_per_kwh_minor: Optional[int] = Field(description="highest trade price; null without trades")


class MarketsOut(_Strict):
    time_ms: int = Field(description="the ledger's clock the states were judged at")
    slot_seconds: int
    current_market_id: int = Field(description="the slot being delivered now")
    next_market_id: Optional[int] = Field(description="the nearest market still open for orders; null when none")
    markets: list[MarketRow] = Field(description="oldest first: every market in the range with orders or trades, "
                                                 "plus the current and the next market")


class DeviceSummary(_Strict):
    device_id: str
    name: str
    bought_wh: int = Field(description="contracted as buyer")
    sold_wh: int = Field(description="contracted as seller")
    received_wh: int = Field(description="settled as buyer")
    delivered_wh: int = Field(description="settled as seller")
    paid_milli_minor: int = Field(description="paid for settled energy")
    received_milli_minor: int = Field(description="received for settled energy")
    shortfall_wh: int = Field(description="shortfall charged to this device, ever")
    open_shortfall_wh: int = Field(description="shortfall not yet cleared by the operator's audit")
    open_orders: int
    open_order_wh: int
    balance_milli_minor: int
    locked_milli_minor: int
    revoked_ms: Optional[int]


class SummaryOut(_Strict):
    time_ms: int
    devices: list[DeviceSummary] = Field(description="by name")


def register(app: FastAPI, store: LedgerStore, *, rules: MarketRules, last_market_id: int | None,
             now_ms: Callable[[], int], require_operator: Callable[[Request], None], responses: dict) -> None:
    """Add the views' routes to the ledger app (called once from app.create_app)."""

    @app.get("/v1/markets", response_model=MarketsOut, responses=responses,
             summary="Markets with their state and aggregate counts/volumes (public: aggregates only)")
    def get_markets(
        start: Optional[int] = Query(None, alias="from", ge=0, le=INT64_MAX,
                                     description=f"first market id (default: {DEFAULT_PAST_MARKETS} slots before now)"),
        end: Optional[int] = Query(None, alias="to", ge=0, le=INT64_MAX,
                                   description="last market id (default: the last market open for orders)"),
        limit: int = Query(100, ge=1, le=MAX_LISTED_MARKETS, description="at most this many, the newest kept"),
    ) -> JSONResponse:
        now = now_ms()
        now_s = now // 1000
        current = rules.slot_start(now_s)
        open_ids = rules.open_markets(now_s)
        if last_market_id is not None:
            open_ids = [m for m in open_ids if m <= last_market_id]
        first = current - DEFAULT_PAST_MARKETS * rules.slot_seconds if start is None else start
        last = (open_ids[-1] if open_ids else rules.next_slot_start(now_s)) if end is None else end
        rows = {row["market_id"]: row for row in store.market_activity(max(0, first), last)}
        for market_id in (current, *open_ids[:1]):
            if first <= market_id <= last and market_id not in rows:
                rows[market_id] = _empty(market_id)
        listed = []
        for market_id in sorted(rows)[-limit:]:
            row = rows[market_id]
            unsettled = row["trades"] - row["settled_trades"]
            listed.append({**row, "state": market_state(rules, market_id, now_s, unsettled_trades=unsettled,
                                                        last_market_id=last_market_id)})
        return JSONResponse({"time_ms": now, "slot_seconds": rules.slot_seconds, "current_market_id": current,
                             "next_market_id": open_ids[0] if open_ids else None, "markets": listed})

    @app.get("/v1/summary", response_model=SummaryOut, responses=responses,
             summary="Per device: energy bought and sold, money paid and received, shortfalls, open orders (operator only)")
    def get_summary(request: Request) -> JSONResponse:
        require_operator(request)
        now = now_ms()
        return JSONResponse({"time_ms": now, "devices": store.device_totals()})


def _empty(market_id: int) -> dict:
    return {"market_id": market_id, "orders": 0, "open_orders": 0, "open_bid_wh": 0, "open_ask_wh": 0, "trades": 0,
            "traded_wh": 0, "settled_trades": 0, "delivered_wh": 0, "shortfall_wh": 0, "paid_milli_minor": 0,
            "price_low_per_kwh_minor": None, "price_high_per_kwh_minor": None}
