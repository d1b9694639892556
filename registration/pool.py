"""A process pool for registration pairs with per-pair timeouts and crash isolation.

``concurrent.futures`` cannot kill one hung task and breaks entirely when a worker segfaults, both of which
happen with ITK. Here each worker is a long-lived process with its own pipe and one pair at a time:

* Workers are forked from a fork server that has imported elastix once (``registration._preload``), so
  neither the first start nor a restart after a crash pays the 7-12 s import again.
* A pair that runs past ``timeout_s`` gets its worker killed; a worker that dies (e.g. SIGSEGV) is noticed
  through its process sentinel. Either way the pair is reported as failed with the reason and the worker is
  replaced; the other pairs go on.
* Each worker watches a lifeline pipe to the parent and exits when the parent dies (``kill -9`` of the job).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from registration.elastix import configure_threads, worker_main
from registration.pairs import PairTask

__all__ = ["PairPool"]

log = logging.getLogger("registration")
Result = dict[str, Any]


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["registration._preload"])
    return ctx


@dataclass(eq=False)
class _Slot:
    process: Any
    conn: Any
    lifeline: Any
    ready: bool = False
    task: PairTask | None = None
    started: float = 0.0


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"worker crashed ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"worker crashed (signal {-exitcode})"
    return f"worker exited unexpectedly (exit code {exitcode})"


class PairPool:
    """Run pair tasks on ``workers`` long-lived processes with ``threads`` ITK threads each."""

    def __init__(self, workers: int = 1, threads: int = 1, timeout_s: float = 600.0):
        if workers < 1 or threads < 1 or timeout_s <= 0:
            raise ValueError(f"workers ({workers}) and threads ({threads}) must be >= 1, timeout_s > 0")
        self.workers, self.threads, self.timeout_s = workers, threads, timeout_s
        configure_threads(threads)  # the fork server inherits this environment before it imports ITK
        self._ctx = _context()
        self._slots: list[_Slot] = []
        self._startup_deaths = 0

    def _start(self) -> _Slot:
        parent, child = self._ctx.Pipe()
        life_parent, life_child = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, args=(child, life_child, self.threads), daemon=True)
        proc.start()
        child.close()
        life_child.close()
        return _Slot(proc, parent, life_parent)

    def _replace(self, slot: _Slot) -> None:
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join(5)
        for c in (slot.conn, slot.lifeline):
            c.close()
        self._slots[self._slots.index(slot)] = self._start()

    def run(self, tasks: Iterable[PairTask], on_result: Callable[[PairTask, Result], PairTask | None]) -> None:
        """Run every task; ``on_result(task, result)`` is called once per attempt and may return a task to
        queue again (the retry)."""
        queue = deque(tasks)
        if not queue:
            return
        self._slots = [self._start() for _ in range(min(self.workers, len(queue)))]
        try:
            while queue or any(s.task for s in self._slots):
                for slot in self._slots:
                    if slot.ready and slot.task is None and queue:
                        slot.task, slot.started = queue.popleft(), time.monotonic()
                        slot.conn.send(slot.task)
                self._poll(queue, on_result)
        finally:
            self.close()

    def _poll(self, queue: deque, on_result: Callable[[PairTask, Result], PairTask | None]) -> None:
        waitables = {s.conn: s for s in self._slots} | {s.process.sentinel: s for s in self._slots}
        for obj in wait(list(waitables), timeout=0.5):
            slot = waitables[obj]
            if slot not in self._slots:
                continue  # replaced during this round
            result = None
            if obj is slot.conn:
                try:
                    kind, payload = slot.conn.recv()
                except (EOFError, OSError):
                    kind = None
                if kind == "ready":
                    slot.ready, self._startup_deaths = True, 0
                    continue
                if kind == "done":
                    result = payload
            if result is None:  # the worker died
                slot.process.join(1)
                result = {"status": "failed", "error": _death_reason(slot.process.exitcode)}
                if not slot.ready:
                    self._startup_deaths += 1
                    if self._startup_deaths > 2 * self.workers:
                        raise RuntimeError(f"registration workers keep dying during start-up: {result['error']}")
                log.warning("worker %s died: %s", slot.process.pid, result["error"])
                task = slot.task
                self._replace(slot)
            else:
                task, slot.task = slot.task, None
            if task is not None:
                self._finish(task, result, queue, on_result)
        now = time.monotonic()
        for slot in list(self._slots):
            if slot.task is not None and now - slot.started > self.timeout_s:
                task = slot.task
                log.warning(
                    "pair %s timed out after %.0f s; killing worker %s", task.stem, self.timeout_s, slot.process.pid
                )
                self._replace(slot)
                self._finish(
                    task, {"status": "failed", "error": f"timeout after {self.timeout_s:g} s"}, queue, on_result
                )

    @staticmethod
    def _finish(task: PairTask, result: Result, queue: deque, on_result) -> None:
        retry = on_result(task, result)
        if retry is not None:
            queue.append(retry)

    def close(self) -> None:
        """Stop all workers (politely, then by force)."""
        for slot in self._slots:
            with contextlib.suppress(OSError, BrokenPipeError):
                slot.conn.send(None)
        for slot in self._slots:
            slot.process.join(2)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(2)
            for c in (slot.conn, slot.lifeline):
                c.close()
        self._slots = []
