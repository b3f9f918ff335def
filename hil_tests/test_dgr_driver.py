"""DGR driver against a router over a real serial line, on the rig (hil_tests/rig.py).

Nothing is mocked: the driver opens the port with pyserial exactly as it opens /dev/ttyAMA0 on
a board. On the default rig the router is the DGR emulator, serving the other end of a socat
pty pair in its own asyncio loop (a background thread here, the bench's shared loop
elsewhere), and every exchange is real protocol bytes through the kernel's ptys; with ``--rig``
the same tests run against the MicroPython bench board's router or a real bench. Tests that
read the router's state or change its settings declare ``emulator-control``, those that make
it misbehave ``fault-injection``; they are skipped on a rig without them. Timeouts are
shortened so the whole module runs in seconds; the energy arithmetic is checked for
exactness, not approximately.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from pathlib import Path

import pytest
import serial

from firmware.config import DgrConfig
from firmware.drivers import dgr_frames as f
from firmware.drivers.dgr import DgrArgumentError, DgrClient, DgrLinkError, DgrNak, DgrStatus
from host_tools.emulators.dgr_emulator import DgrEmulator
from host_tools.emulators.virtual_serial import VirtualSerialLine
from hil_tests.rig import Rig, RigError


def wait_until(predicate, timeout_s: float = 3.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Bench:
    """One virtual line, one emulator on its own loop thread, and the driver's config."""

    def __init__(self, tmp_path: Path, **emulator_kwargs):
        self.line = VirtualSerialLine(tmp_path / "dgr").start()
        self.sink: list[tuple[str, float]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dgr-emulator-loop", daemon=True)
        self.thread.start()
        emulator_kwargs.setdefault("heartbeat_timeout_s", 10.0)
        self.emu = DgrEmulator(str(self.line.emulator_end), energy_sink=lambda d, e: self.sink.append((d, e)),
                               **emulator_kwargs)
        self.run(self.emu.start())
        self.config = DgrConfig(port=str(self.line.device_end), timeout_ms=150, retries=2, heartbeat_seconds=1)

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(5)

    def client(self, **kwargs) -> DgrClient:
        return DgrClient(self.config, **kwargs)

    def sink_total(self, direction: str) -> float:
        return sum(e for d, e in list(self.sink) if d == direction)

    def close(self):
        try:
            self.run(self.emu.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()
            self.line.stop()


class _NoEmulator:
    """Stands in for the emulator on a rig without emulator control (a real bench): any use
    names the feature the test should have declared."""

    def __init__(self, rig: Rig):
        self._rig = rig

    def __getattr__(self, name: str):
        raise RigError(f"{self._rig.config.describe()}: bench.emu.{name} needs the rig feature emulator-control "
                       "(declare it with @pytest.mark.rig_features)")


class RigBench(Bench):
    """The suite's ``Bench`` on the rig's DGR link: ``emu`` is the rig's router control (the
    CPython DgrEmulator, or the MicroPython board's console) and ``sink`` the energy it reported
    moving; the driver config keeps the suite's short timeouts with the rig's port and baud rate.
    The rig starts the router (with ``heartbeat_timeout_s`` on an emulated rig) and stops it."""

    def __init__(self, rig: Rig, heartbeat_timeout_s: float | None = None):
        settings = {} if heartbeat_timeout_s is None else {"heartbeat_timeout_s": heartbeat_timeout_s}
        self.rig = rig
        self.line = self.resource = rig.dgr(**settings)  # line.device_end: the port the driver opens
        self.config = DgrConfig(port=self.resource.port, baudrate=self.resource.baudrate, timeout_ms=150, retries=2,
                                heartbeat_seconds=1)

    @property
    def emu(self):
        return self.resource.control if self.resource.control is not None else _NoEmulator(self.rig)

    @property
    def sink(self) -> list[tuple[str, float]]:
        return self.resource.sink

    def close(self) -> None:
        pass  # the rig stops the router and its line after the test


@pytest.fixture
def bench(hil_rig):
    b = RigBench(hil_rig)
    yield b
    b.close()


@pytest.fixture
def fast_watchdog_bench(hil_rig):
    b = RigBench(hil_rig, heartbeat_timeout_s=0.4)
    yield b
    b.close()


def in_seconds(s: int) -> int:
    return int(time.time()) + s


# --- basics ----------------------------------------------------------------------------------


@pytest.mark.rig_features("emulator-control")
def test_hello_reports_identity_clock_limits_and_opens_a_session(bench):
    with bench.client() as dgr:
        hello = dgr.hello()
    assert (hello.protocol, hello.router_id, hello.mode) == (1, "dgr-emu", "idle")
    assert hello.heartbeat_timeout_ms == 10_000 and hello.max_power_w == 10_000 and hello.max_transfers == 8
    assert abs(hello.clock_offset_s) < 2
    assert bench.emu.snapshot().session == hello.session == dgr.session


def test_status_round_trip_time_over_the_pty(bench, record_property):
    with bench.client() as dgr:
        dgr.status()
        samples = []
        for _ in range(200):
            t0 = time.perf_counter()
            status = dgr.status()
            samples.append(time.perf_counter() - t0)
    median_ms, p99_ms = statistics.median(samples) * 1000, sorted(samples)[197] * 1000
    record_property("status_rtt_median_ms", round(median_ms, 3))
    print(f"STATUS round trip over the pty: median {median_ms:.2f} ms, p99 {p99_ms:.2f} ms")
    assert isinstance(status, DgrStatus) and status.mode == "idle"
    assert median_ms < 20


@pytest.mark.rig_features("emulator-control")
def test_the_port_opens_on_first_use_and_a_missing_port_is_named(bench):
    dgr = bench.client()  # how the daemon uses it: no context manager
    assert dgr.status().mode == "idle"
    dgr.close()
    assert dgr.status().mode == "idle"  # reopened by the next request, same session
    dgr.close()
    assert len(bench.emu.snapshot().executed("HELLO")) == 1
    with pytest.raises(DgrLinkError, match="cannot open the DGR serial port /nonexistent/tty.*check \\[dgr\\] port"):
        DgrClient(DgrConfig(port="/nonexistent/tty")).open()
    with pytest.raises(DgrLinkError, match="to HELLO .*cannot open the DGR serial port /nonexistent/tty") as caught:
        DgrClient(DgrConfig(port="/nonexistent/tty", timeout_ms=20, retries=1)).status()
    assert caught.value.safe_confirmed is False


# --- transfers and energy ---------------------------------------------------------------------


@pytest.mark.rig_features("emulator-control")
def test_transfers_stop_themselves_at_exactly_their_energy_target(bench):
    with bench.client() as dgr:
        status = dgr.start_transfer(101, "export", 7200, in_seconds(600), 2)  # 2 Wh in 1 s
        assert status.mode == "transfer" and status.transfer(101).energy_wh == 2
        status = dgr.start_transfer(102, "import", 2800, in_seconds(600), 1)  # 1 Wh in ~1.3 s
        assert {t.trade_id for t in status.transfers} == {101, 102} and status.power_w == 7200 - 2800
        wait_until(lambda: not bench.emu.snapshot().transfers, 4, "both transfers to end by themselves")
        final = dgr.status()
        events = dgr.drain_events()
    state = bench.emu.snapshot()
    assert {(e.trade_id, e.reason, e.moved_wh) for e in state.ended} == {(101, "target", 2.0), (102, "target", 1.0)}
    assert (state.export_wh, state.import_wh) == (2.0, 1.0)  # exact, not approximately
    assert (final.mode, final.export_wh, final.import_wh, final.transfers) == ("idle", 2, 1, ())
    # the interchange meter is fed every increment and counts exactly what the router moved
    assert bench.sink_total("export") == 2.0 and bench.sink_total("import") == 1.0
    assert len(bench.sink) > 4  # integrated in steps, not one jump at the end
    ends = {e.args["trade_id"]: e.args for e in events if e.kind == "END"}
    assert ends["101"] == {"trade_id": "101", "reason": "target", "moved_wh": "2"}
    assert ends["102"]["reason"] == "target"


@pytest.mark.rig_features("emulator-control")
def test_a_transfer_stops_itself_at_end_at(bench):
    with bench.client() as dgr:
        end_at = in_seconds(1)
        dgr.start_transfer(201, "export", 3600, end_at, 1000)  # would need 1000 s: end_at comes first
        wait_until(lambda: not bench.emu.snapshot().transfers, 3, "the transfer to end at end_at")
        assert time.time() >= end_at
        status = dgr.status()
    (ended,) = bench.emu.snapshot().ended
    assert ended.reason == "end_at"
    started_at = bench.emu.snapshot().executed("START")[0].at
    expected_wh = 3600 * (end_at - started_at) / 3600
    assert abs(ended.moved_wh - expected_wh) <= 1 / 1024  # integrated up to end_at, not beyond
    assert bench.emu.snapshot().export_wh == ended.moved_wh == bench.sink_total("export")
    assert status.export_wh == int(ended.moved_wh) and status.mode == "idle"


@pytest.mark.rig_features("emulator-control")
def test_stop_transfer_is_confirmed_and_stopping_twice_is_harmless(bench):
    with bench.client() as dgr:
        dgr.start_transfer(301, "import", 5000, in_seconds(600), 5000)
        time.sleep(0.2)
        status = dgr.stop_transfer(301)
        assert status.transfers == () and status.mode == "idle"
        moved = bench.emu.snapshot().ended[0].moved_wh
        assert 0 < moved < 5000 and bench.sink_total("import") == moved
        time.sleep(0.15)
        assert bench.emu.snapshot().import_wh == moved  # nothing moves after STOP
        assert dgr.stop_transfer(301).transfers == ()  # already ended: still fine
        assert dgr.stop_transfer(999).transfers == ()  # never seen: the wanted state holds
        assert [e.args["reason"] for e in dgr.drain_events() if e.kind == "END"] == ["stop"]
    answers = [c.answer for c in bench.emu.snapshot().executed("STOP")]
    assert answers == ["ACK", "ACK", "ACK"]


@pytest.mark.rig_features("emulator-control")
def test_a_new_clients_stop_of_an_ended_transfer_tells_what_it_moved(bench):
    """HIL finding H3: a restarted daemon's driver has heard none of the END events its
    predecessor got; STOP of the ended transfer answers was=ended moved_wh, and the driver
    keeps that as the transfer's end (no end time: received_at 0) for the slot's sharing."""
    with bench.client() as dgr:
        dgr.start_transfer(351, "export", 7200, in_seconds(600), 2)  # 2 Wh in 1 s
        wait_until(lambda: not bench.emu.snapshot().transfers, 4, "the transfer to end at its target")
    with bench.client() as fresh:  # the next process: same router, empty memory
        assert fresh.transfer_end(351) is None
        fresh.stop_transfer(351)
        end = fresh.transfer_end(351)
        assert end is not None and end.args["moved_wh"] == "2" and end.args["reason"] == "target"
        assert end.received_at == 0.0
        fresh.stop_transfer(999)  # never seen: nothing to remember
        assert fresh.transfer_end(999) is None


@pytest.mark.rig_features("emulator-control")
def test_a_stop_answered_unknown_is_remembered_as_a_transfer_the_router_never_ran(bench):
    """The router's ``was=unknown`` is the daemon's proof that a START whose intent it journalled
    never reached the router (tests/test_delivery_sequences.py sequence e); ``was=ended`` or
    ``was=active`` never counts as unknown."""
    with bench.client() as dgr:
        assert not dgr.transfer_unknown(998)
        dgr.stop_transfer(998)
        assert dgr.transfer_unknown(998)
        dgr.start_transfer(302, "import", 5000, in_seconds(600), 5000)
        time.sleep(0.1)
        dgr.stop_transfer(302)  # was=active
        dgr.stop_transfer(302)  # was=ended
        assert not dgr.transfer_unknown(302)
        assert dgr.transfer_end(302) is not None


@pytest.mark.rig_features("emulator-control")
def test_safe_state_stops_everything_and_refuses_starts_until_resume(bench):
    with bench.client() as dgr:
        dgr.start_transfer(401, "export", 2000, in_seconds(600), 1000)
        dgr.start_transfer(402, "export", 2000, in_seconds(600), 1000)
        status = dgr.safe_state()
        assert (status.mode, status.transfers, status.power_w) == ("safe", (), 0)
        with pytest.raises(DgrNak) as refused:
            dgr.start_transfer(403, "export", 2000, in_seconds(600), 1000)
        assert (refused.value.code, refused.value.name) == (31, "SAFE_MODE")
        assert dgr.resume().mode == "idle"
        assert dgr.start_transfer(403, "export", 2000, in_seconds(600), 1000).mode == "transfer"
    assert {e.reason for e in bench.emu.snapshot().ended} == {"safe"}


@pytest.mark.rig_features("emulator-control")
def test_router_refusals_arrive_as_naks_with_their_codes(bench):
    with bench.client() as dgr:
        with pytest.raises(DgrNak) as past:
            dgr.start_transfer(501, "export", 2000, in_seconds(-10), 1000)
        assert (past.value.code, past.value.name, past.value.verb) == (33, "END_PAST", "START")
        assert "end_at" in past.value.detail and "is not after router time" in str(past.value)
        with pytest.raises(DgrNak) as zero:
            dgr.start_transfer(502, "export", 0, in_seconds(600), 1000)
        assert (zero.value.code, zero.value.name) == (22, "OUT_OF_RANGE")
        assert "power_w: expected an integer from 1 to 10000, found 0" in zero.value.detail
        dgr.start_transfer(503, "export", 6000, in_seconds(600), 1000)
        with pytest.raises(DgrNak) as twice:
            dgr.start_transfer(503, "export", 1000, in_seconds(600), 1000)
        assert twice.value.code == 34
        with pytest.raises(DgrNak) as over:
            dgr.start_transfer(504, "import", 5000, in_seconds(600), 1000)
        assert (over.value.code, over.value.name) == (35, "CAPACITY")
        with pytest.raises(DgrArgumentError, match="direction: expected one of export, import, found 'up'"):
            dgr.start_transfer(505, "up", 1000, in_seconds(600), 1000)
        with pytest.raises(DgrArgumentError, match="power_w: expected an integer, found 1.5"):
            dgr.start_transfer(505, "export", 1.5, in_seconds(600), 1000)
    starts = bench.emu.snapshot().executed("START")
    assert [c.answer for c in starts] == ["NAK 33 END_PAST", "NAK 22 OUT_OF_RANGE", "ACK", "NAK 34 TRADE_ACTIVE",
                                          "NAK 35 CAPACITY"]  # refusals are not retried; bad arguments never sent


# --- retries, idempotency, link loss ------------------------------------------------------------


@pytest.mark.rig_features("emulator-control", "fault-injection")
def test_a_lost_answer_is_retried_with_the_same_seq_and_the_start_runs_once(bench):
    with bench.client() as dgr:
        dgr.hello()
        bench.emu.drop_next_replies = 1
        status = dgr.start_transfer(601, "export", 1000, in_seconds(600), 1000)
    assert status.transfer(601) is not None
    state = bench.emu.snapshot()
    assert len(state.executed("START")) == 1 and state.replays == 1
    assert len(state.transfers) == 1


@pytest.mark.rig_features("emulator-control", "fault-injection")
def test_a_corrupted_answer_is_retried_at_once(bench):
    with bench.client() as dgr:
        dgr.hello()
        bench.emu.corrupt_next_checksums = 1
        t0 = time.monotonic()
        assert dgr.status().mode == "idle"
        assert time.monotonic() - t0 < 0.1  # no waiting out the 150 ms timeout
    assert bench.emu.snapshot().replays == 1


@pytest.mark.rig_features("emulator-control", "fault-injection")
def test_a_late_answer_is_not_taken_for_the_next_request(bench):
    with bench.client() as dgr:
        dgr.hello()
        bench.emu.reply_delay_s = 0.2  # longer than the 150 ms timeout: every answer comes late
        assert dgr.heartbeat() == "idle"  # answered on the 2nd attempt by the 1st answer, late
        bench.emu.reply_delay_s = 0.0
        assert dgr.status().mode == "idle"  # the 2nd (replayed) heartbeat answer is skipped as stale
    assert len(bench.emu.snapshot().executed("HEARTBEAT")) == 1


@pytest.mark.rig_features("emulator-control", "fault-injection")
def test_lost_link_raises_after_retries_and_sends_the_router_safe(bench):
    with bench.client() as dgr:
        dgr.start_transfer(701, "export", 1000, in_seconds(600), 1000)
        bench.emu.drop_next_replies = 3  # all 3 attempts of the STATUS answer are lost
        with pytest.raises(DgrLinkError) as lost:
            dgr.status()
        assert lost.value.safe_confirmed is True
        assert "after 3 attempt(s)" in str(lost.value) and str(bench.line.device_end) in str(lost.value)
        assert bench.emu.mode == "safe" and not bench.emu.snapshot().transfers
        bench.emu.drop_next_requests = 4  # nothing gets through, not even the SAFE
        with pytest.raises(DgrLinkError) as dead:
            dgr.heartbeat()
        assert dead.value.safe_confirmed is False and "heartbeat watchdog" in str(dead.value)
        assert dgr.status().mode == "safe"  # the link is back; the router stayed safe


# --- sessions ----------------------------------------------------------------------------------


@pytest.mark.rig_features("emulator-control")
def test_a_restarted_dgc_reusing_seq_numbers_gets_fresh_answers(bench):
    with bench.client(first_seq=1) as before_restart:
        before_restart.hello()  # seq 1
        assert before_restart.status().mode == "idle"  # seq 2: "$2 STATUS" answered "idle"
        before_restart.start_transfer(801, "export", 1000, in_seconds(600), 1000)
    with bench.client(first_seq=1) as after_restart:  # a new process: new session, seq from 1 again
        status = after_restart.status()  # HELLO seq 1, then the very same bytes "$2 STATUS"
    assert status.mode == "transfer" and status.transfer(801) is not None  # executed, not the stale "idle"
    state = bench.emu.snapshot()
    assert state.replays == 0 and state.session == after_restart.session != before_restart.session
    assert [c.seq for c in state.executed("STATUS")].count(2) == 2


@pytest.mark.rig_features("emulator-control")
def test_reconnecting_keeps_session_and_sequence(bench):
    dgr = bench.client()
    with dgr:
        dgr.status()
    with dgr:  # reopen the port, same client
        dgr.status()
    state = bench.emu.snapshot()
    assert len(state.executed("HELLO")) == 1
    seqs = [c.seq for c in state.commands]
    assert all(b == a % 65535 + 1 for a, b in zip(seqs, seqs[1:]))


@pytest.mark.rig_features("emulator-control")
def test_sequence_numbers_wrap_from_65535_to_1(bench):
    with bench.client(first_seq=65534) as dgr:
        dgr.status()  # HELLO 65534, STATUS 65535
        dgr.status()  # STATUS 1
    assert [c.seq for c in bench.emu.snapshot().commands] == [65534, 65535, 1]


@pytest.mark.rig_features("emulator-control", "fault-injection")
def test_a_router_restart_is_detected_and_the_session_reopened(bench):
    with bench.client() as dgr:
        dgr.start_transfer(901, "export", 1000, in_seconds(600), 1000)
        bench.emu.reboot()
        wait_until(lambda: bench.emu.snapshot().session is None, what="the emulated reboot")
        status = dgr.status()
        assert status.mode == "idle" and status.transfers == ()  # the transfer died with the router
        assert "BOOT" in [e.kind for e in dgr.drain_events()]
    assert len(bench.emu.snapshot().executed("HELLO")) == 2


# --- watchdog ------------------------------------------------------------------------------------


@pytest.mark.rig_features("emulator-control")
def test_heartbeats_keep_a_transfer_running(fast_watchdog_bench):
    bench = fast_watchdog_bench
    with bench.client() as dgr:
        dgr.start_transfer(1001, "export", 1000, in_seconds(600), 1000)
        for _ in range(8):  # 0.8 s, twice the 0.4 s watchdog
            time.sleep(0.1)
            assert dgr.heartbeat() == "transfer"
    assert bench.emu.mode == "transfer"


@pytest.mark.rig_features("emulator-control")
def test_silence_puts_the_router_in_safe_state_by_itself(fast_watchdog_bench):
    bench = fast_watchdog_bench
    with bench.client() as dgr:
        dgr.start_transfer(1101, "export", 1000, in_seconds(600), 1000)
        t0 = time.monotonic()
        wait_until(lambda: bench.emu.mode == "safe", 2, "the watchdog")  # the DGC sends nothing
        assert 0.35 < time.monotonic() - t0 < 1.5
        status = dgr.status()
        assert (status.mode, status.faults, status.transfers) == ("safe", ("heartbeat_lost",), ())
        events = dgr.drain_events()
        assert {"code": "heartbeat_lost", "mode": "safe"} in [e.args for e in events if e.kind == "FAULT"]
        assert [e.args["reason"] for e in events if e.kind == "END"] == ["heartbeat"]
        with pytest.raises(DgrNak, match="SAFE_MODE"):
            dgr.start_transfer(1102, "export", 1000, in_seconds(600), 1000)
        assert dgr.hello().mode == "idle"  # a master that says hello takes over again
        assert dgr.status().faults == ()


@pytest.mark.rig_features("emulator-control")
def test_an_idle_router_does_not_trip_its_watchdog(fast_watchdog_bench):
    with fast_watchdog_bench.client() as dgr:
        dgr.hello()
        time.sleep(0.6)
        assert dgr.status().mode == "idle"


# --- hostile bytes -------------------------------------------------------------------------------


@pytest.mark.rig_features("emulator-control", "fault-injection")
def test_garbage_from_the_router_side_does_not_disturb_the_driver(bench):
    rng = random.Random(5)
    with bench.client() as dgr:
        dgr.hello()
        for round_ in range(20):
            noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            bench.emu.inject_raw(noise)
            bench.emu.inject_raw(b"\n$7 ACK STATUS mode=idle*0000\n")  # bad checksum
            bench.emu.inject_raw(f.encode_ack(7, "STATUS", {"mode": "fault"}))  # valid, but not ours
            bench.emu.inject_raw(b"x" * 3000)  # a line far over the limit
            bench.emu.inject_raw(b"\n!9 MYSTERY what=ever*0000\n")
            if round_ % 5 == 0:
                bench.emu.inject_raw(b"\xff\xfe$$$!!!***\r\r\n")
            status = dgr.status()
            assert status.mode == "idle" and status.soc_percent == 50
        assert dgr.start_transfer(1201, "export", 1000, in_seconds(600), 1000).transfer(1201) is not None


@pytest.mark.rig_features("emulator-control")
def test_garbage_and_hostile_frames_from_the_dgc_side_get_naks_and_never_run(bench):
    with serial.Serial(str(bench.line.device_end), bench.config.baudrate, timeout=0.3) as port:
        def ask(line: bytes) -> bytes:
            port.reset_input_buffer()
            port.write(line)
            answer = port.readline()
            while answer.startswith(b"!"):  # unsolicited events (e.g. BOOT) may come first
                answer = port.readline()
            return answer

        assert b"NAK 30 NO_SESSION" in ask(f.encode_request(5, "START", {"trade_id": 1, "direction": "export",
                                                                          "power_w": 1000, "end_at": in_seconds(60),
                                                                          "energy_wh": 10}))
        assert b"ACK HELLO" in ask(f.encode_request(6, "HELLO", {"proto": 1, "session": "0badcafe"}))
        assert b"$12 NAK 10 BAD_CRC" in ask(b"$12 STATUS*EE17\r\n")
        assert b"$13 NAK 20 UNKNOWN_VERB" in ask(f.encode_request(13, "FLY"))
        assert b"$14 NAK 21 BAD_ARGS" in ask(f.encode_request(14, "STATUS", {"force": 1}))
        assert b"$15 NAK 21 BAD_ARGS" in ask(f.encode_request(15, "START", {"trade_id": 1}))
        assert b"$16 NAK 40 PROTO_VERSION" in ask(f.encode_request(16, "HELLO", {"proto": 2, "session": "0badcafe"}))
        assert b"$13 NAK 23 SEQ_REUSED" in ask(f.encode_request(13, "STATUS"))
        rng = random.Random(9)
        port.write(bytes(rng.randrange(256) for _ in range(20_000)))
        port.write(b"\n" + b"$" * 5000 + b"\n" + b"!1 BOOT*0000\n" + f.encode_ack(3, "STATUS"))
        time.sleep(0.2)
    state = bench.emu.snapshot()
    assert state.transfers == () and state.bad_lines > 3
    assert [c.answer for c in state.executed("START")] == ["NAK 21 BAD_ARGS"]  # the NO_SESSION one never got that far
    with bench.client() as dgr:  # the router still serves
        assert dgr.status().mode == "idle"


@pytest.mark.rig_features("emulator-control")
def test_concurrent_callers_each_get_their_own_answer(bench):
    errors: list[BaseException] = []

    def worker(dgr: DgrClient, n: int):
        try:
            for _ in range(n):
                assert dgr.status().mode in ("idle", "transfer")
                assert dgr.heartbeat() in ("idle", "transfer")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with bench.client() as dgr:
        threads = [threading.Thread(target=worker, args=(dgr, 25)) for _ in range(4)]
        for t in threads:
            t.start()
        dgr.start_transfer(1301, "export", 1000, in_seconds(600), 1000)
        for t in threads:
            t.join(20)
    assert errors == []
    state = bench.emu.snapshot()
    assert all(not c.answer.startswith("NAK") for c in state.commands) and state.replays == 0
    assert len(state.commands) == 1 + 4 * 25 * 2 + 2  # HELLO, the workers, START + its STATUS read-back


# --- any rig: the router the rig file names, through the board config the rig writes -------------


def _trade_id() -> int:
    """A trade id a real router has not seen in this session (tests on a bench share one router)."""
    return int(time.time() * 1000) % 10**12 + random.randrange(1000)


def test_rig_router_handshake_status_and_a_short_transfer(hil_rig):
    """The firmware's DgrClient, built from the rig's board config, against the rig's router:
    HELLO opens this session with a clock within 2 s, STATUS says idle, a START in the past is
    refused (NAK 33), a START runs and is listed, HEARTBEAT sees it, STOP ends it (END reason
    stop). What the emulators model is exactly what a real router must do here."""
    hil_rig.dgr()
    trade_id = _trade_id()
    with hil_rig.dgr_client() as dgr:
        hello = dgr.hello()
        assert (hello.protocol, hello.session) == (1, dgr.session)
        assert abs(hello.clock_offset_s) < 2, "the router's clock must be UTC (on an RP2040: mpremote rtc --set)"
        assert hello.heartbeat_timeout_ms > 0 and hello.max_power_w > 0 and hello.max_transfers >= 1
        status = dgr.status()
        assert (status.mode, status.transfers) == ("idle", ()), "the router must be idle when a test starts"
        power_w = min(1000, hello.max_power_w)
        with pytest.raises(DgrNak) as past:
            dgr.start_transfer(trade_id, "export", power_w, in_seconds(-10), 1)
        assert (past.value.code, past.value.name) == (33, "END_PAST")
        status = dgr.start_transfer(trade_id, "export", power_w, in_seconds(60), 1000)
        assert status.mode == "transfer" and status.transfer(trade_id).power_w == power_w
        assert dgr.heartbeat() == "transfer"
        status = dgr.stop_transfer(trade_id)
        assert (status.mode, status.transfers) == ("idle", ())
        ends = [e.args for e in dgr.drain_events() if e.kind == "END"]
    assert [(e["trade_id"], e["reason"]) for e in ends] == [(str(trade_id), "stop")]


@pytest.mark.rig_features("power-cycle")
def test_a_router_power_cut_mid_transfer_is_detected_and_the_session_reopened(hil_rig):
    """The rig cuts the router's power during a transfer (an emulator replaced by a fresh one,
    a board process killed with SIGKILL and booted again, or the bench's [power] command): the
    transfer died with it, the driver notices (BOOT, or NO_SESSION), says HELLO again and
    carries on in the same session."""
    hil_rig.dgr()
    trade_id = _trade_id()
    with hil_rig.dgr_client() as dgr:
        hello = dgr.hello()
        dgr.start_transfer(trade_id, "export", min(1000, hello.max_power_w), in_seconds(600), 1000)
        hil_rig.power_cycle("dgr")
        status = dgr.status()
        assert (status.mode, status.transfers) == ("idle", ())
        assert "BOOT" in [e.kind for e in dgr.drain_events()]
        status = dgr.start_transfer(trade_id + 1, "export", min(1000, hello.max_power_w), in_seconds(600), 1000)
        assert status.transfer(trade_id + 1) is not None and status.transfer(trade_id) is None
        assert dgr.stop_transfer(trade_id + 1).transfers == ()
        session = dgr.session
    assert session == hello.session  # the DGC's session survives; the router learnt it again
