"""Journal schema versions: a v1 journal (as the first release wrote it) is migrated to the
current version in one transaction, keeping its rows; a newer one is refused with a clear
error and left untouched; read_schema_version is read-only."""

from __future__ import annotations

import sqlite3

import pytest

from firmware import delivery_states as ds
from firmware.journal import SCHEMA_VERSION, Journal, JournalSchemaError, read_schema_version
from firmware.journal.schema import BASE_SCHEMA, MIGRATIONS


def _v1_journal(path):
    """A journal exactly as the v1 firmware left it, with a delivery in each v1 shape."""
    db = sqlite3.connect(path)
    db.executescript(BASE_SCHEMA)
    db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                   [("schema_version", 1), ("next_nonce", 42), ("trade_cursor", 7)])
    db.execute("INSERT INTO readings (meter, taken_at_ms, import_energy_wh, export_energy_wh, power_w) "
               "VALUES ('interchange', 1000, 500, 800, 0)")
    for trade_id, state, start, outcome, delivered in [
        (1, "scheduled", None, None, None),
        (2, "running", 800, None, None),  # running
        (3, "running", None, "failed", None),  # v1's refused: failed before anything flowed
        (4, "running", 800, "failed", None),  # v1's interrupted: it flowed, then failed
        (5, "metered", 800, "delivered", 100),
        (6, "reported", 800, "failed", 40),
    ]:
        db.execute("INSERT INTO trades VALUES (?, 1800, 'sell', 100, 20, 1, 'x', 0)", (trade_id,))
        db.execute("INSERT INTO deliveries (trade_id, market_id, direction, energy_wh, state, start_meter_wh, outcome, "
                   "delivered_wh) VALUES (?, 1800, 'export', 100, ?, ?, ?, ?)", (trade_id, state, start, outcome, delivered))
    db.commit()
    db.close()


def test_v1_journal_is_migrated_with_its_rows(tmp_path):
    path = tmp_path / "journal.sqlite3"
    _v1_journal(path)
    assert read_schema_version(path) == 1
    journal = Journal(path)
    try:
        assert journal.migrated_from == 1 and journal.schema_version() == SCHEMA_VERSION == read_schema_version(path)
        assert journal.next_nonce() == 42 and journal.trade_cursor() == 7
        states = {r.trade_id: (r.state, r.outcome) for r in journal.recent_deliveries(limit=10)}
        assert states == {1: (ds.SCHEDULED, None), 2: (ds.RUNNING, None), 3: (ds.REFUSED, None), 4: (ds.INTERRUPTED, None),
                          5: (ds.METERED, ds.DELIVERED), 6: (ds.REPORTED, ds.FAILED)}
        assert journal.delivery(5).delivered_mwh == 100_000 and journal.delivery(2).start_meter_mwh == 800_000
        assert journal.reading_before("interchange", 2000) == (1000, 500_000, 800_000)  # Wh x 1000 for v1 rows
        assert journal.operator_safe() is False
    finally:
        journal.close()
    again = Journal(path)  # opening a current journal migrates nothing
    try:
        assert again.migrated_from is None
    finally:
        again.close()


def test_a_failing_migration_leaves_the_v1_journal_intact(tmp_path, monkeypatch):
    path = tmp_path / "journal.sqlite3"
    _v1_journal(path)
    monkeypatch.setitem(MIGRATIONS, 2, [*MIGRATIONS[2], "ALTER TABLE no_such_table ADD COLUMN x INTEGER"])
    with pytest.raises(sqlite3.OperationalError):
        Journal(path)
    assert read_schema_version(path) == 1
    db = sqlite3.connect(path)
    try:
        columns = {r[1] for r in db.execute("PRAGMA table_info(readings)")}
        assert "import_energy_mwh" not in columns  # the whole migration rolled back
        assert db.execute("SELECT state FROM deliveries WHERE trade_id = 3").fetchone() == ("running",)
    finally:
        db.close()


def test_a_newer_journal_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(JournalSchemaError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this firmware's {SCHEMA_VERSION}"):
        Journal(path)
    assert read_schema_version(path) == SCHEMA_VERSION + 1


def test_a_new_journal_is_created_at_the_current_version(tmp_path):
    path = tmp_path / "state" / "journal.sqlite3"
    assert read_schema_version(path) is None
    journal = Journal(path)
    try:
        assert journal.migrated_from is None and journal.schema_version() == SCHEMA_VERSION
        assert journal.next_nonce() == 1 and journal.trade_cursor() == 0
    finally:
        journal.close()
    assert read_schema_version(path) == SCHEMA_VERSION


def test_read_schema_version_refuses_what_is_not_a_journal(tmp_path):
    other = tmp_path / "other.sqlite3"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE x (a)")
    db.commit()
    db.close()
    with pytest.raises(JournalSchemaError, match="not a DGC journal"):
        read_schema_version(other)
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalSchemaError, match="unreadable"):
        read_schema_version(garbage)
