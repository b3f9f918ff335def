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

Messages take a channel of their own (``PipelinedCommitter``): the event loop writes each loop
iteration's verified messages as one frame to a second socket pair, without waiting for the
answer to the frame before, and the writer applies every frame that is waiting when it is free
in ONE transaction (one COMMIT, one fsync), then answers each frame. Why: with a committer
thread between them, the writer sat idle after each COMMIT until that thread had got the GIL
back from the busy event loop (up to the 5-ms switch interval), unpickled the answers, woken the
loop and sent the next batch; now the next transaction starts as soon as the last one is
committed, and the answers are read by the event loop itself (no thread, no self-pipe wake-up).
Exactly-once is the store's as before: a frame is answered only after the COMMIT that applied it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any, Callable, Mapping

from . import fastpath
from .committer import _resolve
from .store import LedgerStore, Outcome

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<II")  # the message channel's frames: byte length and message count, then a pickle
FRAME_MAX_ITEMS = 256  # messages per frame the HTTP side writes at most
TRANSACTION_MAX_ITEMS = 512  # messages the writer applies in one transaction at most (several frames)
# The group-commit window (see _collect): under concurrent load a transaction starts at most once
# per COLLECT_S, unless COLLECT_ITEMS messages are already waiting.
COLLECT_S = 0.004
COLLECT_ITEMS = 64

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


def _serve_child(sock: socket.socket, batch_sock: socket.socket, make_store: Callable[[], LedgerStore]) -> None:
    """The child's whole life: build the store, then answer calls (one at a time, in order) and
    message frames (every frame waiting, in one transaction) until told to stop or the parent goes."""
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
        selector = selectors.DefaultSelector()
        selector.register(conn.fileno(), selectors.EVENT_READ, "call")
        selector.register(batch_sock, selectors.EVENT_READ, "batch")
        inbox = bytearray()  # bytes read from the message channel, not yet a whole frame
        frames: deque = deque()  # whole frames waiting (pickled lists of messages)
        last_count, last_start = 0, 0.0  # the last transaction's messages and start (monotonic s)
        while True:
            if frames:
                if last_count > 1:  # concurrent senders: let the transaction fill a little
                    _collect(batch_sock, inbox, frames, last_start + COLLECT_S)
                last_start = time.monotonic()
                last_count = _apply_frames(store, frames, batch_sock)
                continue
            for key, _ in selector.select():
                if key.data == "batch":
                    if not _read_frames(batch_sock, inbox, frames):  # the parent closed it (or is gone)
                        selector.unregister(batch_sock)
                    continue
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
        batch_sock.close()


def _read_frames(sock: socket.socket, inbox: bytearray, frames: deque) -> bool:
    """Everything the message channel holds now, cut into whole frames; False at its end."""
    while True:
        try:
            data = sock.recv(65536, socket.MSG_DONTWAIT)  # below malloc's mmap threshold: no mmap per call
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            return False
        if not data:
            return False
        inbox += data
    offset, size, head = 0, len(inbox), _FRAME.size
    while size - offset >= head:
        length, count = _FRAME.unpack_from(inbox, offset)
        if size - offset - head < length:
            break
        frames.append((count, bytes(inbox[offset + head:offset + head + length])))
        offset += head + length
    if offset:
        del inbox[:offset]
    return True


def _collect(sock: socket.socket, inbox: bytearray, frames: deque, until: float) -> None:
    """Wait for more frames until ``until`` (monotonic s) or until COLLECT_ITEMS messages wait.

    Why: a COMMIT costs ~0.4 ms of CPU whatever it holds (the fsync and the WAL's header and
    index work on this machine) plus ~5 us per dirty page, so a writer that starts a
    transaction for every frame as soon as it is free spends ~0.28 ms per message at 5
    messages a transaction and ~0.13 ms at 30 (store alone, 160 devices). Only when the last
    transaction held more than one message (senders are concurrent), at most COLLECT_S after the
    last one started: a lone request never waits, and a transaction that took longer than that
    is followed at once."""
    count = sum(n for n, _ in frames)
    while count < COLLECT_ITEMS:
        left = until - time.monotonic()
        if left <= 0:
            return
        ready, _, _ = select.select([sock], [], [], left)
        if not ready or not _read_frames(sock, inbox, frames):
            return
        count = sum(n for n, _ in frames)


