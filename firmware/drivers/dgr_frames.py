"""DGR serial protocol v1: frames, checksum and argument codecs — pure, no I/O.

Why a separate pure module: the driver (on the board) and the router emulator (on the bench)
must agree byte for byte, so both import the one codec, and it can be unit-tested without a
serial line. The protocol itself is specified in ``docs/dgr-protocol.md``; this module is its
executable form, and the worked examples in that document are checked against it by the tests.

A frame is one line of printable ASCII::

    $<seq> <VERB> <key>=<value> ...*<CRC>\\r\\n          request  (DGC -> DGR)
    $<seq> ACK <VERB> <key>=<value> ...*<CRC>\\r\\n      positive answer (DGR -> DGC)
    $<seq> NAK <code> <NAME> <free text>*<CRC>\\r\\n     negative answer (DGR -> DGC)
    !<eseq> <KIND> <key>=<value> ...*<CRC>\\r\\n         unsolicited event (DGR -> DGC)

``<CRC>`` is CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final XOR) over
every byte from the start character up to, not including, the ``*``, as four hex digits.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from typing import Mapping, Union

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1024  # a line longer than this is noise, not a frame: dropped up to its newline
SEQ_MIN, SEQ_MAX = 1, 65535
MAX_DETAIL_CHARS = 200
DIRECTIONS = ("export", "import")
MODES = ("idle", "transfer", "safe", "fault")
END_REASONS = ("target", "end_at", "stop", "safe", "fault", "heartbeat", "reboot")
EMPTY_LIST = "-"  # the value of a list with no items (a value may not be empty)

REQUEST_VERBS = ("HELLO", "STATUS", "START", "STOP", "SAFE", "RESUME", "HEARTBEAT")
EVENT_KINDS = ("BOOT", "END", "FAULT", "MODE")

_VERB_RE = re.compile(r"[A-Z][A-Z0-9_]{1,15}\Z")
_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,23}\Z")
_VALUE_RE = re.compile(r"[A-Za-z0-9_.:,/+-]+\Z")
_SEQ_RE = re.compile(r"(?:0|[1-9][0-9]{0,4})\Z")
_CRC_RE = re.compile(r"[0-9A-Fa-f]{4}\Z")
_LOOSE_SEQ_RE = re.compile(rb"\$([1-9][0-9]{0,4}) ")
_START_CHARS = b"$!"
_FORBIDDEN_IN_TEXT = "$!*"


@dataclass(frozen=True)
class ErrorCode:
    code: int
    name: str
    retry_same_seq: bool  # True: the frame was not understood and nothing ran; resend it as is
    meaning: str


ERROR_CODES: dict[int, ErrorCode] = {
    e.code: e
    for e in (
        ErrorCode(10, "BAD_CRC", True, "the checksum did not match the frame; nothing was executed"),
        ErrorCode(11, "BAD_FRAME", True, "the line is not a well-formed frame; nothing was executed"),
        ErrorCode(20, "UNKNOWN_VERB", False, "the verb is not one of this protocol version's requests"),
        ErrorCode(21, "BAD_ARGS", False, "an argument is missing, unknown, repeated or not of the expected form"),
        ErrorCode(22, "OUT_OF_RANGE", False, "an argument is well-formed but outside the router's accepted range"),
        ErrorCode(23, "SEQ_REUSED", False, "the sequence number is in the answer window with a different request"),
        ErrorCode(30, "NO_SESSION", False, "no HELLO since the router started; send HELLO, then the request with a new seq"),
        ErrorCode(31, "SAFE_MODE", False, "the router is in safe mode; RESUME or HELLO first"),
        ErrorCode(32, "FAULT", False, "the router has a latched fault; see STATUS faults, RESUME to acknowledge"),
        ErrorCode(33, "END_PAST", False, "end_at is not after the router's clock"),
        ErrorCode(34, "TRADE_ACTIVE", False, "a transfer with this trade_id is already active"),
        ErrorCode(35, "CAPACITY", False, "too many active transfers, or total power above the router's rating"),
        ErrorCode(40, "PROTO_VERSION", False, "the protocol version in HELLO is not supported by the router"),
        ErrorCode(50, "INTERNAL", False, "the router failed to execute the request (its own fault)"),
    )
}
ERROR_NAMES: dict[str, int] = {e.name: e.code for e in ERROR_CODES.values()}


class FrameError(ValueError):
    """A line that is not a valid frame. ``seq`` is a best-effort guess (or None) so a router
    can tell the sender which frame it could not take; never trust it for anything else."""

    def __init__(self, message: str, *, code: int = 11, seq: int | None = None):
        super().__init__(message)
        self.code = code
        self.seq = seq


class ChecksumError(FrameError):
    def __init__(self, message: str, *, seq: int | None = None):
        super().__init__(message, code=10, seq=seq)


class ArgError(ValueError):
    """An argument of a well-formed frame is missing, malformed or out of range.

    ``code`` is the NAK code a router answers with (21 BAD_ARGS or 22 OUT_OF_RANGE)."""

    def __init__(self, key: str, expected: str, found: object, *, code: int = 21):
        found_text = "nothing" if found is None else repr(found)
        super().__init__(f"{key}: expected {expected}, found {found_text}")
        self.key, self.expected, self.found, self.code = key, expected, found, code


@dataclass(frozen=True)
class Request:
    seq: int
    verb: str
    args: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""  # the checksummed bytes: a router compares these to recognise a retry


@dataclass(frozen=True)
class Ack:
    seq: int
    verb: str
    args: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Nak:
    seq: int
    code: int
    name: str
    detail: str = ""

    @property
    def retry_same_seq(self) -> bool:
        known = ERROR_CODES.get(self.code)
        return bool(known and known.retry_same_seq)


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str
    args: Mapping[str, str] = field(default_factory=dict)


Frame = Union[Request, Ack, Nak, Event]


@dataclass(frozen=True)
class TransferInfo:
    """One active transfer as the router reports it (``xfers`` item in STATUS)."""

    trade_id: int
    direction: str
    power_w: int
    end_at: int
    energy_wh: int
    moved_wh: int


# --- checksum ------------------------------------------------------------------------------


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE; ``binascii.crc_hqx`` is this polynomial, non-reflected, in C."""
    return binascii.crc_hqx(data, 0xFFFF)


