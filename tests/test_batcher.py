"""The batcher: concurrent requests predicted together, each answered with its own rows;
a model that fails answers every request of its batch with the error, and goes on."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from convnet.use.batcher import Batcher


def test_batcher_puts_concurrent_requests_in_one_batch() -> None:
    sizes: list[int] = []

    def predict(images: np.ndarray) -> np.ndarray:
        sizes.append(len(images))
        time.sleep(0.01)
        return images.reshape(len(images), -1).sum(1, keepdims=True).astype(np.float32)  # (n, 1): says which image

    batcher = Batcher(predict, max_batch=8, wait_s=0.05)
    batcher.start()

    async def send() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.submit(np.full((1 + i % 2, 1, 2, 2), i, np.uint8)) for i in range(20)))

    try:
        answers = asyncio.run(send())
    finally:
        batcher.stop()
    for i, a in enumerate(answers):  # every request gets its own rows back
        assert a.shape == (1 + i % 2, 1) and (a == 4 * i).all()
    assert sum(sizes) == 30 and len(sizes) < 20 and max(sizes) <= 9  # batched; a full batch is sent at once
    assert not batcher.alive


def test_a_model_failure_reaches_every_request_of_its_batch_and_the_thread_goes_on() -> None:
    calls = []

    def predict(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("the model broke")
        return np.ones((len(images), 1), np.float32)

    batcher = Batcher(predict, max_batch=64, wait_s=0.05)
    batcher.start()

    async def send(n: int) -> list[np.ndarray | BaseException]:
        return await asyncio.gather(*(batcher.submit(np.zeros((1, 1, 2, 2), np.uint8)) for _ in range(n)),
                                    return_exceptions=True)

    try:
        first, second = asyncio.run(send(3)), asyncio.run(send(2))
    finally:
        batcher.stop()
    assert all(isinstance(a, RuntimeError) and "the model broke" in str(a) for a in first)
    assert all(isinstance(a, np.ndarray) and a.shape == (1, 1) for a in second)  # the next batch is answered
    assert calls[0] == 3 and batcher.batches == 1 and batcher.images == 2
