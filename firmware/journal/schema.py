"""The journal's tables and their migrations, in one place.

Why migrations and not "CREATE IF NOT EXISTS": an A/B rollback shares one journal between two
releases. A journal is opened only by a firmware that knows its version: an older one is
migrated in ONE transaction (a kill half-way leaves it at the old version, intact), a newer one
is refused with a clear error (it was written by a later release; this one cannot know what its
rows mean). ``read_schema_version(path)`` (core.py) lets the flashing tools check a journal
before a switch without opening it for writing.

Versions (never renumber one that has shipped; add statements only to the version being made):
- 1: the first journal (BASE_SCHEMA).
- 2: delivery state machine (starting/interrupted/refused states, transition log), meter
     resolution (mWh counters beside the Wh ones), slot-edge meter values, persisted operator SAFE.
"""

SCHEMA_VERSION = 2

BASE_SCHEMA = """
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


# version -> statements run, in order, inside the one migration transaction.
MIGRATIONS: dict[int, list[str]] = {
    2: [
        # Meter resolution (issue 7 s): the SDM registers are float32 kWh; keep mWh through metering.
        "ALTER TABLE readings ADD COLUMN import_energy_mwh INTEGER",
        "ALTER TABLE readings ADD COLUMN export_energy_mwh INTEGER",
        "ALTER TABLE deliveries ADD COLUMN start_meter_mwh INTEGER",
        "ALTER TABLE deliveries ADD COLUMN end_meter_mwh INTEGER",
        "ALTER TABLE deliveries ADD COLUMN delivered_mwh INTEGER",
        "ALTER TABLE deliveries ADD COLUMN updated_at_ms INTEGER",
        # The interchange counters at each slot edge: the end of one slot and the start of the
        # next are the same value, so nothing counts in two slots (issue 7 c).
        """CREATE TABLE meter_edges (
            edge_s INTEGER PRIMARY KEY,
            import_energy_mwh INTEGER NOT NULL,
            export_energy_mwh INTEGER NOT NULL,
            method TEXT NOT NULL,
            detail TEXT
        )""",
        # Every delivery transition, for the engineer who asks "why is this trade failed".
        """CREATE TABLE delivery_transitions (
            id INTEGER PRIMARY KEY,
            trade_id INTEGER NOT NULL,
            from_state TEXT,
            to_state TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            detail TEXT
        )""",
        "CREATE INDEX delivery_transitions_by_trade ON delivery_transitions (trade_id, id)",
        # v1 marked a refused or cut-short delivery 'running' with outcome 'failed'; v2 names them.
        "UPDATE deliveries SET state = 'refused' WHERE state = 'running' AND outcome = 'failed' AND start_meter_wh IS NULL",
        "UPDATE deliveries SET state = 'interrupted' WHERE state = 'running' AND outcome = 'failed'",
        "UPDATE deliveries SET outcome = NULL WHERE state IN ('refused', 'interrupted')",
        "UPDATE deliveries SET start_meter_mwh = start_meter_wh * 1000 WHERE start_meter_wh IS NOT NULL",
        "UPDATE deliveries SET end_meter_mwh = end_meter_wh * 1000 WHERE end_meter_wh IS NOT NULL",
        "UPDATE deliveries SET delivered_mwh = delivered_wh * 1000 WHERE delivered_wh IS NOT NULL",
        # An operator's SAFE survives a daemon restart (issue 7 f): 1 while commanded.
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('operator_safe', 0)",
        # A2 (issue 7 j, n): per-message back-off, so one message failing again and again waits
        # its turn without blocking the rest; outbox.state may now also be 'expired' (dropped).
        "ALTER TABLE outbox ADD COLUMN next_attempt_ms INTEGER",
        # A2 (issue 7 i): a trade the ledger lists that matches no order of this board; kept for
        # the engineer and never given a delivery.
        """CREATE TABLE refused_trades (
            trade_id INTEGER PRIMARY KEY,
            market_id INTEGER NOT NULL,
            side TEXT NOT NULL,
            energy_wh INTEGER NOT NULL,
            price_per_kwh_minor INTEGER NOT NULL,
            order_nonce INTEGER NOT NULL,
            counterparty TEXT NOT NULL,
            reason TEXT NOT NULL,
            received_at_ms INTEGER NOT NULL
        )""",
    ],
}


def split_statements(script: str) -> list[str]:
    """BASE_SCHEMA as single statements (executescript would commit; a migration must not)."""
    return [s.strip() for s in script.split(";") if s.strip()]
