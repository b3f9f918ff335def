# DGR (digital grid router) emulator, in MicroPython: the router's side of DGR serial protocol v1.
#
# The same behaviour as host_tools/emulators/dgr_emulator.py (CPython), reshaped for a board:
# sessions and the answer window (idempotent retries), modes idle/transfer/safe/fault,
# transfers that stop by themselves at their energy target or end_at, the heartbeat watchdog,
# unsolicited events, and the same fault-injection surface, driven from the console instead of
# Python attributes. Differences that come from the platform, not the protocol:
#
# * time is integer epoch milliseconds (an RP2040 has no double-precision floats), and energy
#   is integrated in exact units of 1/1024 Wh from integers: moved = power * ms * 1024 // 3.6e6;
# * ordered state (window, transfers, ended, logs) lives in lists, since a MicroPython dict
#   does not keep insertion order;
# * every increment of moved energy is printed as a trace line ("@dgr sink export <quanta>"),
#   which is what the CPython emulator's energy_sink callback receives.

import json

import dgr_proto as f

Q = 1024  # energy quantum: 1/1024 Wh
MAX_TRADE_ID = (1 << 63) - 1
MAX_ENERGY_WH = 1000000000
MAX_DURATION_MS = 86400000
ENDED_MEMORY = 32


class Transfer:
    def __init__(self, trade_id, direction, power_w, end_at, energy_wh, started_ms):
        self.trade_id, self.direction, self.power_w = trade_id, direction, power_w
        self.end_at, self.energy_wh, self.started_ms = end_at, energy_wh, started_ms
        self.moved_q = 0
        self.target_q = energy_wh * Q


class Ended:
    def __init__(self, transfer, reason, ended_ms):
        self.trade_id = transfer.trade_id
        self.direction = transfer.direction
        self.energy_wh = transfer.energy_wh
        self.moved_q = transfer.moved_q
        self.reason = reason
        self.ended_ms = ended_ms


