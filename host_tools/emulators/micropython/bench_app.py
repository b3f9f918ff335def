# The bench board application, in MicroPython: one poll loop serving the configured emulators.
#
# A board config (JSON; board.json on the RP2040's flash, a path argument under the Unix port)
# names up to two services, each on its own serial port:
#
#   "meter": a Modbus RTU slave with one or more emulated meters (RS-485, UART0 + DE pin)
#   "dgr":   a DGR router speaking protocol v1 (full-duplex UART1)
#
# The console (USB CDC on a board, stdin/stdout under the Unix port) carries control commands
# and trace lines; see docs/bench-boards.md. Lines the board prints:
#
#   @ready ...                  all ports are open, requests are served from now on
#   @meter req U F A N OUTCOME  a Modbus request (printed before its answer is written)
#   @meter bad - - - LEN dropped  a frame with a bad CRC or length (no answer)
#   @dgr sink DIRECTION QUANTA  energy the router moved (1/1024 Wh), as integrated
#   =ID ANSWER                  the answer to console command ID ("=" alone for a human)
#   #...                        log for humans
#
# A port that fails (the virtual line went away, a USB adapter was pulled) is closed and
# reopened every half second; the board itself keeps running.

import sys
import json
import select

import board_io
from board_io import say, now_ms

REOPEN_MS = 500
IDLE_POLL_MS = 1000


class Service:
    def __init__(self, name, port, proto):
        self.name = name
        self.port = port
        self.proto = proto
        self.is_open = False
        self.retry_at = 0
        self.failures = 0


