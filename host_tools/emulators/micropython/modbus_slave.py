# Modbus RTU slave, in MicroPython: framing by silence, CRC-16/MODBUS, function codes 3 and 4.
#
# Written from the Modbus specifications (application protocol v1.1b3, serial line v1.02), not
# from pymodbus: the bench proves the DGC's meter driver against an independent implementation.
#
# * Frames end at a silence of 3.5 character times (rtu_gap_us). A frame whose CRC does not
#   match is dropped without an answer, as is any request to a unit id this bus does not have
#   and any broadcast (unit 0: reads are never broadcast).
# * Function codes 3 (holding) and 4 (input registers): 1..125 registers, else exception 3.
#   A function code the unit's register map does not use: exception 1 (illegal function).
#   Registers outside the span the map covers: exception 2 (illegal data address).
#   A unit that cannot produce a value: exception 4 (device failure).
# * Every request is reported to a trace callback (unit, function, address, count, outcome)
#   before its answer is written, so a host that counts trace lines is never behind the line.

from board_io import rtu_gap_us, ticks_us, ticks_diff

MAX_ADU = 256  # the largest RTU frame; anything longer is noise


def _make_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_table()


def crc16(data):
    """CRC-16/MODBUS: reflected polynomial 0xA001, init 0xFFFF; sent low byte first."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def with_crc(body):
    crc = crc16(body)
    return bytes(body) + bytes((crc & 0xFF, crc >> 8))


def exception_frame(unit, function_code, code):
    return with_crc(bytes((unit, (function_code | 0x80) & 0xFF, code)))


class RtuSlave:
    """One RS-485 bus: ``units`` maps unit id -> an object with
    ``read(function_code, address, count, now_ms) -> list of words | exception code (int)``.

    ``trace(kind, unit, function_code, address, count, outcome)`` sees every frame: kind
    "req" (outcome "ans", "exc<N>" or "silent") or "bad" (CRC or length; unit etc. are None).
    """

    def __init__(self, port, baudrate, units, trace=None, clock=None):
        self.port = port
        self.units = units
        self.gap_us = rtu_gap_us(baudrate)
        self.trace = trace
        self.clock = clock
        self._rx = bytearray()
        self._last_rx = 0
        self._buf = bytearray(MAX_ADU)
        self._overrun = False
        self.frames = 0
        self.bad_frames = 0

    # --- called by the loop -------------------------------------------------------------

    def on_readable(self):
        n = self.port.readinto(self._buf)
        if not n:
            return
        now = ticks_us()
        if self._rx and ticks_diff(now, self._last_rx) >= self.gap_us:
            # The previous frame's silence passed while the loop was busy: it ends here.
            self._end_frame()
        self._last_rx = now
        if len(self._rx) + n > MAX_ADU:
            self._overrun = True
            self._rx = bytearray()
            return
        self._rx.extend(memoryview(self._buf)[:n])

    def timeout_ms(self):
        """How long the loop may sleep before this bus needs it (None: until bytes arrive)."""
        if not self._rx and not self._overrun:
            return None
        left = self.gap_us - ticks_diff(ticks_us(), self._last_rx)
        return 0 if left <= 0 else (left + 999) // 1000

    def service(self):
        if (self._rx or self._overrun) and ticks_diff(ticks_us(), self._last_rx) >= self.gap_us:
            self._end_frame()

    # --- one frame ------------------------------------------------------------------------

    def _end_frame(self):
        frame, self._rx = bytes(self._rx), bytearray()
        if self._overrun:
            self._overrun = False
            self._bad(len(frame))
            return
        answer = self.handle(frame)
        if answer:
            self.port.write(answer)

    def _bad(self, length):
        self.bad_frames += 1
        if self.trace:
            self.trace("bad", None, None, None, length, "dropped")

    def handle(self, frame):
        """One complete frame -> the answer bytes, or None for silence."""
        if len(frame) < 4 or crc16(frame[:-2]) != frame[-2] | (frame[-1] << 8):
            self._bad(len(frame))
            return None
        self.frames += 1
        unit, fc = frame[0], frame[1]
        address = count = None
        if fc in (3, 4) and len(frame) == 8:
            address = (frame[2] << 8) | frame[3]
            count = (frame[4] << 8) | frame[5]
        target = self.units.get(unit)
        if unit == 0 or target is None:
            self._trace(unit, fc, address, count, "silent")
            return None
        if fc not in (3, 4):
            return self._exception(unit, fc, address, count, 1)
        if address is None or not 1 <= count <= 125 or address + count > 0x10000:
            return self._exception(unit, fc, address, count, 3)
        try:
            result = target.read(fc, address, count, self.clock() if self.clock else 0)
        except Exception as exc:  # a bug in a unit's model must not take the bus down
            print("#meter unit %d: internal error %r: answering device failure" % (unit, exc))
            result = 4
        if isinstance(result, int):
            return self._exception(unit, fc, address, count, result)
        body = bytearray(3 + 2 * count)
        body[0], body[1], body[2] = unit, fc, 2 * count
        i = 3
        for word in result:
            body[i] = (word >> 8) & 0xFF
            body[i + 1] = word & 0xFF
            i += 2
        self._trace(unit, fc, address, count, "ans")
        return with_crc(body)

    def _exception(self, unit, fc, address, count, code):
        self._trace(unit, fc, address, count, "exc%d" % code)
        return exception_frame(unit, fc, code)

    def _trace(self, unit, fc, address, count, outcome):
        if self.trace:
            self.trace("req", unit, fc, address, count, outcome)
