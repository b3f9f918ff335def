"""The ledger's store in a process of its own: the HTTP side and the writer each get a core.

Why: in one process the event loop (HTTP, JSON, signature checks) and the writer thread (the
book, SQLite, the hash chain) share one GIL, so a busy ledger used ~1.1 of the machine's 2
cores however the work was split (docs/ledger.md, "Throughput"). Here the ``LedgerStore`` lives
in a child forked when the app is built; the parent keeps a ``RemoteStore`` with the same public
methods, each call one request over a socket pair (pickled), answered in order. Nothing about
the rules moves: the child's store is the very same class, it still reads the ledger's clock
*under its own lock* (so the gate is judged at the instant of the apply, after any sweep), it
still commits a batch before a single answer leaves it, and the parent answers a request only
after the child's reply - exactly-once, deduplication and the signed record are the store's as
before. A batch's answers cross as (status, rendered bytes), not as objects (a tenth of the
pickling); the parent decodes a body only if someone asks for it.

Only a clock that means the same in both processes may be used (the host clock, or an
``OffsetClock``): an injected test clock lives in the test's process, so a ledger with one
keeps its store in-process (``LedgerSettings.writer_process``). If the child dies, every call
raises ``WriterGone`` (the HTTP side answers 500 "not applied"; what the child committed stays
committed, and a resend is deduplicated by the next ledger). If the parent dies, the child sees
the socket close and exits.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import signal
import socket
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable

from . import fastpath
from .store import LedgerStore, Outcome

log = logging.getLogger(__name__)

# What the parent may call (every public method the app, the committer and views_api use).
_METHODS = frozenset({
    "submit", "submit_batch", "sweep", "seal", "public_key_of", "account", "revoked_ms", "register_device",
    "revoke_device", "clear_shortfalls", "device_trades", "device_orders", "device_messages", "book",
    "market_trades", "trade", "stats", "blocks", "message_proof", "trade_proof", "record_completeness",
    "market_activity", "device_totals", "start_checkpointer", "stop_checkpointer",
})


class WriterGone(RuntimeError):
    """The store's process is gone (it crashed or was killed): nothing more can be applied."""


class WireOutcome(Outcome):
    """An Outcome as it came back from the writer: status and the answer's bytes; ``body`` is
    decoded from those bytes only when someone reads it (the HTTP fast path never does)."""

    def __init__(self, http_status: int, data: bytes) -> None:  # noqa: D107 (not the dataclass __init__)
        object.__setattr__(self, "http_status", http_status)
        object.__setattr__(self, "data", data)

    @property
    def body(self) -> dict:  # type: ignore[override]
        return json.loads(self.data)


def _to_wire(result: Any) -> Any:
    if isinstance(result, Outcome):
        return (result.http_status, result.data if result.data is not None else fastpath.render_response(result.body))
    return result  # an exception: pickled as it is


