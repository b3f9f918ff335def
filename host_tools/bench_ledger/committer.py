"""Group commit for the HTTP app: one writer thread applies queued messages in batches.

Why: a durable commit (WAL, synchronous=FULL) costs one fsync, several ms on this machine; one
per message capped the ledger at ~200 messages/s whatever the CPU. Requests verified on the
event loop are queued here; the writer takes everything queued (up to ``max_batch``), applies
it with ``LedgerStore.submit_batch`` in one transaction and wakes each request with its own
outcome only after the commit. While one batch is being committed the next one fills, so the
batch size follows the load by itself and a lone request waits for no timer. Exactly-once is
unchanged: an answer is only ever sent for a committed message, and a resend is deduplicated.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, Callable, Mapping

from .store import LedgerStore, Outcome

log = logging.getLogger(__name__)


class GroupCommitter:
    def __init__(self, store: LedgerStore, *, max_batch: int = 256) -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.messages = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
            self._thread.start()

    async def open(self) -> None:  # the app's lifespan: the same for PipelinedCommitter (writer_process.py)
        self.start()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    async def submit(self, fields: Mapping[str, Any], payload: bytes, signature: bytes) -> Outcome:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.start()
        self._queue.put(((fields, payload, signature), loop, future))
        return await future

    def submit_then(self, fields: Mapping[str, Any], payload: bytes, signature: bytes, loop: asyncio.AbstractEventLoop,
                    then: Callable[[Any], None]) -> None:
        """Queue a message; ``then(outcome or exception)`` runs on ``loop`` after its batch's commit.

        The HTTP fast path's form of ``submit``: no future and no task per message."""
        self.start()
        self._queue.put(((fields, payload, signature), loop, then))

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                results: list[Any] = self._store.submit_batch([item for item, _, _ in batch])
            except BaseException as exc:  # the commit failed: nothing of the batch was applied
                log.exception("a batch of %d message(s) could not be committed", len(batch))
                results = [exc] * len(batch)
            self.batches += 1
            self.messages += len(batch)
            # One wake-up per event loop for the whole batch (call_soon_threadsafe writes to the
            # loop's self-pipe: a syscall per call), not one per message.
            by_loop: dict[Any, list] = {}
            for (_, loop, future), result in zip(batch, results):
                by_loop.setdefault(loop, []).append((future, result))
            for loop, done in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_resolve_all, done)
                except RuntimeError:  # that loop is closed: nobody waits for these answers any more
                    pass
            if stop:
                return


def _resolve_all(done: list) -> None:
    for future, result in done:
        _resolve(future, result)


def _resolve(future: Any, result: Any) -> None:
    if not isinstance(future, asyncio.Future):  # a callback (submit_then)
        future(result)
        return
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
