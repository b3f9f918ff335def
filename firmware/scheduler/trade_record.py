"""Is a trade the ledger told us about in the ledger's own signed record? Asked before the trade
may schedule a delivery (issue 10 part 4: what a server says never moves energy unless the
ledger's authority signed it into its tamper-evident record).

Why a backend-specific ``confirm_trade`` behind the ledger interface: the REST ledger proves a
trade with an inclusion proof in a block signed by the authority key pinned at provisioning
(``RestLedger.confirm_trade`` -> ``verify_trade_recorded``); an EVM ledger's trades are contract
logs the board read from the node itself at its confirmation depth (``EvmLedger.confirm_trade``).
The scheduler only sees three outcomes:

- ``None``: confirmed - the trade may be journalled and scheduled;
- ``WAIT``: the ledger could not be asked now (``LedgerUnavailable``) - the trade stays
  unjournalled, the trade cursor does not move past it, and the next poll asks again: never
  lost, never moving energy meanwhile;
- a reason string: refused (``RecordError``: the record contradicts the trade; ``LedgerRejected``:
  the ledger says it is not in the record) - journalled in ``refused_trades``, alarmed, no delivery.

No pinned key (a bench board before provisioning): a ``sim`` board trades unverified, with one
``alarm.ledger_unpinned``; any other board kind refuses every trade (and the same alarm says
why), so a field board never moves energy on an unproven trade - and it signs no orders
(``may_trade``, asked by the bid and review jobs), so it contracts nothing it would refuse.
"""

from __future__ import annotations

from .context import Context

WAIT = "wait"
UNPINNED_REASON = "no pinned ledger authority key ([ledger] authority_public_key): the trade cannot be checked"


def authority_key(ctx: Context) -> bytes | None:
    text = getattr(ctx.config.ledger, "authority_public_key", "") or ""
    return bytes.fromhex(text) if text else None


def _unpinned(ctx: Context) -> str | None:
    """The documented behaviour without a pinned key; alarms once per process."""
    sim = ctx.config.board.kind == "sim"
    health = ctx.health
    with health.lock:
        first = not health.unpinned_told
        health.unpinned_told = True
    if first:
        ctx.events.emit("alarm.ledger_unpinned", kind=ctx.config.board.kind,
                        action="sim board: trades are NOT checked against the signed record" if sim
                        else "trades are refused until the board is provisioned with the key")
    return None if sim else UNPINNED_REASON


def may_trade(ctx: Context) -> bool:
    """False for a board that would refuse every trade (unpinned, not a sim board): it signs no
    orders either, so it never contracts energy it will not deliver."""
    needs_key = getattr(ctx.ledger, "needs_authority_key", True)
    check = getattr(ctx.ledger, "confirm_trade", None)
    if check is not None and (not needs_key or authority_key(ctx) is not None):
        return True
    return _unpinned(ctx) is None


def confirm(ctx: Context, trade) -> str | None:
    """None (confirmed), WAIT, or the reason the trade is refused."""
    from ..ledger.base import LedgerRejected, LedgerUnavailable
    from ..ledger.record import RecordError

    check = getattr(ctx.ledger, "confirm_trade", None)
    key = authority_key(ctx)
    needs_key = getattr(ctx.ledger, "needs_authority_key", True)
    if check is None:
        return _unpinned(ctx)  # an adapter with no record check is treated like an unpinned board
    if needs_key and key is None:
        return _unpinned(ctx)
    try:
        check(trade, ctx.key.device_id, key)
    except LedgerUnavailable:
        return WAIT
    except LedgerRejected as exc:
        return f"not in the ledger's signed record ({exc.code}): {exc.detail}"[:300]
    except RecordError as exc:
        return f"the ledger's signed record contradicts the trade: {exc}"[:300]
    return None
