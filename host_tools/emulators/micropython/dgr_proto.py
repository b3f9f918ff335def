# DGR serial protocol v1 codec, in MicroPython: the router's half of firmware/drivers/dgr_frames.py.
#
# The CPython codec cannot be imported on a board (dataclasses, typing, re with \Z and counted
# repetition, binascii.crc_hqx are all missing), so this is a port of the parts a router needs:
# CRC-16/CCITT-FALSE, the bounded line splitter, resync on the last start character, strict
# request parsing, and encoding of ACK/NAK/event frames with the same texts. Character classes
# are checked by hand instead of with regular expressions. Argument pairs are kept as ordered
# lists because a MicroPython dict does not keep insertion order, and the wire order matters.
#
# The spec is docs/dgr-protocol.md; hil_tests/test_micropython_emulators.py checks this codec
# against the document's worked examples and the CPython codec.

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1024
SEQ_MAX = 65535
MAX_DETAIL_CHARS = 200
DIRECTIONS = ("export", "import")
REQUEST_VERBS = ("HELLO", "STATUS", "START", "STOP", "SAFE", "RESUME", "HEARTBEAT")
EMPTY_LIST = "-"

ERROR_NAMES = {
    10: "BAD_CRC", 11: "BAD_FRAME", 20: "UNKNOWN_VERB", 21: "BAD_ARGS", 22: "OUT_OF_RANGE",
    23: "SEQ_REUSED", 30: "NO_SESSION", 31: "SAFE_MODE", 32: "FAULT", 33: "END_PAST",
    34: "TRADE_ACTIVE", 35: "CAPACITY", 40: "PROTO_VERSION", 50: "INTERNAL",
}

_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
_VERB_REST = _UPPER + _DIGITS + "_"
_KEY_REST = _LOWER + _DIGITS + "_"
_VALUE_CHARS = _UPPER + _LOWER + _DIGITS + "_.:,/+-"


def _make_table():
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _make_table()


def crc16(data):
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final XOR), by table."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


