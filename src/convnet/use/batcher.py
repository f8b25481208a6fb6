"""Requests predicted together: one thread takes everything queued (up to ``max_batch``
images; with ``wait_s`` > 0 it also waits that long after the first arrival for more),
predicts it in one call, and hands each request its rows on the event loop.

The requests that arrive while a batch runs form the next one, so batches grow with the
load without any wait; on 2 cores, where parsing HTTP costs more than the model, a wait
only added latency (docs/serving.md), hence ``convnet serve``'s default of 0.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable

import numpy as np


class Batcher:
    """One thread that predicts queued requests together (see the module's docstring)."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], max_batch: int, wait_s: float,
                 on_batch: Callable[[int], None] | None = None) -> None:
        """``on_batch`` is called, on the batcher's thread, with the images of each batch predicted."""
        self.predict, self.max_batch, self.wait_s, self.on_batch = predict, max_batch, wait_s, on_batch
        self.queue: queue.SimpleQueue[tuple[np.ndarray, asyncio.Future[np.ndarray]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="convnet-batcher", daemon=True)
        self.batches = self.images = self.waiting = 0  # counters, for /model

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``(n, K)`` of uint8 ``(n, C, H, W)``, predicted with whatever else is queued."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.queue.put((images, future))
        self.waiting += 1
        try:
            return await future
        finally:
            self.waiting -= 1

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, held, stop = [first], len(first[0]), False
            deadline = time.monotonic() + self.wait_s
            while held < self.max_batch:
                try:  # take what is queued now; wait for more only until the deadline
                    item = self.queue.get_nowait() if self.wait_s == 0 else self.queue.get(
                        timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                held += len(item[0])
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]) -> None:
        loop = batch[0][1].get_loop()  # one event loop serves every request
        try:
            probs = self.predict(np.concatenate([images for images, _ in batch]))  # (sum n, K)
        except Exception as e:  # a model failure is answered to every request of the batch
            loop.call_soon_threadsafe(_deliver, [(future, e) for _, future in batch])
            return
        self.batches += 1
        self.images += len(probs)
        answers: list[tuple[asyncio.Future[np.ndarray], np.ndarray | Exception]] = []
        start = 0
        for images, future in batch:
            answers.append((future, probs[start:start + len(images)]))
            start += len(images)
        if self.on_batch is not None:  # before the answers: a client that has its answer finds its batch counted
            self.on_batch(len(probs))
        loop.call_soon_threadsafe(_deliver, answers)  # one wake-up of the event loop per batch


def _deliver(answers: list[tuple[asyncio.Future[np.ndarray], np.ndarray | Exception]]) -> None:
    """Hand each waiting request its rows (or the model's error); on the event loop."""
    for future, value in answers:
        if future.done():  # the client went away
            continue
        if isinstance(value, Exception):
            future.set_exception(value)
        else:
            future.set_result(value)
