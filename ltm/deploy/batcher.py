"""Faces of concurrent requests in one forward (`ltm serve`).

Each request hands its face crops to `Batcher.score` and awaits its own P(fake)s. One task gathers the waiting
crops into batches of at most `max_batch` faces, in arrival order, a request's crops possibly split over two
forwards, and runs each batch on the model's single thread. A batch leaves as soon as it is full, or when no other
admitted request can still add faces (a lone request never waits), or when its oldest face has waited `max_wait_s`.

Requests announce themselves on admission (`ticket()`), before their upload is read and their faces are found, so
that the batcher knows whether waiting can pay; a ticket is closed when its faces are handed over or when the
request ends without any (no face, bad upload, timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    images: torch.Tensor
    future: asyncio.Future
    since: float
    sent: int = 0  # crops handed to a forward so far
    scored: int = 0
    probs: list[float] = field(default_factory=list)


class Ticket:
    """One admitted request that may still hand over faces."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher, self.open = batcher, True
        batcher.upcoming += 1

    def close(self) -> None:
        if self.open:
            self.open = False
            self._batcher.upcoming -= 1
            self._batcher.wake.set()


class Batcher:
    """`forward(images) -> list[float]` runs on `executor` (one thread: one model call at a time); `on_batch(n)` is
    told the size of each forward."""

    def __init__(self, forward: Callable[[torch.Tensor], list[float]], executor: Executor, max_batch: int,
                 max_wait_s: float, on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"--max-batch {max_batch}: must be at least 1")
        self.forward, self.executor = forward, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.on_batch = on_batch or (lambda n: None)
        self.upcoming = 0  # open tickets
        self.waiting: list[_Waiting] = []
        self.wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def ticket(self) -> Ticket:
        return Ticket(self)

    @property
    def faces_waiting(self) -> int:
        return sum(len(w.images) - w.sent for w in self.waiting)

    async def score(self, images: torch.Tensor, ticket: Ticket) -> list[float]:
        """P(fake) of each crop of `images` (N, 3, S, S), in order; closes `ticket`."""
        future = asyncio.get_running_loop().create_future()
        if len(images):
            self.waiting.append(_Waiting(images, future, time.monotonic(), probs=[0.0] * len(images)))
        else:
            future.set_result([])
        ticket.close()
        self.wake.set()
        return await future

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ltm-serve-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            self.waiting = [w for w in self.waiting if not w.future.done()]  # requests that timed out meanwhile
            if not self.waiting:
                continue
            await self._gather()
            parts = self._take()
            if not parts:
                continue
            images = torch.cat([w.images[lo:hi] for w, lo, hi in parts])
            self.on_batch(len(images))
            try:
                probs = await asyncio.get_running_loop().run_in_executor(self.executor, self.forward, images)
            except Exception as exc:  # the model failed on this batch: each request in it gets the error
                log.exception("forward of %d faces failed", len(images))
                for w, _, _ in parts:
                    if not w.future.done():
                        w.future.set_exception(exc)
                self.wake.set()
                continue
            at = 0
            for w, lo, hi in parts:
                w.probs[lo:hi] = probs[at:at + hi - lo]
                at += hi - lo
                w.scored += hi - lo
                if w.scored == len(w.images) and not w.future.done():
                    w.future.set_result(w.probs)
            self.wake.set()  # faces that arrived during the forward

    async def _gather(self) -> None:
        """Wait for more faces while that can fill the batch: others are still on their way, there is room, and the
        oldest face has time left."""
        deadline = self.waiting[0].since + self.max_wait_s
        while self.faces_waiting < self.max_batch and self.upcoming > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except asyncio.TimeoutError:
                return
            self.wake.clear()

    def _take(self) -> list[tuple[_Waiting, int, int]]:
        """Up to `max_batch` crops, oldest first: (request, first crop, end) per request in the batch."""
        parts, room = [], self.max_batch
        for w in list(self.waiting):
            if w.future.done():
                self.waiting.remove(w)
                continue
            take = min(room, len(w.images) - w.sent)
            parts.append((w, w.sent, w.sent + take))
            w.sent += take
            room -= take
            if w.sent == len(w.images):
                self.waiting.remove(w)
            if room == 0:
                break
        return parts