def _apply_frames(store: LedgerStore, frames: deque, sock: socket.socket) -> int:
    """Apply the waiting frames (up to TRANSACTION_MAX_ITEMS messages, at least one frame) in ONE
    ``submit_batch`` - one transaction, one COMMIT - and only then answer each of them. Returns
    the number of messages applied."""
    taken: list[list] = []
    count = 0
    while frames and (not taken or count + frames[0][0] <= TRANSACTION_MAX_ITEMS):
        n, data = frames.popleft()
        taken.append(pickle.loads(data))
        count += n
    merged = taken[0] if len(taken) == 1 else [item for items in taken for item in items]
    try:
        results: Any = store.submit_batch(merged)
    except BaseException as exc:  # noqa: BLE001 (the commit failed: nothing of these frames was applied)
        log.exception("a batch of %d message(s) could not be committed", len(merged))
        replies = [pickle.dumps((False, _picklable(exc)), 5)] * len(taken)
    else:
        replies, start = [], 0
        for items in taken:
            replies.append(pickle.dumps((True, [_to_wire(r) for r in results[start:start + len(items)]]), 5))
            start += len(items)
    out = []
    for items, data in zip(taken, replies):
        out += (_FRAME.pack(len(data), len(items)), data)
    try:
        sock.sendall(b"".join(out))
    except OSError:  # the parent is gone: what was committed stays committed, a resend is a duplicate
        pass
    return count


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
        batch_parent, batch_child = socket.socketpair()  # the message channel (PipelinedCommitter)
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
                low, high = sorted((child_sock.fileno(), batch_child.fileno()))
                os.closerange(3, low)  # the parent's listening socket, pipes and database files are not ours
                os.closerange(low + 1, high)
                os.closerange(high + 1, max(os.sysconf("SC_OPEN_MAX"), 1 << 16))
                _serve_child(child_sock, batch_child, make_store)
            except BaseException:  # noqa: BLE001
                log.exception("writer process failed")
                code = 1
            finally:
                os._exit(code)
        child_sock.close()
        batch_child.close()
        self._batch_sock: socket.socket | None = batch_parent
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
            batch_parent.close()
            os.waitpid(pid, 0)
            raise value
        self.authority_public_key, self._public_keys = value
        log.info("ledger store in writer process %d", pid)

    @property
    def pid(self) -> int:
        return self._pid

    def take_message_channel(self) -> socket.socket:
        """The parent's end of the message channel, for the one PipelinedCommitter that owns it."""
        sock, self._batch_sock = self._batch_sock, None
        if sock is None:
            raise RuntimeError("the writer's message channel is already taken")
        return sock

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
            if self._batch_sock is not None:
                self._batch_sock.close()
                self._batch_sock = None
        try:
            os.waitpid(self._pid, 0)
        except ChildProcessError:
            pass


