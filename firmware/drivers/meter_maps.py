"""Meter register maps declared as data (the way OpenEMS and Victron's Modbus client do it).

Each quantity is one typed register: where it is, how it is encoded, and the integer scale
that turns it into the firmware's integer unit (Wh, W, mV, mHz). The driver merges a map into
as few block reads as its request limit allows; adding a meter model means adding a table here,
not writing code.

Eastron documents input registers as 3xxxx numbers: 30073 is address 0x0048 on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

DATA_TYPES = {"float32": 2, "int32": 2, "uint32": 2, "int16": 1, "uint16": 1}  # words per value
FUNCTION_CODES = (3, 4)  # holding, input


@dataclass(frozen=True)
class Register:
    quantity: str  # the firmware's name, with its unit: import_energy_wh, power_w, ...
    address: int  # wire address (0-based)
    data_type: str  # one of DATA_TYPES
    scale: int  # multiply the decoded value by this to get the quantity's integer unit
    function_code: int = 4
    word_order: str = "big"  # "big": high word first (Eastron)

    @property
    def words(self) -> int:
        return DATA_TYPES[self.data_type]


@dataclass(frozen=True)
class MeterMap:
    model: str
    registers: tuple[Register, ...]
    max_registers_per_request: int = 80  # keep requests within what these meters answer reliably


def _eastron(model: str, power_address: int) -> MeterMap:
    return MeterMap(
        model=model,
        registers=(
            Register("voltage_mv", 0x0000, "float32", 1000),
            Register("power_w", power_address, "float32", 1),
            Register("frequency_mhz", 0x0046, "float32", 1000),
            Register("import_energy_wh", 0x0048, "float32", 1000),
            Register("export_energy_wh", 0x004A, "float32", 1000),
        ),
    )


METER_MAPS: dict[str, MeterMap] = {
    "sdm120": _eastron("sdm120", 0x000C),
    "sdm630": _eastron("sdm630", 0x0034),
}
