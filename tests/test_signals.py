"""SIGTERM in the training loop (train/phoclip_train/signals.py), in process: a signal during a step
asks for a stop at its end; a signal during a data wait abandons the wait once it has
lasted STUCK_WAIT_S, also when the signal came in the wait's first moments."""
import os
import signal
import threading
import time

import pytest

from phoclip_train.signals import StoppedWaitingForData, StopSignal


def _term_after(s: float) -> threading.Timer:
    t = threading.Timer(s, os.kill, (os.getpid(), signal.SIGTERM))
    t.start()
    return t


def _wait_for_a_batch_that_never_comes(stop: StopSignal, limit_s: float = 8.0) -> float:
    t0 = time.monotonic()
    with stop.waiting():
        while time.monotonic() - t0 < limit_s:
            time.sleep(0.02)
    return time.monotonic() - t0


def test_sigterm_early_in_a_data_wait_still_ends_it_after_the_stuck_limit():
    stop = StopSignal(stuck_wait_s=1.0, latest=lambda: "run/checkpoints/step_00000007")
    with stop.installed():
        _term_after(0.2)
        t0 = time.monotonic()
        with pytest.raises(StoppedWaitingForData, match="step_00000007"):
            _wait_for_a_batch_that_never_comes(stop)
        assert 0.9 < time.monotonic() - t0 < 3.0
    assert signal.getsignal(signal.SIGTERM) is not stop._on_term  # restored


def test_sigterm_during_a_step_stops_at_its_end_and_a_short_wait_is_not_abandoned():
    stop = StopSignal(stuck_wait_s=1.0)
    with stop.installed():
        t = _term_after(0.1)
        time.sleep(0.4)  # "a step": the signal only asks for a stop
        t.join()
        assert stop.requested
        with stop.waiting():  # the next batch comes quickly: the loop goes on to stop
            time.sleep(0.3)
        time.sleep(1.2)  # no timer left armed outside the wait
        # a stop requested before a wait that then hangs: the same limit applies
        with pytest.raises(StoppedWaitingForData):
            _wait_for_a_batch_that_never_comes(stop)


def test_sigterm_after_the_stuck_limit_ends_the_wait_at_once():
    stop = StopSignal(stuck_wait_s=0.5)
    with stop.installed():
        _term_after(1.0)
        t0 = time.monotonic()
        with pytest.raises(StoppedWaitingForData):
            _wait_for_a_batch_that_never_comes(stop)
        assert time.monotonic() - t0 < 1.6
