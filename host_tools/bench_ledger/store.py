"""The bench ledger's state in SQLite (WAL), and the rules that change it.

Why it is built this way:

- **One transaction per message.** Deduplication, the market-rule checks, matching, money
  locks, trades, settlement *and* the stored outcome of the message are written in a single
  ``BEGIN IMMEDIATE`` transaction. A crash at any instant leaves either all of a message's
  effects or none, and a message whose effects exist always has its outcome stored, so a resend
  gets the same answer.
- **The database is the truth; the book is its index in memory.** Each market's resting orders
  are kept in an ``auction.OrderBook`` in memory, built from the ``orders`` table at start and
  changed only alongside the SQL that changes those orders, in the same locked step. If a
  transaction is rolled back for any reason other than a rejection, the books are rebuilt from
  the database, so they cannot drift from it. (Rebuilding the book from SQL for every order made
  the ledger slower the fuller its book.)
- **Group commit.** ``submit_batch`` applies many messages in one transaction (no savepoint per
  message in the usual case; see submit_batch), and one fsync makes them all durable; no answer leaves before that commit, so a
  crash loses only unanswered messages, which the boards resend and which are then applied once.
- **Integers only.** Energy in Wh, prices in minor units per kWh, money in milli-minor units
  (Wh x minor/kWh = minor/1000, exact). ``balance_milli_minor`` is what a device can spend;
  ``locked_milli_minor`` is money held aside for its open buy orders and unsettled trades.
- One connection guarded by a lock: serialising every write makes matching trivially atomic.

Signature checks happen before this module (see ``app``): everything here has already been
verified to come from the device it names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import coincurve

from firmware.ledger import record
from firmware.market import MarketRules, cost_milli_minor
from firmware.messages import Signer, device_id_from_public_key

from . import fastpath
from .auction import BookOrder, OrderBook

log = logging.getLogger(__name__)

INT64_MAX = 2**63 - 1
# Upper bounds that keep every sum and product inside SQLite's 64-bit integers.
MAX_CREDIT_MILLI_MINOR = 10**15
MAX_ORDER_WH = 10**9  # 1 GWh in one order is far beyond any house
MAX_FUTURE_ISSUE_SECONDS = 300
# Defaults of the seller qualification (docs/ledger.md, "Seller obligation"): what one device may
# have offered or contracted to sell in one market, and the shortfall charged to it that it may
# leave uncleared before the ledger stops taking its orders.
DEFAULT_SELL_CAPACITY_WH = 50_000  # 50 kWh in one slot: 100 kW over 30 min, far beyond a house
DEFAULT_MAX_OPEN_SHORTFALL_WH = 5_000
DEFAULT_MAX_OPEN_ORDERS = 256  # 48 markets ahead x a few orders each
BLOCK_MAX_ENTRIES = 1024  # a block is sealed at this many entries ...
SEAL_INTERVAL_MS = 2000  # ... or this long after its first entry, or when a proof of it is asked for

# Every rejection code and its HTTP status. 4xx means "permanent for this message".
REJECTION_STATUS: dict[str, int] = {
    "malformed": 400,
    "unauthorized": 401,
    "unknown_device": 401,
    "bad_signature": 401,
    "not_found": 404,
    "nonce_conflict": 409,
    "too_large": 413,
    "wrong_ledger": 422,
    "expired": 422,
    "not_yet_valid": 422,
    "unknown_market": 422,
    "gate_closed": 422,
    "price_out_of_band": 422,
    "not_whole_lots": 422,
    "energy_too_large": 422,
    "insufficient_funds": 422,
    "unknown_order": 422,
    "not_owner": 422,
    "order_closed": 422,
    "unknown_trade": 422,
    "not_a_party": 422,
    "wrong_role": 422,
    "trade_settled": 422,
    "report_too_early": 425,  # HTTP 425 Too Early: transient, never stored - the same bytes are valid later
    "report_too_late": 422,
    "over_capacity": 422,
    "audit_failed": 403,
    "too_many_orders": 422,
    "rate_limited": 429,
    "revoked": 403,
    "method_not_allowed": 405,
}

ORDER_STATES = ("open", "filled", "cancelled", "expired")
# Every state, for a look-up by market through the (state, market_id) index (the only orders index by market)
_ANY_STATE = "(" + ", ".join(f"'{state}'" for state in ORDER_STATES) + ")"
TRADE_STATES = ("contracted", "reported", "settled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    balance_milli_minor INTEGER NOT NULL,
    locked_milli_minor INTEGER NOT NULL,
    registered_ms INTEGER NOT NULL,
    revoked_ms INTEGER,  -- set once by the operator (key rotated or compromised); never cleared
    sell_capacity_wh INTEGER NOT NULL DEFAULT 50000,  -- qualification: Wh it may sell in one market
    open_shortfall_wh INTEGER NOT NULL DEFAULT 0  -- shortfall charged to it and not yet cleared by the operator
);
CREATE TABLE IF NOT EXISTS messages (
    device_id TEXT NOT NULL,
    nonce INTEGER NOT NULL,
    payload_sha256 TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    signature TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    http_status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    log_seq INTEGER,  -- an accepted message's entry in log_entries (NULL for a stored rejection)
    PRIMARY KEY (device_id, nonce)
);
CREATE TABLE IF NOT EXISTS orders (
    order_id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the time-priority sequence
    device_id TEXT NOT NULL,
    nonce INTEGER NOT NULL,
    market_id INTEGER NOT NULL,
    side TEXT NOT NULL,
    price_per_kwh_minor INTEGER NOT NULL,
    energy_wh INTEGER NOT NULL,
    remaining_wh INTEGER NOT NULL,
    cancelled_wh INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    closed_ms INTEGER,
    UNIQUE (device_id, nonce)
);
DROP INDEX IF EXISTS orders_market;  -- (market_id, state): orders_open serves market look-ups as state IN (...) AND market_id
CREATE INDEX IF NOT EXISTS orders_open ON orders (state, market_id);
DROP INDEX IF EXISTS orders_device;  -- (device_id, state): the UNIQUE (device_id, nonce) index serves device look-ups
-- (queries by device write +state / +market_id so the planner takes that index; one index less per order write)
CREATE TABLE IF NOT EXISTS trades (
    trade_id INTEGER PRIMARY KEY AUTOINCREMENT,
    market_id INTEGER NOT NULL,
    price_per_kwh_minor INTEGER NOT NULL,
    energy_wh INTEGER NOT NULL,
    seller_device_id TEXT NOT NULL,
    seller_order_nonce INTEGER NOT NULL,
    buyer_device_id TEXT NOT NULL,
    buyer_order_nonce INTEGER NOT NULL,
    taker_side TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS trades_seller ON trades (seller_device_id, trade_id);
CREATE INDEX IF NOT EXISTS trades_buyer ON trades (buyer_device_id, trade_id);
CREATE INDEX IF NOT EXISTS trades_market ON trades (market_id, trade_id);
CREATE INDEX IF NOT EXISTS trades_seller_market ON trades (seller_device_id, market_id);
CREATE INDEX IF NOT EXISTS trades_unsettled ON trades (settled, market_id);
CREATE TABLE IF NOT EXISTS delivery_reports (
    trade_id INTEGER NOT NULL REFERENCES trades (trade_id),
    role TEXT NOT NULL,
    device_id TEXT NOT NULL,
    nonce INTEGER NOT NULL,
    energy_wh INTEGER NOT NULL,
    status TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (trade_id, role)
);
CREATE TABLE IF NOT EXISTS log_entries (
    seq INTEGER PRIMARY KEY,  -- 1, 2, 3 ... in the order the effects were applied
    kind TEXT NOT NULL,  -- message | trade
    device_id TEXT,
    nonce INTEGER,
    trade_id INTEGER,
    leaf TEXT NOT NULL,  -- firmware.ledger.record leaf: canonical JSON of the entry
    block_height INTEGER,  -- unused since blocks are seq ranges (set by ledgers before; never read)
    leaf_index INTEGER
);
-- (no (device_id, nonce) index: a message's entry is found through messages.log_seq; see _migrate)
CREATE INDEX IF NOT EXISTS log_trade ON log_entries (trade_id);
DROP INDEX IF EXISTS log_pending;
CREATE TABLE IF NOT EXISTS log_blocks (  -- block h holds the entry_count entries of lowest seq >= first_seq
    height INTEGER PRIMARY KEY,
    header TEXT NOT NULL,  -- canonical JSON; its sha256 is the block hash, signed by the authority
    block_hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    entry_count INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS settlements (
    trade_id INTEGER PRIMARY KEY REFERENCES trades (trade_id),
    reason TEXT NOT NULL,
    seller_wh INTEGER NOT NULL,
    buyer_wh INTEGER NOT NULL,
    settled_wh INTEGER NOT NULL,
    paid_milli_minor INTEGER NOT NULL,
    released_milli_minor INTEGER NOT NULL,
    shortfall_wh INTEGER NOT NULL,
    shortfall_party TEXT,
    shortfall_device_id TEXT,
    settled_ms INTEGER NOT NULL
);
"""


def _trade_leaf(row: sqlite3.Row) -> bytes:
    return record.trade_leaf(
        trade_id=row["trade_id"], market_id=row["market_id"], energy_wh=row["energy_wh"],
        price_per_kwh_minor=row["price_per_kwh_minor"], seller_device_id=row["seller_device_id"],
        seller_order_nonce=row["seller_order_nonce"], buyer_device_id=row["buyer_device_id"],
        buyer_order_nonce=row["buyer_order_nonce"])


