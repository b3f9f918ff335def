# Board I/O for the bench emulators, in MicroPython (RP2040 boards and the Unix port).
#
# One small API over two worlds, so the protocol code above it is the same bytes on both:
#
# * on an RP2040 (sys.platform == "rp2"): a hardware UART, and for RS-485 a driver-enable
#   pin (DE and /RE of the transceiver tied together) raised only while the board transmits;
# * under the MicroPython Unix port (CI): a tty path, normally the emulator end of a
#   VirtualSerialLine (a socat pty pair), opened with open() and set raw with termios.
#
# Also here: the wall clock in epoch milliseconds (the DGR judges end_at by it), the console
# (sys.stdin/stdout: USB CDC on a board, pipes under the Unix port) that carries the bench's
# control commands and trace lines, and the RS-485 timing arithmetic.
#
# Why no asyncio: the boards run one select.poll() loop with explicit deadlines. Modbus RTU
# framing is defined by silences of 3.5 character times (1.75 ms at 115200 baud); a poll loop
# with computed timeouts states that directly and behaves the same on both ports.

import sys
import time
import select

RP2 = sys.platform == "rp2"

# Embedded ports of old used the 2000 epoch; the protocol speaks UTC epoch seconds since 1970.
_EPOCH_OFFSET_MS = 946684800000 if time.gmtime(0)[0] == 2000 else 0

try:
    _time_ns = time.time_ns
except AttributeError:  # a port without time_ns: whole seconds only
    _time_ns = None


def now_ms():
    """UTC epoch milliseconds (set the RP2040's clock with `mpremote rtc --set`)."""
    if _time_ns is not None:
        return _time_ns() // 1000000 + _EPOCH_OFFSET_MS
    return int(time.time()) * 1000 + _EPOCH_OFFSET_MS


ticks_us = time.ticks_us
ticks_diff = time.ticks_diff


class MonotonicMs:
    """Milliseconds since boot that never wrap (ticks_ms wraps after 2**30 ms on most ports):
    each call adds the ticks elapsed since the previous one. The loop calls it at least once a
    second, far inside ticks_diff's half-period."""

    def __init__(self):
        self._last = time.ticks_ms()
        self._total = 0

    def __call__(self):
        t = time.ticks_ms()
        self._total += ticks_diff(t, self._last)
        self._last = t
        return self._total


def char_time_us(baudrate, bits_per_char=11):
    """One character on the line. Modbus counts 11 bits (start, 8 data, parity or a second
    stop bit, stop) whatever the actual format, so its silences are conservative."""
    return (bits_per_char * 1000000 + baudrate - 1) // baudrate


def rtu_gap_us(baudrate):
    """The 3.5-character silence that ends a Modbus RTU frame; fixed at 1750 us above
    19200 baud, as the Modbus serial line specification prescribes."""
    if baudrate > 19200:
        return 1750
    return (char_time_us(baudrate) * 7 + 1) // 2


class PortError(Exception):
    pass


class TtyPort:
    """A tty path under the Unix port: raw, 8 bits, reads and writes that never stall the loop.

    Reads: termios VMIN=0/VTIME=0 makes read() return what is there (possibly nothing),
    because MicroPython's FileIO.readinto() keeps reading until its buffer is full otherwise.
    The loop reads only after poll() reported the port readable.

    Writes: MicroPython cannot set O_NONBLOCK, so output is queued and written in small chunks
    only while poll() reports the tty writable. A peer that never reads (nobody on the device
    end of a virtual line) then cannot freeze the board; beyond MAX_PENDING bytes, output is
    dropped, like a UART whose TX buffer overflowed.
    """

    MAX_PENDING = 65536
    CHUNK = 256

    def __init__(self, path, baudrate):
        self.path = path
        self.baudrate = baudrate
        self._file = None
        self._out = bytearray()
        self._wpoll = None
        self.dropped_bytes = 0

    def open(self):
        import termios

        try:
            f = open(self.path, "r+b")
        except OSError as exc:
            raise PortError("cannot open %s: %s" % (self.path, exc))
        try:
            fd = f.fileno()
            termios.setraw(fd)
            attrs = termios.tcgetattr(fd)
            cc = attrs[6]
            cc[6] = 0  # VMIN (Linux index)
            cc[5] = 0  # VTIME
            speed = getattr(termios, "B%d" % self.baudrate, None)
            if speed is not None:
                attrs[4] = attrs[5] = speed
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except Exception as exc:
            f.close()
            raise PortError("cannot configure %s: %s" % (self.path, exc))
        self._file = f
        self._out = bytearray()
        self._wpoll = select.poll()
        self._wpoll.register(f, select.POLLOUT)
        return self

    @property
    def pollable(self):
        return self._file

    @property
    def pending(self):
        return len(self._out) > 0

    def readinto(self, buf):
        n = self._file.readinto(buf)
        return n or 0

    def write(self, data):
        if len(self._out) + len(data) > self.MAX_PENDING:
            self.dropped_bytes += len(data)
            return
        self._out.extend(data)
        self.flush()

    def flush(self):
        out = self._out
        while out:
            ready = self._wpoll.poll(0)
            if not ready or not ready[0][1] & select.POLLOUT:
                return
            n = self._file.write(out[:self.CHUNK])
            if not n:
                return
            out = out[n:]
            self._out = out

    def close(self):
        f, self._file = self._file, None
        self._out = bytearray()
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def describe(self):
        return "tty %s at %d baud" % (self.path, self.baudrate)


