"""How a training process reacts to SIGTERM (preemption, `scancel`, torchrun's shutdown).

A signal during a step asks the loop to stop at the end of that step (all ranks agree
on it at the next host read, save, and leave). A signal while the loop *waits for data*
has no step to finish: a batch that has not come for `stuck_wait_s` is not about to come
(a hung mount, a shard server that stopped sending, a `pipe:` command that hangs), so the
wait is abandoned with `StoppedWaitingForData` and the run leaves on its newest checkpoint.
That holds also when the signal arrives in the first seconds of the wait: a timer
(SIGALRM) looks again once the wait has lasted `stuck_wait_s`.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Callable, Iterator, Optional

logger = logging.getLogger(__name__)

STUCK_WAIT_S = 5.0  # a data wait longer than this is not a step about to finish


class StoppedWaitingForData(RuntimeError):
    """SIGTERM came while no batch had arrived for longer than STUCK_WAIT_S."""


class StopSignal:
    """The loop's stop request, set by SIGTERM; `waiting()` marks a data wait."""

    def __init__(self, stuck_wait_s: float = STUCK_WAIT_S,
                 latest: Callable[[], object] = lambda: None) -> None:
        self.stuck_wait_s = stuck_wait_s
        self.latest = latest  # the newest checkpoint, named in the message
        self.requested = False
        self._since: Optional[float] = None
        self._prev: dict = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignal"]:
        """Handle SIGTERM (and the wait timer's SIGALRM) inside the block; restore after."""
        self._prev = {s: signal.signal(s, h) for s, h in
                      ((signal.SIGTERM, self._on_term), (signal.SIGALRM, self._on_alarm))}
        try:
            yield self
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for s, h in self._prev.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Mark a wait for data (a signal inside it may abandon the wait)."""
        self._since = time.monotonic()
        try:
            if self.requested:  # asked to stop before this wait began: same rule
                self._arm()
            yield
        finally:
            self._since = None
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _waited(self) -> float:
        return time.monotonic() - self._since if self._since is not None else 0.0

    def _abandon_if_stuck(self, signum: int) -> bool:
        if self._since is not None and self._waited() >= self.stuck_wait_s:
            raise StoppedWaitingForData(
                f"stopped by signal {signum} after {self._waited():.0f} s without a batch; the newest "
                f"checkpoint ({self.latest()}) is where --resume latest continues")
        return False

    def _arm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, max(0.05, self.stuck_wait_s - self._waited() + 0.05))

    def _on_term(self, signum, frame) -> None:
        self._abandon_if_stuck(signum)
        if not self.requested:
            logger.warning("received signal %d: saving a checkpoint at the end of this step", signum)
        self.requested = True
        if self._since is not None:
            self._arm()  # look again once this wait has lasted stuck_wait_s

    def _on_alarm(self, signum, frame) -> None:
        if self.requested and self._since is not None:
            self._abandon_if_stuck(signal.SIGTERM)
            self._arm()
