"""Issue 9 part 4, "Interface": the board acts on a backend-neutral answer vocabulary
(firmware.ledger.base.Refusal); each adapter maps its own wire codes onto it, and no controller
module knows a backend's code strings.

- Table tests: every rejection code the bench ledger can send (host_tools.bench_ledger.store
  REJECTION_STATUS) is classified by the REST adapter, and every code the EVM adapter can yield
  (the contract's pre-rule errors and rule codes, the relay's own codes) by the EVM adapter;
  where both backends use the same code string they mean the same thing to the board.
- The REST mapping over real HTTP against the real bench ledger (no mock): a submit rejection
  and a query refusal carry the Refusal; the HTTP status stays on the REST-only RestRejected.
- A source scan (ast): firmware/scheduler/*.py and firmware/selftest.py contain no bench-ledger
  or chain code string outside docstrings, and never compare a ``.code`` with a string.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import coincurve
import pytest
import requests

from firmware.keystore import DeviceKey
from firmware.ledger import evm, rest
from firmware.ledger.base import DEVICE_REFUSALS, LedgerRejected, Refusal, SubmitResult
from firmware.ledger.rest import RestLedger, RestRejected
from firmware.market import MarketRules
from firmware.messages import new_fields, sign_message
from host_tools.bench_ledger.app import LedgerSettings
from host_tools.bench_ledger.server import running_ledger
from host_tools.bench_ledger.store import REJECTION_STATUS

ROOT = Path(__file__).resolve().parents[1]

# What each acted-on code means to the board; every other code is a plain permanent refusal.
EXPECTED = {
    "expired": Refusal.RESIGN,
    "not_yet_valid": Refusal.RESIGN,
    "unknown_device": Refusal.DEVICE_UNKNOWN,
    "revoked": Refusal.DEVICE_REVOKED,
    "unauthorized": Refusal.DEVICE_UNAUTHORISED,
    "not_found": Refusal.NOT_FOUND,
    "order_closed": Refusal.ORDER_CLOSED,
}


def _evm_codes() -> set[str]:
    """Every code string the EVM adapter can put in a SubmitResult or LedgerRejected."""
    from host_tools.relay import core as relay_core

    relay_own = {"malformed", "nonce_conflict", "not_carried", "not_found", "too_large", "method_not_allowed"}
    return ({*evm.PRE_RULE_ERRORS.values(), *evm.REJECTION_CODES.values(), "unknown_device", "revoked"}
            | {code for _, code in relay_core.PRE_RULE_ERRORS.values()} | relay_own)


# ------------------------------------------------------------------------- table tests

@pytest.mark.parametrize("code", sorted(REJECTION_STATUS))
def test_the_rest_adapter_classifies_every_bench_ledger_code(code):
    assert code in rest.REFUSALS, f"bench ledger code {code!r} is not classified in firmware/ledger/rest.py REFUSALS"
    assert rest.refusal_for(code) is EXPECTED.get(code, Refusal.REFUSED)


@pytest.mark.parametrize("code", sorted(_evm_codes()))
def test_the_evm_adapter_maps_every_chain_and_relay_code(code):
    assert evm.refusal_for(code) is EXPECTED.get(code, Refusal.REFUSED)


def test_both_backends_give_a_shared_code_the_same_meaning_and_unknown_codes_are_plain_refusals():
    shared = set(rest.REFUSALS) & (_evm_codes() | set(evm.REFUSALS))
    assert {"expired", "not_yet_valid", "unknown_device", "revoked", "order_closed"} <= shared
    assert {c: rest.refusal_for(c) for c in shared} == {c: evm.refusal_for(c) for c in shared}
    assert rest.refusal_for("a_code_from_a_newer_ledger") is evm.refusal_for("code_99") is Refusal.REFUSED
    # the chain's rule codes are the same table the relay uses (host_tools/evm/market.py)
    from host_tools.evm.market import REJECTION_CODES as relay_rule_codes

    assert evm.REJECTION_CODES == relay_rule_codes


def test_the_vocabulary_is_enforced_on_the_interface_types():
    with pytest.raises(TypeError, match="refusal"):
        SubmitResult("rejected", False, "gate_closed", "market_id: closed", {})  # an adapter that forgot to map
    with pytest.raises(TypeError, match="accepted"):
        SubmitResult("accepted", False, None, "", {}, Refusal.REFUSED)
    with pytest.raises(TypeError, match="Refusal"):
        LedgerRejected("not_found", "no such trade", 404)  # the old http_status argument
    refused = LedgerRejected("unknown_device", "no such device", Refusal.DEVICE_UNKNOWN)
    assert not hasattr(refused, "http_status") and refused.refusal in DEVICE_REFUSALS
    assert str(refused) == "ledger refused the request (unknown_device): no such device"


# ------------------------------------------------------------ REST mapping over real HTTP

LEDGER_ID = "vocabulary-test"
T0 = 1_800_000_000
RULES = MarketRules(slot_seconds=1800, markets_ahead=48, lot_wh=100, gate_closure_seconds=900,
                    price_min_per_kwh_minor=1000, price_max_per_kwh_minor=4000)
MARKET = T0 + 3 * 1800
TOKEN = "vocabulary-operator-token"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}


def _key(n: int) -> DeviceKey:
    return DeviceKey(coincurve.PrivateKey(hashlib.sha256(f"vocabulary device {n}".encode()).digest()))


def _message(key: DeviceKey, nonce: int, kind: str = "order", *, issued_at: int = T0 + 100, **extra):
    if kind == "order":
        extra = {"market_id": MARKET, "side": "sell", "energy_wh": 100, "price_per_kwh_minor": 2000, **extra}
    fields = new_fields(kind, ledger_id=LEDGER_ID, device_id=key.device_id, nonce=nonce, issued_at=issued_at, ttl_s=60, **extra)
    return sign_message(fields, key)


def test_rest_answers_carry_the_refusal_over_real_http(tmp_path):
    settings = LedgerSettings(db_path=tmp_path / "l.sqlite3", ledger_id=LEDGER_ID, rules=RULES, operator_token=TOKEN,
                              initial_credit_milli_minor=10**10, report_deadline_seconds=600,
                              clock=lambda: (T0 + 100) * 1000)
    me, stranger, gone = _key(1), _key(2), _key(3)
    with running_ledger(settings) as running:
        for key in (me, gone):
            r = requests.post(running.url + "/v1/devices", json={"public_key": key.public_key.hex(), "name": "h"},
                              headers=OPERATOR, timeout=5)
            assert r.status_code == 200, r.text
        assert requests.post(f"{running.url}/v1/devices/{gone.device_id}/revoke", headers=OPERATOR, timeout=5).status_code == 200
        ledger = RestLedger(running.url, timeout_ms=5000, retries=0, backoff_ms=1, signer=me, ledger_id=LEDGER_ID,
                            clock_ms=lambda: (T0 + 100) * 1000)

        def rejected(message) -> SubmitResult:
            answer = ledger.submit(message)
            assert answer.status == "rejected", answer
            return answer

        assert ledger.submit(_message(me, 1)).accepted
        assert ledger.submit(_message(me, 2, "cancel", market_id=MARKET, order_nonce=1)).accepted
        seen = {
            "expired": rejected(_message(me, 3, issued_at=T0 - 1000)),
            "not_yet_valid": rejected(_message(me, 4, issued_at=T0 + 100_000)),
            "order_closed": rejected(_message(me, 5, "cancel", market_id=MARKET, order_nonce=1)),
            "price_out_of_band": rejected(_message(me, 6, price_per_kwh_minor=9000)),
            "unknown_device": rejected(_message(stranger, 1)),
            "revoked": rejected(_message(gone, 1)),
        }
        assert {code: (a.code, a.refusal) for code, a in seen.items()} == \
               {code: (code, EXPECTED.get(code, Refusal.REFUSED)) for code in seen}

        unsigned = RestLedger(running.url, timeout_ms=5000, retries=0, backoff_ms=1)
        with pytest.raises(RestRejected) as err:  # a device's account is private: unsigned reads are refused
            unsigned.device_account(me.device_id)
        assert (err.value.code, err.value.refusal, err.value.http_status) == ("unauthorized", Refusal.DEVICE_UNAUTHORISED, 401)
        assert "401 unauthorized" in str(err.value)  # the REST adapter keeps the status in its text
        with pytest.raises(LedgerRejected) as err:
            ledger.trade_proof(987654)
        assert (err.value.code, err.value.refusal) == ("not_found", Refusal.NOT_FOUND)
        late = RestLedger(running.url, timeout_ms=5000, retries=0, backoff_ms=1, signer=me, ledger_id=LEDGER_ID,
                          clock_ms=lambda: (T0 - 1000) * 1000)
        with pytest.raises(LedgerRejected) as err:  # a signed read the ledger finds stale
            late.device_account(me.device_id)
        assert (err.value.code, err.value.refusal) == ("expired", Refusal.RESIGN)


# ------------------------------------------------- the controller knows no wire code

CONTROLLER_MODULES = sorted((ROOT / "firmware" / "scheduler").glob("*.py")) + [ROOT / "firmware" / "selftest.py"]
WIRE_CODES = frozenset(REJECTION_STATUS) | _evm_codes() | {"forbidden", "http_error"}
# Words that are also the board's own vocabulary, not a ledger's answer: "expired" is the
# journal's state of a message dropped unsent (outbox.state, dgc status). Still caught below
# if compared with a ``.code``.
BOARD_WORDS = frozenset({"expired"})


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _strings_in(node: ast.AST, constants: dict[str, set[str]]) -> set[str]:
    """String constants an expression holds, following module-level names of string collections."""
    if isinstance(node, ast.Name):
        return constants.get(node.id, set())
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def wire_code_uses(source: str) -> list[str]:
    """Where a module names a ledger wire code or branches on a ``.code`` against strings."""
    tree = ast.parse(source)
    docstrings = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in WIRE_CODES - BOARD_WORDS:
                found.append(f"line {node.lineno}: wire code {node.value!r}")
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            constants[node.targets[0].id] = _strings_in(node.value, {})
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Attribute) and o.attr == "code" for o in operands):
                strings = set().union(*(_strings_in(o, constants) for o in operands))
                if strings:
                    found.append(f"line {node.lineno}: .code compared with {sorted(strings)}")
    return found


@pytest.mark.parametrize("path", CONTROLLER_MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_controller_module_mentions_a_ledger_wire_code(path):
    assert wire_code_uses(path.read_text()) == []


def test_the_scan_catches_the_old_branches():
    """The shapes the controller used before (outbox.py, selftest.py): each is found."""
    old_outbox = 'RESIGN = frozenset({"expired", "not_yet_valid"})\ndef f(a):\n    return a.code in RESIGN\n'
    old_selftest = 'def f(exc):\n    return exc.code == "revoked"\n'
    only_expired = 'CODES = ("expired",)\ndef f(answer):\n    return answer.code in CODES\n'
    assert wire_code_uses(old_outbox) and wire_code_uses(old_selftest) and wire_code_uses(only_expired)
    assert wire_code_uses('def f(s):\n    """Rejected as ``revoked``."""\n    return s.get("expired", 0)\n') == []
