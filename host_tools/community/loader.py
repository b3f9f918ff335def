"""Read a community directory: ``slots.csv`` + ``houses.toml`` (format: docs/community.md).

Pure standard library (csv, tomllib), so the benchmark, the demo and the tests need none of the
generator's heavy libraries. Any directory in the documented format loads, not only the
committed fixture; every error names the file, the line or table, and what was expected.
"""

from __future__ import annotations

import csv
import tomllib
from dataclasses import dataclass
from pathlib import Path

FIXTURE_DIR = Path(__file__).resolve().parent / "fixture"
SLOTS_HEADER = ["slot_start", "house", "load_wh", "pv_wh"]
HOUSE_KEYS = ("pv_kwp", "battery_wh", "battery_power_w", "router_power_w")
# A house connection cannot move more than ~100 kW; one slot of that for a day-long slot is the
# most any row can plausibly hold. It catches unit mistakes (W instead of Wh, kWh x 1000 twice).
MAX_SLOT_WH = 100_000 * 24


class CommunityError(ValueError):
    """A community directory that does not follow docs/community.md."""


@dataclass(frozen=True)
class House:
    name: str
    pv_kwp: float
    battery_wh: int
    battery_power_w: int
    router_power_w: int

    @property
    def has_pv(self) -> bool:
        return self.pv_kwp > 0


@dataclass(frozen=True)
class Community:
    """One community: its houses and, per house, load and PV energy of every slot.

    ``slot_starts`` is the sorted list of slot starts (UTC epoch s), evenly spaced by
    ``slot_seconds``; ``load_wh[name][i]`` and ``pv_wh[name][i]`` belong to ``slot_starts[i]``.
    """

    path: Path
    slot_seconds: int
    slot_starts: tuple[int, ...]
    houses: dict[str, House]
    load_wh: dict[str, tuple[int, ...]]
    pv_wh: dict[str, tuple[int, ...]]

    @property
    def slots_per_day(self) -> int:
        return 86_400 // self.slot_seconds

    @property
    def days(self) -> int:
        return len(self.slot_starts) // self.slots_per_day

    def net_wh(self, name: str) -> list[int]:
        """Surplus (> 0) or shortage (< 0) of a house per slot, before any battery."""
        return [pv - load for load, pv in zip(self.load_wh[name], self.pv_wh[name])]


def _err(where: str, what: str) -> CommunityError:
    return CommunityError(f"{where}: {what}")


