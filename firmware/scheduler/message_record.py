"""Are this board's accepted messages in the ledger's signed record? (issue 10 part 4: "it checks
that its own messages were included").

When: after an accepted submit the outbox queues the message here, and each outbox run checks at
most ``CHECKS_PER_RUN`` of them after its sends (asynchronous to the submit, bounded in ledger
calls per run and in memory). Why not inside the submit: the answer is already journalled and
the sends must not wait on proofs; a proof asked a little later also finds the block sealed.

What a missing one means: the ledger acknowledged bytes it did not put in its record (or put
others there) - it denies or altered what it accepted. That is ``alarm.message_unrecorded``
(once per message); the trade side is protected independently (trade_record.py), so nothing is
undone here. A ledger that cannot be asked keeps the message queued (``MAX_ATTEMPTS`` runs, then
``message.unchecked`` once). The queue is in memory: a restart forgets what was not yet checked
(the operator's ``dgc-host ledger verify`` checks the whole record).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from .context import Context
from .trade_record import authority_key

log = logging.getLogger(__name__)

CHECKS_PER_RUN = 4
MAX_QUEUED = 500
MAX_ATTEMPTS = 10


class MessageRecordCheck:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._queue: OrderedDict[int, list] = OrderedDict()  # nonce -> [message, kind, attempts]

    def enabled(self) -> bool:
        ledger = self.ctx.ledger
        check = getattr(ledger, "confirm_message", None)
        return check is not None and (authority_key(self.ctx) is not None or not getattr(ledger, "needs_authority_key", True))

    def accepted(self, nonce: int, kind: str, message) -> None:
        if not self.enabled() or nonce in self._queue:
            return
        self._queue[nonce] = [message, kind, 0]
        while len(self._queue) > MAX_QUEUED:
            old, (_m, old_kind, _a) = self._queue.popitem(last=False)
            self.ctx.events.emit("message.unchecked", nonce=old, kind=old_kind, reason="check queue full")

    def pending(self) -> int:
        return len(self._queue)

    def run(self) -> None:
        from ..ledger.base import LedgerRejected, LedgerUnavailable
        from ..ledger.record import RecordError

        ctx = self.ctx
        key = authority_key(ctx)
        for nonce in list(self._queue)[:CHECKS_PER_RUN]:
            message, kind, attempts = self._queue[nonce]
            try:
                ctx.ledger.confirm_message(message, key)
            except LedgerUnavailable as exc:
                attempts += 1
                if attempts >= MAX_ATTEMPTS:
                    del self._queue[nonce]
                    ctx.events.emit("message.unchecked", nonce=nonce, kind=kind, reason=str(exc)[:200])
                else:
                    self._queue[nonce][2] = attempts
                    self._queue.move_to_end(nonce)
                return  # the ledger cannot be asked now: the next run goes on
            except (LedgerRejected, RecordError) as exc:
                del self._queue[nonce]
                ctx.events.emit("alarm.message_unrecorded", nonce=nonce, kind=kind, reason=str(exc)[:300],
                                action="the ledger acknowledged a message its signed record does not hold; check the ledger")
                continue
            del self._queue[nonce]
            log.debug("outbox: message %s is in the ledger's signed record", nonce)
