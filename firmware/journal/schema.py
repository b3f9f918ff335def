"""The journal's tables, in one place (the migrations that change them live here too, phase 2)."""

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    meter TEXT NOT NULL,
    taken_at_ms INTEGER NOT NULL,
    import_energy_wh INTEGER NOT NULL,
    export_energy_wh INTEGER NOT NULL,
    power_w INTEGER
);
CREATE INDEX IF NOT EXISTS readings_by_meter_time ON readings (meter, taken_at_ms);
CREATE TABLE IF NOT EXISTS outbox (
    nonce INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    signature TEXT NOT NULL,
    ref TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',      -- pending | acked | rejected
    attempts INTEGER NOT NULL DEFAULT 0,
    last_attempt_ms INTEGER,
    answer TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (state, nonce);
CREATE TABLE IF NOT EXISTS orders (
    nonce INTEGER PRIMARY KEY,
    market_id INTEGER NOT NULL,
    side TEXT NOT NULL,
    energy_wh INTEGER NOT NULL,
    price_per_kwh_minor INTEGER NOT NULL,
    state TEXT NOT NULL,                        -- sending | open | filled | cancelling | cancelled | rejected
    filled_wh INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS orders_by_market ON orders (market_id, state);
CREATE TABLE IF NOT EXISTS trades (
    trade_id INTEGER PRIMARY KEY,
    market_id INTEGER NOT NULL,
    side TEXT NOT NULL,
    energy_wh INTEGER NOT NULL,
    price_per_kwh_minor INTEGER NOT NULL,
    order_nonce INTEGER NOT NULL,
    counterparty TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    trade_id INTEGER PRIMARY KEY REFERENCES trades (trade_id),
    market_id INTEGER NOT NULL,
    direction TEXT NOT NULL,                    -- export (we sell) | import (we buy)
    energy_wh INTEGER NOT NULL,
    state TEXT NOT NULL,                        -- scheduled | running | metered | reported
    start_meter_wh INTEGER,
    end_meter_wh INTEGER,
    delivered_wh INTEGER,
    outcome TEXT,                               -- delivered | failed
    detail TEXT,
    started_at_ms INTEGER,
    report_nonce INTEGER
);
CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries (state, market_id);
"""