def load_houses(path: Path) -> dict[str, House]:
    """``houses.toml``: one ``[house.NAME]`` table per house with the four keys of HOUSE_KEYS."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _err(str(path), "missing (a community directory holds houses.toml and slots.csv)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _err(str(path), f"not valid TOML: {exc}") from None
    extra = sorted(set(raw) - {"house"})
    if extra:
        raise _err(str(path), f"unknown top-level key(s) {extra}: expected only [house.NAME] tables")
    tables = raw.get("house")
    if not isinstance(tables, dict) or not tables:
        raise _err(str(path), "no [house.NAME] table: expected one per house")
    houses = {}
    for name, table in tables.items():
        where = f"{path} [house.{name}]"
        if not name or not name.isascii() or not all(c.isalnum() or c in "-_" for c in name):
            raise _err(where, "house names are letters, digits, '-' and '_'")
        if not isinstance(table, dict):
            raise _err(where, "expected a table")
        unknown = sorted(set(table) - set(HOUSE_KEYS))
        missing = [k for k in HOUSE_KEYS if k not in table]
        if unknown:
            raise _err(where, f"unknown key(s) {unknown}: expected {list(HOUSE_KEYS)}")
        if missing:
            raise _err(where, f"missing key(s) {missing} (0 where the house has none)")
        kwp = table["pv_kwp"]
        if isinstance(kwp, bool) or not isinstance(kwp, (int, float)) or not 0 <= kwp <= 1000:
            raise _err(where, f"pv_kwp must be a number from 0 to 1000, found {kwp!r}")
        ints = {}
        for key in HOUSE_KEYS[1:]:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _err(where, f"{key} must be an integer >= 0, found {value!r}")
            ints[key] = value
        if (ints["battery_wh"] > 0) != (ints["battery_power_w"] > 0):
            raise _err(where, "battery_wh and battery_power_w are both 0 (no battery) or both positive")
        houses[name] = House(name, float(kwp), **ints)
    return houses


def _int_field(row: list[str], index: int, where: str, name: str) -> int:
    text = row[index].strip()
    try:
        return int(text)
    except ValueError:
        raise _err(where, f"{name} must be an integer, found {text!r}") from None


def load_community(directory: str | Path | None = None) -> Community:
    """Load a community directory (default: the committed fixture)."""
    root = Path(directory) if directory is not None else FIXTURE_DIR
    if not root.is_dir():
        raise _err(str(root), "not a directory (expected a community directory with houses.toml and slots.csv)")
    houses = load_houses(root / "houses.toml")
    path = root / "slots.csv"
    per_house: dict[str, dict[int, tuple[int, int]]] = {name: {} for name in houses}
    try:
        f = open(path, encoding="ascii", newline="")
    except FileNotFoundError:
        raise _err(str(path), "missing (a community directory holds houses.toml and slots.csv)") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header != SLOTS_HEADER:
                raise _err(f"{path}:1", f"header must be {','.join(SLOTS_HEADER)}, found {header!r}")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if len(row) != 4:
                    raise _err(where, f"expected 4 fields ({','.join(SLOTS_HEADER)}), found {len(row)}")
                start = _int_field(row, 0, where, "slot_start")
                house = row[1].strip()
                load = _int_field(row, 2, where, "load_wh")
                pv = _int_field(row, 3, where, "pv_wh")
                if start < 0:
                    raise _err(where, f"slot_start must be UTC epoch seconds >= 0, found {start}")
                if house not in per_house:
                    raise _err(where, f"house {house!r} has no [house.{house}] table in houses.toml")
                for name, value in (("load_wh", load), ("pv_wh", pv)):
                    if not 0 <= value <= MAX_SLOT_WH:
                        raise _err(where, f"{name} must be 0..{MAX_SLOT_WH} Wh, found {value}")
                if pv > 0 and not houses[house].has_pv:
                    raise _err(where, f"pv_wh {pv} for house {house!r} whose pv_kwp is 0")
                if start in per_house[house]:
                    raise _err(where, f"second row for house {house!r} at slot_start {start}")
                per_house[house][start] = (load, pv)
        except UnicodeDecodeError as exc:
            raise _err(str(path), f"not ASCII text: {exc}") from None
        except csv.Error as exc:
            raise _err(f"{path}:{reader.line_num}", f"not CSV: {exc}") from None
    starts = sorted(set().union(*(rows.keys() for rows in per_house.values())))
    if len(starts) < 2:
        raise _err(str(path), "needs at least two slots")
    slot_seconds = starts[1] - starts[0]
    if slot_seconds <= 0 or 86_400 % slot_seconds:
        raise _err(str(path), f"slot length {slot_seconds} s must divide a day (86400 s)")
    for a, b in zip(starts, starts[1:]):
        if b - a != slot_seconds:
            raise _err(str(path), f"slots must be evenly spaced by {slot_seconds} s: gap from {a} to {b}")
    for name, rows in per_house.items():
        if len(rows) != len(starts):
            absent = next(s for s in starts if s not in rows)
            raise _err(str(path), f"house {name!r} has {len(rows)} of {len(starts)} slots (first missing: {absent})")
    return Community(
        path=root,
        slot_seconds=slot_seconds,
        slot_starts=tuple(starts),
        houses=houses,
        load_wh={n: tuple(per_house[n][s][0] for s in starts) for n in houses},
        pv_wh={n: tuple(per_house[n][s][1] for s in starts) for n in houses},
    )
