"""File operations run ON the board by ``host_tools.target``, as ``python3 -c <this file> OP ARGS``.

Why a script sent to the board instead of shell one-liners: an update is only as safe as its
file operations. Atomic replacement needs a temporary file in the same directory, fsync of the
file, rename(2), and fsync of the directory; a symlink switch needs a new link renamed over the
old one. Coreutils cannot fsync a directory portably and quoting shell over SSH is a trap, while
``python3`` is on every Raspberry Pi OS image (the firmware needs it anyway). The same script
runs for a board over SSH and for a local directory, so tests and real boards share one path.

Standard library only; Python 3.9+ (this runs under the board's system python3, before any
release is installed). Protocol: arguments on the command line, file data on stdin, results
on stdout (raw bytes for ``read``, JSON otherwise), one line on stderr and exit 1 on error,
exit 3 when ``read`` finds no file.
"""

import base64
import hashlib
import json
import os
import shutil
import stat
import sys
import tarfile

EXIT_MISSING = 3


def _fsync_dir(path):
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path):
    head, tail = os.path.split(path)
    return os.path.join(head, ".%s.tmp-%d" % (tail, os.getpid()))


def op_read(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        sys.exit(EXIT_MISSING)
    sys.stdout.buffer.write(data)


def op_write(path, mode):
    """Atomic write: temporary file (O_EXCL, final mode), fsync, rename over, fsync the directory."""
    data = sys.stdin.buffer.read()
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, int(mode, 8))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, int(mode, 8))  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    print(json.dumps({"written": len(data)}))


def op_symlink(path, value):
    """Point ``path`` at ``value`` atomically: a new link under a temporary name renamed over it."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    if os.path.isdir(path) and not os.path.islink(path):
        raise OSError("%s is a directory, expected a symlink or nothing" % path)
    tmp = _tmp_name(path)
    os.symlink(value, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(directory)
    print(json.dumps({"link": value}))


def op_replace(src, dst):
    os.replace(src, dst)
    _fsync_dir(os.path.dirname(dst))
    if os.path.dirname(src) != os.path.dirname(dst):
        _fsync_dir(os.path.dirname(src))
    print(json.dumps({"replaced": dst}))


def _describe(path):
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return {"type": None}
    if stat.S_ISLNK(info.st_mode):
        return {"type": "link", "link": os.readlink(path), "realpath": os.path.realpath(path),
                "target_exists": os.path.exists(path)}
    kind = "dir" if stat.S_ISDIR(info.st_mode) else "file" if stat.S_ISREG(info.st_mode) else "other"
    return {"type": kind, "realpath": os.path.realpath(path), "mode": stat.S_IMODE(info.st_mode), "size": info.st_size,
            "mtime_ns": info.st_mtime_ns}


def op_stat(*paths):
    print(json.dumps({path: _describe(path) for path in paths}))


def op_probe(*paths):
    """stat (symlinks not followed) plus the content, base64, of each path that is (or links to) a
    small regular file: one round trip for everything an install must know before it starts."""
    out = {}
    for path in paths:
        info = _describe(path)
        info["content"] = None
        if info["type"] in ("file", "link") and os.path.isfile(path) and os.path.getsize(path) <= (1 << 20):
            with open(path, "rb") as handle:
                info["content"] = base64.b64encode(handle.read()).decode("ascii")
        out[path] = info
    print(json.dumps(out))


def op_list(path):
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        names = None
    print(json.dumps(None if names is None else {name: _describe(os.path.join(path, name)) for name in names}))


def op_rmtree(path):
    """Remove a file, a link or a whole directory; nothing there is fine (removal is idempotent)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    else:
        print(json.dumps({"removed": None}))
        return
    _fsync_dir(os.path.dirname(path))
    print(json.dumps({"removed": path}))


def op_untar(dest):
    """Extract the tar stream on stdin into ``dest`` (created, must not exist): regular files and
    directories only, no absolute paths, no '..', no links - whatever the stream says."""
    os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
    os.mkdir(dest, 0o755)
    count = 0
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as archive:
        for member in archive:
            name = member.name
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                raise OSError("unsafe tar member %r (expected relative regular files and directories)" % name)
            target = os.path.join(dest, *parts)
            if member.isdir():
                os.makedirs(target, mode=0o755, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            source = archive.extractfile(member)
            with open(target, "wb") as handle:
                shutil.copyfileobj(source, handle)
            os.chmod(target, 0o644)
            count += 1
    os.sync()  # the bundle must be on the card before anything points at it
    print(json.dumps({"files": count}))


def op_sha256(directory):
    """sha256 and size of each relative path read from stdin (a JSON list)."""
    names = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    out = {}
    for name in names:
        path = os.path.join(directory, *name.split("/"))
        try:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            out[name] = {"sha256": digest.hexdigest(), "size": os.path.getsize(path)}
        except FileNotFoundError:
            out[name] = None
    print(json.dumps(out))


def op_sync():
    os.sync()
    print(json.dumps({"synced": True}))


OPS = {
    "read": op_read, "write": op_write, "symlink": op_symlink, "replace": op_replace, "stat": op_stat, "probe": op_probe,
    "list": op_list, "rmtree": op_rmtree, "untar": op_untar, "sha256": op_sha256, "sync": op_sync,
}


def main(argv):
    if not argv or argv[0] not in OPS:
        sys.stderr.write("board_ops: expected one of %s\n" % ", ".join(sorted(OPS)))
        return 2
    try:
        OPS[argv[0]](*argv[1:])
    except (OSError, ValueError, tarfile.TarError) as exc:
        sys.stderr.write("board_ops %s: %s\n" % (argv[0], exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
