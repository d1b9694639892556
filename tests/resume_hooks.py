"""Test-only bundle handlers (loaded from a test's extra config file, never from the library)."""

import os
import signal

from ignite.engine import Events


class KillAt:
    """SIGKILL this process when the trainer completes ``iteration``: a real ``kill -9`` mid-run."""

    def __init__(self, iteration: int):
        self.iteration = int(iteration)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=self.iteration), self._kill)

    def _kill(self, _engine) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
