"""Stage jobs run in child processes, a few at a time, beside the chain's own stages.

A *job* is a list of stage factories run in order (a student's training, then its
evaluation): a factory is called only when its turn comes, so a stage built from the previous
one's output (the evaluation hashes the checkpoint the training wrote) sees that output.  The
pool runs from a background thread so that the chain's own process can train the teacher and
dump its cache meanwhile; ``slots`` bounds how many child processes run at once."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the runner imports this module; only its types are needed here
    from .runner import Chain, Stage, _Background

Job = list[Callable[[], "Stage"]]


class StagePool:
    def __init__(self, chain: "Chain", slots: int, poll_s: float = 0.2) -> None:
        self.chain, self.slots, self.poll_s = chain, slots, poll_s
        self._queue: deque[Iterator[Callable[[], "Stage"]]] = deque()
        self._active: list[tuple["_Background", Iterator]] = []
        self._lock = threading.RLock()  # held while stages start or finish
        self._closed = False  # no more jobs come: the thread ends when the queued ones are done
        self._stopped = False  # kill(): the thread ends now
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="chain-pool", daemon=True)
        self._thread.start()

    def submit(self, *jobs: Job, first: bool = False) -> None:
        """Queue ``jobs`` in order (``first``: ahead of those waiting); they start at once (in
        this thread) as far as slots are free."""
        with self._lock:
            if first:
                self._queue.extendleft(reversed([iter(j) for j in jobs]))
            else:
                self._queue.extend(iter(j) for j in jobs)
            self._fill()

    def set_slots(self, slots: int) -> None:
        with self._lock:
            self.slots = slots

    def join(self) -> None:
        """Wait until every submitted job has finished; re-raise the first failure."""
        with self._lock:
            self._closed = True
        self._thread.join()
        if self._error is not None:
            raise self._error

    def kill(self) -> None:
        """Stop: kill the running child processes (the chain failed or was interrupted)."""
        with self._lock:
            self._stopped = True
        self._kill_active()
        self._thread.join()

    def _kill_active(self) -> None:
        with self._lock:
            active = list(self._active)
        for bg, _ in active:
            if bg.proc.poll() is None:
                bg.proc.kill()
                bg.proc.wait()
            bg.log.close()

    def _next(self, job: Iterator) -> "_Background | None":
        """Start the job's next stage that is not skipped; None when the job is done."""
        for factory in job:
            bg = self.chain.start_stage(factory())
            if bg is not None:
                return bg
        return None

    def _fill(self) -> None:
        """Start queued jobs while slots are free (the caller holds the lock)."""
        while not self._stopped and self._error is None and self._queue and len(self._active) < self.slots:
            job = self._queue.popleft()
            bg = self._next(job)
            if bg is not None:
                self._active.append((bg, job))

    def _reap(self) -> None:
        """Collect finished stages and start each job's next one (the caller holds the lock)."""
        for bg, job in [a for a in self._active if a[0].proc.poll() is not None]:
            self._active.remove((bg, job))
            self.chain.wait_stage(bg)  # raises if the stage failed
            nxt = self._next(job)
            if nxt is not None:
                self._active.append((nxt, job))

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopped:
                        return
                    self._reap()
                    self._fill()
                    if self._closed and not self._active and not self._queue:
                        return
                time.sleep(self.poll_s)
        except BaseException as exc:  # handed to join(); the other children are killed
            with self._lock:
                self._error = exc
            self._kill_active()
