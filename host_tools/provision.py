"""`dgc-host provision TARGET --ledger URL`: a key made on the board, proven, registered, written into its config.

Gives a board its identity - a key made on the board, registered with the ledger after the
board proved it holds it - and writes that identity into the board's config. `--rotate`
replaces the key and revokes the old device.

Why it is done this way (NOTES.md, provisioning anchors):

- **The key is generated on the board** (`dgc keygen`, which refuses while the kernel's random
  pool is not initialised) and never leaves it. The host only ever receives the public key and a
  signature: every byte the host gets from the board passes through ``host_tools.target``,
  which keeps it for audit, and the tests check the secret is in none of it.
- **Proof of possession.** The host sends a fresh 32-byte challenge; the board signs a
  domain-separated digest of it with its key (`dgc identity`); the host verifies with the
  independent ``ecdsa`` package before registering anything. A public key copied from
  elsewhere, or an answer replayed from an earlier run, cannot be registered this way.
- **Rotation keeps the old key until the new one is registered**, then revokes the old device
  at the ledger (its messages are refused ``revoked`` from then on, its open orders cancelled),
  then moves the new key over the old file. An interrupted rotation resumes: the new key waits
  at ``<key_file>.new``. By default a rotation is refused while the old device still has open
  orders or unsettled trades, because its delivery reports would be refused after revocation.
- **The config is rewritten, not patched by hand:** [ledger] url and ledger_id (from the
  ledger's own GET /v1/info, so they cannot be mistyped) and optionally [board] name, validated
  with the firmware's own parser here and with `dgc check-config` on the board. Comments of the
  old file are not kept (TOML writers cannot keep them). The full identity (device id, public
  key, ledger, revoked predecessors) goes to /etc/dgc/identity.toml, which also tells
  `dgc-host flash install` that the board is provisioned.

Exit status: 0 provisioned; 1 an operation failed (board or ledger unreachable or refusing, the
board's answer did not prove possession); 2 bad input (arguments, no config on the board).
The operator token is sent only to the ledger, in a header; it is never logged or printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import secrets
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from .cli_support import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, OneLineParser
from .target import BadTarget, BoardLayout, Target, TargetError, add_target_arguments, target_from_args

log = logging.getLogger(__name__)

TOKEN_ENV = "DGC_LEDGER_OPERATOR_TOKEN"
HTTP_TIMEOUT_S = 15


class ProvisionError(Exception):
    """One line for stderr and the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ProvisionResult:
    device_id: str
    public_key: str
    name: str
    ledger_url: str
    ledger_id: str
    created: bool
    key_file: str
    config_file: str
    rotated_from: str | None = None
    cancelled_orders: int = 0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the ledger

class _Ledger:
    """The few ledger calls provisioning needs, each failure one sentence naming the URL."""

    def __init__(self, url: str, token: str | None, *, verify_tls: bool = True) -> None:
        import requests

        self.url = url.rstrip("/")
        self._token = token
        self._verify = verify_tls
        self._session = requests.Session()

    def call(self, method: str, path: str, body: Any = None, *, operator: bool = False) -> tuple[int, Any]:
        import requests

        headers = {"Authorization": f"Bearer {self._token}"} if operator and self._token else {}
        try:
            response = self._session.request(method, self.url + path, json=body, headers=headers, timeout=HTTP_TIMEOUT_S,
                                             verify=self._verify, allow_redirects=False)
        except requests.RequestException as exc:
            raise ProvisionError(f"cannot reach the ledger at {self.url} ({type(exc).__name__}); expected a running ledger") from None
        try:
            return response.status_code, response.json()
        except ValueError:
            raise ProvisionError(f"{method} {self.url}{path}: HTTP {response.status_code} without JSON; expected the ledger API "
                                 "(docs/ledger-api.json)") from None

    def ok(self, method: str, path: str, body: Any = None, *, operator: bool = False, what: str) -> dict:
        status, answer = self.call(method, path, body, operator=operator)
        if status == 200 and isinstance(answer, dict):
            return answer
        code = answer.get("code") if isinstance(answer, dict) else None
        detail = answer.get("detail") if isinstance(answer, dict) else None
        hint = ""
        if code == "unauthorized":
            hint = f" (pass --operator-token or set ${TOKEN_ENV})"
        raise ProvisionError(f"the ledger at {self.url} refused to {what}: HTTP {status} {code or ''}: {detail if detail else repr(answer)}{hint}")

    def close(self) -> None:
        self._session.close()