def crc16_reference(data: bytes) -> int:
    """Bit-by-bit CRC-16/CCITT-FALSE, for ports without ``binascii.crc_hqx`` (MicroPython
    bench boards) and to cross-check the fast one in tests."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


# --- encoding -----------------------------------------------------------------------------


def _finish(body: str) -> bytes:
    raw = body.encode("ascii")
    if len(raw) + 5 > MAX_LINE_BYTES:
        raise ValueError(f"frame of {len(raw) + 5} bytes exceeds the {MAX_LINE_BYTES}-byte line limit: {body[:60]}...")
    return raw + b"*%04X\r\n" % crc16(raw)


def _check_seq(seq: int) -> None:
    if type(seq) is not int or not SEQ_MIN <= seq <= SEQ_MAX:
        raise ValueError(f"seq: expected an integer from {SEQ_MIN} to {SEQ_MAX}, found {seq!r}")


def _check_verb(verb: str, what: str = "verb") -> None:
    if not isinstance(verb, str) or not _VERB_RE.match(verb) or verb in ("ACK", "NAK"):
        raise ValueError(f"{what}: expected 2-16 upper-case letters/digits/_ other than ACK and NAK, found {verb!r}")


def encode_value(value: object) -> str:
    """Integers in decimal, strings restricted to a charset that cannot break framing."""
    if isinstance(value, bool):
        raise ValueError(f"value: booleans are not on the wire (use 0/1), found {value!r}")
    text = str(value) if isinstance(value, int) else value
    if not isinstance(text, str) or not _VALUE_RE.match(text):
        raise ValueError(f"value: expected an integer or 1+ characters of [A-Za-z0-9_.:,/+-], found {value!r}")
    return text


def _encode_args(args: Mapping[str, object]) -> str:
    parts = []
    for key, value in args.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"key: expected a lower-case name like power_w, found {key!r}")
        parts.append(f" {key}={encode_value(value)}")
    return "".join(parts)


def encode_request(seq: int, verb: str, args: Mapping[str, object] | None = None) -> bytes:
    _check_seq(seq)
    _check_verb(verb)
    return _finish(f"${seq} {verb}{_encode_args(args or {})}")


def encode_ack(seq: int, verb: str, args: Mapping[str, object] | None = None) -> bytes:
    _check_seq(seq)
    _check_verb(verb)
    return _finish(f"${seq} ACK {verb}{_encode_args(args or {})}")


def sanitize_text(text: str) -> str:
    """Free text for a NAK: printable ASCII without the framing characters, bounded."""
    cleaned = "".join(c if " " <= c <= "~" and c not in _FORBIDDEN_IN_TEXT else "?" for c in str(text))
    return " ".join(cleaned.split())[:MAX_DETAIL_CHARS]


def encode_nak(seq: int, code: int, detail: str = "") -> bytes:
    _check_seq(seq)
    if code not in ERROR_CODES:
        raise ValueError(f"code: expected one of the error codes {sorted(ERROR_CODES)}, found {code!r}")
    detail = sanitize_text(detail)
    return _finish(f"${seq} NAK {code} {ERROR_CODES[code].name}" + (f" {detail}" if detail else ""))


def encode_event(seq: int, kind: str, args: Mapping[str, object] | None = None) -> bytes:
    _check_seq(seq)
    _check_verb(kind, "event kind")
    return _finish(f"!{seq} {kind}{_encode_args(args or {})}")


def encode_transfers(transfers: "list[TransferInfo] | tuple[TransferInfo, ...]") -> str:
    if not transfers:
        return EMPTY_LIST
    return ",".join(f"{t.trade_id}:{t.direction}:{t.power_w}:{t.end_at}:{t.energy_wh}:{t.moved_wh}" for t in transfers)


def encode_list(items: "list[str] | tuple[str, ...]") -> str:
    return ",".join(encode_value(i) for i in items) if items else EMPTY_LIST


# --- parsing ------------------------------------------------------------------------------


def guess_seq(line: bytes) -> int | None:
    match = _LOOSE_SEQ_RE.match(line)
    if match and int(match.group(1)) <= SEQ_MAX:
        return int(match.group(1))
    return None


def resync(line: bytes) -> tuple[bytes, bytes]:
    """Split off noise before the last start character: ``(noise, candidate_frame)``.

    Why the *last* one: ``$`` and ``!`` never occur inside a frame, so line noise that merged
    with the next frame (no newline in between) is dropped and the frame is still recovered.
    """
    cut = max(line.rfind(b"$"), line.rfind(b"!"))
    if cut <= 0:
        return b"", line
    return line[:cut], line[cut:]


def parse_frame(line: bytes) -> Frame:
    """One line (with or without its CR/LF) -> a frame, or FrameError naming what was wrong.

    Strict on purpose: a power converter must not act on a line that is almost a command.
    """
    line = line.rstrip(b"\r\n")
    if not line:
        raise FrameError("empty line: expected a frame starting with '$' or '!'")
    if len(line) > MAX_LINE_BYTES:
        raise FrameError(f"line of {len(line)} bytes: expected at most {MAX_LINE_BYTES}", seq=guess_seq(line))
    if line[:1] not in (b"$", b"!"):
        raise FrameError(f"line starts with {line[:1]!r}: expected '$' (request/answer) or '!' (event)")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("non-ASCII bytes in the line: expected printable ASCII", seq=guess_seq(line)) from None
    if any(not " " <= c <= "~" for c in text):
        raise FrameError("control characters in the line: expected printable ASCII", seq=guess_seq(line))
    star = text.rfind("*")
    if star < 0 or not _CRC_RE.match(text[star + 1:]):
        raise FrameError(f"no '*XXXX' checksum at the end of {text[:40]!r}", seq=guess_seq(line))
    body = line[:star]
    sent, computed = int(text[star + 1:], 16), crc16(body)
    if sent != computed:
        raise ChecksumError(f"checksum {sent:04X} does not match the frame's {computed:04X}", seq=guess_seq(line))
    tokens = text[1:star].split(" ")
    if len(tokens) < 2 or any(not t for t in tokens):
        raise FrameError(f"expected '<seq> <VERB> ...' separated by single spaces, found {text[:star]!r}")
    if not _SEQ_RE.match(tokens[0]) or not SEQ_MIN <= int(tokens[0]) <= SEQ_MAX:
        raise FrameError(f"sequence number {tokens[0]!r}: expected an integer from {SEQ_MIN} to {SEQ_MAX}")
    seq = int(tokens[0])
    if text[0] == "!":
        _check_head(tokens[1], "event kind", seq)
        return Event(seq, tokens[1], _parse_args(tokens[2:], seq))
    if tokens[1] == "NAK":
        return _parse_nak(seq, tokens)
    if tokens[1] == "ACK":
        if len(tokens) < 3:
            raise FrameError("ACK without the verb it answers", seq=seq)
        _check_head(tokens[2], "verb", seq)
        return Ack(seq, tokens[2], _parse_args(tokens[3:], seq))
    _check_head(tokens[1], "verb", seq)
    return Request(seq, tokens[1], _parse_args(tokens[2:], seq), bytes(body))


def _check_head(word: str, what: str, seq: int) -> None:
    if not _VERB_RE.match(word):
        raise FrameError(f"{what} {word!r}: expected 2-16 upper-case letters, digits or _", seq=seq)


def _parse_args(tokens: list[str], seq: int) -> dict[str, str]:
    args: dict[str, str] = {}
    for token in tokens:
        key, eq, value = token.partition("=")
        if not eq or not _KEY_RE.match(key) or not _VALUE_RE.match(value):
            raise FrameError(f"argument {token!r}: expected key=value (key like power_w, value of [A-Za-z0-9_.:,/+-])", seq=seq)
        if key in args:
            raise FrameError(f"argument {key!r} given twice", seq=seq)
        args[key] = value
    return args


def _parse_nak(seq: int, tokens: list[str]) -> Nak:
    if len(tokens) < 4 or not tokens[2].isdigit() or len(tokens[2]) > 3:
        raise FrameError("NAK: expected 'NAK <code> <NAME> [detail]'", seq=seq)
    code, name = int(tokens[2]), tokens[3]
    if not _VERB_RE.match(name):
        raise FrameError(f"NAK name {name!r}: expected upper-case letters", seq=seq)
    return Nak(seq, code, name, " ".join(tokens[4:]))


class LineSplitter:
    """Bytes from a serial port -> complete lines, never more than MAX_LINE_BYTES each.

    Why its own class: both ends must survive a peer (or noise) that sends megabytes without
    a newline; the partial line is bounded and an overlong line is discarded up to its end.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES):
        self._max = max_line_bytes
        self._buffer = bytearray()
        self._discarding = False
        self.discarded_lines = 0

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        self._buffer += data
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > self._max:
                    # no newline within the limit: this is noise; drop it and everything up to its newline
                    self._buffer.clear()
                    if not self._discarding:
                        self.discarded_lines += 1
                    self._discarding = True
                return lines
            line = bytes(self._buffer[:newline]).rstrip(b"\r")
            del self._buffer[: newline + 1]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > self._max:
                self.discarded_lines += 1
                continue
            if line:
                lines.append(line)

    def clear(self) -> None:
        self._buffer.clear()
        self._discarding = False