class UartPort:
    """An RP2040 hardware UART, optionally driving an RS-485 transceiver's DE/RE pin.

    With a DE pin the write is half duplex: raise DE, send, wait until the last stop bit has
    left the shift register (txdone), drop DE. Bytes received meanwhile are the transceiver's
    echo (if /RE is not tied to DE) and are discarded, so the board never parses its own answer.
    """

    _PARITY = {"N": None, "E": 0, "O": 1}

    def __init__(self, uart_id, baudrate, tx, rx, de=None, bits=8, parity="N", stop=1,
                 de_active_high=True, rxbuf=1024, txbuf=1024):
        self.uart_id = uart_id
        self.baudrate = baudrate
        self.tx, self.rx, self.de = tx, rx, de
        self.bits, self.parity, self.stop = bits, parity, stop
        self.de_active_high = de_active_high
        self.rxbuf, self.txbuf = rxbuf, txbuf
        self._uart = None
        self._de = None

    def open(self):
        from machine import Pin, UART

        if self.parity not in self._PARITY:
            raise PortError("parity must be N, E or O, found %r" % (self.parity,))
        if self.de is not None:
            self._de = Pin(self.de, Pin.OUT, value=0 if self.de_active_high else 1)
        self._uart = UART(self.uart_id, baudrate=self.baudrate, bits=self.bits,
                          parity=self._PARITY[self.parity], stop=self.stop,
                          tx=Pin(self.tx), rx=Pin(self.rx), rxbuf=self.rxbuf, txbuf=self.txbuf,
                          timeout=0, timeout_char=0)
        return self

    @property
    def pollable(self):
        return self._uart

    pending = False  # UART.write() hands everything to the TX buffer at once

    def flush(self):
        pass

    def readinto(self, buf):
        n = self._uart.readinto(buf)
        return n or 0

    def _write_all(self, data):
        # With timeout=0 an rp2 UART takes what fits in its TX buffer and returns the count.
        uart = self._uart
        mv = memoryview(data)
        deadline = time.ticks_add(ticks_us(), (len(data) + 4) * char_time_us(self.baudrate) + 100000)
        while len(mv):
            n = uart.write(mv) or 0
            mv = mv[n:]
            if len(mv) and ticks_diff(deadline, ticks_us()) <= 0:
                raise PortError("UART%d: %d bytes not sent in time" % (self.uart_id, len(mv)))

    def write(self, data):
        uart = self._uart
        if self._de is None:
            self._write_all(data)
            return
        self._de.value(1 if self.de_active_high else 0)
        try:
            self._write_all(data)
            char_us = char_time_us(self.baudrate)
            deadline = time.ticks_add(ticks_us(), (len(data) + 4) * char_us + 2000)
            txdone = getattr(uart, "txdone", None)
            if txdone is not None:
                while not txdone() and ticks_diff(deadline, ticks_us()) > 0:
                    pass
                time.sleep_us(char_us)  # margin: the last stop bit on the wire
            else:
                time.sleep_us(len(data) * char_us + char_us)
        finally:
            self._de.value(0 if self.de_active_high else 1)
        while uart.any():  # echo of our own answer (transceiver /RE not tied to DE)
            uart.read()

    def close(self):
        uart, self._uart = self._uart, None
        if uart is not None:
            try:
                uart.deinit()
            except Exception:
                pass

    def describe(self):
        text = "UART%d tx=GP%d rx=GP%d at %d baud" % (self.uart_id, self.tx, self.rx, self.baudrate)
        if self.de is not None:
            text += ", RS-485 DE/RE on GP%d" % self.de
        return text


def make_port(cfg):
    """A port from a service's config: {"port": path} under the Unix port, {"uart": {...}} on
    a board. Both name the baud rate and the character format."""
    baudrate = cfg.get("baudrate", 9600)
    if not RP2:
        path = cfg.get("port")
        if not path:
            raise PortError("under the Unix port a service needs \"port\": a tty path")
        return TtyPort(path, baudrate)
    u = cfg.get("uart")
    if not u:
        raise PortError("on a board a service needs \"uart\": {\"id\", \"tx\", \"rx\"[, \"de\"]}")
    return UartPort(u.get("id", 0), baudrate, u.get("tx", 0), u.get("rx", 1), de=u.get("de"),
                    bits=cfg.get("bytesize", 8), parity=cfg.get("parity", "N"),
                    stop=cfg.get("stopbits", 1), de_active_high=u.get("de_active_high", True))


class Console:
    """Control lines in (sys.stdin), trace and answers out (print).

    Under the Unix port the host writes whole lines into a pipe, so readline() after poll()
    cannot block. On a board the console is USB CDC where a human may type slowly: characters
    are taken one at a time while poll() says one is there, and a line is handed on at its end.
    """

    def __init__(self):
        self.stream = sys.stdin
        self._partial = []
        self._poll = select.poll()
        self._poll.register(sys.stdin, select.POLLIN)
        self.closed = False

    @property
    def pollable(self):
        return self.stream

    def read_lines(self):
        if self.closed:
            return []
        if not RP2:
            line = sys.stdin.readline()
            if not line:
                self.closed = True
                return []
            return [line.strip()]
        lines = []
        for _ in range(4096):
            if not self._poll.poll(0):
                break
            c = sys.stdin.read(1)
            if not c:
                break
            if c in "\r\n":
                if self._partial:
                    lines.append("".join(self._partial).strip())
                    self._partial = []
            elif len(self._partial) < 16384:
                self._partial.append(c)
        return lines


def say(text):
    print(text)
