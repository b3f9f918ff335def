"""Pure parts of provisioning and flashing: proof of possession, the entropy guard of key creation,
bundle manifests, and the config a new release gets."""

from __future__ import annotations

import hashlib
import json
import os

import coincurve
import ecdsa
import pytest

from firmware import keystore
from firmware.identity import (
    IdentityError,
    PROVISION_DOMAIN,
    answer_challenge,
    parse_challenge,
    provision_digest,
    verify_answer,
)
from firmware.keystore import DeviceKey, KeyFileError, generate_key_file
from firmware.messages import SECP256K1_ORDER, device_id_from_public_key

CHALLENGE = bytes(range(32))


def key(n: int = 1) -> DeviceKey:
    return DeviceKey(coincurve.PrivateKey(hashlib.sha256(f"identity test {n}".encode()).digest()))


def test_digest_is_domain_separated_and_reproducible_with_hashlib_alone():
    device_id = key().device_id
    expected = hashlib.sha256(b"DGC-PROVISION-v1\0" + CHALLENGE + device_id.encode()).digest()
    assert provision_digest(CHALLENGE, device_id) == expected
    assert PROVISION_DOMAIN == "DGC-PROVISION-v1"


def test_answer_verifies_with_the_independent_ecdsa_package():
    k = key()
    answer = answer_challenge(k, CHALLENGE)
    public_key, device_id = verify_answer(answer, CHALLENGE)
    assert public_key == k.public_key and device_id == k.device_id == device_id_from_public_key(public_key)
    # and by hand, with ecdsa only
    vk = ecdsa.VerifyingKey.from_string(bytes.fromhex(answer["public_key"]), curve=ecdsa.SECP256k1)
    assert vk.verify_digest(bytes.fromhex(answer["signature"]), provision_digest(CHALLENGE, device_id),
                            sigdecode=ecdsa.util.sigdecode_string)


def test_a_stale_answer_for_another_challenge_is_refused():
    answer = answer_challenge(key(), CHALLENGE)
    with pytest.raises(IdentityError, match="not the challenge this host sent"):
        verify_answer(answer, bytes(32))
    # even with the challenge field rewritten, the signature is over the old challenge
    forged = {**answer, "challenge": bytes(32).hex()}
    with pytest.raises(IdentityError, match="does not verify"):
        verify_answer(forged, bytes(32))


def test_someone_elses_public_key_with_my_signature_is_refused():
    mine, theirs = key(1), key(2)
    answer = answer_challenge(mine, CHALLENGE)
    claimed = {**answer, "public_key": theirs.public_key.hex(), "device_id": theirs.device_id}
    with pytest.raises(IdentityError, match="does not verify"):
        verify_answer(claimed, CHALLENGE)
    wrong_id = {**answer, "device_id": theirs.device_id}
    with pytest.raises(IdentityError, match="derived from the public key"):
        verify_answer(wrong_id, CHALLENGE)


def test_high_s_twin_and_malformed_fields_are_refused():
    answer = answer_challenge(key(), CHALLENGE)
    sig = bytes.fromhex(answer["signature"])
    s = int.from_bytes(sig[32:], "big")
    high = sig[:32] + (SECP256K1_ORDER - s).to_bytes(32, "big")  # also a valid ECDSA signature
    with pytest.raises(IdentityError, match="low S"):
        verify_answer({**answer, "signature": high.hex()}, CHALLENGE)
    with pytest.raises(IdentityError, match="public_key"):
        verify_answer({**answer, "public_key": "zz"}, CHALLENGE)
    with pytest.raises(IdentityError, match="domain"):
        verify_answer({**answer, "domain": "DGC-MESSAGE"}, CHALLENGE)
    with pytest.raises(IdentityError, match="JSON object"):
        verify_answer([answer], CHALLENGE)


@pytest.mark.parametrize("text", ["", "00" * 31, "00" * 33, "zz" * 32, " " + "00" * 31 + " "])
def test_challenge_must_be_32_bytes_of_hex(text):
    with pytest.raises(IdentityError, match="64 hex characters"):
        parse_challenge(text)
    assert parse_challenge("ab" * 32) == bytes([0xAB]) * 32


def test_keygen_refuses_while_the_random_pool_is_not_initialised(tmp_path, monkeypatch):
    """getrandom(GRND_NONBLOCK) raising EAGAIN is the kernel's 'pool not initialised': no key is made."""

    def uninitialised(size, flags=0):
        assert flags & os.GRND_NONBLOCK
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(keystore.os, "getrandom", uninitialised)
    path = tmp_path / "device.key"
    with pytest.raises(KeyFileError, match="random pool is not initialised") as info:
        generate_key_file(path)
    assert "entropy_avail" in str(info.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert generate_key_file(path).device_id  # ready pool: fine


def test_manifest_parser_refuses_what_build_would_never_write():
    from host_tools.flash import BundleRefused, canonical, parse_manifest

    good = {
        "format": "dgc-bundle-v1", "version": "1.0.0", "compatible": ["sim"], "created_at": 1, "requirement": "dgc-firmware==0.1.0",
        "python": "3.11", "platforms": ["x"], "config": "", "release_key": "00",
        "installer": "wheels/pip-26.3-py3-none-any.whl",
        "files": [{"path": "wheels/dgc_firmware-0.1.0-py3-none-any.whl", "sha256": "0" * 64, "size": 1},
                  {"path": "wheels/pip-26.3-py3-none-any.whl", "sha256": "1" * 64, "size": 2}],
    }
    assert parse_manifest(canonical(good)).version == "1.0.0"
    with pytest.raises(BundleRefused, match="canonical"):
        parse_manifest(json.dumps(good, indent=1).encode())
    for bad, match in (
        ({"version": "../etc"}, "version"),
        ({"compatible": []}, "compatible"),
        ({"files": [{"path": "../x.whl", "sha256": "0" * 64, "size": 1}]}, "safe"),
        ({"files": [{"path": "wheels/other-1.0-py3-none-any.whl", "sha256": "0" * 64, "size": 1}]}, "dgc_firmware wheel"),
        ({"installer": "wheels/dgc_firmware-0.1.0-py3-none-any.whl"}, "installer"),
        ({"config": "config/board.toml"}, "config"),
        ({"format": "dgc-bundle-v0"}, "format"),
    ):
        with pytest.raises(BundleRefused, match=match):
            parse_manifest(canonical({**good, **bad}))


def test_a_new_release_keeps_the_boards_identity_and_nothing_else():
    import tomllib

    from host_tools.flash import compose_config

    release = b'# release comment\n[board]\nname = "template"\nkind = "k"\n[ledger]\nurl = "http://new"\nledger_id = "L"\n' \
              b'[policy]\nmax_order_wh = 500\n'
    running = b'[board]\nname = "house-3"\nkind = "k"\n[ledger]\nurl = "https://pilot"\nledger_id = "pilot-1"\n' \
              b'[policy]\nmax_order_wh = 9000\n'
    composed = tomllib.loads(compose_config(release, running).decode())
    assert composed["board"]["name"] == "house-3"
    assert composed["ledger"] == {"url": "https://pilot", "ledger_id": "pilot-1"}
    assert composed["policy"]["max_order_wh"] == 500  # the release's setting wins: it is what was tested
    same = release.replace(b"template", b"house-3").replace(b"http://new", b"https://pilot").replace(b'"L"', b'"pilot-1"')
    assert compose_config(same, running) == same  # nothing to carry over: the release's bytes, comments and all
    assert compose_config(None, running) == running
    assert compose_config(release, None) == release
