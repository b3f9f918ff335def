"""The simulated ledger: firmware/ledger/base.py's ``Ledger`` protocol, in-process, backed by the
bench ledger's real rules (``host_tools.bench_ledger.store.LedgerStore``: auction, money locks,
deduplication on (device, nonce), reports and settlement).

The transport is what is simulated (outside the system under test): outages, 5xx answers
(before or after the message was applied), slow answers (virtual time passes during the call;
past the adapter's timeout the answer is lost after the ledger applied it), and duplicated
deliveries (the same request reaches the ledger twice; the second answer is returned).
Signatures are verified as the bench ledger's HTTP app does (firmware.messages.open_message).

LedgerStore methods used (public only; helper D reworks that package): ``register_device``,
``submit``, ``sweep``, ``device_trades``, ``account``, ``device_messages``, ``trade``,
``market_trades``, ``book``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from firmware.ledger.base import LedgerUnavailable, SubmitResult, TradeRecord
from firmware.ledger.rest import RestRejected, refusal_for  # the REST adapter's code -> Refusal mapping
from firmware.messages import MessageError, SignedMessage, open_message

from .devices import KillHooks, SimulatedKill

try:  # the REST adapter's transient 4xx (408 timeout, 425 too early, 429 rate limited)
    from firmware.ledger.rest import TRANSIENT_4XX as TRANSIENT_STATUSES
except ImportError:  # pragma: no cover - an older adapter
    TRANSIENT_STATUSES = (408, 425, 429)


@dataclass
class LedgerFaults:
    outages: list[tuple[float, float]] = field(default_factory=list)
    # one-shot faults: (time, kind) with kind in 5xx_before, 5xx_after, slow, slow_lost, duplicate
    shots: list[tuple[float, str]] = field(default_factory=list)


class SimLedgerService:
    """The one ledger of the neighbourhood; each house talks to it through a SimLedgerClient."""

    def __init__(self, store, *, ledger_id: str, clock: Callable[[], float], delay: Callable[[float], None],
                 faults: LedgerFaults, observer, timeout_s: float):
        self.store = store
        self.ledger_id = ledger_id
        self.clock = clock
        self.delay = delay
        self.faults = faults
        self.observer = observer
        self.timeout_s = timeout_s
        self.public_keys: dict[str, bytes] = {}
        self.faults_hit = 0
        self.arrived: set[tuple[str, int, bytes, bytes]] = set()  # (device, nonce, payload, signature) that reached it

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _transport(self) -> str | None:
        """Raise for an outage; return a one-shot fault due now (consumed), or None."""
        now = self.clock()
        for a, b in self.faults.outages:
            if a <= now < b:
                self.faults_hit += 1
                raise LedgerUnavailable("simulated ledger outage: connection refused")
        shots = self.faults.shots
        if shots and shots[0][0] <= now:
            self.faults_hit += 1
            return shots.pop(0)[1]
        return None

    def apply(self, message: SignedMessage) -> SubmitResult:
        now = self.now_ms()
        self.store.sweep(now)
        try:
            peek = message.fields
            device_id = peek["device_id"]
            fields = open_message(message, self.public_keys[device_id])
        except (MessageError, KeyError, ValueError, TypeError) as exc:
            self.observer.bad_message(message, str(exc))
            return SubmitResult("rejected", False, "bad_signature", str(exc), {}, refusal_for("bad_signature"))
        if fields["ledger_id"] != self.ledger_id:
            return SubmitResult("rejected", False, "wrong_ledger", "wrong ledger id", {}, refusal_for("wrong_ledger"))
        self.arrived.add((device_id, fields["nonce"], message.payload, message.signature))
        outcome = self.store.submit(fields, message.payload, message.signature, now)
        body = outcome.body
        self.observer.ledger_received(fields, message, body, now)
        if outcome.http_status >= 500 or outcome.http_status in TRANSIENT_STATUSES:
            # what the REST adapter makes of these (firmware/ledger/rest.py): try the same bytes later
            raise LedgerUnavailable(f"simulated ledger: HTTP {outcome.http_status} {body.get('code')}")
        if outcome.http_status >= 400:
            code = str(body.get("code"))
            return SubmitResult("rejected", body.get("duplicate") is True, code, str(body.get("detail")), {}, refusal_for(code))
        return SubmitResult("accepted", bool(body.get("duplicate")), None, "", dict(body.get("result") or {}))


class SimLedgerClient:
    """One board's ledger adapter (the Ledger protocol), with the seed's transport faults."""

    def __init__(self, service: SimLedgerService, hooks: KillHooks, board_ms: Callable[[], int]):
        self._s = service
        self._hooks = hooks
        self._board_ms = board_ms

    def _call(self, what: str, fn):
        phase = self._hooks.before(f"ledger {what}")
        result = fn()
        if phase == "after":
            raise SimulatedKill(f"killed after ledger {what} (answer lost)")
        return result

    def server_time_ms(self) -> int:
        def run():
            shot = self._s._transport()
            if shot in ("5xx_before", "5xx_after"):
                raise LedgerUnavailable("simulated ledger: HTTP 503")
            if shot in ("slow", "slow_lost"):
                # a slow answer: the server read its clock, then the answer took its time
                server = self._s.now_ms()
                self._s.delay(self._s.timeout_s * (0.5 if shot == "slow" else 2.0))
                if shot == "slow_lost":
                    raise LedgerUnavailable("simulated ledger: read timed out")
                return server
            return self._s.now_ms()
        return self._call("time", run)

    def server_time_sample(self):
        """One attempt at the ledger's clock with the board's send and receive times around it
        (RestLedger.server_time_sample): a slow answer widens the round trip, as on a network."""
        from firmware.ledger.rest import TimeSample

        sent = self._board_ms()
        server = self.server_time_ms()
        return TimeSample(server_ms=server, sent_ms=sent, received_ms=self._board_ms())

    def submit(self, message: SignedMessage) -> SubmitResult:
        def run():
            shot = self._s._transport()
            if shot == "5xx_before":
                raise LedgerUnavailable("simulated ledger: HTTP 502 from the proxy")
            result = self._s.apply(message)
            if shot == "duplicate":
                result = self._s.apply(message)  # the request was delivered twice
            elif shot == "5xx_after":
                raise LedgerUnavailable("simulated ledger: HTTP 500 after the message was stored")
            elif shot == "slow":
                self._s.delay(self._s.timeout_s * 0.5)
            elif shot == "slow_lost":
                self._s.delay(self._s.timeout_s)
                raise LedgerUnavailable("simulated ledger: read timed out (the ledger had applied it)")
            return result
        return self._call("submit", run)

    def trades_since(self, device_id: str, cursor: int) -> tuple[list[TradeRecord], int]:
        def run():
            shot = self._s._transport()
            if shot in ("5xx_before", "5xx_after", "slow_lost"):
                raise LedgerUnavailable("simulated ledger: HTTP 503")
            self._s.store.sweep(self._s.now_ms())
            rows, new_cursor = self._s.store.device_trades(device_id, int(cursor), 100)
            trades = [TradeRecord(trade_id=t["trade_id"], market_id=t["market_id"], side=t["side"],
                                  energy_wh=t["energy_wh"], price_per_kwh_minor=t["price_per_kwh_minor"],
                                  order_nonce=t["order_nonce"], counterparty=t["counterparty"], state=t["state"])
                      for t in rows]
            if shot == "slow":
                self._s.delay(self._s.timeout_s * 0.5)
            return trades, new_cursor
        return self._call("trades", run)

    # The record checks (A3, issue 10 part 4; firmware/scheduler/trade_record.py): the same proof
    # the REST adapter checks (firmware.ledger.record), from the store in-process, with the seed's
    # transport faults (an unreachable ledger = the trade waits, never moves energy).
    def _proof(self, what: str, fetch):
        from firmware.ledger.record import InclusionProof

        def run():
            if self._s._transport() in ("5xx_before", "5xx_after", "slow_lost"):
                raise LedgerUnavailable("simulated ledger: HTTP 503")
            obj = fetch(self._s.now_ms())
            if obj is None:
                raise RestRejected("not_found", f"{what} is not in the record", 404)
            return InclusionProof.from_obj(obj)
        return self._call(f"proof {what}", run)

    def confirm_trade(self, trade: TradeRecord, device_id: str, authority_public_key: bytes | None) -> None:
        from firmware.ledger.record import RecordError, trade_matches_leaf

        if authority_public_key is None:
            raise RecordError("no pinned authority key: the trade cannot be checked")
        proof = self._proof(f"trade {trade.trade_id}", lambda now: self._s.store.trade_proof(trade.trade_id, now))
        if not trade_matches_leaf(trade, device_id, proof.leaf):
            raise RecordError(f"proof of trade {trade.trade_id}: the recorded trade differs from the one reported to the board")
        proof.verify(authority_public_key, ledger_id=self._s.ledger_id)

    def confirm_message(self, message: SignedMessage, authority_public_key: bytes | None) -> None:
        from firmware.ledger.record import RecordError, message_leaf

        if authority_public_key is None:
            raise RecordError("no pinned authority key: the message cannot be checked")
        fields = message.fields
        proof = self._proof(f"message {fields['nonce']}",
                            lambda now: self._s.store.message_proof(fields["device_id"], fields["nonce"], now))
        if proof.leaf != message_leaf(message.payload, message.signature):
            raise RecordError(f"proof of nonce {fields['nonce']}: the recorded entry is not the message the board signed")
        proof.verify(authority_public_key, ledger_id=fields["ledger_id"])

    def device_account(self, device_id: str) -> dict:
        def run():
            if self._s._transport() in ("5xx_before", "5xx_after", "slow_lost"):
                raise LedgerUnavailable("simulated ledger: HTTP 503")
            account = self._s.store.account(device_id)
            if account is None:
                raise LedgerUnavailable("simulated ledger: unknown device")
            return account
        return self._call("account", run)

    def info(self) -> dict:
        rules = self._s.store.rules
        return {"ledger_id": self._s.ledger_id, "slot_seconds": rules.slot_seconds, "lot_wh": rules.lot_wh}

    def market_book(self, market_id: int) -> dict:
        book = self._s.store.book(market_id)
        return {"market_id": market_id, "gate_open": True, **book}