class FrameError(Exception):
    def __init__(self, message, code=11, seq=None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.seq = seq

    def __str__(self):
        return self.message


class ArgError(Exception):
    """code 21 (BAD_ARGS) or 22 (OUT_OF_RANGE); str() is the NAK text after the verb."""

    def __init__(self, key, expected, found, code=21):
        found_text = "nothing" if found is None else repr(found)
        self.message = "%s: expected %s, found %s" % (key, expected, found_text)
        super().__init__(self.message)
        self.key = key
        self.code = code

    def __str__(self):
        return self.message


class Request:
    def __init__(self, seq, verb, args, keys, body):
        self.seq, self.verb, self.args, self.keys, self.body = seq, verb, args, keys, body


class Other:
    """A well-formed frame that is not a request (ACK, NAK or event): a router ignores it."""
    def __init__(self, seq, kind):
        self.seq, self.kind = seq, kind


# --- character classes --------------------------------------------------------------------


def _all_in(text, allowed):
    for c in text:
        if c not in allowed:
            return False
    return True


def is_verb(word):
    return 2 <= len(word) <= 16 and word[0] in _UPPER and _all_in(word[1:], _VERB_REST)


def is_key(word):
    return 1 <= len(word) <= 24 and word[0] in _LOWER and _all_in(word[1:], _KEY_REST)


def is_value(word):
    return len(word) > 0 and _all_in(word, _VALUE_CHARS)


def is_session(word):
    return len(word) == 8 and _all_in(word, "0123456789abcdef")


def _is_seq_token(word):
    # 0|[1-9][0-9]{0,4}
    return 1 <= len(word) <= 5 and _all_in(word, _DIGITS) and (word == "0" or word[0] != "0")


def _is_decimal(text):
    # -?(0|[1-9][0-9]{0,18})
    digits = text[1:] if text[:1] == "-" else text
    if not 1 <= len(digits) <= 19 or not _all_in(digits, _DIGITS):
        return False
    return digits == "0" or digits[0] != "0"


# --- parsing ------------------------------------------------------------------------------


def guess_seq(line):
    """The seq of a damaged request if it can still be read ('$<seq> '), else None."""
    if line[:1] != b"$":
        return None
    i = 1
    while i < len(line) and i <= 6 and 0x30 <= line[i] <= 0x39:
        i += 1
    digits = line[1:i]
    if not 1 <= len(digits) <= 5 or digits[0] == 0x30 or i >= len(line) or line[i] != 0x20:
        return None
    seq = int(digits.decode())
    return seq if seq <= SEQ_MAX else None


def resync(line):
    """(noise, candidate): the frame starts at the last '$' or '!' of the line."""
    cut = max(line.rfind(b"$"), line.rfind(b"!"))
    if cut <= 0:
        return b"", line
    return line[:cut], line[cut:]


def parse_frame(line):
    while line[-1:] in (b"\r", b"\n"):
        line = line[:-1]
    if not line:
        raise FrameError("empty line: expected a frame starting with '$' or '!'")
    if len(line) > MAX_LINE_BYTES:
        raise FrameError("line of %d bytes: expected at most %d" % (len(line), MAX_LINE_BYTES), seq=guess_seq(line))
    if line[:1] not in (b"$", b"!"):
        raise FrameError("line starts with %r: expected '$' (request/answer) or '!' (event)" % (line[:1],))
    for byte in line:
        if byte > 0x7E:
            raise FrameError("non-ASCII bytes in the line: expected printable ASCII", seq=guess_seq(line))
        if byte < 0x20:
            raise FrameError("control characters in the line: expected printable ASCII", seq=guess_seq(line))
    text = line.decode()
    star = text.rfind("*")
    crc_text = text[star + 1:] if star >= 0 else ""
    if star < 0 or len(crc_text) != 4 or not _all_in(crc_text, _HEX):
        raise FrameError("no '*XXXX' checksum at the end of %r" % (text[:40],), seq=guess_seq(line))
    body = line[:star]
    sent, computed = int(crc_text, 16), crc16(body)
    if sent != computed:
        raise FrameError("checksum %04X does not match the frame's %04X" % (sent, computed), code=10,
                         seq=guess_seq(line))
    tokens = text[1:star].split(" ")
    if len(tokens) < 2 or "" in tokens:
        raise FrameError("expected '<seq> <VERB> ...' separated by single spaces, found %r" % (text[:star],))
    if not _is_seq_token(tokens[0]) or not 1 <= int(tokens[0]) <= SEQ_MAX:
        raise FrameError("sequence number %r: expected an integer from 1 to %d" % (tokens[0], SEQ_MAX))
    seq = int(tokens[0])
    if text[0] == "!":
        _check_head(tokens[1], "event kind", seq)
        _parse_args(tokens[2:], seq)
        return Other(seq, "event")
    if tokens[1] == "NAK":
        if len(tokens) < 4 or not tokens[2].isdigit() or len(tokens[2]) > 3:
            raise FrameError("NAK: expected 'NAK <code> <NAME> [detail]'", seq=seq)
        if not is_verb(tokens[3]):
            raise FrameError("NAK name %r: expected upper-case letters" % (tokens[3],), seq=seq)
        return Other(seq, "NAK")
    if tokens[1] == "ACK":
        if len(tokens) < 3:
            raise FrameError("ACK without the verb it answers", seq=seq)
        _check_head(tokens[2], "verb", seq)
        _parse_args(tokens[3:], seq)
        return Other(seq, "ACK")
    _check_head(tokens[1], "verb", seq)
    args, keys = _parse_args(tokens[2:], seq)
    return Request(seq, tokens[1], args, keys, bytes(body))


def _check_head(word, what, seq):
    if not is_verb(word):
        raise FrameError("%s %r: expected 2-16 upper-case letters, digits or _" % (what, word), seq=seq)


def _parse_args(tokens, seq):
    args = {}
    keys = []
    for token in tokens:
        key, eq, value = token.partition("=")
        if not eq or not is_key(key) or not is_value(value):
            raise FrameError("argument %r: expected key=value (key like power_w, value of [A-Za-z0-9_.:,/+-])"
                             % (token,), seq=seq)
        if key in args:
            raise FrameError("argument %r given twice" % (key,), seq=seq)
        args[key] = value
        keys.append(key)
    return args, keys


class LineSplitter:
    """Bytes -> complete lines, each at most MAX_LINE_BYTES; an overlong line is dropped up
    to its newline, so a peer streaming garbage cannot grow the buffer."""

    def __init__(self, max_line_bytes=MAX_LINE_BYTES):
        self._max = max_line_bytes
        self._buffer = bytearray()
        self._discarding = False
        self.discarded_lines = 0

    def feed(self, data):
        lines = []
        self._buffer.extend(data)
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > self._max:
                    self._buffer = bytearray()
                    if not self._discarding:
                        self.discarded_lines += 1
                    self._discarding = True
                return lines
            line = bytes(self._buffer[:newline])
            self._buffer = self._buffer[newline + 1:]
            while line[-1:] == b"\r":
                line = line[:-1]
            if self._discarding:
                self._discarding = False
                continue
            if len(line) > self._max:
                self.discarded_lines += 1
                continue
            if line:
                lines.append(line)

    def clear(self):
        self._buffer = bytearray()
        self._discarding = False


# --- encoding -----------------------------------------------------------------------------


def encode_value(value):
    if isinstance(value, bool):
        raise ValueError("booleans are not on the wire")
    text = str(value) if isinstance(value, int) else value
    if not isinstance(text, str) or not is_value(text):
        raise ValueError("value %r cannot be sent" % (value,))
    return text


def _finish(body):
    raw = body.encode()
    if len(raw) + 5 > MAX_LINE_BYTES:
        raise ValueError("frame of %d bytes exceeds the line limit" % (len(raw) + 5))
    return raw + ("*%04X\r\n" % crc16(raw)).encode()


def _encode_pairs(pairs):
    return "".join(" %s=%s" % (key, encode_value(value)) for key, value in pairs)


def encode_request(seq, verb, pairs=()):
    return _finish("$%d %s%s" % (seq, verb, _encode_pairs(pairs)))


def encode_ack(seq, verb, pairs=()):
    return _finish("$%d ACK %s%s" % (seq, verb, _encode_pairs(pairs)))


def sanitize_text(text):
    cleaned = "".join(c if " " <= c <= "~" and c not in "$!*" else "?" for c in str(text))
    return " ".join(cleaned.split())[:MAX_DETAIL_CHARS]


def encode_nak(seq, code, detail=""):
    detail = sanitize_text(detail)
    return _finish("$%d NAK %d %s" % (seq, code, ERROR_NAMES[code]) + (" " + detail if detail else ""))


def encode_event(seq, kind, pairs=()):
    return _finish("!%d %s%s" % (seq, kind, _encode_pairs(pairs)))


def encode_list(items):
    return ",".join(encode_value(i) for i in items) if items else EMPTY_LIST


# --- arguments ----------------------------------------------------------------------------


def get_int(args, key, lo, hi):
    raw = args.get(key)
    if raw is None:
        raise ArgError(key, "an integer from %d to %d" % (lo, hi), None)
    if not _is_decimal(raw):
        raise ArgError(key, "a decimal integer from %d to %d" % (lo, hi), raw)
    value = int(raw)
    if not lo <= value <= hi:
        raise ArgError(key, "an integer from %d to %d" % (lo, hi), value, code=22)
    return value


def get_choice(args, key, choices):
    raw = args.get(key)
    if raw not in choices:
        raise ArgError(key, "one of " + ", ".join(choices), raw)
    return raw


def get_str(args, key):
    raw = args.get(key)
    if raw is None:
        raise ArgError(key, "a value", None)
    return raw


def check_keys(req, allowed):
    for key in req.keys:
        if key not in allowed:
            raise ArgError(key, "one of the keys " + (", ".join(allowed) or "(none)"), "unknown key " + key)
