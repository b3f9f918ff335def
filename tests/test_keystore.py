"""The device key file: 0600, atomic, never overwritten, refused when others can read it, never leaked."""

from __future__ import annotations

import copy
import hashlib
import multiprocessing
import os
import pickle
import stat
import traceback
from pathlib import Path

import coincurve
import pytest

from firmware import keystore
from firmware.keystore import KEY_FILE_HEADER, DeviceKey, KeyFileError, generate_key_file, load_key_file
from firmware.messages import is_low_s, verify_signature


@pytest.fixture
def umask():
    """Set a umask for one test and restore the previous one."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def secret_in(path: Path) -> str:
    header, secret = path.read_text().split()
    assert header == KEY_FILE_HEADER
    return secret


def leaks(exc: BaseException, *needles: str) -> list[str]:
    """The needles (lower- or upper-case) found in anything printable about an exception."""
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    return [n for n in needles for t in texts if n.lower() in t.lower()]


def write_key_file(path: Path, content: str, mode: int = 0o600) -> None:
    path.write_text(content)
    path.chmod(mode)


# --- creation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_generate_creates_a_0600_file_whatever_the_umask(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "state" / "device.key"  # the directory is created too
    key = generate_key_file(path)
    assert mode_of(path) == 0o600
    assert stat.S_ISREG(path.lstat().st_mode)
    lines = path.read_text().splitlines()
    assert lines[0] == KEY_FILE_HEADER and len(lines) == 2
    secret = bytes.fromhex(lines[1])
    assert len(secret) == 32
    assert coincurve.PrivateKey(secret).public_key.format(compressed=True) == key.public_key
    assert os.listdir(path.parent) == ["device.key"]  # no temporary file left behind
    assert load_key_file(path).device_id == key.device_id


def test_generated_keys_are_random(tmp_path):
    ids = {generate_key_file(tmp_path / f"k{i}.key").device_id for i in range(5)}
    assert len(ids) == 5


def test_generate_refuses_to_overwrite_and_leaves_the_file_untouched(tmp_path):
    path = tmp_path / "device.key"
    original = generate_key_file(path)
    before = path.read_bytes(), path.stat()
    with pytest.raises(KeyFileError, match="already exists; refusing to overwrite") as info:
        generate_key_file(path)
    after = path.read_bytes(), path.stat()
    assert after[0] == before[0]
    assert (after[1].st_ino, after[1].st_mtime_ns, after[1].st_mode) == (before[1].st_ino, before[1].st_mtime_ns, before[1].st_mode)
    assert load_key_file(path).device_id == original.device_id
    assert os.listdir(tmp_path) == ["device.key"]
    assert not leaks(info.value, secret_in(path))


def test_generate_refuses_even_when_the_file_appears_after_the_check(tmp_path, monkeypatch):
    """Another process wins the race between the exists() check and the link: the link refuses."""
    path = tmp_path / "device.key"
    write_key_file(path, "the other process's key\n")
    monkeypatch.setattr(keystore.Path, "exists", lambda self: False)  # as if the check ran before the other write
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(path)
    monkeypatch.undo()
    assert path.read_text() == "the other process's key\n"
    assert os.listdir(tmp_path) == ["device.key"]  # the temporary file was removed


def test_generate_refuses_a_dangling_symlink(tmp_path):
    path = tmp_path / "device.key"
    path.symlink_to(tmp_path / "elsewhere.key")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(path)
    assert not (tmp_path / "elsewhere.key").exists()
    assert sorted(os.listdir(tmp_path)) == ["device.key"]


def test_generate_in_an_unusable_directory_is_a_key_file_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(KeyFileError, match="cannot create the key file") as info:
        generate_key_file(blocker / "device.key")
    assert str(blocker / "device.key") in str(info.value)


def _race(path: str, barrier, rounds: int, results) -> None:
    for i in range(rounds):
        barrier.wait()
        try:
            key = generate_key_file(Path(path) / f"round{i}.key")
        except KeyFileError:
            results.put((i, os.getpid(), None))
        else:
            results.put((i, os.getpid(), key.device_id))


def test_concurrent_creation_by_two_processes_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    rounds = 15
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_race, args=(str(tmp_path), barrier, rounds, results)) for _ in range(2)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=30) for _ in range(2 * rounds)]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    for i in range(rounds):
        this_round = [device_id for r, _, device_id in outcomes if r == i]
        winners = [d for d in this_round if d is not None]
        assert len(this_round) == 2 and len(winners) == 1, this_round
        path = tmp_path / f"round{i}.key"
        assert mode_of(path) == 0o600
        assert load_key_file(path).device_id == winners[0]  # the file holds the winner's key
    assert sorted(os.listdir(tmp_path)) == sorted(f"round{i}.key" for i in range(rounds))  # no temp files


# --- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o666, 0o610, 0o601])
def test_load_refuses_group_or_other_access(tmp_path, mode):
    path = tmp_path / "device.key"
    generate_key_file(path)
    secret = secret_in(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError) as info:
        load_key_file(path)
    text = str(info.value)
    assert f"mode {mode:04o}" in text and "expected 0600" in text and str(path) in text
    assert "\n" not in text
    assert not leaks(info.value, secret)


def test_load_accepts_owner_only_modes(tmp_path):
    path = tmp_path / "device.key"
    key = generate_key_file(path)
    for mode in (0o400, 0o600, 0o700):
        path.chmod(mode)
        assert load_key_file(path).device_id == key.device_id


def test_load_missing_file_says_how_to_create_one(tmp_path):
    with pytest.raises(KeyFileError, match=r"no key file \(create one with 'dgc keygen'\)"):
        load_key_file(tmp_path / "device.key")


def test_load_a_directory_or_a_path_through_a_file_is_a_key_file_error(tmp_path):
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="expected a regular file"):
        load_key_file(tmp_path / "dir.key")
    (tmp_path / "plain").write_text("")
    with pytest.raises(KeyFileError, match="cannot read the key file"):  # was a bare NotADirectoryError
        load_key_file(tmp_path / "plain" / "device.key")


GOOD_SECRET = hashlib.sha256(b"keystore test secret").hexdigest()
ORDER_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

MALFORMED = {
    "empty": "",
    "header only": f"{KEY_FILE_HEADER}\n",
    "secret only": f"{GOOD_SECRET}\n",
    "wrong header": f"dgc-ed25519-v9\n{GOOD_SECRET}\n",
    "extra line": f"{KEY_FILE_HEADER}\n{GOOD_SECRET}\n{GOOD_SECRET[::-1]}\n",
    "not hex": f"{KEY_FILE_HEADER}\nzz{GOOD_SECRET[2:]}\n",
    "odd length": f"{KEY_FILE_HEADER}\n{GOOD_SECRET[:-1]}\n",
    "short secret": f"{KEY_FILE_HEADER}\n{GOOD_SECRET[:-2]}\n",  # 31 bytes: coincurve would zero-pad it
    "long secret": f"{KEY_FILE_HEADER}\n00{GOOD_SECRET}\n",  # 33 bytes with a leading zero
    "zero secret": f"{KEY_FILE_HEADER}\n{'00' * 32}\n",
    "secret = group order": f"{KEY_FILE_HEADER}\n{ORDER_N:064x}\n",
    "binary": "\x00\x01\x02garbage-\x7f\x80text\n",
    "pem-like": "-----BEGIN EC PRIVATE KEY-----\nMHQCAQEEIPdkbGZ0c2VjcmV0c2hvdWxkbm90bGVhaw\n-----END EC PRIVATE KEY-----\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_file_errors_never_include_the_content(tmp_path, name):
    content = MALFORMED[name]
    path = tmp_path / "device.key"
    write_key_file(path, content)
    with pytest.raises(KeyFileError) as info:
        load_key_file(path)
    assert str(path) in str(info.value)
    tokens = [t for t in content.split() if t != KEY_FILE_HEADER and len(t) >= 6]
    for token in tokens:  # no piece of the file (and so no secret) in any rendering of the error
        for fragment in (token, token[:16], token[-16:]):
            assert not leaks(info.value, fragment), (name, fragment)


def test_a_truncated_secret_is_refused_not_padded(tmp_path):
    path = tmp_path / "device.key"
    write_key_file(path, MALFORMED["short secret"])
    with pytest.raises(KeyFileError, match="not a valid 32-byte secp256k1 key"):
        load_key_file(path)


def test_load_accepts_surrounding_whitespace_and_upper_case(tmp_path):
    path = tmp_path / "device.key"
    write_key_file(path, f"\n{KEY_FILE_HEADER}\r\n  {GOOD_SECRET.upper()}  \n\n")
    expected = coincurve.PrivateKey(bytes.fromhex(GOOD_SECRET)).public_key.format(compressed=True)
    assert load_key_file(path).public_key == expected


# --- the loaded key ---------------------------------------------------------------------------


def test_repr_and_str_show_the_device_id_and_never_the_secret(tmp_path):
    path = tmp_path / "device.key"
    generate_key_file(path)
    secret = secret_in(path)
    key = load_key_file(path)
    for text in (repr(key), str(key), f"{key}", f"{key!r}", format(key), repr([key]), str({"k": key})):
        assert key.device_id in text
        assert secret not in text.lower()
    assert not hasattr(key, "secret") and not hasattr(key, "__dict__")
    assert not [name for name in dir(key) if "secret" in name.lower() or "export" in name.lower()]


def test_every_keystore_error_keeps_the_secret_out(tmp_path):
    path = tmp_path / "device.key"
    generate_key_file(path)
    secret = secret_in(path)
    errors: list[KeyFileError] = []

    def collect(fn, *args):
        with pytest.raises(KeyFileError) as info:
            fn(*args)
        errors.append(info.value)

    collect(generate_key_file, path)  # refuse to overwrite
    path.chmod(0o644)
    collect(load_key_file, path)  # bad mode
    write_key_file(path, f"{KEY_FILE_HEADER}\n{secret}\n{secret}\n")
    collect(load_key_file, path)  # extra line
    write_key_file(path, f"not-a-header\n{secret}\n")
    collect(load_key_file, path)  # wrong header
    write_key_file(path, f"{KEY_FILE_HEADER}\n{secret[:-2]}\n")
    collect(load_key_file, path)  # truncated
    assert len(errors) == 5
    for exc in errors:
        assert not leaks(exc, secret, secret[:-2], secret[:20], secret[-20:]), exc


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_is_refused(tmp_path, protocol):
    key = generate_key_file(tmp_path / "device.key")
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(key, protocol=protocol)


def test_copying_is_refused(tmp_path):
    key = generate_key_file(tmp_path / "device.key")
    with pytest.raises(TypeError):
        copy.copy(key)
    with pytest.raises(TypeError):
        copy.deepcopy(key)


def test_sign_digest_is_compact_low_s_deterministic_and_verifies(tmp_path):
    key = load_key_file(_written(tmp_path))
    payload = b'{"any":"bytes"}'
    digest = hashlib.sha256(payload).digest()
    signature = key.sign_digest(digest)
    assert len(signature) == 64 and is_low_s(signature)
    assert key.sign_digest(digest) == signature
    for backend in ("coincurve", "ecdsa"):
        assert verify_signature(payload, signature, key.public_key, backend=backend)
    for bad in (b"", digest[:31], digest + b"\x00", payload):
        with pytest.raises(ValueError, match="32-byte digest"):
            key.sign_digest(bad)


def _written(tmp_path: Path) -> Path:
    path = tmp_path / "device.key"
    write_key_file(path, f"{KEY_FILE_HEADER}\n{GOOD_SECRET}\n")
    return path


def test_device_key_from_file_matches_the_secret(tmp_path):
    key = load_key_file(_written(tmp_path))
    public = coincurve.PrivateKey(bytes.fromhex(GOOD_SECRET)).public_key.format(compressed=True)
    assert key.public_key == public
    assert key.device_id == hashlib.sha256(public).hexdigest()[:40]
    assert isinstance(key, DeviceKey)