# --------------------------------------------------------------------------- the board

def _board_identity(target: Target, dgc: str, config: str, key_file: str) -> tuple[bytes, str]:
    """Challenge the board's key at ``key_file``; return its verified (public key, device id)."""
    from firmware.identity import IdentityError, verify_answer

    challenge = secrets.token_bytes(32)
    result = target.run([dgc, "identity", config, "--key-file", key_file, "--challenge", challenge.hex(), "--json"],
                        check=False, as_board_user=True)
    if result.returncode != 0:
        raise ProvisionError(f"dgc identity failed on {target.describe()} (exit {result.returncode}): {result.last_lines()}")
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        raise ProvisionError(f"dgc identity on {target.describe()} answered something that is not JSON; "
                             "expected the firmware's identity answer (is the board's firmware current?)") from None
    try:
        return verify_answer(answer, challenge)
    except IdentityError as exc:
        raise ProvisionError(f"the board's answer does not prove it holds the key at {key_file}: {exc}") from None


def _key_file_of(data: dict, real_config: str) -> str:
    """[board] key_file as the board resolves it: relative to the config file's real directory."""
    board = data.get("board")
    key_file = board.get("key_file", "var/state/device.key") if isinstance(board, dict) else None
    if not isinstance(key_file, str) or not key_file:
        raise ProvisionError(f"{real_config}: [board] key_file: expected a path string", EXIT_BAD_INPUT)
    if key_file.startswith("/"):
        return posixpath.normpath(key_file)
    return posixpath.normpath(posixpath.join(posixpath.dirname(real_config), key_file))


def _check_quiet(ledger: _Ledger, device_id: str) -> None:
    """Refuse to revoke a device that still has open orders or unsettled trades: after revocation
    its delivery reports would be refused and those trades would settle as shortfalls."""
    status, _ = ledger.call("GET", f"/v1/devices/{device_id}", operator=True)
    if status == 404:
        return
    orders = ledger.ok("GET", f"/v1/devices/{device_id}/orders", operator=True,
                       what=f"list the orders of device {device_id}")["orders"]
    trades = ledger.ok("GET", f"/v1/devices/{device_id}/trades?after=0&limit=1000", operator=True,
                       what=f"list the trades of device {device_id}")["trades"]
    open_orders = [o for o in orders if o.get("state") == "open"]
    unsettled = [t for t in trades if t.get("state") != "settled"]
    if open_orders or unsettled:
        raise ProvisionError(
            f"device {device_id} still has {len(open_orders)} open order(s) and {len(unsettled)} unsettled trade(s); "
            "revoking it now would turn its pending deliveries into shortfalls. Stop the daemon, wait until its trades "
            "settle, then rotate - or pass --force (e.g. for a compromised key)")


