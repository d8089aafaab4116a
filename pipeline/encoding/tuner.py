"""How many decode workers: adapted while the run goes, by measured throughput."""

from __future__ import annotations

import logging
from typing import Callable, Iterator

log = logging.getLogger(__name__)

GAIN = 1.05  # a worker more must bring 5% more images per second to be kept
WAITING = 0.05  # the model waits for data more than this share of the time: try a worker more
SETTLED_SEGMENT = 32  # groups per segment once the worker count is settled
WINDOW_IMAGES = 32  # images per step while tuning: a step is a window of a group's batches, so that a dataset
# smaller than one chunk is tuned too (a step per chunk never took a second step below ~1,000 images)


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

    def segments(self, pending: dict[int, int], batches_of: Callable[[int], int | None],
                 batch_size: int) -> Iterator[tuple[dict[int, int], range | None]]:
        """The pending groups in segments, each with the window of its one group's batches to decode (None: all):
        windows of about WINDOW_IMAGES while the count is being tuned, then the rest of the group, then segments
        of many groups (a fresh set of workers costs a fraction of a second). A group whose batches cannot be
        split (`batches_of` None: a tar file, read by one worker from start to end) is one step."""
        groups = sorted(pending)
        at, window = 0, max(1, WINDOW_IMAGES // batch_size)
        while at < len(groups):
            if self.settled:
                yield {g: pending[g] for g in groups[at:at + SETTLED_SEGMENT]}, None
                at += SETTLED_SEGMENT
                continue
            group = groups[at]
            total, first = batches_of(group), 0
            if total is None:
                yield {group: pending[group]}, None
            while total is not None and first < total:
                stop = total if self.settled else min(total, first + window)
                yield {group: pending[group]}, range(first, stop)
                first = stop
            at += 1

    def report(self) -> None:
        if self.fixed:
            return
        tried = ", ".join(f"{k}: {v:.1f} img/s" for k, v in sorted(self.rates.items()))
        log.info("decode workers: settled on %d (tried %s)", self.count, tried or "-")
