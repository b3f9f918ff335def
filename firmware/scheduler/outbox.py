"""The outbox job: send pending signed messages oldest first and settle the ledger's answers.

Sending never decides anything: every message was signed and journalled with its local effect
before it got here, so a crash at any point only means the message is sent again (the ledger
deduplicates on device and nonce).
"""

from __future__ import annotations

import threading
from typing import Callable

from ..journal import OutboxEntry
from .context import Context


class Outbox:
    def __init__(self, ctx: Context, *, resign_report: Callable[[int], None]):
        """``resign_report(trade_id)``: sign a reported delivery's report again (the ledger
        rejected the old one as expired)."""
        self.ctx = ctx
        self._resign_report = resign_report
        self._flush_lock = threading.Lock()

    def flush(self) -> None:
        """Send pending messages oldest first until the ledger stops answering."""
        from ..ledger.base import LedgerUnavailable

        ctx = self.ctx
        if not self._flush_lock.acquire(blocking=False):
            return  # another thread is flushing; it will see our message
        try:
            while True:
                batch = ctx.journal.pending_outbox(limit=50)
                if not batch:
                    return
                for entry in batch:
                    ctx.journal.note_attempt(entry.nonce)
                    try:
                        answer = ctx.ledger.submit(entry.message)
                    except LedgerUnavailable as exc:
                        if ctx.health.ledger_reachable is not False:
                            ctx.events.emit("ledger.unavailable", detail=str(exc), outbox_pending=ctx.journal.pending_count())
                        ctx.health.ledger_reachable = False
                        return
                    if ctx.health.ledger_reachable is False:
                        ctx.events.emit("ledger.back")
                    ctx.health.ledger_reachable = True
                    self._settle(entry, answer)
        finally:
            self._flush_lock.release()

    def _settle(self, entry: OutboxEntry, answer) -> None:
        ctx = self.ctx
        accepted = answer.status == "accepted"
        record = {"status": answer.status, "duplicate": answer.duplicate, "code": answer.code,
                  "detail": answer.detail, "result": answer.result}
        ctx.journal.settle_outbox(entry, accepted=accepted, answer=record)
        if accepted:
            ctx.events.emit(f"{entry.kind}.acked", nonce=entry.nonce, duplicate=answer.duplicate,
                            filled_wh=(answer.result or {}).get("filled_wh", "-") if entry.kind == "order" else "-")
            return
        ctx.events.emit(f"{entry.kind}.rejected", nonce=entry.nonce, code=answer.code, detail=answer.detail)
        if entry.kind == "delivery_report" and answer.code == "expired":
            self._resign_report(entry.message.fields["trade_id"])
