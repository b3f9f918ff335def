"""What the board knows about its ledger link, told once: reachable or not, and whether the
ledger refuses this device.

Why one place: four jobs talk to the ledger (outbox, trade poll, clock guard, start-up). Each
used to judge the link on its own, so the first to notice an outage decided whether it was ever
announced: a 105-s outage first seen by the trade poll left nothing in the event log but the
eventual ``ledger.back`` (issue 7 p). Now every job reports what it saw here, and:

- ``ledger.unavailable`` is emitted once per outage, by whichever job saw it first, and
  ``ledger.back`` once when any job gets an answer again; ``dgc status`` shows since when and why;
- a permanent refusal of the device itself (unregistered, revoked, not authorised: the answer
  to every request would be the same) raises ``alarm.ledger_refused`` once, pauses the jobs
  that talk to the ledger, and lets them ask again only every ``REFUSAL_RETRY_SECONDS``
  (issue 7 h) — no crash, no restart loop, no stream of identical refusals. A message the
  outbox could not deliver because of it stays pending: it is not the message that is wrong.

State lives in ``ctx.health`` (under its lock), so status.py reads the same facts.
"""

from __future__ import annotations

from .context import Context

# What refuses the device, not a request (asking again changes nothing until an operator
# registers or re-provisions the board): firmware.ledger.base.DEVICE_REFUSALS for a submit; any
# LedgerRejected of the device's own reads (account, trades). ``code`` below is the adapter's
# wire code, kept as text for the alarm and dgc status.
REFUSAL_RETRY_SECONDS = 300


def unavailable(ctx: Context, exc: BaseException | str, *, job: str) -> None:
    """A job could not reach the ledger (LedgerUnavailable)."""
    health = ctx.health
    now_ms = ctx.now_ms()
    with health.lock:
        first = health.ledger_reachable is not False
        health.ledger_reachable = False
        health.ledger_detail = str(exc)[:300]
        if first:
            health.ledger_down_since_ms = now_ms
    if first:
        ctx.events.emit("ledger.unavailable", job=job, detail=str(exc), outbox_pending=ctx.journal.pending_count())


def answered(ctx: Context, *, job: str) -> bool:
    """The ledger answered a job (with anything it meant, a refusal included). True when this
    ends an outage."""
    health = ctx.health
    with health.lock:
        was_down = health.ledger_reachable is False
        since = health.ledger_down_since_ms
        health.ledger_reachable = True
        health.ledger_down_since_ms = None
        health.ledger_detail = None
    if was_down:
        down_s = round((ctx.now_ms() - since) / 1000, 1) if since is not None else "-"
        ctx.events.emit("ledger.back", job=job, down_s=down_s)
    return was_down


def device_refused(ctx: Context, code: str, detail: str, *, job: str) -> None:
    """The ledger refuses this device: alarm once, pause, ask again in REFUSAL_RETRY_SECONDS."""
    answered(ctx, job=job)
    health = ctx.health
    with health.lock:
        first = health.ledger_refusal is None
        health.ledger_refusal = f"{code}: {detail}"[:300]
        health.ledger_retry_at_ms = ctx.now_ms() + REFUSAL_RETRY_SECONDS * 1000
    if first:
        ctx.events.emit("alarm.ledger_refused", code=code, job=job, device=ctx.key.device_id, detail=detail,
                        action=f"trading paused; asking again every {REFUSAL_RETRY_SECONDS} s "
                               "(register or re-provision the board)")


def device_accepted(ctx: Context, *, job: str) -> None:
    """A request that needs the device to be known succeeded: lift a refusal."""
    health = ctx.health
    with health.lock:
        was_refused = health.ledger_refusal is not None
        health.ledger_refusal = None
        health.ledger_retry_at_ms = None
    if was_refused:
        ctx.events.emit("ledger.device_accepted", job=job)


def paused(ctx: Context) -> bool:
    """True while the device is refused and its next retry is not due; a due retry re-arms the
    wait at once, so among the jobs exactly one asks (the others stay paused)."""
    health = ctx.health
    with health.lock:
        if health.ledger_refusal is None:
            return False
        now_ms = ctx.now_ms()
        if health.ledger_retry_at_ms is not None and now_ms < health.ledger_retry_at_ms:
            return True
        health.ledger_retry_at_ms = now_ms + REFUSAL_RETRY_SECONDS * 1000
        return False


def refused_device(ctx: Context) -> str | None:
    with ctx.health.lock:
        return ctx.health.ledger_refusal


def sync_account(ctx: Context, *, job: str = "start") -> None:
    """At start-up: raise the nonce floor to the ledger's (a journal restored from an old copy
    must never reuse a nonce). Never raises for what the ledger says or does not say."""
    from ..ledger.base import LedgerRejected, LedgerUnavailable

    try:
        account = ctx.ledger.device_account(ctx.key.device_id)
    except LedgerUnavailable as exc:
        unavailable(ctx, exc, job=job)
        return
    except LedgerRejected as exc:
        device_refused(ctx, exc.code, exc.detail, job=job)
        return
    answered(ctx, job=job)
    device_accepted(ctx, job=job)
    if ctx.journal.raise_nonce_floor(int(account.get("max_nonce", 0)) + 1):
        ctx.events.emit("nonce.raised", next_nonce=ctx.journal.next_nonce())
