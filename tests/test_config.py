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
     "ledger", "timeout_ms", "expected an integer from 1 to 60000"),
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


# --- every number is bounded; check-config accepts only what `dgc run` can run (issue 7 q) ------

# Where a key of each table goes in MINIMAL (a line after which it may be inserted), or None for a
# table MINIMAL lacks (appended as a new table).
_TABLE_ANCHOR = {
    "ledger": 'ledger_id = "dgc-test"', "dgr": 'port = "ports/dgr"', "bus.0": "baudrate = 9600",
    "meter.0": 'role = "house"', "market": None, "cadence": None, "policy": None, "forecast": None, "console": None,
}
_TABLE_CLASS = {
    "ledger": LedgerConfig, "dgr": DgrConfig, "bus.0": BusConfig, "meter.0": MeterConfig, "cadence": CadenceConfig,
    "policy": PolicyConfig, "forecast": ForecastConfig, "console": ConsoleConfig,
}


def _int_keys() -> list[tuple[str, str]]:
    keys = [(table, f.name) for table, cls in _TABLE_CLASS.items() for f in dataclasses.fields(cls) if f.type == "int"]
    keys += [("market", f.name) for f in dataclasses.fields(MarketRules) if f.type == "int"]
    keys += [("meter.0.register.0", name) for name in _CUSTOM_REGISTERS]
    return keys


# Keys MINIMAL already sets (replaced, not added), and a custom meter for the [[meter.register]] keys.
_EXISTING = {("bus.0", "baudrate"): "baudrate = 9600", ("meter.0", "unit_id"): "unit_id = 1"}
_CUSTOM_REGISTERS = {"address": 72, "function_code": 4, "scale": 1, "scale_divisor": 1}


def _custom_meter(key: str, value: int) -> str:
    registers = ""
    for quantity, address in (("import_energy_wh", 72), ("export_energy_wh", 74)):
        values = dict(_CUSTOM_REGISTERS, address=address)
        if quantity == "import_energy_wh":
            values[key] = value
        registers += (f'\n[[meter.register]]\nquantity = "{quantity}"\ntype = "float32"\nunit = "kWh"\n'
                      + "".join(f"{k} = {v}\n" for k, v in values.items()))
    text = MINIMAL.replace('model = "sdm630"', 'model = "custom"', 1)
    head, tail = text.split('[[meter]]\nname = "interchange"', 1)
    return head + registers.lstrip("\n") + '\n[[meter]]\nname = "interchange"' + tail


def _with_key(table: str, key: str, value: int) -> str:
    if table == "meter.0.register.0":
        return _custom_meter(key, value)
    if (table, key) in _EXISTING:
        return MINIMAL.replace(_EXISTING[table, key], f"{key} = {value}", 1)
    anchor = _TABLE_ANCHOR[table]
    if anchor is None:
        return MINIMAL + f"\n[{table}]\n{key} = {value}\n"
    assert anchor in MINIMAL
    return MINIMAL.replace(anchor, f"{anchor}\n{key} = {value}", 1)


INT_KEYS = _int_keys()


def test_every_integer_key_is_covered():
    assert len(INT_KEYS) >= 35 and ("dgr", "heartbeat_seconds") in INT_KEYS and ("market", "slot_seconds") in INT_KEYS


@pytest.mark.parametrize("value", [10**15, 10**30, -(10**30)])
@pytest.mark.parametrize("table, key", INT_KEYS, ids=[f"{t}.{k}" for t, k in INT_KEYS])
def test_every_integer_key_has_a_finite_range(tmp_path, table, key, value):
    """An integer the daemon cannot use (a timedelta, a socket timeout, a datetime) must fail here,
    with one line naming the key, not as a traceback in `dgc run`."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, _with_key(table, key, value)))
    assert (info.value.table, info.value.key) == (table, key), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("table, key, value, fragment", [
    ("dgr", "heartbeat_seconds", 10**15, "an integer from 1 to 60"),
    ("ledger", "timeout_ms", 10**30, "an integer from 1 to 60000"),
    ("market", "slot_seconds", 10**15, "an integer from 1 to 86400"),
])
def test_the_issues_values_are_refused_naming_the_range(tmp_path, table, key, value, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, _with_key(table, key, value)))
    assert f"[{table}] {key}: expected {fragment}" in str(info.value), str(info.value)


def test_the_largest_accepted_values_build_what_the_daemon_builds(tmp_path):
    """The upper bounds are usable: the objects the daemon makes from them do not overflow."""
    from datetime import datetime, timedelta, timezone

    cfg = load_config(write(tmp_path, MINIMAL))
    bounds = config_module.int_bounds
    slot_max = bounds(MarketRules, "slot_seconds")[1]
    rules = dataclasses.replace(cfg.market, slot_seconds=slot_max, gate_closure_seconds=0)
    datetime.fromtimestamp(rules.next_slot_start(2**33), tz=timezone.utc)  # a year-2242 clock still works
    for cls in (CadenceConfig, DgrConfig):
        for f in dataclasses.fields(cls):
            if f.type == "int":
                timedelta(seconds=bounds(cls, f.name)[1])
    import socket

    with socket.socket() as sock:
        sock.settimeout(bounds(LedgerConfig, "timeout_ms")[1] / 1000)
        sock.settimeout(bounds(BusConfig, "timeout_ms")[1] / 1000)
        sock.settimeout(bounds(DgrConfig, "timeout_ms")[1] / 1000)


def test_the_doc_states_each_integer_keys_range():
    sections = _doc_sections()
    heading_of = {"ledger": "[ledger]", "dgr": "[dgr]", "bus.0": "[[bus]]", "meter.0": "[[meter]]", "market": "[market]",
                  "cadence": "[cadence]", "policy": "[policy]", "forecast": "[forecast]", "console": "[console]"}
    for table, key in INT_KEYS:
        if table == "meter.0.register.0":
            continue  # [[meter.register]] is documented in its own section
        cls = _TABLE_CLASS.get(table, MarketRules)
        bounds = config_module.int_bounds(cls, key)
        if bounds is None:  # a set of values (baud rates): the meaning column lists them
            continue
        documented = _doc_rows(sections[heading_of[table]])[key][0]
        assert documented == f"integer {bounds[0]}..{bounds[1]}", (table, key, documented)


# --- state_dir must be writable (checked by `dgc check-config` and `dgc run`, not by parsing) ---


def test_state_dir_under_proc_is_refused(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL.replace('name = "test-board"', 'name = "test-board"\nstate_dir = "/proc/dgc/state"')))
    with pytest.raises(ConfigError) as info:
        config_module.check_state_dir(cfg)
    assert (info.value.table, info.value.key) == ("board", "state_dir")
    assert "/proc/dgc/state" in str(info.value) and "writable directory" in str(info.value)
    assert not Path("/proc/dgc").exists()


def test_state_dir_below_a_file_is_refused(tmp_path):
    (tmp_path / "blocker").write_text("not a directory")
    cfg = load_config(write(tmp_path, MINIMAL.replace('name = "test-board"', 'name = "test-board"\nstate_dir = "blocker/state"')))
    with pytest.raises(ConfigError, match=r"\[board\] state_dir: expected a writable directory"):
        config_module.check_state_dir(cfg)


def test_a_missing_state_dir_is_fine_and_not_created_by_the_check(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    config_module.check_state_dir(cfg)
    assert not cfg.board.state_dir.exists()  # check-config has no side effects
    config_module.check_state_dir(cfg, create=True)  # what `dgc run` does
    assert cfg.board.state_dir.is_dir()
    assert list(cfg.board.state_dir.iterdir()) == []  # the probe file is gone
