# Emulated energy meters behind the Modbus RTU slave, in MicroPython.
#
# Register tables come from meter_tables, generated at build time from the firmware's own
# firmware/drivers/meter_maps.py (host_tools/emulators/mpy_build.py), so the board encodes
# exactly what the driver decodes: addresses, types, scales and word order.
#
# The value model is deliberately simple and documented (docs/bench-boards.md):
#
# * each unit starts from fixed values in the firmware's units: import_energy_wh,
#   export_energy_wh, power_w (positive = the house draws from the line), voltage_mv,
#   frequency_mhz;
# * with "integrate": true the counters run at the power: import_energy_wh rises at power_w
#   while power_w > 0, export_energy_wh at -power_w while it is negative, measured from the
#   moment the values were last set (boot, or a console `set`);
# * the console can set any quantity (`meter set 1 power_w=-500 voltage_mv=nan`) or remove
#   one (`meter remove 1 frequency_mhz`: the unit then answers exception 4, device failure).

import struct

from meter_tables import MODELS, QUANTITIES

_WORDS = {"float32": 2, "int32": 2, "uint32": 2, "int16": 1, "uint16": 1}
_CODES = {"float32": "f", "int32": "i", "uint32": "I", "int16": "h", "uint16": "H"}


def _round_half_away(value):
    if value >= 0:
        return int(value + 0.5)
    return -int(-value + 0.5)


def encode_register(data_type, word_order, value):
    """A value as the meter encodes it -> its registers (16-bit words)."""
    code = _CODES[data_type]
    if code != "f":
        value = _round_half_away(value)
    data = struct.pack(">" + code, value)
    words = [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]
    if word_order == "little":
        words.reverse()
    return words


class MeterUnit:
    def __init__(self, unit_id, model, values, integrate=False, clock=None):
        if model not in MODELS:
            raise ValueError("unit %d: meter model %r: expected one of %s"
                             % (unit_id, model, ", ".join(sorted(MODELS))))
        self.unit_id = unit_id
        self.model = model
        self.table = MODELS[model]
        self.function_codes = set(r[4] for r in self.table)
        self.first = min(r[1] for r in self.table)
        self.end = max(r[1] + _WORDS[r[2]] for r in self.table)
        self.integrate = bool(integrate)
        self._clock = clock
        self.values = {}
        for key in values:
            self._check_quantity(key)
            self.values[key] = float(values[key])
        self._origin_ms = clock() if clock else 0

    @staticmethod
    def _check_quantity(key):
        if key not in QUANTITIES:
            raise ValueError("quantity %r: expected one of %s" % (key, ", ".join(QUANTITIES)))

    # --- the model ------------------------------------------------------------------------

    def current(self, now_ms):
        """Quantities now (floats in the firmware's units); a removed one is absent."""
        values = dict(self.values)
        power = values.get("power_w")
        if self.integrate and power is not None and power == power:  # not NaN
            elapsed_ms = now_ms - self._origin_ms
            if elapsed_ms > 0:
                key = "import_energy_wh" if power > 0 else "export_energy_wh"
                if key in values:
                    values[key] = values[key] + abs(power) * elapsed_ms / 3600000.0
        return values

    def set(self, updates, now_ms):
        for key in updates:
            self._check_quantity(key)
        # Counters keep what they accumulated; the new power applies from now on.
        self.values = self.current(now_ms)
        self._origin_ms = now_ms
        for key in updates:
            self.values[key] = float(updates[key])

    def remove(self, key, now_ms):
        self._check_quantity(key)
        self.values = self.current(now_ms)
        self._origin_ms = now_ms
        self.values.pop(key, None)

    # --- what the Modbus slave asks -------------------------------------------------------

    def read(self, function_code, address, count, now_ms):
        if function_code not in self.function_codes:
            return 1
        if address < self.first or address + count > self.end:
            return 2
        values = self.current(now_ms)
        words = [0] * count  # gap registers read 0, as on an Eastron meter
        for quantity, reg_address, data_type, scale, fc, word_order, divisor in self.table:
            if fc != function_code:
                continue
            n = _WORDS[data_type]
            if reg_address + n <= address or reg_address >= address + count:
                continue
            if quantity not in values:
                return 4
            try:
                encoded = encode_register(data_type, word_order, values[quantity] * divisor / scale)
            except (ArithmeticError, ValueError, OverflowError):
                return 4
            for i in range(n):
                at = reg_address + i - address
                if 0 <= at < count:
                    words[at] = encoded[i]
        return words

    def describe(self):
        return "unit %d %s%s" % (self.unit_id, self.model, " (integrating)" if self.integrate else "")


# What a unit reads when its config leaves a quantity out: a quiet house on a 230 V, 50 Hz grid.
DEFAULT_VALUES = {
    "import_energy_wh": 0.0, "export_energy_wh": 0.0, "power_w": 0.0,
    "voltage_mv": 230000.0, "frequency_mhz": 50000.0,
}


def build_units(units_cfg, clock):
    """[{"unit_id": 1, "model": "sdm630", "integrate": true, "values": {...}}, ...] -> {id: MeterUnit}."""
    units = {}
    for u in units_cfg:
        unit_id = int(u["unit_id"])
        if not 1 <= unit_id <= 247:
            raise ValueError("unit id must be 1..247, found %d" % unit_id)
        if unit_id in units:
            raise ValueError("unit id %d given twice" % unit_id)
        values = dict(DEFAULT_VALUES)
        values.update(u.get("values", {}))
        units[unit_id] = MeterUnit(unit_id, u["model"], values, u.get("integrate", False), clock)
    if not units:
        raise ValueError("a meter bus needs at least one unit")
    return units


def _parse_number(text):
    return float(text)  # accepts nan and inf: a faulty meter's registers


def command(units, words, now_ms):
    """One console command after the leading "meter"; returns the answer text.

    set <unit> <quantity>=<value> ...   (values in the firmware's units; nan/inf allowed)
    remove <unit> <quantity>            (the unit then answers exception 4)
    show <unit>                         (the quantities now, as JSON)
    """
    import json

    if len(words) < 2:
        raise ValueError("usage: meter set|remove|show <unit> ...")
    cmd, unit_id = words[0], int(words[1])
    unit = units.get(unit_id)
    if unit is None:
        raise ValueError("no unit %d on this bus" % unit_id)
    if cmd == "set":
        updates = {}
        for token in words[2:]:
            key, eq, value = token.partition("=")
            if not eq:
                raise ValueError("expected quantity=value, found %r" % (token,))
            updates[key] = _parse_number(value)
        unit.set(updates, now_ms)
        return "ok"
    if cmd == "remove":
        if len(words) != 3:
            raise ValueError("usage: meter remove <unit> <quantity>")
        unit.remove(words[2], now_ms)
        return "ok"
    if cmd == "show":
        values = unit.current(now_ms)
        return json.dumps(dict((k, repr(v)) for k, v in values.items()))
    raise ValueError("unknown meter command %r: expected set, remove or show" % (cmd,))