class PipelinedCommitter:
    """GroupCommitter's interface (``submit``, ``submit_then``) for a store in a writer process,
    run by the event loop itself over the message channel (see the module's docstring).

    The messages verified in one turn of the loop go out as one frame at the end of that turn,
    whether or not earlier frames are answered yet; answers come back in order (the writer serves
    its channel in order) and each frame's callbacks run on the loop as its answer is read. If the
    writer dies, every message waiting for an answer - and every one after - gets ``WriterGone``
    (the HTTP side answers 500 "not applied"). Only the serving loop may call ``submit_then``."""

    def __init__(self, store: RemoteStore) -> None:
        self._store = store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._opening = False
        self._pending: list[tuple[tuple, Any]] = []  # (item, callback or future) not yet written
        self._flush_scheduled = False
        self._in_flight: deque[list] = deque()  # per frame written and not yet answered: its callbacks
        self._gone: WriterGone | None = None
        self._idle: asyncio.Event | None = None
        self.batches = 0  # frames written
        self.messages = 0

    async def open(self) -> None:
        """Attach the message channel to the running loop (the app's lifespan does this at start)."""
        if self._transport is not None or self._gone is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._transport, _ = await self._loop.create_unix_connection(lambda: _ChannelProtocol(self),
                                                                     sock=self._store.take_message_channel())

    def start(self) -> None:  # GroupCommitter's interface: nothing to start before the loop runs
        pass

    async def close(self, timeout_s: float = 30.0) -> None:
        """Wait (bounded) for every message written to be answered, then close the channel."""
        if self._pending:
            self._flush()
        if self._in_flight and self._gone is None:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except asyncio.TimeoutError:
                log.error("%d frame(s) of messages were still unanswered at shutdown", len(self._in_flight))
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._lost("the ledger is shutting down")

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def submit(self, fields: Mapping[str, Any], payload: bytes, signature: bytes) -> Outcome:
        future = asyncio.get_running_loop().create_future()
        self.submit_then(fields, payload, signature, future.get_loop(), future)
        return await future

    def submit_then(self, fields: Mapping[str, Any], payload: bytes, signature: bytes, loop: asyncio.AbstractEventLoop,
                    then: Any) -> None:
        """Queue a message; ``then(outcome or exception)`` runs on the loop after its transaction's COMMIT."""
        if self._gone is not None:
            _resolve(then, self._gone)
            return
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("PipelinedCommitter: submit_then from a loop other than the serving one")
        self._pending.append(((fields, payload, signature), then))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._transport is None and not self._opening:  # used before the lifespan ran: open first
                self._opening = True
                loop.create_task(self._open_then_flush())
            elif self._transport is not None:
                loop.call_soon(self._flush)  # after the rest of this turn's requests: one frame for all

    async def _open_then_flush(self) -> None:
        try:
            await self.open()
        except BaseException as exc:  # noqa: BLE001
            self._lost(f"the writer's message channel could not be opened ({exc!r})")
            return
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if not pending:
            return
        if self._gone is not None or self._transport is None:
            for _, then in pending:
                _resolve(then, self._gone or WriterGone("the writer's message channel is closed"))
            return
        for start in range(0, len(pending), FRAME_MAX_ITEMS):
            chunk = pending[start:start + FRAME_MAX_ITEMS]
            data = pickle.dumps([item for item, _ in chunk], 5)
            self._in_flight.append([then for _, then in chunk])
            self._transport.write(_FRAME.pack(len(data), len(chunk)) + data)
            self.batches += 1
            self.messages += len(chunk)

    def _answered(self, ok: bool, value: Any) -> None:
        callbacks = self._in_flight.popleft()
        if ok:
            results = [WireOutcome(*r) if type(r) is tuple else r for r in value]
        else:
            results = [value] * len(callbacks)
        for then, result in zip(callbacks, results):
            try:
                _resolve(then, result)
            except Exception:  # noqa: BLE001 (one answer's failure must not lose the others)
                log.exception("answering a committed message failed")
        if not self._in_flight and self._idle is not None:
            self._idle.set()

    def _lost(self, why: str) -> None:
        if self._gone is None:
            self._gone = WriterGone(why)
        waiting = [then for callbacks in self._in_flight for then in callbacks] + [then for _, then in self._pending]
        self._in_flight.clear()
        self._pending = []
        for then in waiting:
            try:
                _resolve(then, self._gone)
            except Exception:  # noqa: BLE001
                log.exception("answering a message after the writer went failed")
        if self._idle is not None:
            self._idle.set()


class _ChannelProtocol(asyncio.Protocol):
    """The message channel as the event loop reads it: whole answer frames, in order."""

    def __init__(self, owner: PipelinedCommitter) -> None:
        self._owner = owner
        self._inbox = bytearray()

    def data_received(self, data: bytes) -> None:
        inbox = self._inbox
        inbox += data
        offset, size, head = 0, len(inbox), _FRAME.size
        answers = []
        while size - offset >= head:
            length, _ = _FRAME.unpack_from(inbox, offset)
            if size - offset - head < length:
                break
            answers.append(pickle.loads(bytes(inbox[offset + head:offset + head + length])))
            offset += head + length
        if offset:
            del inbox[:offset]
        for ok, value in answers:
            self._owner._answered(ok, value)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(f"the ledger's writer process is gone ({type(exc).__name__ if exc else 'end of channel'}); "
                          "nothing was applied after it")
