"""CPU-bound work (decoding, embedding, thumbnails) off the event loop, bounded."""
from __future__ import annotations

from typing import Any, Callable, Optional

import anyio
from fastapi import HTTPException


class CpuJobs:
    """At most `slots` CPU-bound jobs at once, each in a worker thread, never on the event
    loop; at most `queue` more wait for one, each at most `wait` seconds. Past either
    bound a job gets 503 + Retry-After: a short wait, never a queue of minutes."""

    def __init__(self, slots: int, queue: int = 0, wait: float = 5.0) -> None:
        self.slots, self.queue, self.wait = max(1, slots), max(0, queue), wait
        self.admitted = 0  # running + waiting; only touched on the event loop: no lock
        self._free: Optional[anyio.Semaphore] = None

    def _busy(self) -> HTTPException:
        return HTTPException(503, f"busy: {self.slots} workers, {self.admitted} jobs admitted; retry "
                                  "in a second", headers={"Retry-After": "1"})

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a worker thread once a slot is free; 503 when none frees in time."""
        if self.admitted >= self.slots + self.queue:
            raise self._busy()
        if self._free is None:  # made on the event loop
            self._free = anyio.Semaphore(self.slots)
        self.admitted += 1
        try:
            with anyio.move_on_after(self.wait) as waited:
                await self._free.acquire()
            if waited.cancelled_caught:
                raise self._busy()
            try:
                # a cancelled request (client gone) still waits for its thread: the slot
                # is not handed on while the job runs
                return await anyio.to_thread.run_sync(fn, *args)
            finally:
                self._free.release()
        finally:
            self.admitted -= 1