def provision(target: Target, ledger_url: str, *, operator_token: str | None = None, config_path: str | None = None,
              identity_path: str | None = None, dgc: str | None = None, name: str | None = None, rotate: bool = False,
              force: bool = False, credit_milli_minor: int | None = None, verify_tls: bool = True) -> ProvisionResult:
    """Provision (or, with ``rotate``, re-key) the board behind ``target``. See the module doc."""
    import tomli_w

    from firmware.config import ConfigError, parse_config

    layout = BoardLayout()
    config = target.board_path(config_path or layout.config)
    identity_file = target.board_path(identity_path or layout.identity)
    dgc = dgc or target.board_path(layout.dgc)
    ledger = _Ledger(ledger_url, operator_token, verify_tls=verify_tls)
    try:
        info = ledger.ok("GET", "/v1/info", what="tell its ledger id")
        ledger_id = info.get("ledger_id")
        if not isinstance(ledger_id, str) or not ledger_id:
            raise ProvisionError(f"GET {ledger.url}/v1/info: no ledger_id; expected the ledger API (docs/ledger-api.json)")
        log.info("ledger %s at %s", ledger_id, ledger.url)

        raw = target.read_file(config)
        if raw is None:
            raise ProvisionError(f"no board config at {config} on {target.describe()}; expected one (install a release with "
                                 "dgc-host flash install, copy a config there, or name it with --config-path)", EXIT_BAD_INPUT)
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ProvisionError(f"{config} on {target.describe()}: not valid TOML ({exc})", EXIT_BAD_INPUT) from None
        real_config = target.stat(config)[config]["realpath"]
        key_file = _key_file_of(data, real_config)
        board_name = name or str(data.get("board", {}).get("name", ""))
        notes: list[str] = []

        rotated_from, cancelled = None, 0
        if rotate:
            if not target.exists(key_file):
                raise ProvisionError(f"no key at {key_file} on {target.describe()} to rotate; provision without --rotate first",
                                     EXIT_BAD_INPUT)
            _, old_id = _board_identity(target, dgc, config, key_file)
            log.info("board holds the key of device %s (to be rotated)", old_id)
            if not force:
                _check_quiet(ledger, old_id)
            new_key = key_file + ".new"
            if target.exists(new_key):
                log.info("resuming an interrupted rotation: a new key is already waiting at %s", new_key)
            else:
                target.run([dgc, "keygen", config, "--key-file", new_key], what="dgc keygen (new key)", as_board_user=True)
            public_key, device_id = _board_identity(target, dgc, config, new_key)
            rotated_from = old_id
        else:
            if target.exists(key_file):
                log.info("the board already has a key at %s; proving possession of it", key_file)
            else:
                target.run([dgc, "keygen", config], what="dgc keygen", as_board_user=True)
            public_key, device_id = _board_identity(target, dgc, config, key_file)
        log.info("the board proved possession of the key of device %s", device_id)

        body: dict[str, Any] = {"public_key": public_key.hex(), "name": board_name[:64]}
        if credit_milli_minor is not None:
            body["credit_milli_minor"] = credit_milli_minor
        account = ledger.ok("POST", "/v1/devices", body, operator=True, what=f"register device {device_id}")
        if account.get("device_id") != device_id:
            raise ProvisionError(f"the ledger registered device {account.get('device_id')!r}; expected {device_id} "
                                 "(derived from the board's public key)")
        created = bool(account.get("created"))
        log.info("device %s %s at ledger %s", device_id, "registered" if created else "was already registered", ledger_id)

        if rotate:
            status, answer = ledger.call("POST", f"/v1/devices/{rotated_from}/revoke", operator=True)
            if status == 404:
                notes.append(f"old device {rotated_from} was not registered at this ledger; nothing to revoke")
            elif status == 200 and isinstance(answer, dict):
                cancelled = int(answer.get("cancelled_orders", 0))
                log.info("revoked old device %s (%d open order(s) cancelled)", rotated_from, cancelled)
            else:
                code = answer.get("code") if isinstance(answer, dict) else None
                detail = answer.get("detail") if isinstance(answer, dict) else answer
                raise ProvisionError(f"the ledger refused to revoke old device {rotated_from}: HTTP {status} {code or ''}: "
                                     f"{detail}; the new key waits at {key_file}.new - run --rotate again to finish")
            target.replace(key_file + ".new", key_file)
            log.info("retired the old key: %s now holds the key of device %s", key_file, device_id)
            notes.append("restart the daemon (sudo systemctl restart dgc) so that it signs with the new key")

        data.setdefault("ledger", {})
        data["ledger"]["url"] = ledger.url
        data["ledger"]["ledger_id"] = ledger_id
        authority = info.get("authority_public_key")  # pinned: the board checks the ledger's signed record with it
        pinned = isinstance(authority, str) and len(authority) == 66 and all(c in "0123456789abcdef" for c in authority)
        if pinned:
            data["ledger"]["authority_public_key"] = authority  # the daemon reads it here (issue 10, A3)
        if name:
            data.setdefault("board", {})["name"] = name
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        text = (f"# Board config of {board_name}. [ledger] url and ledger_id written by dgc-host provision at {stamp}\n"
                f"# for device {device_id}; identity in {identity_path or layout.identity}.\n\n" + tomli_w.dumps(data))
        try:
            parse_config(text, PurePosixPath(real_config))
        except ConfigError as exc:
            raise ProvisionError(f"the updated config would not be valid: {exc}", EXIT_BAD_INPUT) from None
        target.write_file(real_config, text.encode("utf-8"), mode=0o644)
        target.run([dgc, "check-config", config], what="dgc check-config", as_board_user=True)

        previous = target.read_file(identity_file)
        revoked: list[str] = []
        if previous:
            try:
                revoked = list(tomllib.loads(previous.decode("utf-8")).get("identity", {}).get("revoked_device_ids", []))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError):
                notes.append(f"{identity_file} was not valid TOML; rewritten")
        if rotated_from and rotated_from not in revoked:
            revoked.append(rotated_from)
        identity = {"identity": {
            "device_id": device_id, "public_key": public_key.hex(), "name": board_name, "ledger_url": ledger.url,
            "ledger_id": ledger_id, "key_file": key_file, "provisioned_at": stamp, "revoked_device_ids": revoked,
        }}
        if pinned:
            identity["identity"]["ledger_authority_public_key"] = authority
        target.write_file(identity_file, ("# Written by dgc-host provision; public data only.\n\n" + tomli_w.dumps(identity)).encode(),
                          mode=0o644)
        return ProvisionResult(device_id=device_id, public_key=public_key.hex(), name=board_name, ledger_url=ledger.url,
                               ledger_id=ledger_id, created=created, key_file=key_file, config_file=real_config,
                               rotated_from=rotated_from, cancelled_orders=cancelled, notes=notes)
    finally:
        ledger.close()


