"""The board's view of "a ledger": a small interface every backend implements (REST now, EVM later).

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from firmware.messages import SignedMessage

TRADE_SIDES = ("buy", "sell")
TRADE_STATES = ("contracted", "reported", "settled")


class LedgerError(Exception):
    """Base of the adapter's errors; the text never contains key material."""


class LedgerUnavailable(LedgerError):
    """Transient: the ledger could not be reached or answered something unusable. Retry later."""


class LedgerRejected(LedgerError):
    """Permanent: the ledger understood a query and refused it (unknown device, bad parameter)."""

    def __init__(self, code: str, detail: str, http_status: int) -> None:
        super().__init__(f"ledger refused the request ({http_status} {code}): {detail}")
        self.code, self.detail, self.http_status = code, detail, http_status


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
