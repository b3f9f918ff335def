"""Event lines: one line per event, whatever text the ledger (or a meter, or a router) put in a field.

Issue 7 k: a ledger answer's `detail` with a newline in it must not forge a second event line
(an `alarm.` an engineer would act on, or a `report.acked` that never happened).
"""

from __future__ import annotations

import io
import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.scheduler import events
from firmware.scheduler.events import EventLog

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z board-1 [A-Za-z0-9_.\-]+( .*)?\n$")


def emitted(event: str, **fields: object) -> str:
    stream = io.StringIO()
    EventLog("board-1", stream=stream).emit(event, **fields)
    return stream.getvalue()


def test_a_newline_from_the_ledger_cannot_forge_an_event_line():
    forged = "bad order\n2026-12-01T09:00:00.000Z board-1 report.acked nonce=7 duplicate=False"
    text = emitted("order.rejected", nonce=5, code="invalid", detail=forged)
    assert text.count("\n") == 1 and text.endswith("\n"), text
    assert LINE.match(text), text
    assert " report.acked" in text  # still there, but inside the quoted value, escaped
    assert events.parse_line(text)["fields"]["detail"] == forged


def test_carriage_return_escape_sequences_and_quotes_are_escaped():
    nasty = 'a\rb\x1b[2J\x00"quoted" back\\slash\u2028next\x85end'
    text = emitted("ledger.unavailable", detail=nasty)
    assert text.count("\n") == 1
    assert all(32 <= ord(ch) < 127 for ch in text.rstrip("\n")), repr(text)
    assert events.parse_line(text)["fields"]["detail"] == nasty


def test_plain_values_are_unchanged():
    text = emitted("delivery.started", trade=12, market=1800, direction="export", detail="router ended the transfer: fault")
    assert text.split(" ", 3)[3] == 'trade=12 market=1800 direction=export detail="router ended the transfer: fault"\n'
    assert emitted("x", empty="").endswith(' empty=""\n')


def test_an_event_name_or_key_with_odd_characters_is_made_safe():
    text = emitted("order.rejected\nboard-1 alarm.x", **{"de tail\n": "v"})
    assert text.count("\n") == 1
    assert LINE.match(text), text


_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
_value = st.one_of(_text, st.integers(), st.booleans(), st.none())


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), _value, max_size=6))
def test_any_fields_give_one_printable_line_that_parses_back(fields):
    text = emitted("ledger.answer", **fields)
    assert text.count("\n") == 1 and text.endswith("\n")
    assert all(32 <= ord(ch) < 127 for ch in text.rstrip("\n")), repr(text)
    parsed = events.parse_line(text)
    assert parsed["event"] == "ledger.answer"
    assert parsed["fields"] == {k: str(v) for k, v in fields.items()}


def test_json_escapes_are_standard():
    text = emitted("e", detail="line1\nline2")
    assert text.rstrip("\n").endswith('detail=' + json.dumps("line1\nline2"))
