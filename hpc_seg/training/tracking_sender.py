"""The MLflow tracker's sending thread (``hpc_seg.training.tracking``, docs/tracking.md).

The training thread only queues: :meth:`Sender.put` appends metric values and tags under a lock
and returns; a daemon thread, started at the first ``put``, connects and sends. A blackholed host
or a slow DNS then holds that thread, never a training step (nor, through the next allreduce,
the other ranks). The queue is bounded: past ``max_pending`` values the oldest are dropped and
counted. :meth:`Sender.close` gives the thread one last try, within a deadline.

The DataLoader forks its workers from the training process: a forked child inherits the queue
and its lock (possibly held by the thread, which does not survive the fork) but not the thread;
every entry point checks ``os.getpid()`` and does nothing outside the process that made it.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from typing import Callable


class Sender:
    """Args:
        flush: called in the thread: sends what waits (:meth:`peek` / :meth:`ack`), raises when
            the store fails (the values stay queued).
        retry_s: a failing store is tried again at most this often.
        max_pending: metric values kept; the oldest go first.
        failed: called in the thread with each exception of ``flush``.
        recovered: called in the thread when ``flush`` works again after failing.
        warn: prints a warning line (drops).
    """

    def __init__(self, flush: Callable[[], None], retry_s: float, max_pending: int,
                 failed: Callable[[BaseException], None], recovered: Callable[[], None], warn: Callable[[str], None]):
        self.flush, self.retry_s, self.max_pending = flush, retry_s, max_pending
        self.failed, self.recovered, self.warn = failed, recovered, warn
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.metrics: deque = deque()  # (sequence number, value)
        self.tags: dict[str, str] = {}
        self.seq = itertools.count()
        self.dropped = 0
        self.thread: threading.Thread | None = None
        self.kick = self.closing = self.failing = self.done = self.silent = False
        self.next_try = 0.0
        self.last: Callable[[], None] | None = None

    def owner(self) -> bool:
        """This is the process that made the sender (not a forked DataLoader worker)."""
        return os.getpid() == self.pid

    # ------------------------------------------------------------------ the training thread
    def put(self, metrics=(), tags: dict | None = None) -> None:
        """Queue metric values and tags and return at once (nothing at all in a forked child)."""
        if not self.owner():
            return
        with self.cond:
            self.metrics.extend((next(self.seq), m) for m in metrics)
            self.tags.update(tags or {})
            self._trim()
            self.kick = True
            self._start()
            self.cond.notify()

    def close(self, timeout_s: float, last: Callable[[], None] | None = None) -> bool:
        """One last try to send, then ``last()`` (mark the run ended), within ``timeout_s``: True
        when all was sent and ``last`` ran. The thread, a daemon, is left behind past the deadline."""
        if not self.owner():
            return False
        with self.cond:
            self.last, self.closing = last, True
            self._start()
            self.cond.notify()
        self.thread.join(timeout_s)
        if self.thread.is_alive():  # left behind: it must not print while the interpreter shuts down
            self.silent = True
        return self.done and not self.thread.is_alive()

    def waiting(self) -> int:
        """Metric values not sent yet (those in flight included)."""
        with self.cond:
            return len(self.metrics)

    # ------------------------------------------------------------------ the sending thread
    def peek(self, n: int) -> list:
        """The ``n`` oldest waiting values as (sequence number, value); :meth:`ack` removes them."""
        with self.cond:
            return list(itertools.islice(self.metrics, n))

    def ack(self, last_seq: int) -> None:
        """Values up to sequence number ``last_seq`` are sent."""
        with self.cond:
            while self.metrics and self.metrics[0][0] <= last_seq:
                self.metrics.popleft()

    def take_tags(self) -> dict[str, str]:
        with self.cond:
            tags, self.tags = self.tags, {}
            return tags

    def give_back_tags(self, tags: dict[str, str]) -> None:
        with self.cond:
            self.tags = {**tags, **self.tags}

    def _trim(self) -> None:
        extra = len(self.metrics) - self.max_pending
        if extra <= 0:
            return
        for _ in range(extra):
            self.metrics.popleft()
        if not self.dropped:
            self.warn(f"{self.max_pending} MLflow metric values wait to be sent; the oldest are dropped from "
                      f"now on (counted at the end of the run)")
        self.dropped += extra

    def _start(self) -> None:
        if self.thread is None:  # lazily, in the owner: started before a fork, it is not in the child
            self.thread = threading.Thread(target=self._run, name="hpc-seg-mlflow", daemon=True)
            self.thread.start()

    def _due(self) -> bool:
        return self.closing or (self.kick and time.monotonic() >= self.next_try)

    def _run(self) -> None:
        while True:
            with self.cond:
                now = time.monotonic()
                timeout = self.next_try - now if self.failing and self.next_try > now else None
                if not self.cond.wait_for(self._due, timeout):
                    continue
                closing, self.kick = self.closing, False
            ok = self._try(self.flush)
            if closing:
                self.done = ok and (self.last is None or self._try(self.last))
                return

    def _try(self, call: Callable[[], None]) -> bool:
        try:
            call()
        except Exception as exc:  # mlflow, requests, SQLAlchemy, OS errors alike: training goes on
            self.next_try, self.failing = time.monotonic() + self.retry_s, True
            with self.cond:
                self.kick = True  # what failed waits: tried again at next_try
            if not self.silent:
                self.failed(exc)
            return False
        if self.failing:
            self.failing = False
            if not self.silent:
                self.recovered()
        return True
