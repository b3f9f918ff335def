"""The delivery lifecycle (firmware/delivery_states.py) and its journal transactions: every
declared transition is accepted, every other one is refused and changes nothing."""

from __future__ import annotations

import itertools

import coincurve
import pytest

from firmware import delivery_states as ds
from firmware.journal import Journal
from firmware.journal.deliveries import MeteredDelivery
from firmware.keystore import DeviceKey
from firmware.messages import new_fields

LEGAL = {(a, b) for a, targets in ds.TRANSITIONS.items() for b in targets}
ALL_PAIRS = set(itertools.product(ds.STATES, ds.STATES))

# How to bring a fresh delivery (scheduled) to each state through legal transitions only.
PATHS = {
    ds.SCHEDULED: [],
    ds.STARTING: [ds.STARTING],
    ds.RUNNING: [ds.STARTING, ds.RUNNING],
    ds.INTERRUPTED: [ds.STARTING, ds.RUNNING, ds.INTERRUPTED],
    ds.REFUSED: [ds.REFUSED],
    ds.METERED: [ds.STARTING, ds.RUNNING, ds.METERED],
    ds.REPORTED: [ds.STARTING, ds.RUNNING, ds.METERED, ds.REPORTED],
}


def test_the_table_is_closed_and_every_state_is_reachable():
    assert set(ds.TRANSITIONS) == set(ds.STATES)
    assert all(targets <= set(ds.STATES) for targets in ds.TRANSITIONS.values())
    assert set(PATHS) == set(ds.STATES)
    # terminal except the re-signing of an expired report
    assert ds.TRANSITIONS[ds.REPORTED] == {ds.REPORTED}
    # nothing goes back to scheduled, and starting is entered only from scheduled: a START is
    # never sent twice for one delivery
    assert not any(b == ds.SCHEDULED for _, b in LEGAL)
    assert {a for a, b in LEGAL if b == ds.STARTING} == {ds.SCHEDULED}


@pytest.mark.parametrize("current,wanted", sorted(ALL_PAIRS))
def test_check_transition_accepts_exactly_the_declared_ones(current, wanted):
    if (current, wanted) in LEGAL:
        ds.check_transition(7, current, wanted)
    else:
        with pytest.raises(ds.IllegalTransition, match=f"trade 7: it is {current}, cannot become {wanted}"):
            ds.check_transition(7, current, wanted)


def test_unknown_state_and_missing_delivery_are_illegal():
    with pytest.raises(ds.IllegalTransition, match="cannot become paid"):
        ds.check_transition(1, ds.METERED, "paid")
    with pytest.raises(ds.IllegalTransition, match="no such delivery"):
        ds.check_transition(1, None, ds.RUNNING)


@pytest.mark.parametrize("before,delivered,contracted,tolerance,expected", [
    (ds.RUNNING, 100, 100, 0, ds.DELIVERED),
    (ds.RUNNING, 99, 100, 0, ds.FAILED),
    (ds.RUNNING, 98, 100, 2, ds.DELIVERED),
    (ds.RUNNING, 97, 100, 2, ds.FAILED),
    (ds.INTERRUPTED, 100, 100, 0, ds.DELIVERED),  # cut short after it had reached its target
    (ds.REFUSED, 100, 100, 5, ds.FAILED),  # never ran: failed whatever the meter says
])
def test_outcome(before, delivered, contracted, tolerance, expected):
    assert ds.outcome(before, delivered, contracted, tolerance) == expected


# --- the journal's transitions --------------------------------------------------------------------------


class _T:
    def __init__(self, trade_id):
        self.trade_id, self.market_id, self.side, self.energy_wh = trade_id, 1_800, "sell", 100
        self.price_per_kwh_minor, self.order_nonce, self.counterparty = 20, 1, "cd" * 20


def _journal(tmp_path) -> Journal:
    journal = Journal(tmp_path / "j.sqlite3", clock_ms=lambda: 5_000)
    key = DeviceKey(coincurve.PrivateKey(b"\x02" * 32))

    def build(nonce):
        return new_fields("order", ledger_id="t", device_id=key.device_id, nonce=nonce, issued_at=1, ttl_s=600,
                          market_id=1_800, side="sell", energy_wh=10_000, price_per_kwh_minor=20)

    order = journal.enqueue_order(build, key)
    t = _T(1)
    t.order_nonce = order.fields["nonce"]
    journal.record_trades([t], cursor=1)
    journal.key = key
    return journal


def _apply(journal: Journal, to_state: str) -> None:
    if to_state == ds.METERED:
        journal.meter_slot([MeteredDelivery(1, 100, 100_000, ds.DELIVERED)], [])
    elif to_state == ds.REPORTED:
        def build(nonce):
            return new_fields("delivery_report", ledger_id="t", device_id=journal.key.device_id, nonce=nonce, issued_at=1,
                              ttl_s=600, trade_id=1, market_id=1_800, role="seller", energy_wh=100, status="delivered")

        journal.enqueue_report(1, build, journal.key)
    else:
        journal.transition(1, to_state, f"to {to_state}")


@pytest.mark.parametrize("current,wanted", sorted(ALL_PAIRS))
def test_journal_applies_legal_transitions_and_refuses_the_rest_unchanged(tmp_path, current, wanted):
    journal = _journal(tmp_path)
    try:
        for step in PATHS[current]:
            _apply(journal, step)
        assert journal.delivery(1).state == current
        history = journal.delivery_history(1)
        nonces = journal.next_nonce()
        if (current, wanted) in LEGAL:
            _apply(journal, wanted)
            assert journal.delivery(1).state == wanted
            assert journal.delivery_history(1)[-1][:2] == (current, wanted)
        else:
            with pytest.raises(ds.IllegalTransition):
                _apply(journal, wanted)
            assert journal.delivery(1).state == current  # nothing changed ...
            assert journal.delivery_history(1) == history  # ... nothing logged ...
            assert journal.next_nonce() == nonces  # ... and no nonce taken for a refused report
    finally:
        journal.close()


def test_meter_slot_is_all_or_nothing(tmp_path):
    """One illegal delivery in a slot's metering: no delivery of the slot is metered."""
    journal = _journal(tmp_path)
    try:
        journal.transition(1, ds.REFUSED)
        with pytest.raises(ds.IllegalTransition):
            journal.meter_slot([MeteredDelivery(1, 0, 0, ds.FAILED), MeteredDelivery(99, 0, 0, ds.FAILED)], [])
        assert journal.delivery(1).state == ds.REFUSED
    finally:
        journal.close()
