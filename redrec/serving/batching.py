"""An asyncio micro-batcher: concurrent requests share one call of a batch function.

While one batch runs (in a worker thread, so the event loop keeps accepting requests), new
requests queue up; the next batch takes everything queued (up to ``max_size``), waiting at most
``max_wait_ms`` for company while another batch is still in flight. Under load batches grow by
themselves; a request reaching an idle batcher does not wait at all. Up to ``max_concurrent`` batches run at once, so one
batch's wait on a remote call (Feast, Milvus) overlaps the next batch's work.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


class MicroBatcher:
    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_size: int = 64, max_wait_ms: float = 2.0, name: str = "batch",
                 max_concurrent: int = 2):
        """``fn(items) -> results`` (same length); a result that is an Exception is raised to its caller."""
        self.fn = fn
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.name = name
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_concurrent = max_concurrent
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix=f"redrec-{name}")
        self.batches = 0
        self.items = 0
        self.largest = 0

    async def submit(self, item: Any) -> Any:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run())
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        slots = asyncio.Semaphore(self.max_concurrent)
        running: set[asyncio.Task] = set()
        while True:
            await slots.acquire()
            batch = [await q.get()]
            # company is worth waiting for only while another batch is in flight (it will free its
            # slot no sooner); a request arriving at an idle batcher goes at once, with whatever queued
            deadline = loop.time() + (self.max_wait if running else 0.0)
            while len(batch) < self.max_size:
                if not q.empty():
                    batch.append(q.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(i, f) for i, f in batch if not f.cancelled()]  # a client that went away
            if not batch:
                slots.release()
                continue
            self.batches += 1
            self.items += len(batch)
            self.largest = max(self.largest, len(batch))
            task = loop.create_task(self._one(batch, slots))
            running.add(task)
            task.add_done_callback(running.discard)

    async def _one(self, batch: list, slots: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [i for i, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: batch function returned {len(results)} results for {len(batch)} items")
            except Exception as e:  # the whole batch failed (e.g. the feature store is down)
                results = [e] * len(batch)
            for (_, fut), r in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)
        finally:
            slots.release()

    def stats(self) -> dict:
        return {"batches": self.batches, "items": self.items, "largest": self.largest,
                "mean_size": self.items / self.batches if self.batches else 0.0}

    def close(self) -> None:
        """Stop the batch loop and its worker thread; callable from any thread (a config reload
        retires batchers from the watcher thread)."""
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._executor.shutdown(wait=False, cancel_futures=True)
