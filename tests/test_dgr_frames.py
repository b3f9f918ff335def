"""DGR protocol codec: checksum, encoding, strict parsing, resync, arguments, error codes.

Pure tests (no serial line): the codec is what both the driver and the router emulator trust,
so it must reject everything that is not exactly a frame, with a message naming what was wrong.
The worked examples of docs/dgr-protocol.md are checked here so the document cannot drift.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from firmware.drivers import dgr_frames as f

DOC = Path(__file__).resolve().parents[1] / "docs" / "dgr-protocol.md"


# --- checksum ----------------------------------------------------------------------------------


def test_crc16_is_ccitt_false_with_its_check_value():
    assert f.crc16(b"123456789") == 0x29B1
    assert f.crc16_reference(b"123456789") == 0x29B1


def test_fast_crc_matches_the_reference_on_random_data():
    rng = random.Random(7)
    for _ in range(300):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        assert f.crc16(data) == f.crc16_reference(data)


# --- encode / parse round trips --------------------------------------------------------------


def test_request_round_trip_keeps_order_values_and_checksummed_body():
    frame = f.encode_request(3, "START", {"trade_id": 4711, "direction": "export", "power_w": 2000,
                                          "end_at": 1767226800, "energy_wh": 1000})
    assert frame == b"$3 START trade_id=4711 direction=export power_w=2000 end_at=1767226800 energy_wh=1000*96CC\r\n"
    parsed = f.parse_frame(frame)
    assert isinstance(parsed, f.Request)
    assert (parsed.seq, parsed.verb) == (3, "START")
    assert list(parsed.args.items()) == [("trade_id", "4711"), ("direction", "export"), ("power_w", "2000"),
                                         ("end_at", "1767226800"), ("energy_wh", "1000")]
    assert parsed.body == frame[: frame.index(b"*")]


def test_ack_nak_and_event_round_trip():
    ack = f.parse_frame(f.encode_ack(65535, "STATUS", {"mode": "idle", "power_w": -1500, "faults": "-"}))
    assert ack == f.Ack(65535, "STATUS", {"mode": "idle", "power_w": "-1500", "faults": "-"})
    nak = f.parse_frame(f.encode_nak(9, 33, "end_at 5 is not after router time 7"))
    assert nak == f.Nak(9, 33, "END_PAST", "end_at 5 is not after router time 7")
    assert not nak.retry_same_seq
    assert f.parse_frame(f.encode_nak(9, 10)).retry_same_seq
    event = f.parse_frame(f.encode_event(1, "END", {"trade_id": 7, "reason": "target", "moved_wh": 1000}))
    assert event == f.Event(1, "END", {"trade_id": "7", "reason": "target", "moved_wh": "1000"})


def test_lower_case_checksum_and_bare_newline_are_accepted():
    assert f.parse_frame(b"$2 STATUS*a757\n") == f.Request(2, "STATUS", {}, b"$2 STATUS")


def test_nak_detail_is_sanitized_and_bounded():
    frame = f.encode_nak(4, 21, "bad $value* with !bang\tand\nnewline " + "x" * 500)
    parsed = f.parse_frame(frame)
    assert "$" not in parsed.detail and "*" not in parsed.detail and "!" not in parsed.detail
    assert len(parsed.detail) <= f.MAX_DETAIL_CHARS
    assert parsed.detail.startswith("bad ?value? with ?bang?and?newline")


@pytest.mark.parametrize("call, message", [
    (lambda: f.encode_request(0, "STATUS"), "seq: expected an integer from 1 to 65535, found 0"),
    (lambda: f.encode_request(65536, "STATUS"), "found 65536"),
    (lambda: f.encode_request(True, "STATUS"), "found True"),
    (lambda: f.encode_request(1, "ACK"), "other than ACK and NAK"),
    (lambda: f.encode_request(1, "status"), "upper-case"),
    (lambda: f.encode_request(1, "START", {"router": "a b"}), "found 'a b'"),
    (lambda: f.encode_request(1, "START", {"router": "x*1234"}), "found 'x*1234'"),
    (lambda: f.encode_request(1, "START", {"router": "$1"}), "found '$1'"),
    (lambda: f.encode_request(1, "START", {"router": ""}), "found ''"),
    (lambda: f.encode_request(1, "START", {"flag": True}), "booleans are not on the wire"),
    (lambda: f.encode_request(1, "START", {"Power": 1}), "key: expected a lower-case name"),
    (lambda: f.encode_nak(1, 99), "expected one of the error codes"),
    (lambda: f.encode_ack(1, "STATUS", {"xfers": "1" * 1100}), "exceeds the 1024-byte line limit"),
])
def test_encoding_refuses_what_would_break_framing(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


# --- strict parsing ----------------------------------------------------------------------------


def _with_crc(body: bytes) -> bytes:
    return body + b"*%04X" % f.crc16(body)


@pytest.mark.parametrize("line, message", [
    (b"", "empty line"),
    (b"hello there", "expected '$' (request/answer) or '!' (event)"),
    (b"$2 STATUS", "no '*XXXX' checksum"),
    (b"$2 STATUS*12", "no '*XXXX' checksum"),
    (b"$2 STATUS*A758", "checksum A758 does not match the frame's A757"),
    (_with_crc(b"$2  STATUS"), "single spaces"),
    (_with_crc(b"$2 STATUS "), "single spaces"),
    (_with_crc(b"$02 STATUS"), "sequence number '02'"),
    (_with_crc(b"$0 STATUS"), "sequence number '0'"),
    (_with_crc(b"$65536 STATUS"), "sequence number '65536'"),
    (_with_crc(b"$x STATUS"), "sequence number 'x'"),
    (_with_crc(b"$2"), "expected '<seq> <VERB> ...'"),
    (_with_crc(b"$2 status"), "verb 'status'"),
    (_with_crc(b"$2 START power_w"), "argument 'power_w': expected key=value"),
    (_with_crc(b"$2 START power_w="), "argument 'power_w='"),
    (_with_crc(b"$2 START Power=5"), "argument 'Power=5'"),
    (_with_crc(b"$2 START a=1 a=2"), "argument 'a' given twice"),
    (_with_crc(b"$2 ACK"), "ACK without the verb"),
    (_with_crc(b"$2 NAK x BAD"), "expected 'NAK <code> <NAME> [detail]'"),
    (_with_crc(b"$2 NAK 10 bad"), "NAK name 'bad'"),
    (_with_crc(b"!2 end x=1"), "event kind 'end'"),
    (_with_crc(b"$2 STATUS \xff"), "non-ASCII"),
    (_with_crc(b"$2 STATUS\x00"), "control characters"),
    (_with_crc(b"$2 START " + b"k=v " * 300 + b"k=v"), "expected at most 1024"),
])
def test_parse_rejects_everything_that_is_not_exactly_a_frame(line, message):
    with pytest.raises(f.FrameError, match=re.escape(message)):
        f.parse_frame(line)


def test_a_bad_checksum_is_a_checksum_error_with_a_best_effort_seq_for_the_nak():
    with pytest.raises(f.ChecksumError) as caught:
        f.parse_frame(b"$12 STATUS*EE17")
    assert (caught.value.code, caught.value.seq) == (10, 12)


def test_random_bytes_only_ever_raise_frame_error():
    rng = random.Random(11)
    alphabet = b"$!*= 0123456789ABCDEFSTATUSackNAK\r\n\x00\xff-,:"
    for _ in range(3000):
        line = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        try:
            f.parse_frame(line)
        except f.FrameError:
            pass


def test_resync_drops_noise_glued_before_a_frame():
    noise, frame = f.resync(b"\x13noise$$!x$2 STATUS*A757")
    assert noise == b"\x13noise$$!x"
    assert f.parse_frame(frame) == f.Request(2, "STATUS", {}, b"$2 STATUS")
    assert f.resync(b"$2 STATUS*A757") == (b"", b"$2 STATUS*A757")


# --- line splitting ----------------------------------------------------------------------------


def test_line_splitter_joins_partial_reads_and_strips_line_ends():
    splitter = f.LineSplitter()
    assert splitter.feed(b"$2 STA") == []
    assert splitter.feed(b"TUS*A757\r\n!1 BO") == [b"$2 STATUS*A757"]
    assert splitter.feed(b"OT\n\n\r\n") == [b"!1 BOOT"]  # empty lines are not frames


def test_line_splitter_discards_overlong_lines_and_recovers_on_the_next():
    splitter = f.LineSplitter(max_line_bytes=64)
    assert splitter.feed(b"x" * 50) == []
    assert splitter.feed(b"y" * 50) == []  # over the limit without a newline: dropped
    assert splitter.feed(b"z" * 5000) == []  # still the same noise line, memory stays bounded
    assert splitter.feed(b"tail of noise\n$2 STATUS*A757\n") == [b"$2 STATUS*A757"]
    assert splitter.feed(b"w" * 70 + b"\n$3 STATUS*279C\n") == [b"$3 STATUS*279C"]  # a complete overlong line goes
    assert splitter.discarded_lines == 2


def test_line_splitter_drops_a_complete_overlong_line():
    splitter = f.LineSplitter(max_line_bytes=16)
    assert splitter.feed(b"w" * 17 + b"\n$2 STATUS*A757\n") == [b"$2 STATUS*A757"]
    assert splitter.discarded_lines == 1


# --- arguments ---------------------------------------------------------------------------------


def test_get_int_distinguishes_malformed_from_out_of_range():
    args = {"power_w": "0", "end_at": "12x", "energy_wh": "-5", "lead": "007"}
    with pytest.raises(f.ArgError, match=re.escape("power_w: expected an integer from 1 to 10000, found 0")) as caught:
        f.get_int(args, "power_w", 1, 10000)
    assert caught.value.code == 22
    with pytest.raises(f.ArgError, match=re.escape("end_at: expected a decimal integer")) as caught:
        f.get_int(args, "end_at", 0, 2**40)
    assert caught.value.code == 21
    with pytest.raises(f.ArgError, match="found nothing") as caught:
        f.get_int(args, "trade_id", 1, 9)
    assert caught.value.code == 21
    with pytest.raises(f.ArgError, match="decimal"):
        f.get_int(args, "lead", 0, 10)
    assert f.get_int(args, "energy_wh", -10, 10) == -5


def test_choices_keys_and_lists():
    with pytest.raises(f.ArgError, match=re.escape("direction: expected one of export, import, found 'sideways'")):
        f.get_choice({"direction": "sideways"}, "direction", f.DIRECTIONS)
    with pytest.raises(f.ArgError, match=re.escape("expected one of the keys trade_id, found 'unknown key force'")):
        f.check_keys({"trade_id": "1", "force": "1"}, ("trade_id",))
    assert f.parse_list({"faults": "-"}, "faults") == ()
    assert f.parse_list({"faults": "overtemp,heartbeat_lost"}, "faults") == ("overtemp", "heartbeat_lost")
    with pytest.raises(f.ArgError):
        f.parse_list({"faults": "a,,b"}, "faults")
    assert f.encode_list([]) == "-" and f.encode_list(["a", "b"]) == "a,b"


def test_transfers_round_trip_and_malformed_items_are_refused():
    transfers = (f.TransferInfo(4711, "export", 2000, 1767226800, 1000, 350),
                 f.TransferInfo(2**63 - 1, "import", 10000, 2**40, 10**9, 10**9))
    encoded = f.encode_transfers(transfers)
    assert f.parse_transfers({"xfers": encoded}) == transfers
    assert f.parse_transfers({"xfers": f.encode_transfers(())}) == ()
    with pytest.raises(f.ArgError, match="trade_id:direction:power_w:end_at:energy_wh:moved_wh"):
        f.parse_transfers({"xfers": "1:export:2000"})
    with pytest.raises(f.ArgError, match="direction"):
        f.parse_transfers({"xfers": "1:up:2000:5:5:0"})


def test_a_status_with_eight_worst_case_transfers_fits_in_a_line():
    worst = [f.TransferInfo(2**63 - 1 - i, "export", 10**9, 2**40, 10**12, 10**12) for i in range(8)]
    frame = f.encode_ack(65535, "STATUS", {"mode": "transfer", "power_w": -(10**9), "export_wh": 10**15,
                                           "import_wh": 10**15, "soc_percent": 100, "faults": "overtemp,heartbeat_lost",
                                           "xfers": f.encode_transfers(worst), "time": 2**40})
    assert f.parse_transfers(f.parse_frame(frame).args) == tuple(worst)


# --- error codes and the document -------------------------------------------------------------


def test_only_unreadable_frames_are_retried_with_the_same_seq():
    assert {c for c, e in f.ERROR_CODES.items() if e.retry_same_seq} == {10, 11}
    assert len({e.name for e in f.ERROR_CODES.values()}) == len(f.ERROR_CODES)
    assert all(f.ERROR_NAMES[e.name] == c for c, e in f.ERROR_CODES.items())


def test_the_document_lists_every_error_code_with_its_name():
    text = DOC.read_text(encoding="utf-8")
    documented = {int(c): n for c, n in re.findall(r"^\| (\d\d) \| `([A-Z_]+)` \|", text, flags=re.M)}
    assert documented == {c: e.name for c, e in f.ERROR_CODES.items()}


def test_every_worked_example_in_the_document_has_a_valid_checksum():
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```frames\n(.*?)```", text, flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert len(lines) >= 25
    kinds = set()
    for line in lines:
        frame = f.parse_frame(line.encode("ascii"))
        kinds.add(type(frame).__name__)
        if isinstance(frame, f.Request):
            assert frame.verb in f.REQUEST_VERBS
        elif isinstance(frame, f.Event):
            assert frame.kind in f.EVENT_KINDS
        elif isinstance(frame, f.Nak):
            assert f.ERROR_CODES[frame.code].name == frame.name
    assert kinds == {"Request", "Ack", "Nak", "Event"}
    # the prose example of a damaged request: the frame's real checksum is the one the text names
    assert f.crc16(b"$12 STATUS") == 0xEE16 and "`$12 STATUS*EE17` (the frame's checksum is `EE16`)" in text


def test_command_line_helper_appends_and_checks_checksums(capsys):
    assert f.main(["$2 STATUS"]) == 0
    assert capsys.readouterr().out.strip() == "$2 STATUS*A757"
    assert f.main(["$2 STATUS*A758"]) == 1
    assert "does not match" in capsys.readouterr().out