class App:
    def __init__(self, cfg):
        self.cfg = cfg
        self.mono = board_io.MonotonicMs()
        self.services = []
        self.running = True
        self.console = board_io.Console()
        self.meter_units = None
        self.slave = None
        self.router = None
        self.baudrates = {}
        trace_all = bool(cfg.get("trace", False))
        self.tracing = {"meter": trace_all, "dgr": trace_all}
        if "meter" in cfg:
            import meter_board
            import modbus_slave

            mcfg = cfg["meter"]
            self.tracing["meter"] = bool(mcfg.get("trace", trace_all))
            self.meter_units = meter_board.build_units(mcfg.get("units", []), self.mono)
            port = board_io.make_port(mcfg)
            self.baudrates["meter"] = mcfg.get("baudrate", 9600)
            self.slave = modbus_slave.RtuSlave(port, self.baudrates["meter"], self.meter_units, self._meter_trace,
                                               self.mono)
            self.services.append(Service("meter", port, self.slave))
        if "dgr" in cfg:
            dcfg = cfg["dgr"]
            self.tracing["dgr"] = bool(dcfg.get("trace", trace_all))
            port = board_io.make_port(dcfg)
            self.baudrates["dgr"] = dcfg.get("baudrate", 115200)
            self.router = self._new_router(port, dcfg)
            self.services.append(Service("dgr", port, self.router))
        if not self.services:
            raise ValueError("the board config names no service: expected \"meter\" and/or \"dgr\"")

    # --- trace --------------------------------------------------------------------------

    def _meter_trace(self, kind, unit, fc, address, count, outcome):
        if self.tracing["meter"]:
            say("@meter %s %s %s %s %s %s" % (kind, "-" if unit is None else unit, "-" if fc is None else fc,
                                               "-" if address is None else address,
                                               "-" if count is None else count, outcome))

    def _dgr_trace(self, text):
        if self.tracing["dgr"]:
            say("@dgr " + text)

    def _new_router(self, port, dcfg):
        import dgr_board

        return dgr_board.DgrRouter(port, dcfg, now_ms, self._dgr_trace)

    # --- ports --------------------------------------------------------------------------

    def _open(self, s, poller):
        try:
            s.port.open()
        except Exception as exc:  # PortError, OSError, ValueError from machine.UART
            if s.failures == 0:
                say("#%s: %s; retrying every %d ms" % (s.name, exc, REOPEN_MS))
            s.failures += 1
            s.retry_at = self.mono() + REOPEN_MS
            return False
        poller.register(s.port.pollable, select.POLLIN)
        s.is_open = True
        if s.failures:
            say("#%s: reopened %s" % (s.name, s.port.describe()))
            if s.name == "dgr":
                s.proto.port_reopened()
        s.failures = 0
        return True

    def _port_failed(self, s, poller, why):
        say("#%s: port failed (%s); reopening" % (s.name, why))
        try:
            poller.unregister(s.port.pollable)
        except Exception:
            pass
        s.port.close()
        s.is_open = False
        s.failures = 1
        s.retry_at = self.mono() + REOPEN_MS

    # --- console ------------------------------------------------------------------------

    def _console_line(self, line):
        text = line.strip()
        if not text:
            return
        ident = ""
        head, _, tail = text.partition(" ")
        if head.isdigit():
            ident, text = head, tail.strip()
        try:
            answer = self._command(text.split(), text)
        except Exception as exc:
            answer = "error %s" % (exc,)
        say("=%s %s" % (ident, answer))

    def _command(self, words, text):
        if not words:
            raise ValueError("empty command")
        cmd = words[0]
        if cmd == "ping":
            return "ok"
        if cmd == "quit":
            self.running = False
            return "ok"
        if cmd == "info":
            return json.dumps(info(self))
        if cmd == "trace":
            if len(words) != 2 or words[1] not in ("on", "off"):
                raise ValueError("usage: trace on|off")
            for name in self.tracing:
                self.tracing[name] = words[1] == "on"
            return "ok"
        if cmd == "meter" and self.meter_units is not None:
            import meter_board

            if words[1:2] == ["units"]:
                # meter units [{"unit_id": 1, "model": "sdm630", ...}, ...]: a new set of meters
                units = meter_board.build_units(json.loads(text.split(None, 2)[2]), self.mono)
                self.meter_units = self.slave.units = units
                return "ok"
            return meter_board.command(self.meter_units, words[1:], self.mono())
        if cmd == "dgr" and self.router is not None:
            if words[1:2] == ["config"]:
                # dgr config {...}: a router with new settings and fresh state, as after a power-up
                dcfg = json.loads(text.split(None, 2)[2])
                service = [s for s in self.services if s.name == "dgr"][0]
                self.router = service.proto = self._new_router(service.port, dcfg)
                if service.is_open:
                    self.router.boot()
                return "ok"
            return self.router.command(words[1:])
        if cmd == "help":
            return ("ping | info | trace on|off | quit | meter set U q=v.. | meter remove U q | meter show U | "
                    "meter units JSON | dgr snapshot|mode|reboot|fault CODE|inject HEX|drop_requests N|"
                    "drop_replies N|corrupt N|delay_ms N|soc N|config JSON")
        raise ValueError("unknown command %r (try help)" % (cmd,))

    # --- the loop -----------------------------------------------------------------------

    def run(self):
        poller = select.poll()
        poller.register(self.console.pollable, select.POLLIN)
        for s in self.services:
            self._open(s, poller)
        for s in self.services:
            say("#%s on %s: %s" % (s.name, s.port.describe(),
                                   self.router.describe() if s.name == "dgr" else
                                   ", ".join(self.meter_units[k].describe() for k in sorted(self.meter_units))))
        if self.router is not None:
            self.router.boot()
        say("@ready " + " ".join(s.name for s in self.services))
        while self.running:
            timeout = IDLE_POLL_MS
            now = self.mono()
            for s in self.services:
                if s.is_open:
                    t = s.proto.timeout_ms()
                    if s.port.pending:
                        t = 1 if t is None or t > 1 else t
                else:
                    t = max(0, s.retry_at - now)
                if t is not None and t < timeout:
                    timeout = t
            for obj, ev in poller.poll(timeout):
                if obj is self.console.pollable:
                    if ev & select.POLLIN:
                        for line in self.console.read_lines():
                            self._console_line(line)
                    if self.console.closed or (ev & (select.POLLHUP | select.POLLERR) and not ev & select.POLLIN):
                        if not board_io.RP2:
                            self.running = False  # the host went away: so does the board
                        poller.unregister(self.console.pollable)
                    continue
                for s in self.services:
                    if s.is_open and obj is s.port.pollable:
                        try:
                            if ev & select.POLLIN:
                                s.proto.on_readable()
                            if ev & (select.POLLHUP | select.POLLERR):
                                self._port_failed(s, poller, "hangup")
                        except OSError as exc:
                            self._port_failed(s, poller, repr(exc))
                        except Exception as exc:  # an emulator bug must not stop the board
                            say("#%s: internal error %r" % (s.name, exc))
                        break
            now = self.mono()
            for s in self.services:
                if s.is_open:
                    try:
                        s.proto.service()
                        s.port.flush()
                    except OSError as exc:
                        self._port_failed(s, poller, repr(exc))
                    except Exception as exc:
                        say("#%s: internal error %r" % (s.name, exc))
                elif now >= s.retry_at:
                    self._open(s, poller)
        for s in self.services:
            s.port.close()
        say("#bye")


def info(app=None):
    impl = sys.implementation
    data = {
        "platform": sys.platform,
        "implementation": impl.name,
        "version": ".".join(str(v) for v in impl.version[:3]),
        "mpy": getattr(impl, "_mpy", None),
        "app_file": __file__,
    }
    if app is not None:
        data["services"] = [s.name for s in app.services]
        data["baudrates"] = app.baudrates
        if app.meter_units is not None:
            data["units"] = sorted(app.meter_units)
    return data


def load_config(path):
    with open(path) as fh:
        return json.load(fh)


def main(config_path=None):
    path = config_path or (sys.argv[1] if len(sys.argv) > 1 else "board.json")
    try:
        cfg = load_config(path)
    except OSError as exc:
        say("#cannot read board config %s: %s" % (path, exc))
        raise
    app = App(cfg)
    say("#bench board on %s, MicroPython %s, app %s, config %s"
        % (sys.platform, info()["version"], __file__, path))
    app.run()