class Rejection(Exception):
    """A request refused for a reason the sender can act on: a code and a sentence naming the field."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in REJECTION_STATUS:
            raise ValueError(f"unknown rejection code {code!r}")
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail

    @property
    def http_status(self) -> int:
        return REJECTION_STATUS[self.code]

    def body(self, **extra: Any) -> dict:
        return {"status": "rejected", "code": self.code, "detail": self.detail, **extra}

    def __reduce__(self):  # pickled with its two arguments (the writer process sends rejections back)
        return (Rejection, (self.code, self.detail))


@dataclass(frozen=True)
class Outcome:
    """The answer to a submitted message: HTTP status and JSON body (and, when the store rendered
    it already, the body's bytes as sent: the stored text, so the event loop need not render it again)."""

    http_status: int
    body: dict
    data: bytes | None = field(default=None, compare=False, repr=False)


class _NotLean(Exception):
    """A lean batch cannot finish without savepoints (see LedgerStore.submit_batch)."""


class LedgerStore:
    """All ledger state and every state change. Thread-safe (one lock around one connection)."""

    def __init__(self, path: Path | str, rules: MarketRules, report_deadline_seconds: int,
                 last_market_id: int | None = None, *, clock: Callable[[], int] | None = None,
                 default_sell_capacity_wh: int = DEFAULT_SELL_CAPACITY_WH,
                 max_open_shortfall_wh: int = DEFAULT_MAX_OPEN_SHORTFALL_WH,
                 max_open_orders: int = DEFAULT_MAX_OPEN_ORDERS, authority: Signer | None = None,
                 ledger_id: str = "bench", seal_interval_ms: int = SEAL_INTERVAL_MS) -> None:
        if report_deadline_seconds < 0:
            raise ValueError(f"report_deadline_seconds: expected zero or more, got {report_deadline_seconds}")
        if last_market_id is not None and not rules.is_market_id(last_market_id):
            raise ValueError(f"last_market_id: expected a slot start (a multiple of {rules.slot_seconds}), got {last_market_id}")
        self.rules = rules
        self.report_deadline_seconds = report_deadline_seconds
        self.last_market_id = last_market_id  # a bounded market day (demos): no orders beyond it
        for name, value in (("default_sell_capacity_wh", default_sell_capacity_wh),
                            ("max_open_shortfall_wh", max_open_shortfall_wh), ("max_open_orders", max_open_orders)):
            if type(value) is not int or value < 0:
                raise ValueError(f"{name}: expected zero or a positive integer, got {value!r}")
        self.default_sell_capacity_wh = default_sell_capacity_wh
        self.max_open_shortfall_wh = max_open_shortfall_wh
        self.max_open_orders = max_open_orders
        # The ledger's clock, read *under the store lock* when submit() is not given a time: the
        # gate is then judged at the instant the order is applied, never at a time read before
        # another request's sweep ran (issue 10: orders judged open applied after the gate shut).
        self._clock = clock
        self._public_keys: dict[str, bytes] = {}  # device_id -> key; keys never change once registered
        # device_id -> a nonce at least as high as any stored for it (read lazily from SQLite, raised
        # whenever a message is stored; a rollback can only leave it too high, which costs a look-up).
        # A board's nonces only grow, so a new message skips the duplicate look-up.
        self._max_nonce: dict[str, int] = {}
        # The authority key signs the record's blocks (an ephemeral one when none is given: a
        # throwaway ledger in a test or a simulation still keeps a verifiable record).
        if authority is None:
            from firmware.keystore import DeviceKey

            authority = DeviceKey(coincurve.PrivateKey())
        self._authority = authority
        self.ledger_id = ledger_id
        self.seal_interval_ms = seal_interval_ms
        self._pending_since_ms: int | None = None
        self._lock = threading.Lock()
        path_text = str(path)
        if path_text != ":memory:":
            Path(path_text).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path_text, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")  # an acknowledged message survives a power cut
        self._path = path_text
        self._checkpointer: tuple[threading.Thread, threading.Event] | None = None
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        columns = {row["name"] for row in self._conn.execute("PRAGMA table_info(devices)")}
        if "revoked_ms" not in columns:  # a database created before revocation existed
            self._conn.execute("ALTER TABLE devices ADD COLUMN revoked_ms INTEGER")
        if "sell_capacity_wh" not in columns:  # created before the seller qualification existed
            self._conn.execute(f"ALTER TABLE devices ADD COLUMN sell_capacity_wh INTEGER NOT NULL DEFAULT {int(default_sell_capacity_wh)}")
            self._conn.execute("ALTER TABLE devices ADD COLUMN open_shortfall_wh INTEGER NOT NULL DEFAULT 0")
        self._migrate()
        self._books: dict[int, OrderBook] = {}
        self._load_books()
        self._next_order_id = self._one("SELECT COALESCE(MAX(order_id), 0) + 1 FROM orders")[0]
        self._trade_leaves: list[tuple[int, bytes]] = []
        self._next_seq: int | None = None  # the next log_entries seq (None: read it; reset by every rollback)
        self._lean = False  # inside a lean batch (submit_batch): outcome and record rows are collected
        self._batch_messages: dict[tuple[str, int], tuple] = {}
        self._batch_entries: list[tuple] = []
        self._batch_devices: dict[str, dict] = {}  # a lean batch's device rows (see _prefetch_devices)
        self._sealed_through_seq = self._last_sealed_seq()
        self._appended_since_seal = 0  # entries appended since the last seal (too high after a rollback: harmless)
        if self._one("SELECT 1 FROM log_entries WHERE seq > ? LIMIT 1", (self._sealed_through_seq,)) is not None:
            self._pending_since_ms = 0  # entries left unsealed by the last run: seal at the first chance

    def _migrate(self) -> None:
        """A database from before messages.log_seq: fill it from the (device_id, nonce) index of
        log_entries, then drop that index. Why: it was one of three indexes keyed by device that
        dirtied a page of their own per message (a WAL frame each in the COMMIT); a message's
        entry is now found through the messages row that the duplicate look-up reads anyway."""
        columns = {row["name"] for row in self._conn.execute("PRAGMA table_info(messages)")}
        if "log_seq" not in columns:
            self._begin()
            try:
                self._conn.execute("ALTER TABLE messages ADD COLUMN log_seq INTEGER")
                self._conn.execute("CREATE INDEX IF NOT EXISTS log_message ON log_entries (device_id, nonce)")
                self._conn.execute(
                    "UPDATE messages SET log_seq = (SELECT seq FROM log_entries e WHERE e.kind = 'message' "
                    "AND e.device_id = messages.device_id AND e.nonce = messages.nonce) WHERE http_status = 200")
                self._conn.execute("DROP INDEX log_message")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        self._conn.execute("DROP INDEX IF EXISTS log_message")

    def _load_books(self) -> None:
        """Every market's book from the open orders in the database (at start, and after a rollback)."""
        by_market: dict[int, list[BookOrder]] = {}
        for row in self._all("SELECT * FROM orders WHERE state = 'open' AND remaining_wh > 0 ORDER BY order_id"):
            by_market.setdefault(row["market_id"], []).append(
                BookOrder(row["device_id"], row["nonce"], row["side"], row["price_per_kwh_minor"], row["remaining_wh"], row["order_id"]))
        self._books = {market: OrderBook(orders) for market, orders in by_market.items()}

    def _book(self, market_id: int) -> OrderBook:
        book = self._books.get(market_id)
        if book is None:
            book = self._books[market_id] = OrderBook()
        return book

    @property
    def authority_public_key(self) -> bytes:
        return self._authority.public_key

    def close(self) -> None:
        self.stop_checkpointer()
        with self._lock:
            self._conn.close()

    # -------------------------------------------------------------- checkpoints

    def start_checkpointer(self, interval_s: float = 0.25) -> None:
        """Copy the WAL back into the database from a thread of its own, off the writer's path.

        Why: SQLite's automatic checkpoint runs inside the COMMIT that crosses 1,000 WAL pages -
        under the store lock, with an fsync of the database file - so under load every few
        hundred messages one batch waited for it (a latency spike for every request in it). A
        PASSIVE checkpoint on a second connection runs alongside the writer (SQLite's WAL allows
        it) and mostly outside the GIL; the writer's own automatic checkpoint stays as a
        backstop at 10,000 pages should this thread ever stop. Durability is unchanged: every
        COMMIT still fsyncs the WAL (synchronous=FULL). Started by the HTTP app, not by tests
        that drive a store directly."""
        if self._path == ":memory:" or self._checkpointer is not None:
            return
        self._conn.execute("PRAGMA wal_autocheckpoint=10000")
        stop = threading.Event()

        def run() -> None:
            conn = sqlite3.connect(self._path, isolation_level=None)
            try:
                conn.execute("PRAGMA synchronous=FULL")
                while not stop.wait(interval_s):
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    except sqlite3.Error as exc:  # busy or locked: the next round (or the backstop) does it
                        log.debug("background checkpoint skipped: %s", exc)
            finally:
                conn.close()

        thread = threading.Thread(target=run, name="ledger-checkpointer", daemon=True)
        self._checkpointer = (thread, stop)
        thread.start()

    def stop_checkpointer(self) -> None:
        if self._checkpointer is not None:
            thread, stop = self._checkpointer
            stop.set()
            thread.join(timeout=10)
            self._checkpointer = None

    # ----------------------------------------------------------------- helpers

    def _begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def _one(self, sql: str, params: tuple = ()) -> sqlite3.Row | None:
        return self._conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, params).fetchall()

    def _adjust(self, device_id: str, balance_delta: int = 0, locked_delta: int = 0) -> None:
        self._conn.execute(
            "UPDATE devices SET balance_milli_minor = balance_milli_minor + ?, locked_milli_minor = locked_milli_minor + ? "
            "WHERE device_id = ?",
            (balance_delta, locked_delta, device_id),
        )
        row = self._batch_devices.get(device_id)
        if row is not None:  # the lean batch's copy follows its table row
            row["balance_milli_minor"] += balance_delta

    _DEVICE_COLUMNS = "device_id, revoked_ms, balance_milli_minor, open_shortfall_wh, sell_capacity_wh"
    _PREFETCH = 64  # ids per look-up: one statement text, padded, so SQLite's statement cache keeps it

    def _prefetch_devices(self, items: list) -> None:
        """The lean batch's device rows in a few look-ups instead of one per message. The copies
        follow every change the batch makes to those rows (_adjust, a shortfall charged), and
        live only for the batch: a rollback redoes the batch without them."""
        ids = list(dict.fromkeys(fields["device_id"] for fields, _, _ in items))
        sql = f"SELECT {self._DEVICE_COLUMNS} FROM devices WHERE device_id IN ({', '.join('?' * self._PREFETCH)})"
        for start in range(0, len(ids), self._PREFETCH):
            chunk = ids[start:start + self._PREFETCH]
            for row in self._all(sql, tuple(chunk + [chunk[0]] * (self._PREFETCH - len(chunk)))):
                self._batch_devices[row["device_id"]] = dict(row)

    # ----------------------------------------------------------------- devices

    def register_device(self, public_key_hex: str, name: str, credit_milli_minor: int, now_ms: int, *,
                        sell_capacity_wh: int | None = None) -> tuple[dict, bool]:
        """Register a public key; registering the same key again returns the same account unchanged.

        ``sell_capacity_wh`` is the device's qualification: the most it may offer or have
        contracted to sell in one market (the ledger's default when None)."""
        capacity = self.default_sell_capacity_wh if sell_capacity_wh is None else sell_capacity_wh
        if type(capacity) is not int or not 0 <= capacity <= MAX_ORDER_WH:
            raise Rejection("malformed", f"sell_capacity_wh: expected 0 to {MAX_ORDER_WH}, got {capacity!r}")
        try:
            raw = bytes.fromhex(public_key_hex)
            public_key = coincurve.PublicKey(raw).format(compressed=True)
        except ValueError:
            raise Rejection(
                "malformed",
                "public_key: expected a secp256k1 public key in hex (66 hex characters compressed or 130 uncompressed)",
            ) from None
        if not 0 <= credit_milli_minor <= MAX_CREDIT_MILLI_MINOR:
            raise Rejection("malformed", f"credit_milli_minor: expected 0 to {MAX_CREDIT_MILLI_MINOR}, got {credit_milli_minor}")
        device_id = device_id_from_public_key(public_key)
        with self._lock:
            self._begin()
            try:
                existing = self._one("SELECT revoked_ms FROM devices WHERE device_id = ?", (device_id,))
                created = existing is None
                if existing is not None and existing["revoked_ms"] is not None:
                    raise Rejection(
                        "revoked",
                        f"public_key: device {device_id} was revoked and cannot be registered again; "
                        "expected a new key (dgc-host provision --rotate)",
                    )
                if created:
                    self._conn.execute(
                        "INSERT INTO devices (device_id, public_key, name, balance_milli_minor, locked_milli_minor, registered_ms, "
                        "sell_capacity_wh, open_shortfall_wh) VALUES (?, ?, ?, ?, 0, ?, ?, 0)",
                        (device_id, public_key.hex(), name, credit_milli_minor, now_ms, capacity),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            if created:
                log.info("registered device %s (%s) with %d milli-minor", device_id, name, credit_milli_minor)
            return self._account(device_id), created

    def revoke_device(self, device_id: str, now_ms: int) -> tuple[dict, bool, int]:
        """Revoke a device: from now on its messages are rejected ``revoked``; its open orders are
        cancelled (buy locks released) in the same transaction, because orders resting from a key
        that was rotated away or compromised must not trade. Contracted trades stay; they settle
        at the report deadline like any trade a party stopped reporting on.

        Returns (account, already_revoked, cancelled_orders); revoking twice changes nothing.
        Raises Rejection('not_found') for an unknown device.
        """
        with self._lock:
            self._begin()
            try:
                row = self._one("SELECT revoked_ms FROM devices WHERE device_id = ?", (device_id,))
                if row is None:
                    raise Rejection("not_found", f"device_id: no device {device_id[:64]!r} is registered; expected the id from POST /v1/devices")
                already = row["revoked_ms"] is not None
                cancelled = 0
                if not already:
                    self._conn.execute("UPDATE devices SET revoked_ms = ? WHERE device_id = ?", (now_ms, device_id))
                    for order in self._all("SELECT * FROM orders WHERE device_id = ? AND +state = 'open'", (device_id,)):
                        if order["side"] == "buy":
                            released = cost_milli_minor(order["remaining_wh"], order["price_per_kwh_minor"])
                            self._adjust(device_id, +released, -released)
                        self._conn.execute(
                            "UPDATE orders SET cancelled_wh = remaining_wh, remaining_wh = 0, state = 'cancelled', closed_ms = ? "
                            "WHERE order_id = ?",
                            (now_ms, order["order_id"]),
                        )
                        self._book(order["market_id"]).cancel(device_id, order["nonce"])
                        cancelled += 1
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                self._load_books()
                raise
            if not already:
                log.info("revoked device %s (%d open order(s) cancelled)", device_id, cancelled)
            return self._account(device_id), already, cancelled

    def clear_shortfalls(self, device_id: str, now_ms: int) -> dict:
        """The operator's audit cleared the device's recorded shortfalls (it made good or was
        compensated off-ledger): it may place orders again. Raises Rejection('not_found')."""
        with self._lock:
            self._begin()
            try:
                cur = self._conn.execute("UPDATE devices SET open_shortfall_wh = 0 WHERE device_id = ?", (device_id,))
                if cur.rowcount == 0:
                    raise Rejection("not_found", f"device_id: no device {device_id[:64]!r} is registered; expected the id from POST /v1/devices")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            log.info("shortfalls of device %s cleared by the operator", device_id)
            return self._account(device_id)

    def revoked_ms(self, device_id: str) -> int | None:
        with self._lock:
            row = self._one("SELECT revoked_ms FROM devices WHERE device_id = ?", (device_id,))
        return None if row is None else row["revoked_ms"]

    def public_key_of(self, device_id: str) -> bytes | None:
        """The registered key, from memory after the first look-up (a registered key never changes),
        so refusing an unknown id or a forgery costs no SQL under the store lock."""
        key = self._public_keys.get(device_id)
        if key is not None:
            return key
        with self._lock:
            row = self._one("SELECT public_key FROM devices WHERE device_id = ?", (device_id,))
        if row is None:
            return None
        key = bytes.fromhex(row["public_key"])
        self._public_keys[device_id] = key
        return key

    @property
    def known_public_keys(self) -> Mapping[str, bytes]:
        """The keys looked up so far (device id -> key), for a caller that wants a look-up without the lock."""
        return self._public_keys

    def public_keys(self) -> dict[str, bytes]:
        """Every registered device's key (the writer process hands its parent a copy at start)."""
        with self._lock:
            rows = self._all("SELECT device_id, public_key FROM devices")
        keys = {row["device_id"]: bytes.fromhex(row["public_key"]) for row in rows}
        self._public_keys.update(keys)
        return keys

    def account(self, device_id: str) -> dict | None:
        with self._lock:
            return self._account(device_id)

    def _account(self, device_id: str) -> dict | None:
        row = self._one("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        if row is None:
            return None
        max_nonce = self._one("SELECT COALESCE(MAX(nonce), 0) AS n FROM messages WHERE device_id = ?", (device_id,))["n"]
        return {
            "device_id": row["device_id"],
            "public_key": row["public_key"],
            "name": row["name"],
            "balance_milli_minor": row["balance_milli_minor"],
            "locked_milli_minor": row["locked_milli_minor"],
            "max_nonce": max_nonce,
            "revoked_ms": row["revoked_ms"],
            "sell_capacity_wh": row["sell_capacity_wh"],
            "open_shortfall_wh": row["open_shortfall_wh"],
        }

    # ---------------------------------------------------------------- messages

    def submit(self, fields: Mapping[str, Any], payload: bytes, signature: bytes, now_ms: int | None = None) -> Outcome:
        """Apply one verified message exactly once and store its outcome, in one transaction.

        Order of checks: a resend of a stored (device, nonce) returns the stored answer even
        after the message expired (the first answer may have been lost); a different payload
        under a used nonce is a conflict. The validity window (expired / not yet valid) is
        checked next and *not* stored, so it never consumes a nonce. Everything else - market
        rules included - is stored with its outcome.
        """
        result = self.submit_batch([(fields, payload, signature)], now_ms)[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def submit_batch(self, items: list[tuple[Mapping[str, Any], bytes, bytes]], now_ms: int | None = None) -> list[Any]:
        """Apply several verified messages, in order, in ONE transaction (one fsync): group commit.

        Usual case (``_apply_batch(lean=True)``): no savepoint per message, and the stored
        outcomes and record entries of the whole batch are written with one ``executemany``
        each just before the COMMIT - a rejected message changes nothing but its outcome row, so
        it needs nothing undone. If any message fails unexpectedly (a bug, an I/O error), or a
        rejection is raised after a write, the whole transaction is rolled back, the books are
        rebuilt from SQLite, and the batch is applied again with a savepoint per message, so the
        failing one is undone alone (its result is that exception) and the others keep their
        effects. Returns an Outcome or an exception per item. Nothing is answered before the
        COMMIT: if it fails, every item gets the error.
        """
        with self._lock:
            if now_ms is None:
                if self._clock is None:
                    raise ValueError("submit: now_ms is required when the store has no clock")
                now_ms = self._clock()  # read under the lock: no sweep can run between this and the apply
            self._sweep_locked(now_ms)
            pending_before = self._pending_since_ms
            try:
                return self._apply_batch(items, now_ms, lean=True)
            except _NotLean:
                self._pending_since_ms = pending_before
                self._load_books()
            return self._apply_batch(items, now_ms, lean=False)

    def _apply_batch(self, items: list[tuple[Mapping[str, Any], bytes, bytes]], now_ms: int, *, lean: bool) -> list[Any]:
        pending_before = self._pending_since_ms
        results: list[Any] = []
        self._lean = lean
        self._batch_messages: dict[tuple[str, int], tuple] = {}  # rows to write at the end (lean)
        self._batch_entries: list[tuple] = []
        self._batch_devices = {}
        self._begin()
        try:
            if lean:
                self._prefetch_devices(items)
            for fields, payload, signature in items:
                digest = hashlib.sha256(payload).hexdigest()
                try:
                    results.append(self._submit_locked(fields, payload, signature, digest, now_ms))
                except _NotLean:
                    raise
                except Exception as exc:
                    if lean:  # undo the whole batch and apply it again with a savepoint per message
                        raise _NotLean() from exc
                    self._load_books()  # a bug or an I/O error in one message: undone alone (its savepoint)
                    log.exception("message from %s could not be applied", fields.get("device_id"))
                    results.append(exc)
            try:
                if self._batch_messages:
                    self._conn.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", self._batch_messages.values())
                if self._batch_entries:
                    self._conn.executemany("INSERT INTO log_entries (seq, kind, device_id, nonce, trade_id, leaf) "
                                           "VALUES (?, ?, ?, ?, ?, ?)", self._batch_entries)
            except sqlite3.Error as exc:  # which message? the savepoint pass will say
                raise _NotLean() from exc
            self._conn.execute("COMMIT")
        except _NotLean:
            self._conn.execute("ROLLBACK")
            self._pending_since_ms = pending_before
            self._next_seq = None
            raise
        except BaseException:
            self._conn.execute("ROLLBACK")
            self._pending_since_ms = pending_before
            self._next_seq = None
            self._load_books()
            raise
        finally:
            self._lean = False
            self._batch_messages, self._batch_entries, self._batch_devices = {}, [], {}
        return results

    def _submit_locked(self, fields: Mapping[str, Any], payload: bytes, signature: bytes, digest: str, now_ms: int) -> Outcome:
        device_id, nonce, kind = fields["device_id"], fields["nonce"], fields["type"]
        top = self._max_nonce.get(device_id)
        if top is None:
            top = self._max_nonce[device_id] = self._one(
                "SELECT COALESCE(MAX(nonce), 0) FROM messages WHERE device_id = ?", (device_id,))[0]
        stored = self._batch_messages.get((device_id, nonce)) if nonce <= top else None  # a resend within this batch
        if stored is not None:
            stored = {"payload_sha256": stored[2], "kind": stored[3], "http_status": stored[7], "outcome": stored[8]}
        elif nonce <= top:  # (a nonce above every stored one of the device is certainly new: no look-up)
            stored = self._one("SELECT payload_sha256, kind, http_status, outcome FROM messages WHERE device_id = ? AND nonce = ?",
                               (device_id, nonce))
        if stored is not None:
            if stored["payload_sha256"] == digest:
                body = json.loads(stored["outcome"])
                body["duplicate"] = True
                return Outcome(stored["http_status"], body)
            rejection = Rejection(
                "nonce_conflict",
                f"nonce {nonce}: already used by this device for a different {stored['kind']} message; "
                "expected a new nonce (the highest seen is in GET /v1/devices/{device_id})",
            )
            return Outcome(rejection.http_status, rejection.body(duplicate=False, nonce=nonce))
        self._device_row = self._batch_devices.get(device_id) or self._one(
            f"SELECT {self._DEVICE_COLUMNS} FROM devices WHERE device_id = ?",
            (device_id,))  # read once per message; only this message changes it before its apply reads it
        revoked_ms = self._device_row["revoked_ms"]
        if revoked_ms is not None:  # checked under the same lock as revoke_device: nothing slips in after it
            rejection = Rejection(
                "revoked",
                f"device_id: device {device_id} was revoked by the operator at {revoked_ms} ms (its key was rotated "
                "or withdrawn); expected a message signed by a device that is not revoked",
            )
            return Outcome(rejection.http_status, rejection.body(duplicate=False, nonce=nonce))
        if now_ms > fields["expires_at"] * 1000:
            rejection = Rejection(
                "expired", f"expires_at: {fields['expires_at']} is before the ledger's time {now_ms // 1000}; expected a fresh message"
            )
            return Outcome(rejection.http_status, rejection.body(duplicate=False, nonce=nonce))
        if fields["issued_at"] * 1000 > now_ms + MAX_FUTURE_ISSUE_SECONDS * 1000:
            rejection = Rejection(
                "not_yet_valid",
                f"issued_at: {fields['issued_at']} is more than {MAX_FUTURE_ISSUE_SECONDS} s after the ledger's time "
                f"{now_ms // 1000}; expected the board's clock to agree with GET /v1/time",
            )
            return Outcome(rejection.http_status, rejection.body(duplicate=False, nonce=nonce))
        if kind == "delivery_report" and now_ms < (fields["market_id"] + self.rules.slot_seconds) * 1000:
            # Not stored either: a report before its slot ended cannot be a metered result (issue 10:
            # a buyer reported 0 Wh two hours early); the same bytes are accepted once the slot is over.
            slot_end = fields["market_id"] + self.rules.slot_seconds
            rejection = Rejection(
                "report_too_early",
                f"market_id: the slot of market {fields['market_id']} ends at {slot_end} (ledger time {now_ms // 1000}); "
                "expected a delivery report only after the slot has ended",
            )
            return Outcome(rejection.http_status, rejection.body(duplicate=False, nonce=nonce))

        if self._lean:
            return self._apply_lean(fields, payload, signature, digest, now_ms)
        self._conn.execute("SAVEPOINT apply")  # the message's effects, its stored outcome and its record entries
        self._trade_leaves = []
        try:
            outcome = self._apply(fields, payload, signature, digest, now_ms)
            self._conn.execute("RELEASE apply")
        except Rejection as rejection:
            self._conn.execute("ROLLBACK TO apply")
            self._conn.execute("RELEASE apply")
            self._next_seq = None
            outcome = Outcome(rejection.http_status, rejection.body(duplicate=False, nonce=nonce))
            outcome = self._store_message(fields, payload, signature, digest, now_ms, outcome)
        except BaseException:
            self._conn.execute("ROLLBACK TO apply")
            self._conn.execute("RELEASE apply")
            self._next_seq = None
            raise
        return outcome

    def _apply_lean(self, fields: Mapping[str, Any], payload: bytes, signature: bytes, digest: str, now_ms: int) -> Outcome:
        """``_apply`` without a savepoint: a rejection must have changed nothing (every rule is
        checked before the first write, and SQLite's change counter proves it), else the batch
        is redone with savepoints."""
        changes = self._conn.total_changes
        self._trade_leaves = []
        try:
            return self._apply(fields, payload, signature, digest, now_ms)
        except Rejection as rejection:
            if self._conn.total_changes != changes:
                raise _NotLean() from rejection
            outcome = Outcome(rejection.http_status, rejection.body(duplicate=False, nonce=fields["nonce"]))
            outcome = self._store_message(fields, payload, signature, digest, now_ms, outcome)
            return outcome

    def _apply(self, fields: Mapping[str, Any], payload: bytes, signature: bytes, digest: str, now_ms: int) -> Outcome:
        """The message's effects, its stored outcome and its record entries (the accepted
        message, then the trades it made). Raises Rejection for a rule it breaks."""
        device_id, nonce, kind = fields["device_id"], fields["nonce"], fields["type"]
        if kind == "order":
            result = self._apply_order(fields, now_ms)
        elif kind == "cancel":
            result = self._apply_cancel(fields, now_ms)
        elif kind == "delivery_report":
            result = self._apply_report(fields, now_ms)
        else:  # messages.validate_fields admits only the kinds above
            raise Rejection("malformed", f"type: expected one of order, cancel, delivery_report, got {kind!r}")
        outcome = Outcome(200, {"status": "accepted", "duplicate": False, "nonce": nonce, "type": kind, "result": result})
        seq = self._append("message", fastpath.message_leaf(payload, signature), now_ms, device_id=device_id, nonce=nonce)
        outcome = self._store_message(fields, payload, signature, digest, now_ms, outcome, log_seq=seq)
        for trade_id, leaf in self._trade_leaves:
            self._append("trade", leaf, now_ms, trade_id=trade_id)
        return outcome

    def _store_message(self, fields: Mapping[str, Any], payload: bytes, signature: bytes, digest: str, now_ms: int,
                       outcome: Outcome, log_seq: int | None = None) -> Outcome:
        """Store the message with its outcome (and, accepted, its record entry's seq); returns the
        outcome with its rendered bytes."""
        data = fastpath.render_response(outcome.body)  # stored as the very bytes the answer carries
        row = (fields["device_id"], fields["nonce"], digest, fields["type"], payload.decode("ascii"), signature.hex(), now_ms,
               outcome.http_status, data.decode("utf-8"), log_seq)
        if fields["nonce"] > self._max_nonce.get(row[0], 0):
            self._max_nonce[row[0]] = fields["nonce"]
        if self._lean:  # written with the batch's other rows, before its COMMIT
            self._batch_messages[row[0], row[1]] = row
        else:
            self._conn.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        return Outcome(outcome.http_status, outcome.body, data)

    # ------------------------------------------------------------- the record

    def _append(self, kind: str, leaf: bytes, now_ms: int, *, device_id: str | None = None, nonce: int | None = None,
                trade_id: int | None = None) -> int:
        """Append a record entry; returns its seq (the next one: this connection is the only writer)."""
        seq = self._next_seq
        if seq is None:
            seq = self._one("SELECT COALESCE(MAX(seq), 0) + 1 FROM log_entries")[0]
        row = (seq, kind, device_id, nonce, trade_id, leaf.decode("ascii"))
        if self._lean:  # written with the batch's other rows, in order, before its COMMIT
            self._batch_entries.append(row)
        else:
            self._conn.execute("INSERT INTO log_entries (seq, kind, device_id, nonce, trade_id, leaf) VALUES (?, ?, ?, ?, ?, ?)", row)
        self._next_seq = seq + 1
        self._appended_since_seal += 1
        if self._pending_since_ms is None:
            self._pending_since_ms = now_ms
        return seq

    def _last_sealed_seq(self) -> int:
        """The seq of the last sealed entry (0 when nothing is sealed)."""
        last = self._one("SELECT first_seq, entry_count FROM log_blocks ORDER BY height DESC LIMIT 1")
        if last is None:
            return 0
        row = self._one("SELECT seq FROM log_entries WHERE seq >= ? ORDER BY seq LIMIT 1 OFFSET ?",
                        (last["first_seq"], last["entry_count"] - 1))
        return last["first_seq"] + last["entry_count"] - 1 if row is None else row["seq"]

    def _block_entries(self, first_seq: int, entry_count: int) -> list[sqlite3.Row]:
        """A block's entries (seq, leaf), in order: the entry_count entries of lowest seq from first_seq."""
        return self._all("SELECT seq, leaf FROM log_entries WHERE seq >= ? ORDER BY seq LIMIT ?", (first_seq, entry_count))

    def _seal_locked(self, now_ms: int, *, full_blocks_only: bool = False) -> int:
        """Seal every unsealed entry into blocks of at most BLOCK_MAX_ENTRIES (with ``full_blocks_only``,
        only whole blocks: the busy ledger's seal, one block at a time); returns blocks sealed.

        A block is a range of seq: it writes one row, never touches the entries it seals, so a
        seal under load costs hashing and one signature, not a rewrite of every entry's page."""
        if self._pending_since_ms is None:
            return 0
        sealed = 0
        self._begin()
        try:
            while True:
                rows = self._all("SELECT seq, leaf FROM log_entries WHERE seq > ? ORDER BY seq LIMIT ?",
                                 (self._sealed_through_seq, BLOCK_MAX_ENTRIES))
                if not rows or (full_blocks_only and len(rows) < BLOCK_MAX_ENTRIES):
                    break
                last = self._one("SELECT height, block_hash FROM log_blocks ORDER BY height DESC LIMIT 1")
                height = 0 if last is None else last["height"] + 1
                root = fastpath.merkle_root([r["leaf"] for r in rows])
                header = record.BlockHeader(
                    ledger_id=self.ledger_id, height=height,
                    prev_block_hash=record.GENESIS_HASH if last is None else last["block_hash"],
                    entries_root=root.hex(), entry_count=len(rows), first_seq=rows[0]["seq"], sealed_ms=now_ms)
                signature = self._authority.sign_digest(hashlib.sha256(header.to_bytes()).digest())
                self._conn.execute("INSERT INTO log_blocks VALUES (?, ?, ?, ?, ?, ?)",
                                   (height, header.to_bytes().decode("ascii"), header.block_hash, signature.hex(),
                                    rows[0]["seq"], len(rows)))
                self._sealed_through_seq = rows[-1]["seq"]
                sealed += 1
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            self._sealed_through_seq = self._last_sealed_seq()
            raise
        left = len(rows)  # what the last query found beyond the sealed blocks (0, or a part-block kept back)
        if not left:
            self._pending_since_ms = None
        elif sealed:  # a part-block kept back by a full-blocks-only seal: its age counts from now
            self._pending_since_ms = now_ms
        self._appended_since_seal = left
        return sealed

    def seal(self, now_ms: int) -> int:
        with self._lock:
            return self._seal_locked(now_ms)

    def _block(self, row: sqlite3.Row, *, with_entries: bool) -> dict:
        out = {**json.loads(row["header"]), "block_hash": row["block_hash"], "signature": row["signature"]}
        if with_entries:
            out["entries"] = [r["leaf"] for r in self._block_entries(row["first_seq"], row["entry_count"])]
        return out

    def blocks(self, start: int, limit: int, now_ms: int, *, with_entries: bool = False) -> tuple[list[dict], int]:
        """Sealed blocks from height ``start`` (sealing what is pending first); and the block count."""
        with self._lock:
            self._seal_locked(now_ms)
            rows = self._all("SELECT * FROM log_blocks WHERE height >= ? ORDER BY height LIMIT ?", (start, limit))
            count = self._one("SELECT COUNT(*) FROM log_blocks")[0]
            return [self._block(r, with_entries=with_entries) for r in rows], count

    def _proof(self, entry: sqlite3.Row | None, now_ms: int) -> dict | None:
        if entry is None:
            return None
        if entry["seq"] > self._sealed_through_seq:
            self._seal_locked(now_ms)
        block = self._one("SELECT * FROM log_blocks WHERE first_seq <= ? ORDER BY height DESC LIMIT 1", (entry["seq"],))
        rows = self._block_entries(block["first_seq"], block["entry_count"])
        index = next(i for i, r in enumerate(rows) if r["seq"] == entry["seq"])
        hashes = [record.leaf_hash(r["leaf"].encode("ascii")) for r in rows]
        return {
            "seq": entry["seq"],
            "leaf": entry["leaf"],
            "leaf_index": index,
            "path": [h.hex() for h in record.merkle_path(hashes, index)],
            "block": self._block(block, with_entries=False),
        }

    def message_proof(self, device_id: str, nonce: int, now_ms: int) -> dict | None:
        """Inclusion proof of an accepted message in a signed block; None if it is not in the record."""
        with self._lock:
            stored = self._one("SELECT log_seq FROM messages WHERE device_id = ? AND nonce = ?", (device_id, nonce))
            if stored is None or stored["log_seq"] is None:
                return None
            return self._proof(self._one("SELECT * FROM log_entries WHERE seq = ? AND kind = 'message'", (stored["log_seq"],)), now_ms)

    def trade_proof(self, trade_id: int, now_ms: int) -> dict | None:
        with self._lock:
            return self._proof(self._one("SELECT * FROM log_entries WHERE kind = 'trade' AND trade_id = ?", (trade_id,)), now_ms)

    def record_completeness(self) -> list[str]:
        """Problems between the record and the tables: every accepted message and every trade must
        have exactly its leaf in the log, and nothing else may be there. Empty list: complete."""
        problems: list[str] = []
        with self._lock:
            logged = {(r["device_id"], r["nonce"]): r["leaf"] for r in self._all(
                "SELECT device_id, nonce, leaf FROM log_entries WHERE kind = 'message'")}
            for r in self._all("SELECT device_id, nonce, payload, signature FROM messages WHERE http_status = 200"):
                leaf = record.message_leaf(r["payload"].encode("ascii"), bytes.fromhex(r["signature"])).decode("ascii")
                if logged.pop((r["device_id"], r["nonce"]), None) != leaf:
                    problems.append(f"message {r['device_id']}/{r['nonce']}: accepted but not (or not so) in the record")
            problems += [f"message {d}/{n}: in the record but not accepted" for d, n in logged]
            trades = {r["trade_id"]: r["leaf"] for r in self._all("SELECT trade_id, leaf FROM log_entries WHERE kind = 'trade'")}
            for row in self._all("SELECT * FROM trades"):
                if trades.pop(row["trade_id"], None) != _trade_leaf(row).decode("ascii"):
                    problems.append(f"trade {row['trade_id']}: not (or not so) in the record")
            problems += [f"trade {t}: in the record but not in the trades table" for t in trades]
        return problems

    # ------------------------------------------------------------------ orders

    def _check_order_rules(self, fields: Mapping[str, Any], now_s: int) -> None:
        rules = self.rules
        market_id, energy_wh, price = fields["market_id"], fields["energy_wh"], fields["price_per_kwh_minor"]
        last_market = rules.next_slot_start(now_s) + (rules.markets_ahead - 1) * rules.slot_seconds
        if not rules.is_market_id(market_id):
            raise Rejection(
                "unknown_market",
                f"market_id: {market_id} is not a slot start; expected a multiple of {rules.slot_seconds} (UTC epoch seconds)",
            )
        if market_id > last_market:
            raise Rejection(
                "unknown_market",
                f"market_id: {market_id} is more than {rules.markets_ahead} markets ahead; expected at most {last_market}",
            )
        if self.last_market_id is not None and market_id > self.last_market_id:
            raise Rejection(
                "unknown_market",
                f"market_id: {market_id} is after this ledger's last market; expected at most {self.last_market_id}",
            )
        if not rules.gate_open(market_id, now_s):
            raise Rejection(
                "gate_closed",
                f"market_id: {market_id} closed for orders {rules.gate_closure_seconds} s before delivery "
                f"(ledger time {now_s}); expected a market starting after {now_s + rules.gate_closure_seconds}",
            )
        if not rules.price_in_band(price):
            raise Rejection(
                "price_out_of_band",
                f"price_per_kwh_minor: {price} is outside the band; expected {rules.price_min_per_kwh_minor} "
                f"to {rules.price_max_per_kwh_minor}",
            )
        if not rules.is_whole_lots(energy_wh):
            raise Rejection(
                "not_whole_lots", f"energy_wh: {energy_wh} is not a whole number of lots; expected a multiple of {rules.lot_wh}"
            )
        if energy_wh > MAX_ORDER_WH:
            raise Rejection("energy_too_large", f"energy_wh: {energy_wh} is too large; expected at most {MAX_ORDER_WH}")

    def _check_qualification(self, device_id: str, market_id: int, side: str, energy_wh: int) -> None:
        """The seller obligation's backing, as a qualification audit (docs/ledger.md; seed 004):

        - a device whose shortfalls (charged at settlement, either side) exceed the limit and were
          not cleared by the operator places no new order until they are;
        - what a device offers plus what it has contracted to sell in one market never exceeds its
          qualified capacity (set at registration): a 1 GWh sell from a house is refused;
        - a device has at most ``max_open_orders`` open orders at once.
        """
        device = self._device_row
        if device["open_shortfall_wh"] > self.max_open_shortfall_wh:
            raise Rejection(
                "audit_failed",
                f"device_id: {device['open_shortfall_wh']} Wh of shortfalls charged to this device are not cleared "
                f"(limit {self.max_open_shortfall_wh} Wh); expected the operator to clear them "
                "(POST /v1/devices/{device_id}/clear-shortfalls) before new orders",
            )
        open_orders = sum(book.open_orders_of(device_id) for book in self._books.values())  # in memory: = open rows
        if open_orders >= self.max_open_orders:
            raise Rejection(
                "too_many_orders",
                f"device_id: {open_orders} open orders already; expected at most {self.max_open_orders} "
                "(cancel some, or wait for fills and gate closure)",
            )
        if side == "sell":
            offered = self._book(market_id).offered_wh_of(device_id)
            sold = self._one(
                "SELECT COALESCE(SUM(energy_wh), 0) FROM trades WHERE seller_device_id = ? AND market_id = ?",
                (device_id, market_id))[0]
            capacity = device["sell_capacity_wh"]
            if offered + sold + energy_wh > capacity:
                raise Rejection(
                    "over_capacity",
                    f"energy_wh: {energy_wh} Wh more would bring this device's offers and sales in market {market_id} to "
                    f"{offered + sold + energy_wh} Wh; expected at most its qualified capacity {capacity} Wh "
                    f"({max(capacity - offered - sold, 0)} Wh left)",
                )

    def _apply_order(self, fields: Mapping[str, Any], now_ms: int) -> dict:
        device_id, nonce = fields["device_id"], fields["nonce"]
        market_id, side = fields["market_id"], fields["side"]
        energy_wh, limit = fields["energy_wh"], fields["price_per_kwh_minor"]
        self._check_order_rules(fields, now_ms // 1000)
        self._check_qualification(device_id, market_id, side, energy_wh)
        locked = 0
        if side == "buy":
            locked = cost_milli_minor(energy_wh, limit)
            balance = self._device_row["balance_milli_minor"]
            if locked > balance:
                raise Rejection(
                    "insufficient_funds",
                    f"energy_wh x price_per_kwh_minor: buying {energy_wh} Wh at {limit} locks {locked} milli-minor; "
                    f"expected at most the available balance {balance}",
                )
            self._adjust(device_id, -locked, +locked)
        seq = self._next_order_id  # the time priority; the row is written once, after matching
        self._next_order_id += 1
        match = self._book(market_id).submit(BookOrder(device_id, nonce, side, limit, energy_wh, seq))
        trades, released = [], 0
        for fill in match.fills:
            maker = fill.maker
            seller_id, seller_nonce = (maker.device_id, maker.order_nonce) if side == "buy" else (device_id, nonce)
            buyer_id, buyer_nonce = (device_id, nonce) if side == "buy" else (maker.device_id, maker.order_nonce)
            trade_id = self._conn.execute(
                "INSERT INTO trades (market_id, price_per_kwh_minor, energy_wh, seller_device_id, seller_order_nonce, "
                "buyer_device_id, buyer_order_nonce, taker_side, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (market_id, fill.price_per_kwh_minor, fill.energy_wh, seller_id, seller_nonce, buyer_id, buyer_nonce, side, now_ms),
            ).lastrowid
            maker_left = fill.maker_remaining_wh
            self._conn.execute(
                "UPDATE orders SET remaining_wh = ?, state = ?, closed_ms = ? WHERE order_id = ?",  # the book's seq is the order_id
                (maker_left, "open" if maker_left else "filled", None if maker_left else now_ms, maker.seq),
            )
            # The buyer's order locked energy x its limit; the trade keeps energy x trade price.
            # The difference (price improvement for an incoming buy) goes back to the balance.
            buyer_limit = limit if side == "buy" else maker.price_per_kwh_minor
            excess = cost_milli_minor(fill.energy_wh, buyer_limit - fill.price_per_kwh_minor)
            if excess:
                self._adjust(buyer_id, +excess, -excess)
                released += excess
            trades.append({
                "trade_id": trade_id,
                "energy_wh": fill.energy_wh,
                "price_per_kwh_minor": fill.price_per_kwh_minor,
                "counterparty": maker.device_id,
                "counterparty_order_nonce": maker.order_nonce,
            })
            self._trade_leaves.append((trade_id, record.trade_leaf(
                trade_id=trade_id, market_id=market_id, energy_wh=fill.energy_wh, price_per_kwh_minor=fill.price_per_kwh_minor,
                seller_device_id=seller_id, seller_order_nonce=seller_nonce, buyer_device_id=buyer_id,
                buyer_order_nonce=buyer_nonce)))
        state = "open" if match.remaining_wh else "filled"
        self._conn.execute(
            "INSERT INTO orders (order_id, device_id, nonce, market_id, side, price_per_kwh_minor, energy_wh, remaining_wh, "
            "state, created_ms, closed_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (seq, device_id, nonce, market_id, side, limit, energy_wh, match.remaining_wh, state, now_ms,
             None if match.remaining_wh else now_ms),
        )
        return {
            "order_nonce": nonce,
            "market_id": market_id,
            "side": side,
            "energy_wh": energy_wh,
            "filled_wh": match.filled_wh,
            "remaining_wh": match.remaining_wh,
            "state": state,
            "locked_milli_minor": locked,
            "released_milli_minor": released,
            "trades": trades,
        }

    def _apply_cancel(self, fields: Mapping[str, Any], now_ms: int) -> dict:
        device_id, market_id, order_nonce = fields["device_id"], fields["market_id"], fields["order_nonce"]
        order = self._one("SELECT * FROM orders WHERE device_id = ? AND nonce = ?", (device_id, order_nonce))
        if order is None:
            others = self._one(f"SELECT 1 FROM orders WHERE state IN {_ANY_STATE} AND market_id = ? AND nonce = ? AND device_id != ?",
                               (market_id, order_nonce, device_id))
            if others is not None:
                raise Rejection(
                    "not_owner",
                    f"order_nonce: order {order_nonce} in market {market_id} belongs to another device; "
                    "expected the nonce of one of your own orders",
                )
            raise Rejection("unknown_order", f"order_nonce: no order of yours has nonce {order_nonce}; expected the nonce of one of your orders")
        if order["market_id"] != market_id:
            raise Rejection(
                "unknown_order",
                f"market_id: your order {order_nonce} is in market {order['market_id']}, not {market_id}; expected the order's market",
            )
        if order["state"] != "open":
            raise Rejection(
                "order_closed",
                f"order_nonce: order {order_nonce} is already {order['state']}; expected an open order",
            )
        remaining = order["remaining_wh"]
        released = 0
        if order["side"] == "buy":
            released = cost_milli_minor(remaining, order["price_per_kwh_minor"])
            self._adjust(device_id, +released, -released)
        self._conn.execute(
            "UPDATE orders SET remaining_wh = 0, cancelled_wh = ?, state = 'cancelled', closed_ms = ? WHERE order_id = ?",
            (remaining, now_ms, order["order_id"]),
        )
        self._book(market_id).cancel(device_id, order_nonce)
        return {
            "order_nonce": order_nonce,
            "market_id": market_id,
            "cancelled_wh": remaining,
            "filled_wh": order["energy_wh"] - remaining,
            "released_milli_minor": released,
            "state": "cancelled",
        }

    # ------------------------------------------------------------- deliveries

    def _apply_report(self, fields: Mapping[str, Any], now_ms: int) -> dict:
        device_id, trade_id, role = fields["device_id"], fields["trade_id"], fields["role"]
        trade = self._one("SELECT * FROM trades WHERE trade_id = ?", (trade_id,))
        if trade is None:
            raise Rejection("unknown_trade", f"trade_id: no trade {trade_id}; expected the id of one of your trades")
        if trade["market_id"] != fields["market_id"]:
            raise Rejection(
                "unknown_trade",
                f"market_id: trade {trade_id} is in market {trade['market_id']}, not {fields['market_id']}; expected the trade's market",
            )
        parties = {"seller": trade["seller_device_id"], "buyer": trade["buyer_device_id"]}
        if device_id not in parties.values():
            raise Rejection("not_a_party", f"trade_id: trade {trade_id} is between two other devices; expected one of your trades")
        if parties[role] != device_id:
            actual = "seller" if parties["seller"] == device_id else "buyer"
            raise Rejection("wrong_role", f"role: you are the {actual} in trade {trade_id}; expected role {actual!r}, got {role!r}")
        existing = self._one("SELECT * FROM delivery_reports WHERE trade_id = ? AND role = ?", (trade_id, role))
        if existing is not None:
            return {
                "trade_id": trade_id,
                "role": role,
                "energy_wh": existing["energy_wh"],
                "status": existing["status"],
                "report_nonce": existing["nonce"],
                "already_reported": True,
                "trade_state": self._trade_state(trade_id),
                "settlement": self._settlement(trade_id),
            }
        if trade["settled"]:
            raise Rejection(
                "trade_settled",
                f"trade_id: trade {trade_id} was settled at the report deadline "
                f"({self.report_deadline_seconds} s after its slot) without your report; expected reports before then",
            )
        deadline_s = trade["market_id"] + self.rules.slot_seconds + self.report_deadline_seconds
        if now_ms > deadline_s * 1000:  # a store driven without sweeps (a simulation) still closes the window
            raise Rejection(
                "report_too_late",
                f"trade_id: the report deadline of trade {trade_id} was {deadline_s} (ledger time {now_ms // 1000}); "
                "expected reports within report_deadline_seconds after the slot",
            )
        self._conn.execute(
            "INSERT INTO delivery_reports VALUES (?, ?, ?, ?, ?, ?, ?)",
            (trade_id, role, device_id, fields["nonce"], fields["energy_wh"], fields["status"], now_ms),
        )
        reports = {r["role"]: r["energy_wh"] for r in self._all("SELECT role, energy_wh FROM delivery_reports WHERE trade_id = ?", (trade_id,))}
        if len(reports) == 2:
            self._settle(trade, reports["seller"], reports["buyer"], reason="reports", now_ms=now_ms)
        return {
            "trade_id": trade_id,
            "role": role,
            "energy_wh": fields["energy_wh"],
            "status": fields["status"],
            "report_nonce": fields["nonce"],
            "already_reported": False,
            "trade_state": self._trade_state(trade_id),
            "settlement": self._settlement(trade_id),
        }

    def _settle(self, trade: sqlite3.Row, seller_wh: int | None, buyer_wh: int | None, *, reason: str, now_ms: int) -> None:
        """Pay for the metered energy and record who fell short.

        settled_wh = min(contracted, seller's report, buyer's report): nobody pays for energy a
        meter did not see. The shortfall is charged to the party whose report is lower (the
        seller on a tie: delivering is the seller's obligation); a missing report counts as 0
        and, when only one party is silent, the silent party is charged.
        """
        contracted, price = trade["energy_wh"], trade["price_per_kwh_minor"]
        seller_value = 0 if seller_wh is None else seller_wh
        buyer_value = 0 if buyer_wh is None else buyer_wh
        settled_wh = min(contracted, seller_value, buyer_value)
        shortfall_wh = contracted - settled_wh
        party = None
        if shortfall_wh:
            if seller_wh is None and buyer_wh is not None:
                party = "seller"
            elif buyer_wh is None and seller_wh is not None:
                party = "buyer"
            else:
                party = "seller" if seller_value <= buyer_value else "buyer"
        party_device = None if party is None else trade[f"{party}_device_id"]
        lock = cost_milli_minor(contracted, price)
        paid = cost_milli_minor(settled_wh, price)
        released = lock - paid
        self._adjust(trade["buyer_device_id"], +released, -lock)
        self._adjust(trade["seller_device_id"], +paid, 0)
        if party_device is not None:  # the qualification audit counts it until the operator clears it
            self._conn.execute("UPDATE devices SET open_shortfall_wh = open_shortfall_wh + ? WHERE device_id = ?",
                               (shortfall_wh, party_device))
            row = self._batch_devices.get(party_device)
            if row is not None:
                row["open_shortfall_wh"] += shortfall_wh
        self._conn.execute(
            "INSERT INTO settlements VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (trade["trade_id"], reason, seller_value, buyer_value, settled_wh, paid, released, shortfall_wh, party,
             party_device, now_ms),
        )
        self._conn.execute("UPDATE trades SET settled = 1 WHERE trade_id = ?", (trade["trade_id"],))
        log.info(
            "settled trade %d (%s): %d of %d Wh, paid %d milli-minor, shortfall %d Wh%s",
            trade["trade_id"], reason, settled_wh, contracted, paid, shortfall_wh, f" charged to the {party}" if party else "",
        )

    # ------------------------------------------------------------------ sweep

    def sweep(self, now_ms: int) -> dict:
        """Close what time has closed: orders whose gate shut, trades past the report deadline.

        Orders still open at gate closure can never trade, so they expire and their locks are
        released. Trades not fully reported ``report_deadline_seconds`` after their slot ends are
        settled with a missing report counted as 0. Called before every request, so every
        answer reflects the ledger's current time.
        """
        with self._lock:
            return self._sweep_locked(now_ms)

    def _sweep_locked(self, now_ms: int) -> dict:
        if self._pending_since_ms is not None:
            if now_ms - self._pending_since_ms >= self.seal_interval_ms:
                self._seal_locked(now_ms)
            elif self._appended_since_seal >= BLOCK_MAX_ENTRIES:  # busy: a whole block now, not a pile every interval
                self._seal_locked(now_ms, full_blocks_only=True)
        now_s = now_ms // 1000
        gate_cutoff = now_s + self.rules.gate_closure_seconds  # market_id <= cutoff means gate closed
        trade_cutoff = now_s - self.rules.slot_seconds - self.report_deadline_seconds
        stale_orders = self._one(
            "SELECT 1 FROM orders WHERE state = 'open' AND market_id <= ? LIMIT 1", (gate_cutoff,))
        stale_trades = self._one(
            "SELECT 1 FROM trades WHERE settled = 0 AND market_id <= ? LIMIT 1", (trade_cutoff,))
        if stale_orders is None and stale_trades is None:
            return {"expired_orders": 0, "settled_trades": 0}
        self._begin()
        try:
            expired = self._all("SELECT * FROM orders WHERE state = 'open' AND market_id <= ?", (gate_cutoff,))
            for order in expired:
                if order["side"] == "buy":
                    released = cost_milli_minor(order["remaining_wh"], order["price_per_kwh_minor"])
                    self._adjust(order["device_id"], +released, -released)
                self._conn.execute(
                    "UPDATE orders SET cancelled_wh = remaining_wh, remaining_wh = 0, state = 'expired', closed_ms = ? "
                    "WHERE order_id = ?",
                    (now_ms, order["order_id"]),
                )
            due = self._all("SELECT * FROM trades WHERE settled = 0 AND market_id <= ?", (trade_cutoff,))
            for trade in due:
                reports = {r["role"]: r["energy_wh"] for r in self._all(
                    "SELECT role, energy_wh FROM delivery_reports WHERE trade_id = ?", (trade["trade_id"],))}
                self._settle(trade, reports.get("seller"), reports.get("buyer"), reason="deadline", now_ms=now_ms)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            self._load_books()
            raise
        for market_id in [m for m in self._books if m <= gate_cutoff]:
            del self._books[market_id]  # every open order of a market whose gate shut just expired
        if expired:
            log.info("expired %d open order(s) at gate closure", len(expired))
        return {"expired_orders": len(expired), "settled_trades": len(due)}

    # ---------------------------------------------------------------- queries

    def _trade_state(self, trade_id: int) -> str:
        if self._one("SELECT 1 FROM settlements WHERE trade_id = ?", (trade_id,)) is not None:
            return "settled"
        if self._one("SELECT 1 FROM delivery_reports WHERE trade_id = ?", (trade_id,)) is not None:
            return "reported"
        return "contracted"

    def _settlement(self, trade_id: int) -> dict | None:
        row = self._one("SELECT * FROM settlements WHERE trade_id = ?", (trade_id,))
        if row is None:
            return None
        return {
            "reason": row["reason"],
            "seller_wh": row["seller_wh"],
            "buyer_wh": row["buyer_wh"],
            "settled_wh": row["settled_wh"],
            "paid_milli_minor": row["paid_milli_minor"],
            "released_milli_minor": row["released_milli_minor"],
            "shortfall_wh": row["shortfall_wh"],
            "shortfall_party": row["shortfall_party"],
            "shortfall_device_id": row["shortfall_device_id"],
            "settled_ms": row["settled_ms"],
        }

    def _device_trade(self, row: sqlite3.Row, device_id: str) -> dict:
        is_seller = row["seller_device_id"] == device_id
        return {
            "trade_id": row["trade_id"],
            "market_id": row["market_id"],
            "side": "sell" if is_seller else "buy",
            "energy_wh": row["energy_wh"],
            "price_per_kwh_minor": row["price_per_kwh_minor"],
            "order_nonce": row["seller_order_nonce"] if is_seller else row["buyer_order_nonce"],
            "counterparty": row["buyer_device_id"] if is_seller else row["seller_device_id"],
            "state": self._trade_state(row["trade_id"]),
            "created_ms": row["created_ms"],
            "settlement": self._settlement(row["trade_id"]),
        }

    def device_trades(self, device_id: str, after: int, limit: int) -> tuple[list[dict], int]:
        """Trades involving the device with trade_id > after, oldest first; the cursor is the last id returned."""
        with self._lock:
            rows = self._all(
                "SELECT * FROM trades WHERE trade_id > ? AND (seller_device_id = ? OR buyer_device_id = ?) "
                "ORDER BY trade_id LIMIT ?",
                (after, device_id, device_id, limit),
            )
            trades = [self._device_trade(row, device_id) for row in rows]
        return trades, (trades[-1]["trade_id"] if trades else after)

    def device_orders(self, device_id: str, market_id: int | None) -> list[dict]:
        with self._lock:
            if market_id is None:
                rows = self._all("SELECT * FROM orders WHERE device_id = ? ORDER BY order_id", (device_id,))
            else:
                rows = self._all("SELECT * FROM orders WHERE device_id = ? AND +market_id = ? ORDER BY order_id",
                                 (device_id, market_id))
        return [
            {
                "nonce": r["nonce"],
                "market_id": r["market_id"],
                "side": r["side"],
                "energy_wh": r["energy_wh"],
                "remaining_wh": r["remaining_wh"],
                "filled_wh": r["energy_wh"] - r["remaining_wh"] - r["cancelled_wh"],
                "cancelled_wh": r["cancelled_wh"],
                "price_per_kwh_minor": r["price_per_kwh_minor"],
                "state": r["state"],
                "created_ms": r["created_ms"],
            }
            for r in rows
        ]

    def book(self, market_id: int) -> dict:
        """The market's open quantity per price level - asks cheapest first, bids dearest first.

        Aggregates only: who rests at a price, and when, is a household's private pattern."""
        with self._lock:
            book = self._books.get(market_id)
            sides = {side: [] if book is None else book.levels(side) for side in ("sell", "buy")}
        return {key: [{"price_per_kwh_minor": p, "remaining_wh": wh, "orders": n} for p, wh, n in sides[side]]
                for key, side in (("asks", "sell"), ("bids", "buy"))}

    def _trade_detail(self, row: sqlite3.Row) -> dict:
        reports = [
            {"role": r["role"], "device_id": r["device_id"], "nonce": r["nonce"], "energy_wh": r["energy_wh"],
             "status": r["status"], "received_ms": r["received_ms"]}
            # seller first, then buyer
            for r in self._all("SELECT * FROM delivery_reports WHERE trade_id = ? ORDER BY role DESC", (row["trade_id"],))
        ]
        return {
            "trade_id": row["trade_id"],
            "market_id": row["market_id"],
            "energy_wh": row["energy_wh"],
            "price_per_kwh_minor": row["price_per_kwh_minor"],
            "seller": {"device_id": row["seller_device_id"], "order_nonce": row["seller_order_nonce"]},
            "buyer": {"device_id": row["buyer_device_id"], "order_nonce": row["buyer_order_nonce"]},
            "taker_side": row["taker_side"],
            "created_ms": row["created_ms"],
            "state": self._trade_state(row["trade_id"]),
            "reports": reports,
            "settlement": self._settlement(row["trade_id"]),
        }

    def device_messages(self, device_id: str, after: int, limit: int) -> list[dict]:
        """The device's stored messages with nonce > after: what the ledger recorded, byte for byte,
        so a board (or a test) can check that each message it signed was recorded exactly once."""
        with self._lock:
            rows = self._all(
                "SELECT * FROM messages WHERE device_id = ? AND nonce > ? ORDER BY nonce LIMIT ?", (device_id, after, limit))
        out = []
        for r in rows:
            outcome = json.loads(r["outcome"])
            out.append({
                "nonce": r["nonce"],
                "kind": r["kind"],
                "payload_sha256": r["payload_sha256"],
                "payload": r["payload"],
                "signature": r["signature"],
                "received_ms": r["received_ms"],
                "http_status": r["http_status"],
                "status": outcome.get("status"),
                "code": outcome.get("code"),
            })
        return out

    def market_trades(self, market_id: int) -> list[dict]:
        with self._lock:
            rows = self._all("SELECT * FROM trades WHERE market_id = ? ORDER BY trade_id", (market_id,))
            return [self._trade_detail(r) for r in rows]

    def trade(self, trade_id: int) -> dict | None:
        with self._lock:
            row = self._one("SELECT * FROM trades WHERE trade_id = ?", (trade_id,))
            return None if row is None else self._trade_detail(row)

    def stats(self) -> dict:
        with self._lock:
            one = lambda sql: self._one(sql)[0]  # noqa: E731
            return {
                "devices": one("SELECT COUNT(*) FROM devices"),
                "messages": one("SELECT COUNT(*) FROM messages"),
                "orders": one("SELECT COUNT(*) FROM orders"),
                "open_orders": one("SELECT COUNT(*) FROM orders WHERE state = 'open'"),
                "trades": one("SELECT COUNT(*) FROM trades"),
                "traded_wh": one("SELECT COALESCE(SUM(energy_wh), 0) FROM trades"),
                "reported_trades": one(
                    "SELECT COUNT(*) FROM (SELECT trade_id FROM delivery_reports GROUP BY trade_id HAVING COUNT(*) = 2)"),
                "settled_trades": one("SELECT COUNT(*) FROM settlements"),
                "delivered_wh": one("SELECT COALESCE(SUM(settled_wh), 0) FROM settlements"),
                "shortfall_wh": one("SELECT COALESCE(SUM(shortfall_wh), 0) FROM settlements"),
                "failed_trades": one(
                    "SELECT COUNT(*) FROM trades t WHERE EXISTS (SELECT 1 FROM settlements s WHERE s.trade_id = t.trade_id "
                    "AND s.shortfall_wh > 0) OR EXISTS (SELECT 1 FROM delivery_reports r WHERE r.trade_id = t.trade_id "
                    "AND r.status = 'failed')"),
                "delivered_markets": one(
                    "SELECT COUNT(DISTINCT t.market_id) FROM trades t JOIN settlements s ON s.trade_id = t.trade_id "
                    "WHERE s.settled_wh > 0"),
                "balance_milli_minor": one("SELECT COALESCE(SUM(balance_milli_minor), 0) FROM devices"),
                "locked_milli_minor": one("SELECT COALESCE(SUM(locked_milli_minor), 0) FROM devices"),
            }

    # ------------------------------------------------- read-only views (helper C2, issue 11 part 3)

    def market_activity(self, first_market_id: int, last_market_id: int) -> list[dict]:
        """Per market in [first, last] that has any order or trade: aggregate counts and volumes.

        Aggregates only (no device ids): what `dgc-host ledger markets` shows anyone."""
        with self._lock:
            orders = {r["market_id"]: r for r in self._all(
                "SELECT market_id, COUNT(*) AS orders, SUM(state = 'open') AS open_orders, "
                "COALESCE(SUM(CASE WHEN state = 'open' AND side = 'buy' THEN remaining_wh END), 0) AS open_bid_wh, "
                "COALESCE(SUM(CASE WHEN state = 'open' AND side = 'sell' THEN remaining_wh END), 0) AS open_ask_wh "
                f"FROM orders WHERE state IN {_ANY_STATE} AND market_id BETWEEN ? AND ? GROUP BY market_id",
                (first_market_id, last_market_id))}
            trades = {r["market_id"]: r for r in self._all(
                "SELECT t.market_id, COUNT(*) AS trades, SUM(t.energy_wh) AS traded_wh, "
                "MIN(t.price_per_kwh_minor) AS price_low, MAX(t.price_per_kwh_minor) AS price_high, "
                "SUM(t.settled) AS settled_trades, COALESCE(SUM(s.settled_wh), 0) AS delivered_wh, "
                "COALESCE(SUM(s.shortfall_wh), 0) AS shortfall_wh, COALESCE(SUM(s.paid_milli_minor), 0) AS paid_milli_minor "
                "FROM trades t LEFT JOIN settlements s ON s.trade_id = t.trade_id "
                "WHERE t.market_id BETWEEN ? AND ? GROUP BY t.market_id", (first_market_id, last_market_id))}
        out = []
        for market_id in sorted(set(orders) | set(trades)):
            o, t = orders.get(market_id), trades.get(market_id)
            out.append({
                "market_id": market_id,
                "orders": o["orders"] if o else 0,
                "open_orders": o["open_orders"] if o else 0,
                "open_bid_wh": o["open_bid_wh"] if o else 0,
                "open_ask_wh": o["open_ask_wh"] if o else 0,
                "trades": t["trades"] if t else 0,
                "traded_wh": t["traded_wh"] if t else 0,
                "settled_trades": t["settled_trades"] if t else 0,
                "delivered_wh": t["delivered_wh"] if t else 0,
                "shortfall_wh": t["shortfall_wh"] if t else 0,
                "paid_milli_minor": t["paid_milli_minor"] if t else 0,
                "price_low_per_kwh_minor": t["price_low"] if t else None,
                "price_high_per_kwh_minor": t["price_high"] if t else None,
            })
        return out

    def device_totals(self) -> list[dict]:
        """Per registered device: energy and money both ways, shortfalls charged to it, open orders.

        bought/sold are contracted Wh; received/delivered are settled Wh (what meters confirmed);
        paid/received money is settled money. Operator data: it names every household."""
        with self._lock:
            rows = self._all(
                "SELECT d.device_id, d.name, d.balance_milli_minor, d.locked_milli_minor, d.revoked_ms, d.open_shortfall_wh, "
                "(SELECT COALESCE(SUM(energy_wh), 0) FROM trades WHERE buyer_device_id = d.device_id) AS bought_wh, "
                "(SELECT COALESCE(SUM(energy_wh), 0) FROM trades WHERE seller_device_id = d.device_id) AS sold_wh, "
                "(SELECT COALESCE(SUM(s.settled_wh), 0) FROM trades t JOIN settlements s ON s.trade_id = t.trade_id "
                " WHERE t.buyer_device_id = d.device_id) AS received_wh, "
                "(SELECT COALESCE(SUM(s.settled_wh), 0) FROM trades t JOIN settlements s ON s.trade_id = t.trade_id "
                " WHERE t.seller_device_id = d.device_id) AS delivered_wh, "
                "(SELECT COALESCE(SUM(s.paid_milli_minor), 0) FROM trades t JOIN settlements s ON s.trade_id = t.trade_id "
                " WHERE t.buyer_device_id = d.device_id) AS paid_milli_minor, "
                "(SELECT COALESCE(SUM(s.paid_milli_minor), 0) FROM trades t JOIN settlements s ON s.trade_id = t.trade_id "
                " WHERE t.seller_device_id = d.device_id) AS received_milli_minor, "
                "(SELECT COALESCE(SUM(shortfall_wh), 0) FROM settlements WHERE shortfall_device_id = d.device_id) AS shortfall_wh, "
                "(SELECT COUNT(*) FROM orders WHERE device_id = d.device_id AND +state = 'open') AS open_orders, "
                "(SELECT COALESCE(SUM(remaining_wh), 0) FROM orders WHERE device_id = d.device_id AND +state = 'open') AS open_order_wh "
                "FROM devices d ORDER BY d.name, d.device_id")
        return [dict(row) for row in rows]
