"""A wall-clock budget for training (``train.max_minutes``).

Training stops when ``max_steps`` is reached or the budget is spent, whichever comes first, and
the LR schedule runs on the further of the two: its progress is ``max(step / max_steps, minutes
spent / max_minutes)``, so when time binds the schedule is the config's own, compressed to end on
the budget. The clock counts the training loop (data loading, validation and checkpoints
included; setup excluded) and is carried across resumes in the checkpoint.

Every rank must use the same LR, so the fraction a rank's schedule reads changes only where the
ranks agree on it (``agree``: the largest elapsed time over ranks, at the trainer's stop checks).
"""

from __future__ import annotations

import time


class TimeBudget:
    """Args:
        minutes: the budget; None: no budget (``fraction`` stays 0, ``spent`` False).
        seconds_before: training seconds of earlier processes of this run (from the checkpoint).
    """

    def __init__(self, minutes: float | None, seconds_before: float = 0.0):
        self.minutes = minutes
        self.seconds_before = float(seconds_before)
        self._start: float | None = None
        self.agreed_s = self.seconds_before  # what every rank last agreed on

    def resume_from(self, seconds: float) -> None:
        """Carry on from a checkpoint's training seconds (in place: the LR schedule holds this object)."""
        self.seconds_before = self.agreed_s = float(seconds)

    def start(self) -> None:
        self._start = time.monotonic()

    def local_seconds(self) -> float:
        """This rank's training seconds so far (earlier processes included)."""
        return self.seconds_before + (time.monotonic() - self._start if self._start is not None else 0.0)

    def agree(self, seconds: float) -> None:
        """Record the seconds all ranks agreed on (the maximum over ranks)."""
        self.agreed_s = max(self.agreed_s, float(seconds))

    def sync(self, all_max) -> None:
        """Agree on the clock with the other ranks (``all_max``: the collective, called by every rank
        at the same step); nothing without a budget."""
        if self.minutes:
            self.agree(all_max(self.local_seconds()))

    @property
    def fraction(self) -> float:
        """The share of the budget spent, as agreed (0 without a budget)."""
        if not self.minutes:
            return 0.0
        return min(self.agreed_s / (self.minutes * 60.0), 1.0)

    @property
    def spent(self) -> bool:
        return bool(self.minutes) and self.agreed_s >= self.minutes * 60.0
