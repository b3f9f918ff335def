"""The community format (docs/community.md): the committed fixture loads, and every kind of
broken directory is refused with an error that names the file, the place and the expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from host_tools.community.loader import FIXTURE_DIR, CommunityError, load_community

HOUSES = """
[house.a]
pv_kwp = 5.0
battery_wh = 7000
battery_power_w = 3000
router_power_w = 4000

[house.b]
pv_kwp = 0
battery_wh = 0
battery_power_w = 0
router_power_w = 4000
"""

SLOTS = "slot_start,house,load_wh,pv_wh\n" + "".join(
    f"{1800 * i},{h},{100 + i},{(50 * i) if h == 'a' else 0}\n" for i in range(4) for h in ("a", "b"))


def write(tmp_path: Path, houses: str = HOUSES, slots: str = SLOTS) -> Path:
    (tmp_path / "houses.toml").write_text(houses)
    (tmp_path / "slots.csv").write_text(slots)
    return tmp_path


def test_small_directory_loads(tmp_path):
    c = load_community(write(tmp_path))
    assert c.slot_seconds == 1800 and c.slot_starts == (0, 1800, 3600, 5400)
    assert c.load_wh["a"] == (100, 101, 102, 103) and c.pv_wh["a"] == (0, 50, 100, 150)
    assert c.pv_wh["b"] == (0, 0, 0, 0)
    assert c.houses["a"].battery_wh == 7000 and c.houses["a"].has_pv and not c.houses["b"].has_pv
    assert c.net_wh("a") == [-100, -51, -2, 47]


def test_committed_fixture_matches_issue():
    """15 houses (10 consumers, 5 with 4-6 kWp and a 7 kWh battery), a year of 30-min slots,
    households with realistic day-to-day variability (same-slot-yesterday error 0.6-1.0 of mean)."""
    c = load_community(FIXTURE_DIR)
    assert len(c.houses) == 15 and c.slot_seconds == 1800 and c.days == 365
    pv_houses = [h for h in c.houses.values() if h.has_pv]
    assert len(pv_houses) == 5
    assert all(4.0 <= h.pv_kwp <= 6.0 and h.battery_wh == 7000 for h in pv_houses)
    assert all(h.battery_wh == 0 and h.pv_kwp == 0 for h in c.houses.values() if not h.has_pv)
    for name in c.houses:
        load = c.load_wh[name]
        mean = sum(load) / len(load)
        ssy = sum(abs(a - b) for a, b in zip(load[48:], load)) / (len(load) - 48)
        assert 0.6 <= ssy / mean <= 1.05, (name, ssy / mean)
    for h in pv_houses:
        kwh_per_kwp = sum(c.pv_wh[h.name]) / 1000 / h.pv_kwp
        assert 750 <= kwh_per_kwp <= 1100  # central Europe's typical yield


@pytest.mark.parametrize("houses,slots,needle", [
    (HOUSES, "slot,house,load_wh,pv_wh\n", "header must be slot_start,house,load_wh,pv_wh"),
    (HOUSES, SLOTS + "7200,a,1\n", "slots.csv:10: expected 4 fields"),
    (HOUSES, SLOTS + "7200,a,x,0\n", "load_wh must be an integer, found 'x'"),
    (HOUSES, SLOTS + "7200,a,1.5,0\n", "load_wh must be an integer, found '1.5'"),
    (HOUSES, SLOTS + "7200,a,-1,0\n", "load_wh must be 0.."),
    (HOUSES, SLOTS + "7200,zz,1,0\n", "house 'zz' has no [house.zz] table"),
    (HOUSES, SLOTS + "0,a,1,0\n", "second row for house 'a' at slot_start 0"),
    (HOUSES, SLOTS + "7200,b,1,5\n", "pv_wh 5 for house 'b' whose pv_kwp is 0"),
    (HOUSES, SLOTS + "9000,a,1,0\n9000,b,1,0\n", "evenly spaced by 1800 s: gap from 5400 to 9000"),
    (HOUSES, SLOTS + "7200,a,1,0\n", "house 'b' has 4 of 5 slots (first missing: 7200)"),
    (HOUSES.replace("battery_wh = 7000", "battery_wh = 7000.5"), SLOTS, "battery_wh must be an integer >= 0"),
    (HOUSES.replace("router_power_w = 4000\n\n[house.b]", "\n[house.b]"), SLOTS, "missing key(s) ['router_power_w']"),
    (HOUSES + "colour = 1\n", SLOTS, "unknown key(s) ['colour']"),
    (HOUSES.replace("battery_power_w = 3000", "battery_power_w = 0"), SLOTS, "both 0 (no battery) or both positive"),
    ("[house.a\n", SLOTS, "not valid TOML"),
    ("title = 'x'\n", SLOTS, "unknown top-level key(s) ['title']"),
])
def test_broken_directories_are_refused_clearly(tmp_path, houses, slots, needle):
    with pytest.raises(CommunityError) as err:
        load_community(write(tmp_path, houses, slots))
    assert needle in str(err.value)


def test_missing_files_and_directory(tmp_path):
    with pytest.raises(CommunityError, match="not a directory"):
        load_community(tmp_path / "nope")
    with pytest.raises(CommunityError, match="houses.toml: missing"):
        load_community(tmp_path)
    (tmp_path / "houses.toml").write_text(HOUSES)
    with pytest.raises(CommunityError, match="slots.csv: missing"):
        load_community(tmp_path)


def test_slot_length_must_divide_a_day(tmp_path):
    slots = "slot_start,house,load_wh,pv_wh\n" + "".join(f"{7000 * i},{h},1,0\n" for i in range(3) for h in "ab")
    with pytest.raises(CommunityError, match="must divide a day"):
        load_community(write(tmp_path, slots=slots))