# --- arguments ----------------------------------------------------------------------------


def get_int(args: Mapping[str, str], key: str, lo: int, hi: int) -> int:
    """A decimal integer argument within [lo, hi]; ArgError says which and why."""
    raw = args.get(key)
    if raw is None:
        raise ArgError(key, f"an integer from {lo} to {hi}", None)
    if not re.fullmatch(r"-?(?:0|[1-9][0-9]{0,18})", raw):
        raise ArgError(key, f"a decimal integer from {lo} to {hi}", raw)
    value = int(raw)
    if not lo <= value <= hi:
        raise ArgError(key, f"an integer from {lo} to {hi}", value, code=22)
    return value


def get_choice(args: Mapping[str, str], key: str, choices: tuple[str, ...]) -> str:
    raw = args.get(key)
    if raw not in choices:
        raise ArgError(key, f"one of {', '.join(choices)}", raw)
    return raw


def get_str(args: Mapping[str, str], key: str) -> str:
    raw = args.get(key)
    if raw is None:
        raise ArgError(key, "a value", None)
    return raw


def check_keys(args: Mapping[str, str], allowed: tuple[str, ...]) -> None:
    """Unknown keys are errors: a router that ignores a key it does not know might drop a
    limit the DGC relies on."""
    for key in args:
        if key not in allowed:
            raise ArgError(key, f"one of the keys {', '.join(allowed) or '(none)'}", "unknown key " + key)