class DgrRouter:
    def __init__(self, port, cfg, clock, trace=None):
        self.port = port
        self.clock = clock
        self.trace = trace
        self.router_id = cfg.get("router_id", "dgr-emu")
        self.firmware = cfg.get("fw", "emu-1.0")
        f.encode_value(self.router_id)
        f.encode_value(self.firmware)
        self.hb_timeout_ms = int(cfg.get("hb_timeout_ms", 10000))
        self.max_power_w = int(cfg.get("max_power_w", 10000))
        self.max_transfers = int(cfg.get("max_xfers", 8))
        self.answer_window = max(16, int(cfg.get("answer_window", 16)))
        self.tick_ms = int(cfg.get("tick_ms", 50))
        self.soc_percent = int(cfg.get("soc_percent", 50))
        self.log_length = int(cfg.get("command_log", 100))
        # fault injection, from the console
        self.drop_next_requests = 0
        self.drop_next_replies = 0
        self.corrupt_next_checksums = 0
        self.reply_delay_ms = 0

        self._transfers = []  # Transfer, in start order
        self._ended = []  # Ended, oldest first, at most ENDED_MEMORY
        self._export_q = int(cfg.get("export_wh", 0)) * Q
        self._import_q = int(cfg.get("import_wh", 0)) * Q
        self._safe = False
        self._heartbeat_lost = False
        self._hard_faults = []
        self._session = None
        self._window = []  # [seq, body, answer], oldest first
        self._event_seq = 0
        self._last_frame_ms = clock()
        self._next_tick_ms = self._last_frame_ms + self.tick_ms
        self._delayed = []  # [due_ms, bytes]
        self._commands = []  # (seq, verb, args, at_ms, verdict)
        self._events_sent = []
        self._replays = 0
        self._bad_lines = 0
        self._splitter = f.LineSplitter()
        self._buf = bytearray(512)

    # --- lifecycle, called by the loop ----------------------------------------------------

    def boot(self):
        self._send_all([self._event("BOOT", (("router", self.router_id), ("fw", self.firmware),
                                             ("proto", f.PROTOCOL_VERSION)))])

    def port_reopened(self):
        self._splitter.clear()

    def on_readable(self):
        n = self.port.readinto(self._buf)
        if n:
            for line in self._splitter.feed(memoryview(self._buf)[:n]):
                self._handle_line(line)

    def timeout_ms(self):
        now = self.clock()
        due = self._next_tick_ms
        for item in self._delayed:
            if item[0] < due:
                due = item[0]
        return max(0, due - now)

    def service(self):
        now = self.clock()
        if self._delayed:
            keep = []
            for item in self._delayed:
                if item[0] <= now:
                    self._write(item[1])
                else:
                    keep.append(item)
            self._delayed = keep
        if now >= self._next_tick_ms:
            self._next_tick_ms = now + self.tick_ms
            self._tick(now)

    def _tick(self, now):
        out = []
        try:
            self._advance(now, out)
            if self._transfers and now - self._last_frame_ms > self.hb_timeout_ms:
                self._heartbeat_timeout(now, out)
        except Exception as exc:
            print("#dgr internal error in the tick: %r" % (exc,))
        self._send_all(out)

    # --- serial I/O -----------------------------------------------------------------------

    def _write(self, data):
        self.port.write(data)

    def _send_all(self, frames):
        for frame in frames:
            self._write(frame)

    def _send_answer(self, answer):
        if self.drop_next_replies > 0:
            self.drop_next_replies -= 1
            return
        if self.corrupt_next_checksums > 0:
            self.corrupt_next_checksums -= 1
            star = answer.rfind(b"*")
            crc = int(answer[star + 1:star + 5].decode(), 16) ^ 0x5A5A
            answer = answer[:star + 1] + ("%04X\r\n" % crc).encode()
        if self.reply_delay_ms > 0:
            self._delayed.append([self.clock() + self.reply_delay_ms, answer])
        else:
            self._write(answer)

    # --- protocol -------------------------------------------------------------------------

    def _handle_line(self, line):
        """Never raises: whatever arrives, the router keeps serving."""
        out = []
        answer = None
        try:
            noise, candidate = f.resync(line)
            try:
                frame = f.parse_frame(candidate)
            except f.FrameError as exc:
                self._bad_lines += 1
                if exc.seq is not None and candidate[:1] == b"$":
                    answer = f.encode_nak(exc.seq, exc.code, str(exc))
            else:
                if not isinstance(frame, f.Request):
                    pass  # an ACK, NAK or event on the router's input: an echo or noise
                elif self.drop_next_requests > 0:
                    self.drop_next_requests -= 1
                else:
                    answer = self._process(frame, out)
        except Exception as exc:  # a router bug must not take the router down
            print("#dgr internal error on line %r: %r" % (line[:80], exc))
            seq = f.guess_seq(line)
            answer = f.encode_nak(seq, 50, "internal error") if seq else None
        if answer is not None:
            self._send_answer(answer)
        self._send_all(out)

    def _process(self, req, out):
        now = self.clock()
        self._last_frame_ms = now
        self._advance(now, out)
        session = req.args.get("session", "")
        new_session = req.verb == "HELLO" and f.is_session(session) and session != self._session
        if not new_session:
            for entry in self._window:
                if entry[0] == req.seq:
                    if entry[1] == req.body:
                        self._replays += 1
                        return entry[2]
                    return f.encode_nak(req.seq, 23, "seq %d already answered a different request in this session; "
                                                     "expected a retry to repeat the request byte for byte" % req.seq)
            if self._session is None and req.verb != "HELLO":
                return f.encode_nak(req.seq, 30, "no session since router start; send HELLO first")
        handler = self._HANDLERS.get(req.verb)
        if handler is None:
            answer = f.encode_nak(req.seq, 20, "unknown verb %s; expected one of %s"
                                  % (req.verb, " ".join(f.REQUEST_VERBS)))
        else:
            try:
                answer = handler(self, req, now, out)
            except f.ArgError as exc:
                answer = f.encode_nak(req.seq, exc.code, "%s %s" % (req.verb, exc))
        if new_session and answer.split(b" ", 2)[1] == b"ACK":
            self._window = []
        self._window = [e for e in self._window if e[0] != req.seq]
        self._window.append([req.seq, req.body, answer])
        if len(self._window) > self.answer_window:
            del self._window[0]
        parts = answer.split(b"*")[0].split(b" ")
        verdict = "ACK" if parts[1] == b"ACK" else b" ".join(parts[1:4]).decode()
        self._commands.append((req.seq, req.verb, req.args, now, verdict))
        if len(self._commands) > self.log_length:
            del self._commands[0]
        return answer

    def mode(self):
        if self._hard_faults:
            return "fault"
        if self._safe:
            return "safe"
        return "transfer" if self._transfers else "idle"

    def _faults(self):
        return list(self._hard_faults) + (["heartbeat_lost"] if self._heartbeat_lost else [])

    def _event(self, kind, pairs):
        self._event_seq = self._event_seq % f.SEQ_MAX + 1
        frame = f.encode_event(self._event_seq, kind, pairs)
        self._events_sent.append(frame.split(b"*")[0].decode())
        if len(self._events_sent) > self.log_length:
            del self._events_sent[0]
        return frame

    def _set_mode_event(self, out, before, reason):
        mode = self.mode()
        if mode != before:
            out.append(self._event("MODE", (("mode", mode), ("was", before), ("reason", reason))))

    def _find(self, trade_id):
        for t in self._transfers:
            if t.trade_id == trade_id:
                return t
        return None

    def _find_ended(self, trade_id):
        for e in self._ended:
            if e.trade_id == trade_id:
                return e
        return None

    # --- energy ---------------------------------------------------------------------------

    def _advance(self, now, out):
        """Integrate every active transfer up to ``now`` and end those that are done."""
        for t in list(self._transfers):
            end_ms = t.end_at * 1000
            effective = now if now < end_ms else end_ms
            elapsed = effective - t.started_ms
            if elapsed < 0:
                elapsed = 0
            q = t.power_w * elapsed * Q // 3600000
            if q > t.target_q:
                q = t.target_q
            if q > t.moved_q:
                self._move(t, q - t.moved_q)
            if t.moved_q >= t.target_q:
                self._end(t, "target", now, out)
            elif now >= end_ms:
                self._end(t, "end_at", now, out)

    def _move(self, t, quanta):
        t.moved_q += quanta
        if t.direction == "export":
            self._export_q += quanta
        else:
            self._import_q += quanta
        if self.trace:
            self.trace("sink %s %d" % (t.direction, quanta))

    def _end(self, t, reason, now, out):
        before = self.mode()
        self._transfers.remove(t)
        self._ended = [e for e in self._ended if e.trade_id != t.trade_id]
        self._ended.append(Ended(t, reason, now))
        if len(self._ended) > ENDED_MEMORY:
            del self._ended[0]
        out.append(self._event("END", (("trade_id", t.trade_id), ("reason", reason), ("moved_wh", t.moved_q // Q))))
        if reason in ("target", "end_at", "stop"):
            self._set_mode_event(out, before, reason)

    def _stop_all(self, reason, now, out):
        transfers = list(self._transfers)
        for t in transfers:
            self._end(t, reason, now, out)
        return len(transfers)

    def _heartbeat_timeout(self, now, out):
        before = self.mode()
        print("#dgr no frame for %d ms with transfers active: safe state" % (now - self._last_frame_ms))
        self._stop_all("heartbeat", now, out)
        self._safe = True
        self._heartbeat_lost = True
        out.append(self._event("FAULT", (("code", "heartbeat_lost"), ("mode", self.mode()))))
        self._set_mode_event(out, before, "heartbeat")

    # --- request handlers (return the answer frame) ---------------------------------------

    def _do_hello(self, req, now, out):
        f.check_keys(req, ("proto", "session"))
        proto = f.get_int(req.args, "proto", 1, 999)
        session = f.get_str(req.args, "session")
        if not f.is_session(session):
            raise f.ArgError("session", "8 lower-case hex digits", session)
        if proto != f.PROTOCOL_VERSION:
            return f.encode_nak(req.seq, 40, "router speaks protocol %d, HELLO asked for %d" % (f.PROTOCOL_VERSION, proto))
        self._session = session
        before = self.mode()
        if self._safe:
            self._safe = self._heartbeat_lost = False
            self._set_mode_event(out, before, "hello")
        return f.encode_ack(req.seq, "HELLO", (
            ("proto", f.PROTOCOL_VERSION), ("router", self.router_id), ("fw", self.firmware),
            ("time", now // 1000), ("hb_timeout_ms", self.hb_timeout_ms), ("max_power_w", self.max_power_w),
            ("max_xfers", self.max_transfers), ("session", session), ("mode", self.mode())))

    def _do_status(self, req, now, out):
        f.check_keys(req, ())
        power_w = 0
        items = []
        for t in self._transfers:
            power_w += t.power_w if t.direction == "export" else -t.power_w
            items.append("%d:%s:%d:%d:%d:%d" % (t.trade_id, t.direction, t.power_w, t.end_at, t.energy_wh, t.moved_q // Q))
        return f.encode_ack(req.seq, "STATUS", (
            ("mode", self.mode()), ("power_w", power_w),
            ("export_wh", self._export_q // Q), ("import_wh", self._import_q // Q),
            ("soc_percent", self.soc_percent), ("faults", f.encode_list(self._faults())),
            ("xfers", ",".join(items) if items else f.EMPTY_LIST), ("time", now // 1000)))

    def _do_start(self, req, now, out):
        f.check_keys(req, ("trade_id", "direction", "power_w", "end_at", "energy_wh"))
        trade_id = f.get_int(req.args, "trade_id", 1, MAX_TRADE_ID)
        direction = f.get_choice(req.args, "direction", f.DIRECTIONS)
        power_w = f.get_int(req.args, "power_w", 1, self.max_power_w)
        end_at = f.get_int(req.args, "end_at", 0, 1 << 40)
        energy_wh = f.get_int(req.args, "energy_wh", 1, MAX_ENERGY_WH)
        mode = self.mode()
        if mode == "fault":
            return f.encode_nak(req.seq, 32, "latched faults %s; RESUME to acknowledge" % ",".join(self._faults()))
        if mode == "safe":
            return f.encode_nak(req.seq, 31, "router is in safe mode; RESUME or HELLO first")
        if end_at * 1000 <= now:
            return f.encode_nak(req.seq, 33, "end_at %d is not after router time %d" % (end_at, now // 1000))
        if end_at * 1000 - now > MAX_DURATION_MS:
            return f.encode_nak(req.seq, 22, "end_at %d is more than %d s after router time %d"
                                % (end_at, MAX_DURATION_MS // 1000, now // 1000))
        if self._find(trade_id) is not None:
            return f.encode_nak(req.seq, 34, "trade_id %d is already transferring" % trade_id)
        if len(self._transfers) >= self.max_transfers:
            return f.encode_nak(req.seq, 35, "%d transfers active; the router runs at most %d"
                                % (len(self._transfers), self.max_transfers))
        total_w = power_w
        for t in self._transfers:
            total_w += t.power_w
        if total_w > self.max_power_w:
            return f.encode_nak(req.seq, 35, "total power %d W would exceed the rating of %d W" % (total_w, self.max_power_w))
        self._transfers.append(Transfer(trade_id, direction, power_w, end_at, energy_wh, now))
        self._ended = [e for e in self._ended if e.trade_id != trade_id]
        self._set_mode_event(out, mode, "start")
        return f.encode_ack(req.seq, "START", (("trade_id", trade_id), ("started_at", now // 1000), ("mode", self.mode())))

    def _do_stop(self, req, now, out):
        f.check_keys(req, ("trade_id",))
        trade_id = f.get_int(req.args, "trade_id", 1, MAX_TRADE_ID)
        t = self._find(trade_id)
        if t is not None:
            self._end(t, "stop", now, out)
            return f.encode_ack(req.seq, "STOP", (("trade_id", trade_id), ("was", "active"),
                                                  ("moved_wh", t.moved_q // Q), ("reason", "stop")))
        ended = self._find_ended(trade_id)
        if ended is not None:
            return f.encode_ack(req.seq, "STOP", (("trade_id", trade_id), ("was", "ended"),
                                                  ("moved_wh", ended.moved_q // Q), ("reason", ended.reason)))
        return f.encode_ack(req.seq, "STOP", (("trade_id", trade_id), ("was", "unknown")))

    def _do_safe(self, req, now, out):
        f.check_keys(req, ())
        before = self.mode()
        stopped = self._stop_all("safe", now, out)
        self._safe = True
        self._set_mode_event(out, before, "command")
        return f.encode_ack(req.seq, "SAFE", (("stopped", stopped), ("mode", self.mode())))

    def _do_resume(self, req, now, out):
        f.check_keys(req, ())
        before = self.mode()
        self._safe = self._heartbeat_lost = False
        self._hard_faults = []
        self._set_mode_event(out, before, "resume")
        return f.encode_ack(req.seq, "RESUME", (("mode", self.mode()),))

    def _do_heartbeat(self, req, now, out):
        f.check_keys(req, ())
        return f.encode_ack(req.seq, "HEARTBEAT", (("mode", self.mode()), ("time", now // 1000)))

    _HANDLERS = {
        "HELLO": _do_hello, "STATUS": _do_status, "START": _do_start, "STOP": _do_stop,
        "SAFE": _do_safe, "RESUME": _do_resume, "HEARTBEAT": _do_heartbeat,
    }

    # --- bench control (console) ----------------------------------------------------------

    def reboot(self):
        """Power-cycle: transfers, session and answer window are lost (counters are kept,
        like a meter's), and the router announces itself with a BOOT event."""
        self._transfers = []
        self._window = []
        self._session = None
        self._safe = self._heartbeat_lost = False
        self._hard_faults = []
        self._event_seq = 0
        self._splitter.clear()
        self.boot()

    def inject_fault(self, code):
        if not f.is_key(code):
            raise ValueError("fault code: expected a lower-case name like overtemp, found %r" % (code,))
        out = []
        now = self.clock()
        self._advance(now, out)
        before = self.mode()
        self._stop_all("fault", now, out)
        if code not in self._hard_faults:
            self._hard_faults.append(code)
        out.append(self._event("FAULT", (("code", code), ("mode", self.mode()))))
        self._set_mode_event(out, before, "fault")
        self._send_all(out)

    def snapshot(self):
        return json.dumps({
            "mode": self.mode(), "session": self._session,
            "transfers": [[t.trade_id, t.direction, t.power_w, t.end_at, t.energy_wh, t.started_ms, t.moved_q]
                          for t in self._transfers],
            "ended": [[e.trade_id, e.direction, e.energy_wh, e.moved_q, e.reason, e.ended_ms] for e in self._ended],
            "export_q": self._export_q, "import_q": self._import_q, "soc_percent": self.soc_percent,
            "faults": self._faults(),
            "commands": [[c[0], c[1], c[2], c[3], c[4]] for c in self._commands],
            "replays": self._replays, "bad_lines": self._bad_lines, "events_sent": self._events_sent,
        })

    def command(self, words):
        """One console command (after the leading "dgr"); returns the answer text."""
        if not words:
            raise ValueError("expected a dgr command")
        cmd, rest = words[0], words[1:]
        if cmd == "snapshot":
            return self.snapshot()
        if cmd == "mode":
            return self.mode()
        if cmd == "reboot":
            self.reboot()
            return "ok"
        if cmd == "fault":
            self.inject_fault(rest[0] if rest else "")
            return "ok"
        if cmd == "inject":
            self._write(bytes(int(rest[0][i:i + 2], 16) for i in range(0, len(rest[0]), 2)) if rest else b"")
            return "ok"
        counters = {"drop_requests": "drop_next_requests", "drop_replies": "drop_next_replies",
                    "corrupt": "corrupt_next_checksums", "delay_ms": "reply_delay_ms", "soc": "soc_percent"}
        if cmd in counters:
            if len(rest) != 1:
                raise ValueError("usage: dgr %s <integer>" % cmd)
            setattr(self, counters[cmd], int(rest[0]))
            return "ok"
        raise ValueError("unknown dgr command %r: expected snapshot, mode, reboot, fault CODE, inject HEX, "
                         "drop_requests N, drop_replies N, corrupt N, delay_ms N, soc N" % (cmd,))

    def describe(self):
        return "router %s fw %s, heartbeat timeout %d ms, %d W, %d transfers" % (
            self.router_id, self.firmware, self.hb_timeout_ms, self.max_power_w, self.max_transfers)
