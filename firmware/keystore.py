"""The device's secp256k1 key: created once on the board, loaded for signing, never exported.

Why this way:
- The key file is written to a temporary name with mode 0600 and then *hard-linked* into
  place: the link fails if the target exists, so creation is atomic and never overwrites a key
  (rename() would silently replace one).
- A key file that group or others can read is refused: on a shared Pi another account could
  have copied it already, and the owner must know.
- ``DeviceKey`` holds a coincurve key (libsecp256k1, constant time, RFC 6979, low-S) and has
  no method that returns the secret; its repr shows only the device id.
- A key is only created once the kernel's random pool is initialised: a Pi has no RTC and
  little entropy early in its first boot, and a key drawn from a predictable pool is a key
  someone else can recompute (see ``require_entropy``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import coincurve
from coincurve.ecdsa import der_to_cdata, serialize_compact

from .messages import device_id_from_public_key

KEY_FILE_HEADER = "dgc-secp256k1-v1"


class KeyFileError(Exception):
    """A key file that is missing, unsafe or malformed. Never carries key material."""


class DeviceKey:
    __slots__ = ("_key", "public_key", "device_id")

    def __init__(self, key: coincurve.PrivateKey) -> None:
        self._key = key
        self.public_key: bytes = key.public_key.format(compressed=True)
        self.device_id: str = device_id_from_public_key(self.public_key)

    def sign_digest(self, digest: bytes) -> bytes:
        """64-byte compact low-S signature (r || s) of a 32-byte digest."""
        if len(digest) != 32:
            raise ValueError("sign_digest expects a 32-byte digest")
        return serialize_compact(der_to_cdata(self._key.sign(digest, hasher=None)))

    def __repr__(self) -> str:
        return f"DeviceKey(device_id={self.device_id})"

    __str__ = __repr__

    def __reduce__(self):  # pickling would copy the secret out of the process
        raise TypeError("DeviceKey cannot be pickled")


def generate_key_file(path: Path) -> DeviceKey:
    """Create a new key at ``path`` (0600, atomic); refuse if a file is already there."""
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path}: a key file already exists; refusing to overwrite it (move it away first to rotate)")
    require_entropy()
    key = coincurve.PrivateKey()  # os.urandom-backed
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:  # e.g. a directory the user may not write: one clear line, not a traceback
        raise KeyFileError(f"{path}: cannot create the key file: {exc.strerror} ({exc.filename})") from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{KEY_FILE_HEADER}\n{key.secret.hex()}\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise KeyFileError(f"{path}: a key file already exists; refusing to overwrite it") from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return DeviceKey(key)


ENTROPY_AVAIL = Path("/proc/sys/kernel/random/entropy_avail")


def require_entropy() -> None:
    """Raise KeyFileError while the kernel's random pool is not initialised.

    ``getrandom(GRND_NONBLOCK)`` fails with EAGAIN exactly while the pool is uninitialised (the
    kernel's own definition of "not ready"), so that is the test; ``entropy_avail`` is only
    quoted in the message (since Linux 5.18 it reads 256 once the pool is ready, and its value
    alone proves nothing). Where there is no getrandom (not Linux), os.urandom is seeded by the
    OS before user space runs, so there is nothing to check.
    """
    getrandom = getattr(os, "getrandom", None)
    if getrandom is None:
        return
    try:
        getrandom(1, os.GRND_NONBLOCK)
    except BlockingIOError:
        try:
            avail = f"entropy_avail {ENTROPY_AVAIL.read_text().strip()}"
        except OSError:
            avail = "entropy_avail unreadable"
        raise KeyFileError(
            f"the kernel's random pool is not initialised yet ({avail}); refusing to create a key from it: "
            "wait until boot has finished (or enable the hardware RNG, rng-tools) and run keygen again"
        ) from None


def load_key_file(path: Path) -> DeviceKey:
    """Load a key file after checking its permissions; errors never include the file's contents."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no key file (create one with 'dgc keygen')") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: expected a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets group or others read the key; expected 0600 (chmod 600 {path})"
        )
    try:
        lines = path.read_text(encoding="ascii", errors="replace").split()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file: {exc.strerror}") from None
    if len(lines) != 2 or lines[0] != KEY_FILE_HEADER:
        raise KeyFileError(f"{path}: not a DGC key file (expected a '{KEY_FILE_HEADER}' header and one secret line)")
    try:
        secret = bytes.fromhex(lines[1])
        if len(secret) != 32:  # coincurve would left-pad a short secret into a different, valid key
            raise ValueError
        key = coincurve.PrivateKey(secret)
    except ValueError:
        raise KeyFileError(f"{path}: the secret line is not a valid 32-byte secp256k1 key") from None
    return DeviceKey(key)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