def parse_list(args: Mapping[str, str], key: str) -> tuple[str, ...]:
    raw = get_str(args, key)
    if raw == EMPTY_LIST:
        return ()
    items = tuple(raw.split(","))
    if any(not item for item in items):
        raise ArgError(key, "a comma-separated list or '-'", raw)
    return items


def parse_transfers(args: Mapping[str, str], key: str = "xfers") -> tuple[TransferInfo, ...]:
    transfers = []
    for item in parse_list(args, key):
        fields = item.split(":")
        if len(fields) != 6:
            raise ArgError(key, "items trade_id:direction:power_w:end_at:energy_wh:moved_wh", item)
        named = dict(zip(("trade_id", "direction", "power_w", "end_at", "energy_wh", "moved_wh"), fields))
        transfers.append(
            TransferInfo(
                trade_id=get_int(named, "trade_id", 1, 2**63 - 1),
                direction=get_choice(named, "direction", DIRECTIONS),
                power_w=get_int(named, "power_w", 0, 10**9),
                end_at=get_int(named, "end_at", 0, 2**40),
                energy_wh=get_int(named, "energy_wh", 0, 10**12),
                moved_wh=get_int(named, "moved_wh", 0, 10**12),
            )
        )
    return tuple(transfers)


def main(argv: "list[str] | None" = None) -> int:
    """``python -m firmware.drivers.dgr_frames '$2 STATUS'`` prints the frame with its checksum,
    ready to paste into a serial terminal (``picocom --omap crlf``) when debugging a router;
    a complete frame (with ``*XXXX``) is parsed and checked instead."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m firmware.drivers.dgr_frames '<frame without *CRC>' | '<frame with *CRC>'", file=sys.stderr)
        return 2
    status = 0
    for text in args:
        raw = text.encode("ascii", "replace")
        if b"*" in raw:
            try:
                print(f"ok: {parse_frame(raw)}")
            except FrameError as exc:
                print(f"bad: {exc}")
                status = 1
        else:
            print((raw + b"*%04X" % crc16(raw)).decode())
    return status


if __name__ == "__main__":
    raise SystemExit(main())
