"""Preemption: the stop flag a training checks at every step boundary, and the signals that set it.

SLURM sends SIGUSR2 before a job's time limit or preemption (`#SBATCH --signal`), a user SIGTERM; submitit's
checkpoint handler and launchers call `request_stop()`. A handler only sets a flag: the ranks must agree on one step
to save at, which ltm.train.trainer's Trainer does by summing every rank's flag in its per-step collective.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
_stop = threading.Event()


def request_stop() -> None:
    """Ask the running `train()` to save at the next step boundary and return status "preempted".

    Safe to call from a signal handler or another thread (submitit's checkpoint handler, a launcher); every rank's
    flag is summed over the ranks each step, so one rank asking is enough.
    """
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def clear_stop() -> None:
    """Forget an earlier request: a new `train()` in the same process starts without one."""
    _stop.clear()


def _on_signal(signum: int, _frame: Any) -> None:
    # Only a flag: the ranks must agree on one step to save at, which a handler cannot do.
    _stop.set()
    log.warning("received %s: saving at the next step boundary", signal.Signals(signum).name)


@contextmanager
def stop_signal_handlers() -> Iterator[None]:
    """SIGUSR1/SIGUSR2/SIGTERM set the stop flag while training; the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works only there
        yield
        return
    previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
