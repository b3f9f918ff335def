"""Proof of possession for provisioning: the board signs the host's fresh challenge with its key.

Why this exists: when an engineer registers a board with the ledger, the host must know that
the public key it registers belongs to a secret that really sits on *this* board — not a key
copied from another board, not a public key typed in by hand. So the host sends a fresh random
challenge; the board answers with its public key, its device id and a signature over

    sha256(b"DGC-PROVISION-v1\\0" + challenge + device_id)

The domain prefix keeps this signature from ever being valid as a market message (those sign
sha256 of canonical JSON, which cannot start with these bytes), and the device id binds the
answer to the id the ledger will derive from the key. Only the public half and the signature
leave the board; the secret stays in ``keystore.DeviceKey``.

The host verifies with the independent pure-Python ``ecdsa`` package (the board signs with
``coincurve``), like the bench ledger does for messages. No I/O here.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

from .messages import Signer, device_id_from_public_key, is_low_s

PROVISION_DOMAIN = "DGC-PROVISION-v1"
CHALLENGE_BYTES = 32
IDENTITY_VERSION = 1


class IdentityError(ValueError):
    """A challenge or an answer that is malformed or does not prove possession. Says which field and why."""


def parse_challenge(text: str) -> bytes:
    """A challenge as given on the command line: exactly 64 hex characters (32 bytes)."""
    if not isinstance(text, str) or len(text) != 2 * CHALLENGE_BYTES or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise IdentityError(f"challenge: expected {2 * CHALLENGE_BYTES} hex characters ({CHALLENGE_BYTES} random bytes)")
    return bytes.fromhex(text)


def provision_digest(challenge: bytes, device_id: str) -> bytes:
    """The 32-byte digest the board signs; the device id is fixed-length, so the concatenation is unambiguous."""
    if len(challenge) != CHALLENGE_BYTES:
        raise IdentityError(f"challenge: expected {CHALLENGE_BYTES} bytes, got {len(challenge)}")
    if len(device_id) != 40 or not device_id.isascii():
        raise IdentityError("device_id: expected 40 hex characters")
    return hashlib.sha256(PROVISION_DOMAIN.encode("ascii") + b"\0" + challenge + device_id.encode("ascii")).digest()


def answer_challenge(key: Signer, challenge: bytes) -> dict:
    """The board's answer: public key, device id and the signature over the provisioning digest."""
    device_id = device_id_from_public_key(key.public_key)
    signature = key.sign_digest(provision_digest(challenge, device_id))
    return {
        "v": IDENTITY_VERSION,
        "domain": PROVISION_DOMAIN,
        "public_key": key.public_key.hex(),
        "device_id": device_id,
        "challenge": challenge.hex(),
        "signature": signature.hex(),
    }


def verify_answer(answer: Mapping[str, object], challenge: bytes) -> tuple[bytes, str]:
    """Check a board's answer to ``challenge``; returns (compressed public key, device id).

    Every failure names the field: a stale answer (another challenge), a device id that is not
    the one derived from the key, a signature that does not verify or is not low-S.
    """
    import ecdsa  # host side only: the board never needs the pure-Python implementation

    if not isinstance(answer, Mapping):
        raise IdentityError("answer: expected a JSON object")
    if answer.get("v") != IDENTITY_VERSION or answer.get("domain") != PROVISION_DOMAIN:
        raise IdentityError(f"answer: expected v={IDENTITY_VERSION} and domain {PROVISION_DOMAIN!r}, "
                            f"got v={answer.get('v')!r} domain={answer.get('domain')!r}")
    fields = {}
    for name in ("public_key", "device_id", "challenge", "signature"):
        value = answer.get(name)
        if not isinstance(value, str) or not value or any(c not in "0123456789abcdef" for c in value):
            raise IdentityError(f"answer.{name}: expected lowercase hex")
        fields[name] = value
    if fields["challenge"] != challenge.hex():
        raise IdentityError("answer.challenge: not the challenge this host sent (a stale or replayed answer)")
    public_key = bytes.fromhex(fields["public_key"])
    if len(public_key) != 33:
        raise IdentityError(f"answer.public_key: expected a 33-byte compressed secp256k1 key, got {len(public_key)} bytes")
    try:
        expected_id = device_id_from_public_key(public_key)
    except ValueError:
        raise IdentityError("answer.public_key: not a point on secp256k1") from None
    if fields["device_id"] != expected_id:
        raise IdentityError(f"answer.device_id: expected {expected_id} (derived from the public key), got {fields['device_id']}")
    signature = bytes.fromhex(fields["signature"])
    if len(signature) != 64 or not is_low_s(signature):
        raise IdentityError("answer.signature: expected 64 bytes r||s with low S")
    digest = provision_digest(challenge, expected_id)
    try:
        verifying_key = ecdsa.VerifyingKey.from_string(public_key, curve=ecdsa.SECP256k1)
        ok = verifying_key.verify_digest(signature, digest, sigdecode=ecdsa.util.sigdecode_string)
    except (ecdsa.BadSignatureError, ecdsa.MalformedPointError, ValueError, AssertionError):
        ok = False
    if not ok:
        raise IdentityError("answer.signature: does not verify against answer.public_key; the board does not hold that key")
    return public_key, expected_id
