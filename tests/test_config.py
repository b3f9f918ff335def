"""Board config: shipped configs load, defaults are the primary source's, every error names file, table and key."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from firmware import config as config_module
from firmware.config import (
    TOP_LEVEL_TABLES,
    BoardConfig,
    BoardSection,
    BusConfig,
    CadenceConfig,
    ConfigError,
    ConsoleConfig,
    DgrConfig,
    ForecastConfig,
    LedgerConfig,
    MeterConfig,
    PolicyConfig,
    load_config,
    parse_config,
)
from firmware.market import MarketRules

REPO = Path(__file__).resolve().parents[1]
BOARD_CONFIGS = REPO / "board_configs"
DOC = REPO / "docs" / "board-config.md"

# The smallest valid config: only what has no default.
MINIMAL = """\
[board]
name = "test-board"

[ledger]
url = "http://127.0.0.1:8750"
ledger_id = "dgc-test"

[[bus]]
name = "rs485"
port = "ports/meter-bus"
baudrate = 9600

[[meter]]
name = "house"
bus = "rs485"
unit_id = 1
model = "sdm630"
role = "house"

[[meter]]
name = "interchange"
bus = "rs485"
unit_id = 2
model = "sdm120"
role = "interchange"

[dgr]
port = "ports/dgr"
"""


def write(tmp_path: Path, text: str, name: str = "board.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- shipped configs --------------------------------------------------------------------------


def test_sim_config_loads():
    cfg = load_config(BOARD_CONFIGS / "sim.toml")
    assert isinstance(cfg, BoardConfig)
    assert cfg.board.name == "sim-house-1" and cfg.board.kind == "sim"
    assert cfg.market == MarketRules(slot_seconds=30, markets_ahead=8, lot_wh=100, gate_closure_seconds=10,
                                     price_min_per_kwh_minor=1000, price_max_per_kwh_minor=4000)
    assert cfg.cadence.measure_seconds == 2 and cfg.cadence.bid_seconds == 30
    assert cfg.ledger.verify_tls is True  # the default, not set in the file
    # relative paths resolve against board_configs/, whatever the working directory
    assert cfg.board.state_dir == REPO / "var" / "sim" / "sim-house-1"
    assert cfg.board.key_file == REPO / "var" / "sim" / "sim-house-1" / "device.key"
    assert cfg.journal_path == REPO / "var" / "sim" / "sim-house-1" / "journal.sqlite3"
    assert cfg.bus("rs485").port == str(REPO / "var" / "sim" / "sim-house-1" / "meter-bus")
    assert cfg.dgr.port == str(REPO / "var" / "sim" / "sim-house-1" / "dgr")
    assert cfg.meter_by_role("interchange").model == "sdm120"
    assert cfg.meter_by_role("house").unit_id == 1
    assert cfg.sim["pv_peak_w"] == 3000


def test_rpi4_config_loads():
    cfg = load_config(BOARD_CONFIGS / "rpi4-sdm630.toml")
    assert cfg.board.kind == "rpi4-sdm630"
    assert cfg.board.key_file == Path("/var/lib/dgc/device.key")  # absolute paths are kept
    assert cfg.dgr.port == "/dev/ttyAMA0"
    assert cfg.bus("rs485").port.startswith("/dev/serial/by-id/")
    assert cfg.ledger.url.startswith("https://") and cfg.ledger.verify_tls is True
    assert cfg.market.slot_seconds == 1800 and cfg.market.markets_ahead == 48
    assert cfg.policy.battery_capacity_wh == 9800
    assert cfg.sim == {}


def test_config_objects_are_frozen():
    cfg = load_config(BOARD_CONFIGS / "sim.toml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.market.slot_seconds = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.board.key_file = Path("/tmp/x")  # type: ignore[misc]


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_are_the_primary_sources_when_market_and_cadence_are_omitted(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    m, c = cfg.market, cfg.cadence
    assert (m.slot_seconds, m.markets_ahead, m.lot_wh, m.gate_closure_seconds) == (1800, 48, 100, 900)
    assert (c.measure_seconds, c.bid_seconds, c.review_seconds, c.poll_trades_seconds) == (60, 1800, 300, 60)
    assert m == MarketRules()
    assert c == CadenceConfig()
    assert cfg.policy == PolicyConfig() and cfg.forecast == ForecastConfig()
    assert (cfg.ledger.timeout_ms, cfg.ledger.retries, cfg.ledger.verify_tls, cfg.ledger.message_ttl_seconds) == (5000, 3, True, 600)
    assert (cfg.buses[0].parity, cfg.buses[0].stopbits, cfg.buses[0].bytesize) == ("N", 1, 8)
    assert cfg.dgr.baudrate == 115200 and cfg.board.kind == "sim"
    # default paths resolve against the config's directory too
    assert cfg.board.state_dir == tmp_path / "var" / "state"
    assert cfg.board.key_file == tmp_path / "var" / "state" / "device.key"
    assert cfg.sim == {}


def test_partial_tables_keep_the_other_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "\n[market]\nslot_seconds = 60\n\n[cadence]\nbid_seconds = 60\n"))
    assert cfg.market == MarketRules(slot_seconds=60)
    assert cfg.cadence == CadenceConfig(bid_seconds=60)


# --- broken configs ---------------------------------------------------------------------------


def replace(old: str, new: str):
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)
    return edit


def append(extra: str):
    return lambda text: text + "\n" + extra + "\n"


def drop_table(header: str):
    def edit(text: str) -> str:
        start = text.index(header)
        end = text.find("\n[", start + 1)
        return text[:start] + (text[end + 1:] if end != -1 else "")
    return edit


BROKEN = [
    # (id, edit of MINIMAL, table, key, a fragment of "expected ..., found ...")
    ("int as string", append('[cadence]\nmeasure_seconds = "60"'), "cadence", "measure_seconds", "found '60'"),
    ("int as float", append("[market]\nslot_seconds = 1800.0"), "market", "slot_seconds", "found 1800.0"),
    ("bool as int", replace('ledger_id = "dgc-test"', 'ledger_id = "dgc-test"\nverify_tls = 1'),
     "ledger", "verify_tls", "expected true or false"),
    ("int as bool", append("[policy]\nmax_order_wh = true"), "policy", "max_order_wh", "found True"),
    ("path as int", replace('name = "test-board"', 'name = "test-board"\nkey_file = 5'), "board", "key_file", "a path string"),
    ("negative", replace('ledger_id = "dgc-test"', 'ledger_id = "dgc-test"\ntimeout_ms = -1'),
     "ledger", "timeout_ms", "expected a positive integer"),
    ("out of range", append("[policy]\nbattery_reserve_percent = 101"), "policy", "battery_reserve_percent", "from 0 to 100"),
    ("markets_ahead 0", append("[market]\nmarkets_ahead = 0"), "market", "markets_ahead", "from 1 to 96"),
    ("unknown key", replace('name = "test-board"', 'name = "test-board"\ncolour = "red"'), "board", "colour", "unknown key 'colour'"),
    ("misspelt key", append("[cadence]\nmeasure_secs = 60"), "cadence", "measure_secs", "one of the keys"),
    ("unknown market key", append("[market]\nslot_minutes = 30"), "market", "slot_minutes", "unknown key"),
    ("unknown meter key", replace("role = \"house\"", "role = \"house\"\nphase = 3"), "meter.0", "phase", "unknown key"),
    ("unknown table", append("[extras]\na = 1"), "extras", "", "unknown table [extras]"),
    ("missing url", replace('url = "http://127.0.0.1:8750"\n', ""), "ledger", "url", "found nothing"),
    ("bad url", replace("http://127.0.0.1:8750", "ftp://127.0.0.1"), "ledger", "url", "http:// or https://"),
    ("ledger_id control char", replace('"dgc-test"', '"dgc\\ttest"'), "ledger", "ledger_id", "printable ASCII"),
    ("ledger_id too long", replace('"dgc-test"', '"' + "x" * 129 + '"'), "ledger", "ledger_id", "1 to 128"),
    ("ledger_id non-ascii", replace('"dgc-test"', '"dgc-tést"'), "ledger", "ledger_id", "printable ASCII"),
    ("missing board name", replace('name = "test-board"', 'kind = "sim"'), "board", "name", "found nothing"),
    ("bad board name", replace('"test-board"', '"test board"'), "board", "name", "letters, digits"),
    ("missing ledger table", drop_table("[ledger]"), "ledger", "", "a [ledger] table"),
    ("missing dgr table", drop_table("[dgr]"), "dgr", "", "a [dgr] table"),
    ("missing dgr port", replace('port = "ports/dgr"', 'baudrate = 115200'), "dgr", "port", "found nothing"),
    ("bus as plain table", replace("[[bus]]", "[bus]"), "bus", "", "one or more [[bus]] tables"),
    ("bad baudrate", replace("baudrate = 9600", "baudrate = 9601"), "bus.0", "baudrate", "found 9601"),
    ("bad parity", replace("baudrate = 9600", 'baudrate = 9600\nparity = "X"'), "bus.0", "parity", "one of N, E, O"),
    ("bad meter bus reference", replace('bus = "rs485"\nunit_id = 2', 'bus = "rs232"\nunit_id = 2'), "meter.1", "bus",
     "found 'rs232'"),
    ("duplicate unit id", replace("unit_id = 2", "unit_id = 1"), "meter.1", "unit_id", "not already used on bus 'rs485'"),
    ("unit id 0", replace("unit_id = 1", "unit_id = 0"), "meter.0", "unit_id", "from 1 to 247"),
    ("unit id 248", replace("unit_id = 2", "unit_id = 248"), "meter.1", "unit_id", "from 1 to 247"),
    ("bad model", replace('model = "sdm630"', 'model = "sdm999"'), "meter.0", "model", "one of sdm120, sdm630"),
    ("bad role", replace('role = "house"', 'role = "garage"'), "meter.0", "role", "one of house, interchange, pv"),
    ("duplicate meter name", replace('name = "interchange"', 'name = "house"'), "meter.1", "name", "a meter name used once"),
    ("no interchange meter", replace('role = "interchange"', 'role = "pv"'), "meter", "role",
     "exactly one [[meter]] with role = 'interchange', found '0 such meters'"),
    ("two house meters", replace('role = "interchange"', 'role = "house"'), "meter", "role", "'2 such meters'"),
    ("duplicate bus name", append('[[bus]]\nname = "rs485"\nport = "ports/other"\nbaudrate = 9600'), "bus.0", "name",
     "used by one [[bus]] only"),
    ("duplicate bus port", append('[[bus]]\nname = "second"\nport = "ports/../ports/meter-bus"\nbaudrate = 9600'), "bus.0",
     "port", "a port owned by one [[bus]] only"),
    ("price band inverted", append("[market]\nprice_min_per_kwh_minor = 500\nprice_max_per_kwh_minor = 400"), "market",
     "price_max_per_kwh_minor", "at least price_min_per_kwh_minor (500)"),
    ("gate beyond horizon", append("[market]\nslot_seconds = 60\nmarkets_ahead = 2\ngate_closure_seconds = 120"), "market",
     "gate_closure_seconds", "less than slot_seconds x markets_ahead (120)"),
    ("sim not a table", lambda text: "sim = 5\n" + text, "sim", "", "expected a table"),
    ("ledger not a table", lambda text: "ledger = \"x\"\n" + drop_table("[ledger]")(text), "ledger", "", "a table, found 'x'"),
    ("invalid TOML", append("[policy]\nmax_order_wh = = 5"), "toml", "", "(at line"),
    ("duplicate key TOML", replace('name = "test-board"', 'name = "test-board"\nname = "again"'), "toml", "", "valid TOML"),
]


@pytest.mark.parametrize("edit, table, key, fragment", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_config_names_file_table_and_key(tmp_path, edit, table, key, fragment):
    path = write(tmp_path, edit(MINIMAL))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    exc, text = info.value, str(info.value)
    assert (exc.file, exc.table, exc.key) == (str(path), table, key)
    where = f"[{table}] {key}:" if key else f"[{table}]:"
    assert text.startswith(f"{path}: {where} expected "), text
    assert ", found " in text
    assert fragment in text, text
    assert "\n" not in text  # one line


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: [file]: expected an existing board config file (TOML), found 'no such file'"


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: [file]: expected a readable UTF-8 TOML file")):
        load_config(tmp_path)  # a directory
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.replace("test-board", "t\xe9st").encode("latin-1"))
    with pytest.raises(ConfigError, match=r"\[file\]: expected a readable UTF-8 TOML file"):
        load_config(path)


def test_invalid_toml_reports_the_line(tmp_path):
    path = write(tmp_path, MINIMAL + "\n[policy]\nmax_order_wh = = 5\n")
    line = (MINIMAL + "\n[policy]\nmax_order_wh = = 5\n").splitlines().index("max_order_wh = = 5") + 1
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: \[toml\]: expected valid TOML, found .*line {line}"):
        load_config(path)


def test_parse_config_without_a_file_names_a_placeholder():
    with pytest.raises(ConfigError, match=r"^<config>: \[ledger\] url: expected"):
        parse_config(MINIMAL.replace('url = "http://127.0.0.1:8750"\n', ""))


# --- relative paths ---------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory(tmp_path, monkeypatch):
    board_dir = tmp_path / "boards" / "house-7"
    board_dir.mkdir(parents=True)
    text = MINIMAL.replace('name = "test-board"', 'name = "test-board"\nstate_dir = "state"\nkey_file = "../keys/device.key"')
    text = text.replace('port = "ports/dgr"', 'port = "/dev/ttyAMA0"')
    path = write(board_dir, text)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for given in (path, Path("..") / "boards" / "house-7" / "board.toml"):  # absolute and relative to the cwd
        cfg = load_config(given)
        assert cfg.board.state_dir == board_dir / "state"
        assert cfg.board.key_file == tmp_path / "boards" / "keys" / "device.key"  # normalised, no ".."
        assert cfg.journal_path == board_dir / "state" / "journal.sqlite3"
        assert cfg.buses[0].port == str(board_dir / "ports" / "meter-bus")
        assert isinstance(cfg.buses[0].port, str) and isinstance(cfg.board.key_file, Path)
        assert cfg.dgr.port == "/dev/ttyAMA0"  # absolute: untouched
        assert cfg.board.state_dir.is_absolute()


def test_symlinked_ports_are_not_followed(tmp_path):
    (tmp_path / "ports").mkdir()
    (tmp_path / "ports" / "dgr").symlink_to("/dev/null")
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.dgr.port == str(tmp_path / "ports" / "dgr")


# --- the reference doc ------------------------------------------------------------------------

DOC_TABLES = {
    "[board]": BoardSection,
    "[ledger]": LedgerConfig,
    "[market]": MarketRules,
    "[cadence]": CadenceConfig,
    "[policy]": PolicyConfig,
    "[forecast]": ForecastConfig,
    "[[bus]]": BusConfig,
    "[[meter]]": MeterConfig,
    "[dgr]": DgrConfig,
    "[console]": ConsoleConfig,
}


def _doc_sections() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    parts = re.split(r"^### (\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _doc_rows(section: str) -> dict[str, list[str]]:
    rows = {}
    for line in section.splitlines():
        match = re.match(r"^\| `(\w+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split("|")]
    return rows


def test_every_config_key_is_documented_in_its_table_with_its_default():
    sections = _doc_sections()
    assert set(sections) == set(DOC_TABLES) | {"[sim]"}
    assert {name.strip("[]") for name in sections} == set(TOP_LEVEL_TABLES)
    for heading, cls in DOC_TABLES.items():
        rows = _doc_rows(sections[heading])
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
        assert set(rows) == set(fields), heading  # nothing missing, nothing stale
        for name, fld in fields.items():
            documented = rows[name][1]  # columns: type, default, unit, meaning
            if fld.default is dataclasses.MISSING:
                assert documented == "required", (heading, name)
            else:
                literal = re.fullmatch(r"`(.+)`", documented)
                assert literal, (heading, name, documented)
                value = tomllib.loads(f"v = {literal.group(1)}")["v"]
                default = str(fld.default) if isinstance(fld.default, Path) else fld.default
                assert value == default and type(value) is type(default), (heading, name)
            assert rows[name][3], (heading, name)  # a meaning is given


def test_doc_error_example_is_what_the_code_says(tmp_path):
    text = DOC.read_text(encoding="utf-8")
    example = re.search(r"e\.g\. `(board_configs/sim\.toml: [^`]+)`", text).group(1)
    sim = (BOARD_CONFIGS / "sim.toml").read_text()
    broken = sim.replace("timeout_ms = 2000", 'timeout_ms = "5000"', 1)
    with pytest.raises(ConfigError) as info:
        parse_config(broken, "board_configs/sim.toml")
    assert str(info.value) == example


def test_the_doc_lists_the_meter_models_the_code_knows():
    from firmware.drivers.meter_maps import METER_MAPS

    row = _doc_rows(_doc_sections()["[[meter]]"])["model"]
    for model in METER_MAPS:
        assert f"`{model}`" in row[3]
    assert config_module.METER_ROLES == ("house", "interchange", "pv")
