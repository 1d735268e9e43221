"""SIGTERM, as Slurm and Kubernetes send it before SIGKILL: stop taking steps, save, shut down.

The first SIGTERM lets the step in progress finish and the run checkpoint it; if that takes longer
than the grace period (train.stop_grace_s), the run is interrupted where it is, like Ctrl-C: a
checkpoint half written is removed, and the last complete one stays.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class GraceExpired(KeyboardInterrupt):
    """SIGTERM's grace period ran out before the run could stop at a step boundary."""


class StopOnTerm:
    """While entered (in the main thread), SIGTERM sets `requested` instead of killing the process."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.requested = False
        self._saved: dict = {}

    def __enter__(self) -> "StopOnTerm":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._saved = {sig: signal.signal(sig, handler) for sig, handler in
                           ((signal.SIGTERM, self._on_term), (signal.SIGALRM, self._on_grace_expired))}
        return self

    def __exit__(self, *exc) -> None:
        if self._saved:
            signal.setitimer(signal.ITIMER_REAL, 0)  # a grace timer still running must not fire later
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    def _on_term(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested = True
        log.warning("SIGTERM: stopping after the current step and saving it (within %.0f s, train.stop_grace_s)",
                    self.grace_s)
        signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _on_grace_expired(self, signum, frame) -> None:
        raise GraceExpired(f"the step in progress did not finish within train.stop_grace_s={self.grace_s:g} s")
