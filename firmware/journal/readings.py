"""Stored meter readings (continuous, re-baselined counter units; see firmware.plausibility).

Counters are kept in Wh (what the forecast and the plausibility rules use) and, since schema
v2, in mWh beside them: the SDM registers are float32 kWh, and rounding both ends of a
transfer to the Wh made one that ended exactly at its target read 99 of 100 Wh (issue 7 s).
A reading without mWh (journalled by v1, or a meter map in whole Wh) reads as Wh x 1000.
"""

from __future__ import annotations

_MWH = ("taken_at_ms, COALESCE(import_energy_mwh, import_energy_wh * 1000), "
        "COALESCE(export_energy_mwh, export_energy_wh * 1000)")


class ReadingsMixin:
    def add_reading(self, meter: str, taken_at_ms: int, import_energy_wh: int, export_energy_wh: int, power_w: int | None,
                    *, import_energy_mwh: int | None = None, export_energy_mwh: int | None = None) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO readings (meter, taken_at_ms, import_energy_wh, export_energy_wh, power_w, import_energy_mwh, "
                "export_energy_mwh) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (meter, taken_at_ms, import_energy_wh, export_energy_wh, power_w, import_energy_mwh, export_energy_mwh),
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

    def reading_before(self, meter: str, at_ms: int) -> tuple[int, int, int] | None:
        """The last reading taken at or before ``at_ms``: (taken_at_ms, import_mwh, export_mwh)."""
        with self._lock:
            return self._db.execute(
                f"SELECT {_MWH} FROM readings WHERE meter = ? AND taken_at_ms <= ? ORDER BY taken_at_ms DESC, id DESC LIMIT 1",
                (meter, at_ms),
            ).fetchone()

    def reading_after(self, meter: str, at_ms: int) -> tuple[int, int, int] | None:
        """The first reading taken at or after ``at_ms``: (taken_at_ms, import_mwh, export_mwh)."""
        with self._lock:
            return self._db.execute(
                f"SELECT {_MWH} FROM readings WHERE meter = ? AND taken_at_ms >= ? ORDER BY taken_at_ms, id LIMIT 1",
                (meter, at_ms),
            ).fetchone()

    def prune_readings(self, before_ms: int) -> int:
        with self._transaction() as db:
            return db.execute("DELETE FROM readings WHERE taken_at_ms < ?", (before_ms,)).rowcount
