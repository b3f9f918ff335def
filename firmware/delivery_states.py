"""The delivery lifecycle: its states and the transitions allowed between them, in one place.

Why a declared state machine: a delivery moves a household's energy and money, and every step
of it (the intent to start, the router's answer, the meter's verdict, the signed report) must
survive a kill at any instant. Each transition is one journal transaction
(firmware/journal/deliveries.py ``transition``), checked here first; a transition not listed
below is refused, logged and alarmed (``alarm.delivery_transition``), never silently rewritten.

States (docs/delivery.md has the diagram):

- ``scheduled``   the trade is journalled; nothing sent to the router yet.
- ``starting``    the intent is journalled and START is (about to be) on the wire. After a kill
                  in this state the router is asked about the trade before anything else: a
                  transfer it knows is ``running``; one it does not know is never started a
                  second time blindly (see ``firmware/scheduler/deliveries.py``).
- ``running``     the router acknowledged the START (or reported the transfer active).
- ``interrupted`` the transfer ran, or may have run, and was cut short (lost link, the router's
                  own END for safe/fault/heartbeat, an answer that contradicted the START). It
                  takes a share of the metered energy like a running one.
- ``refused``     it never ran: the router refused it (NAK), the slot passed, the clock guard
                  stopped it. It is reported failed with 0 Wh and takes no metered energy.
- ``metered``     the slot was metered (all of its deliveries in ONE transaction); the
                  delivered energy and the outcome are fixed.
- ``reported``    the report is signed and in the outbox (same transaction as the nonce). A
                  report the ledger rejects as expired is signed again: reported -> reported.
"""

from __future__ import annotations

SCHEDULED = "scheduled"
STARTING = "starting"
RUNNING = "running"
INTERRUPTED = "interrupted"
REFUSED = "refused"
METERED = "metered"
REPORTED = "reported"

STATES = (SCHEDULED, STARTING, RUNNING, INTERRUPTED, REFUSED, METERED, REPORTED)

TRANSITIONS: dict[str, frozenset[str]] = {
    SCHEDULED: frozenset({STARTING, REFUSED}),
    STARTING: frozenset({RUNNING, INTERRUPTED, REFUSED}),
    RUNNING: frozenset({INTERRUPTED, METERED}),
    INTERRUPTED: frozenset({METERED}),
    REFUSED: frozenset({METERED}),
    METERED: frozenset({REPORTED}),
    REPORTED: frozenset({REPORTED}),
}

# Before the slot is metered: still open at the router or waiting for the meter.
OPEN = (SCHEDULED, STARTING, RUNNING, INTERRUPTED, REFUSED)
# Take a share of the slot's metered energy (they ran, or may have).
FLOWING = (RUNNING, INTERRUPTED)
# May be metered at the slot's end (scheduled and starting rows are first resolved).
METERABLE = (RUNNING, INTERRUPTED, REFUSED)

DELIVERED = "delivered"
FAILED = "failed"


class IllegalTransition(Exception):
    """A delivery was asked to move along a transition the lifecycle does not allow."""

    def __init__(self, trade_id: int, current: str | None, wanted: str):
        self.trade_id, self.current, self.wanted = trade_id, current, wanted
        allowed = ", ".join(sorted(TRANSITIONS.get(current, ()))) if current in TRANSITIONS else "none"
        where = "no such delivery" if current is None else f"it is {current}"
        super().__init__(f"delivery of trade {trade_id}: {where}, cannot become {wanted} (allowed: {allowed})")


def allowed(current: str, wanted: str) -> bool:
    return wanted in TRANSITIONS.get(current, frozenset())


def check_transition(trade_id: int, current: str | None, wanted: str) -> None:
    """Raise IllegalTransition unless ``current -> wanted`` is a declared transition."""
    if wanted not in TRANSITIONS:
        raise IllegalTransition(trade_id, current, wanted)
    if current is None or not allowed(current, wanted):
        raise IllegalTransition(trade_id, current, wanted)


def outcome(state_before: str, delivered_wh: int, contracted_wh: int, tolerance_wh: int) -> str:
    """The metered outcome: delivered when the share reaches the contract within the metering
    tolerance (the router stops at its own count, settlement reads a class-1 meter), failed
    otherwise. A refused delivery is failed whatever the meter says (it never ran)."""
    if state_before == REFUSED:
        return FAILED
    return DELIVERED if delivered_wh + tolerance_wh >= contracted_wh else FAILED