def _serve_child(sock: socket.socket, make_store: Callable[[], LedgerStore]) -> None:
    """The child's whole life: build the store, then answer calls until told to stop or the parent goes."""
    conn = Connection(sock.detach())
    store = None
    try:
        try:
            store = make_store()
            keys = store.public_keys()
            conn.send_bytes(pickle.dumps((True, (store.authority_public_key, keys)), 5))
        except BaseException as exc:  # noqa: BLE001 (reported to the parent, which raises it)
            conn.send_bytes(pickle.dumps((False, _picklable(exc)), 5))
            return
        gc.freeze()  # the store's long-lived objects (books rebuilt from SQLite) out of the full collections
        while True:
            try:
                request = conn.recv_bytes()
            except (EOFError, OSError):  # the parent is gone
                return
            name, args, kwargs = pickle.loads(request)
            if name == "__close__":
                store.close()
                store = None
                conn.send_bytes(pickle.dumps((True, None), 5))
                return
            try:
                result = getattr(store, name)(*args, **kwargs)
                reply = (True, [_to_wire(r) for r in result] if name == "submit_batch" else result)
            except BaseException as exc:  # noqa: BLE001 (raised again in the parent)
                reply = (False, exc)
            try:
                data = pickle.dumps(reply, 5)
            except Exception as exc:  # noqa: BLE001 (an unpicklable answer is a bug: say which)
                data = pickle.dumps((False, RuntimeError(f"writer: the answer of {name} could not be sent back: {exc!r}")), 5)
            conn.send_bytes(data)
    finally:
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001
                log.exception("writer: closing the store failed")
        conn.close()


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux's PR_SET_PDEATHSIG). Why: a parent killed
    mid-batch must not leave a child that commits that batch later, while a restarted ledger is
    already rebuilding its books from the database; with this the child dies with the parent
    (at most the COMMIT it is inside lands, atomically, as it would have). Elsewhere the child
    still exits at the socket's end-of-file, after the batch in hand."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.dumps(exc, 5)
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class RemoteStore:
    """The parent's side: LedgerStore's public methods, each a call to the writer process.

    Calls are serialised (one in flight at a time, like the store's own lock); the thread that
    waits for the child's answer releases the GIL, so the event loop runs meanwhile."""

    def __init__(self, make_store: Callable[[], LedgerStore]) -> None:
        parent_sock, child_sock = socket.socketpair()
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's code
            code = 0
            try:
                _die_with_parent(parent_pid)
                gc.freeze()  # the parent's objects (and any garbage among them) are never collected here,
                # so no inherited socket or file object is finalised onto a descriptor number reused below
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent stops us
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                keep = child_sock.fileno()
                os.closerange(3, keep)  # the parent's listening socket, pipes and database files are not ours
                os.closerange(keep + 1, max(os.sysconf("SC_OPEN_MAX"), 1 << 16))
                _serve_child(child_sock, make_store)
            except BaseException:  # noqa: BLE001
                log.exception("writer process failed")
                code = 1
            finally:
                os._exit(code)
        child_sock.close()
        self._pid = pid
        self._conn = Connection(parent_sock.detach())
        self._lock = threading.Lock()
        self._gone: str | None = None
        try:
            ok, value = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            ok, value = False, WriterGone("the writer process exited while opening the store")
        if not ok:
            self._conn.close()
            os.waitpid(pid, 0)
            raise value
        self.authority_public_key, self._public_keys = value
        log.info("ledger store in writer process %d", pid)

    @property
    def pid(self) -> int:
        return self._pid

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        request = pickle.dumps((name, args, kwargs), 5)
        with self._lock:
            if self._gone is not None:
                raise WriterGone(self._gone)
            try:
                self._conn.send_bytes(request)
                ok, value = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError) as exc:
                self._gone = f"the ledger's writer process is gone ({exc.__class__.__name__}); nothing was applied after it"
                raise WriterGone(self._gone) from None
        if not ok:
            raise value
        return value

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in _METHODS:
            raise AttributeError(f"RemoteStore has no {name!r} (the writer process serves {sorted(_METHODS)})")
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)

    def submit_batch(self, items: list, now_ms: int | None = None) -> list:
        return [WireOutcome(*r) if type(r) is tuple else r for r in self._call("submit_batch", items, now_ms)]

    def public_key_of(self, device_id: str) -> bytes | None:
        """From the parent's own copy, never a call: it holds every key in the database when the
        child opened it, and every registration since goes through ``register_device`` below
        (the child's store is changed by nothing else). So an unknown id - a forger's - costs a
        dictionary look-up, not a round trip behind the batch being committed."""
        return self._public_keys.get(device_id)

    @property
    def known_public_keys(self) -> dict[str, bytes]:
        return self._public_keys

    def register_device(self, *args: Any, **kwargs: Any) -> tuple[dict, bool]:
        account, created = self._call("register_device", *args, **kwargs)
        self._public_keys[account["device_id"]] = bytes.fromhex(account["public_key"])
        return account, created

    def close(self) -> None:
        """Stop the writer (it closes the store: checkpointer, connection) and reap it."""
        with self._lock:
            if self._gone is None:
                try:
                    self._conn.send_bytes(pickle.dumps(("__close__", (), {}), 5))
                    self._conn.recv_bytes()
                except (EOFError, OSError):
                    pass
                self._gone = "the ledger's store was closed"
            self._conn.close()
        try:
            os.waitpid(self._pid, 0)
        except ChildProcessError:
            pass
