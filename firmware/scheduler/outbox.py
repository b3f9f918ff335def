"""The outbox job: send pending signed messages (reports first, then the rest oldest first) and
settle the ledger's answers.

Sending never decides anything: every message was signed and journalled with its local effect
before it got here, so a crash at any point only means the message is sent again (the ledger
deduplicates on device and nonce).

What keeps one message from holding up the rest (issue 7 j, n):
- a message that fails transiently gets its own back-off (``next_attempt_ms``, doubling up to
  ``BACKOFF_CAP_SECONDS``) and the flush goes on with the next one; only several failures in a
  row (the ledger itself is down) end the flush. When the ledger answers again after an outage,
  every back-off is cleared: they all failed for the same reason.
- a cancel never overtakes its order: it waits while the order's message is pending.
- the due delivery reports go first (``REPORTS_FIRST``): a report never waits behind a queue of
  orders, which on a chain is a block per order.
- a message whose own expiry has passed is dropped and recorded as ``expired`` (the ledger would
  refuse it); an expired report is signed again (the energy must be reported).
- a report the ledger refuses for its timestamps (``Refusal.RESIGN``: expired, not yet valid)
  is signed again at most ``MAX_REPORT_SIGNATURES`` times in all, each one waiting twice as long
  (``RESIGN_BACKOFF_SECONDS`` first). A board whose clock is far behind the ledger's once signed
  thousands of reports a minute for one trade.
- ``stop_requested`` (set by the daemon on SIGTERM) ends a flush between two messages.
- a refusal of the device itself (unregistered, revoked) pauses the outbox (ledger_link.py);
  the message stays pending, since it is not the message that is wrong.
- an accepted message is then checked as included in the ledger's signed record, a few per run
  after the sends (message_record.py, issue 10 part 4).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ..journal import OutboxEntry
from . import ledger_link
from .clock_guard import check_step
from .context import Context
from .message_record import MessageRecordCheck

log = logging.getLogger(__name__)

BACKOFF_CAP_SECONDS = 300
FAILURES_BEFORE_GIVING_UP_A_FLUSH = 3
# A pass sends the due delivery reports first, then everything due (orders and cancels in nonce
# order). Why: on a chain each message waits for its block, and a report signed at a slot edge
# behind the queued orders waited one block per order; a report settles energy already moved,
# an order only asks for a trade. Nonces are unordered on both ledgers (docs/ledger-evm.md).
REPORTS_FIRST: tuple[tuple[str, ...] | None, ...] = (("delivery_report",), None)
MAX_REPORT_SIGNATURES = 6  # the first report and five re-signings
RESIGN_BACKOFF_SECONDS = 30
# A report refused for its timestamps (Refusal.RESIGN: the board's clock behind or ahead of the
# ledger's) is signed again with new ones: the energy must be reported (sim finding F5).
# Answers that refuse the device, not the message: base.DEVICE_REFUSALS. The adapters map their
# wire codes onto these (firmware/ledger/base.py); the outbox never reads a code string.


class Outbox:
    def __init__(self, ctx: Context, *, resign_report: Callable[[int], None]):
        """``resign_report(trade_id)``: sign a reported delivery's report again (the ledger
        rejected the old one as expired, or it expired unsent)."""
        self.ctx = ctx
        self._resign_report = resign_report
        self._flush_lock = threading.Lock()
        self.stop_requested = threading.Event()
        self._gave_up: set[int] = set()
        self.record_check = MessageRecordCheck(ctx)

    def flush(self) -> None:
        """Send the messages that are due: the reports, then all oldest first, past the ones that must wait."""
        ctx = self.ctx
        if not self._flush_lock.acquire(blocking=False):
            return  # another thread is flushing; it will see our message
        try:
            check_step(ctx)  # the cheapest frequent place to notice a clock step (deliveries read clock_ok)
            if ledger_link.paused(ctx):
                return
            self._flush(ctx)
            if not self.stop_requested.is_set() and not ledger_link.paused(ctx):
                self.record_check.run()
        finally:
            self._flush_lock.release()

    def _flush(self, ctx: Context) -> None:
        """One pass over the due messages. A transient failure backs off that message only; the
        ledger counts as unavailable (ledger_link) only when nothing got through in this pass."""
        from ..ledger.base import DEVICE_REFUSALS, LedgerUnavailable

        journal = ctx.journal
        failures_in_a_row = 0
        first_failure: LedgerUnavailable | None = None
        got_through = False
        previous_answer: float | None = None  # ctx.monotonic() at the last answer of this pass
        try:
            for kinds in REPORTS_FIRST:
                after = 0
                while not self.stop_requested.is_set():
                    batch = journal.pending_outbox(limit=50, due_ms=ctx.now_ms(), after_nonce=after, kinds=kinds)
                    if not batch:
                        break
                    for entry in batch:
                        if self.stop_requested.is_set():
                            return
                        after = entry.nonce
                        if entry.expires_at <= ctx.now():
                            self._expire(entry)
                            continue
                        if entry.kind == "cancel" and journal.outbox_state(entry.message.fields["order_nonce"]) == "pending":
                            continue  # its order has not reached the ledger yet
                        journal.note_attempt(entry.nonce)
                        started = ctx.monotonic() if ctx.monotonic is not None else None
                        try:
                            answer = ctx.ledger.submit(entry.message)
                        except LedgerUnavailable as exc:
                            log.info("outbox: message %s (%s) not delivered, backing off: %s", entry.nonce, entry.kind, exc)
                            self._back_off(entry)
                            previous_answer = None  # a timeout is not a turn
                            first_failure = first_failure or exc
                            failures_in_a_row += 1
                            if failures_in_a_row >= FAILURES_BEFORE_GIVING_UP_A_FLUSH:
                                return  # the ledger, not this message: the next run tries again
                            continue
                        failures_in_a_row = 0
                        got_through = True
                        if started is not None:
                            # One message's turn: from the previous answer of this pass (the outbox's
                            # own work between two sends is part of it), else from its send.
                            ended = ctx.monotonic()
                            if not answer.duplicate:
                                self._note_send_time(int((ended - (previous_answer or started)) * 1000))
                            previous_answer = ended
                        if ledger_link.answered(ctx, job="outbox"):
                            journal.clear_outbox_backoff()  # they all failed for the outage's reason
                        if answer.status != "accepted" and answer.refusal in DEVICE_REFUSALS:
                            ledger_link.device_refused(ctx, answer.code, answer.detail, job="outbox")
                            return
                        self._settle(entry, answer)
        finally:
            if first_failure is not None and not got_through:
                ledger_link.unavailable(ctx, first_failure, job="outbox")

    def _note_send_time(self, sample_ms: int) -> None:
        """A moving average (a quarter weight to each new send) of one message's turn: about a
        block on a chain, milliseconds on the bench ledger (trading.py's queue room). A duplicate
        answer (a resend of what already landed, answered at once) is not a sample."""
        health = self.ctx.health
        last = health.outbox_send_ms
        health.outbox_send_ms = max(0, sample_ms) if last is None else (3 * last + max(0, sample_ms)) // 4

    def _back_off(self, entry: OutboxEntry) -> None:
        ctx = self.ctx
        base_s = max(1, ctx.config.cadence.outbox_seconds)
        delay_s = min(BACKOFF_CAP_SECONDS, base_s * 2 ** min(entry.attempts, 16))
        # Never back off past the message's life: it gets tries left before it expires.
        delay_s = min(delay_s, max(base_s, (entry.expires_at - ctx.now()) // 3))
        ctx.journal.defer_outbox(entry.nonce, ctx.now_ms() + delay_s * 1000)

    def _expire(self, entry: OutboxEntry) -> None:
        ctx = self.ctx
        ctx.journal.expire_outbox(entry)
        ctx.events.emit("outbox.expired", nonce=entry.nonce, kind=entry.kind, attempts=entry.attempts)
        if entry.kind == "delivery_report":
            self._resign(entry.message.fields["trade_id"])

    def _settle(self, entry: OutboxEntry, answer) -> None:
        from ..ledger.base import Refusal

        ctx = self.ctx
        accepted = answer.status == "accepted"
        record = {"status": answer.status, "duplicate": answer.duplicate, "code": answer.code,
                  "detail": answer.detail, "result": answer.result}
        ctx.journal.settle_outbox(entry, accepted=accepted, answer=record)
        if accepted:
            self.record_check.accepted(entry.nonce, entry.kind, entry.message)
            ctx.events.emit(f"{entry.kind}.acked", nonce=entry.nonce, duplicate=answer.duplicate,
                            filled_wh=(answer.result or {}).get("filled_wh", "-") if entry.kind == "order" else "-")
            return
        ctx.events.emit(f"{entry.kind}.rejected", nonce=entry.nonce, code=answer.code, detail=answer.detail)
        if entry.kind == "delivery_report" and answer.refusal is Refusal.RESIGN:
            self._resign(entry.message.fields["trade_id"])

    def _resign(self, trade_id: int) -> None:
        """Sign a report again, a bounded number of times, each new one waiting longer."""
        ctx = self.ctx
        journal = ctx.journal
        signed = journal.report_signatures(trade_id)
        if signed >= MAX_REPORT_SIGNATURES:
            if trade_id not in self._gave_up:
                self._gave_up.add(trade_id)
                ctx.events.emit("alarm.report_unsent", trade=trade_id, signatures=signed,
                                action="not signed again; check the board's clock against the ledger's (dgc status)")
            return
        self._resign_report(trade_id)
        nonce = journal.latest_report_nonce(trade_id)
        if nonce is not None and journal.report_signatures(trade_id) > signed:
            delay_s = RESIGN_BACKOFF_SECONDS * 2 ** (signed - 1)
            journal.defer_outbox(nonce, ctx.now_ms() + delay_s * 1000)
