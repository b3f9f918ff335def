"""The board's view of "a ledger": a small interface every backend implements (REST, EVM).

Why this interface and these error kinds:
- The daemon only needs a handful of operations: the ledger's clock (clock guard), submitting a
  signed message, polling the device's trades with a cursor, and reading account, market rules
  and book. Keeping it this small is what lets an Ethereum JSON-RPC backend slot in later.
- Failures come in exactly two kinds, because the outbox acts differently on each:
  ``LedgerUnavailable`` is transient (network down, timeout, 5xx, an answer that does not make
  sense): keep the signed message and resend it later - safe, because the ledger deduplicates on
  (device, nonce). A rejection (``SubmitResult.status == "rejected"`` for ``submit``, or
  ``LedgerRejected`` for a query) is the ledger's permanent answer to *that* request: resending
  the same bytes will get the same answer.
- What a rejection *means to the board* is the backend-neutral ``Refusal`` below. Each adapter
  maps its own wire codes onto it (the bench ledger's code strings in rest.py, the contract's
  errors and the relay's codes in evm.py); the scheduler, the outbox and the self-test branch
  on ``Refusal`` only, never on a backend's code string or HTTP status. The wire code is kept as
  text (``code``) for events, the journal and ``dgc status``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from firmware.messages import SignedMessage

TRADE_SIDES = ("buy", "sell")
TRADE_STATES = ("contracted", "reported", "settled")


class LedgerError(Exception):
    """Base of the adapter's errors; the text never contains key material."""


class LedgerUnavailable(LedgerError):
    """Transient: the ledger could not be reached or answered something unusable. Retry later."""


class Refusal(enum.Enum):
    """What a ledger's refusal means to the board: the only answer kinds the daemon acts on.

    (Retry later is not a refusal: it is ``LedgerUnavailable``, raised for anything transient,
    e.g. a report sent before its slot ended or a rate limit. The message is kept and resent.)
    """

    REFUSED = "refused"
    """This message or query is refused for good: resending the same bytes gets the same answer
    (a market rule, a malformed or foreign message, a nonce conflict). Record it, move on.
    The default for a wire code an adapter does not know."""
    RESIGN = "resign"
    """Refused for its validity window only (expired, not yet valid: the board's clock against
    the ledger's). The same content signed again with fresh timestamps may be accepted; the
    outbox re-signs a delivery report (bounded), since the energy must be reported."""
    DEVICE_UNKNOWN = "device_unknown"
    """The ledger does not know this device (not registered). Every request would get the same
    answer: alarm once, pause trading, ask again slowly (ledger_link.py)."""
    DEVICE_REVOKED = "device_revoked"
    """This device's key was revoked by the market's operator: it can no longer trade (rotate the
    key). Same treatment as DEVICE_UNKNOWN."""
    DEVICE_UNAUTHORISED = "device_unauthorised"
    """The ledger did not accept the board's proof of who it is for this request (e.g. a signed
    read it refuses). Same treatment as DEVICE_UNKNOWN: not the message that is wrong."""
    NOT_FOUND = "not_found"
    """The thing asked about is not at the ledger (a trade or message not in its record; for
    ``device_account``, the device itself)."""
    ORDER_CLOSED = "order_closed"
    """A cancel found its order already filled, cancelled or expired: nothing left to cancel,
    the trade poll says what filled."""


# Refusals of the device itself rather than of one request: the jobs pause (ledger_link.py).
DEVICE_REFUSALS = frozenset({Refusal.DEVICE_UNKNOWN, Refusal.DEVICE_REVOKED, Refusal.DEVICE_UNAUTHORISED})


class LedgerRejected(LedgerError):
    """Permanent: the ledger understood a query and refused it (unknown device, bad parameter).

    ``refusal`` is what it means (the vocabulary above); ``code`` is the backend's wire code, as
    text for logs only. Backend details (an HTTP status) belong to the adapter's subclass.
    """

    def __init__(self, code: str, detail: str, refusal: Refusal, *, message: str | None = None) -> None:
        if not isinstance(refusal, Refusal):
            raise TypeError(f"LedgerRejected: refusal must be a firmware.ledger.base.Refusal, got {refusal!r}")
        super().__init__(message or f"ledger refused the request ({code}): {detail}")
        self.code, self.detail, self.refusal = code, detail, refusal


@dataclass(frozen=True)
class SubmitResult:
    """The ledger's answer to a signed message.

    ``duplicate`` is true when the ledger had already stored this (device, nonce): the answer is
    the stored one and nothing was applied twice. ``result`` is the kind-specific detail (fills
    of an order, the released quantity of a cancel, a report's settlement).
    """

    status: Literal["accepted", "rejected"]
    duplicate: bool
    code: str | None
    detail: str
    result: dict[str, Any] = field(default_factory=dict)
    refusal: Refusal | None = None
    """What a rejection means to the board (required when rejected, None when accepted); ``code``
    is the backend's wire code, kept as text for events and the journal."""

    def __post_init__(self) -> None:
        if self.status == "rejected" and not isinstance(self.refusal, Refusal):
            raise TypeError(f"SubmitResult: a rejection ({self.code}) needs refusal=Refusal..., got {self.refusal!r}")
        if self.status == "accepted" and self.refusal is not None:
            raise TypeError("SubmitResult: an accepted answer has no refusal")

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


@dataclass(frozen=True)
class TradeRecord:
    """One contracted trade as the device sees it (``side`` and ``order_nonce`` are the device's own)."""

    trade_id: int
    market_id: int
    side: str
    energy_wh: int
    price_per_kwh_minor: int
    order_nonce: int
    counterparty: str
    state: str


@runtime_checkable
class Ledger(Protocol):
    """What the daemon needs from any ledger backend."""

    def server_time_ms(self) -> int:
        """The ledger's clock, UTC epoch milliseconds."""

    def submit(self, message: SignedMessage) -> SubmitResult:
        """Submit a signed message. Raises LedgerUnavailable on transient failure."""

    def trades_since(self, device_id: str, cursor: int) -> tuple[list[TradeRecord], int]:
        """Trades involving the device newer than ``cursor``, and the cursor to use next time."""

    def device_account(self, device_id: str) -> dict:
        """balance_milli_minor, locked_milli_minor, max_nonce, name, ... (private: the backend proves
        it reads as the device, e.g. the REST adapter signs the read with the device key)."""

    def info(self) -> dict:
        """ledger_id and the market rules (slot_seconds, lot_wh, price band, ...)."""

    def market_book(self, market_id: int) -> dict:
        """market_id, gate_open, and asks/bids as price levels (price_per_kwh_minor, remaining_wh,
        orders): aggregates only, a ledger does not show who rests at a price."""