# --------------------------------------------------------------------------- command line

def _url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text.rstrip("/")


def cmd_provision(args: argparse.Namespace) -> int:
    token = args.operator_token or os.environ.get(TOKEN_ENV) or None
    try:
        with target_from_args(args.target, args) as target:
            result = provision(target, args.ledger, operator_token=token, config_path=args.config_path,
                               identity_path=args.identity_path, dgc=args.dgc, name=args.name, rotate=args.rotate,
                               force=args.force, credit_milli_minor=args.credit)
    except ProvisionError as exc:
        print(f"dgc-host provision: {exc}", file=sys.stderr)
        return exc.status
    except TargetError as exc:
        print(f"dgc-host provision: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(exc, BadTarget) else EXIT_FAILED
    print(f"device_id {result.device_id}")
    print(f"public_key {result.public_key}")
    print(f"ledger {result.ledger_id} {result.ledger_url} ({'registered' if result.created else 'already registered'})")
    if result.rotated_from:
        print(f"revoked {result.rotated_from} ({result.cancelled_orders} open order(s) cancelled)")
    print(f"config {result.config_file}")
    for note in result.notes:
        print(f"note: {note}")
    return EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    """Add `dgc-host provision` (a command, not a group)."""
    p = subparsers.add_parser(name, help=help_text, description=__doc__.splitlines()[0])
    p.__class__ = OneLineParser
    p.add_argument("target", metavar="TARGET", help="user@host (SSH), serial:/dev/DEVICE[@BAUD] (a logged-in shell on the serial console) or a directory standing for the board's root")
    p.add_argument("--ledger", type=_url, required=True, help="the ledger's base URL")
    p.add_argument("--operator-token", help=f"the ledger's operator token (or ${TOKEN_ENV}); never printed")
    p.add_argument("--config-path", help=f"the board config on the board (default {BoardLayout.config})")
    p.add_argument("--identity-path", help=f"where to write the identity on the board (default {BoardLayout.identity})")
    p.add_argument("--dgc", help=f"the board's dgc command (default {BoardLayout().dgc} under the root)")
    p.add_argument("--name", help="set the board's name ([board] name; default: keep the config's)")
    p.add_argument("--credit", type=int, metavar="MILLI_MINOR", help="opening balance at registration (default: the ledger's)")
    p.add_argument("--rotate", action="store_true",
                   help="make a new key on the board, register it, revoke the old device, retire the old key")
    p.add_argument("--force", action="store_true", help="rotate even while the old device has open orders or unsettled trades")
    add_target_arguments(p)
    p.set_defaults(func=cmd_provision)
    return p
