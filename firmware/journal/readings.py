"""Stored meter readings (continuous, re-baselined counter units; see firmware.plausibility)."""

from __future__ import annotations


class ReadingsMixin:
    def add_reading(self, meter: str, taken_at_ms: int, import_energy_wh: int, export_energy_wh: int, power_w: int | None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO readings (meter, taken_at_ms, import_energy_wh, export_energy_wh, power_w) VALUES (?, ?, ?, ?, ?)",
                (meter, taken_at_ms, import_energy_wh, export_energy_wh, power_w),
            )

    def readings(self, meter: str, since_ms: int) -> list[tuple[int, int, int]]:
        """(taken_at_ms, import_energy_wh, export_energy_wh), oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT taken_at_ms, import_energy_wh, export_energy_wh FROM readings WHERE meter = ? AND taken_at_ms >= ? ORDER BY taken_at_ms",
                (meter, since_ms),
            ).fetchall()

    def last_reading(self, meter: str) -> tuple[int, int, int] | None:
        with self._lock:
            return self._db.execute(
                "SELECT taken_at_ms, import_energy_wh, export_energy_wh FROM readings WHERE meter = ? ORDER BY taken_at_ms DESC LIMIT 1",
                (meter,),
            ).fetchone()

    def prune_readings(self, before_ms: int) -> int:
        with self._transaction() as db:
            return db.execute("DELETE FROM readings WHERE taken_at_ms < ?", (before_ms,)).rowcount
