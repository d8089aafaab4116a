"""How many decode workers: adapted while the run goes, by measured throughput."""

from __future__ import annotations

import logging
from typing import Iterator

log = logging.getLogger(__name__)

GAIN = 1.05  # a worker more must bring 5% more images per second to be kept
WAITING = 0.05  # the model waits for data more than this share of the time: try a worker more
SETTLED_SEGMENT = 32  # groups per segment once the worker count is settled


class WorkerTuner:
    """The number of decode workers: it grows while the model waits for data (up to `highest`: the cores, less
    one for the thread that drives an accelerator) as long as each step pays, and falls back when more workers
    slow the run down (on a CPU, decoders and the model share the cores). A count set in the config
    (`encode.num_workers`) stays as set."""

    def __init__(self, start: int, highest: int, fixed: bool) -> None:
        self.count, self.highest, self.fixed = start, max(start, highest), fixed
        self.rates: dict[int, float] = {}
        self.settled = fixed

    def observe(self, workers: int, images: int, seconds: float, waited: float) -> None:
        if self.settled or not images or seconds <= 0:
            return
        rate = images / seconds
        self.rates[workers] = max(rate, self.rates.get(workers, 0.0))
        better = self.rates.get(workers - 1)
        if better is not None and rate < better * GAIN:  # the last step did not pay: go back and stay
            self.count, self.settled = workers - 1, True
        elif waited / seconds > WAITING and workers < self.highest:
            self.count = workers + 1
        else:
            self.settled = True

    def segments(self, pending: dict[int, int]) -> Iterator[dict[int, int]]:
        """The pending groups in segments: one group at a time while the count is being tuned, then larger ones
        (a fresh set of workers costs a fraction of a second)."""
        groups = sorted(pending)
        at = 0
        while at < len(groups):
            size = 1 if not self.settled else SETTLED_SEGMENT
            yield {g: pending[g] for g in groups[at:at + size]}
            at += size

    def report(self) -> None:
        if self.fixed:
            return
        tried = ", ".join(f"{k}: {v:.1f} img/s" for k, v in sorted(self.rates.items()))
        log.info("decode workers: settled on %d (tried %s)", self.count, tried or "-")
