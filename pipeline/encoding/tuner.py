"""How many decode workers: adapted while the run goes, by measured throughput."""

from __future__ import annotations

import logging
from typing import Callable, Generator

log = logging.getLogger(__name__)

GAIN = 1.05  # a worker more must bring 5% more images per second for the tuner to try one more still
LOSS = 0.95  # and is taken back only when it made the run this much slower: within that band, a step over a
# window of a few batches is noise, and the count the model waited at is the worse bet
WAITING = 0.05  # the model waits for data more than this share of the time: try a worker more
SETTLED_SEGMENT = 32  # groups per segment once the worker count is settled
WINDOW_IMAGES = 32  # images per observation while tuning, inside a chunk, so that a dataset smaller than one
# chunk is tuned too (one observation per chunk never took a second step below ~1,000 images)

Step = tuple[dict[int, int], "range | None"]  # groups (group -> its first chunk) and the batches of its one group


class WorkerTuner:
    """The number of decode workers: it grows while the model waits for data (up to `highest`: the cores, less
    one for the thread that drives an accelerator) as long as each step pays, and falls back when more workers
    slow the run down (on a CPU, decoders and the model share the cores); a run that starts above `lowest` goes
    down to it when the model did not wait for data in the first observation. A count set in the config
    (`encode.num_workers`) stays as set."""

    def __init__(self, start: int, highest: int, fixed: bool, lowest: int | None = None) -> None:
        self.count, self.highest, self.fixed = start, max(start, highest), fixed
        self.lowest = min(start, lowest or start)  # where to go when the model never waited at the start
        self.rates: dict[int, float] = {}
        self.settled = fixed

    def observe(self, workers: int, images: int, seconds: float, waited: float) -> None:
        if self.settled or not images or seconds <= 0:
            return
        rate = images / seconds
        self.rates[workers] = max(rate, self.rates.get(workers, 0.0))
        before = self.rates.get(workers - 1)
        if before is not None and rate < before * LOSS:  # the last step slowed the run: go back and stay
            self.count, self.settled = workers - 1, True
        elif before is not None and rate < before * GAIN:  # it did not clearly pay: stay
            self.settled = True
        elif before is None and workers > self.lowest and waited / seconds <= WAITING:
            # the model never waited: decoders beyond the fewest only take cores from it
            self.count, self.settled = self.lowest, True
        elif waited / seconds > WAITING and workers < self.highest:
            self.count = workers + 1
        else:
            self.settled = True

    def segments(self, pending: dict[int, int],
                 batches_of: Callable[[int], int | None]) -> Generator[Step, int | None, None]:
        """The pending groups in steps, each with the window of its one group's batches to decode (None: all).
        While the count is being tuned a step is the rest of one group, which the caller may stop early (when the
        count changes) by sending the batch to resume from; it is sent None when a step ran to its end. Once
        settled, a step is many groups (a fresh set of workers costs a fraction of a second). A group whose
        batches cannot be split (`batches_of` None: a tar file, read by one worker from start to end) is one
        step."""
        groups = sorted(pending)
        at = 0
        while at < len(groups):
            if self.settled:
                yield {g: pending[g] for g in groups[at:at + SETTLED_SEGMENT]}, None
                at += SETTLED_SEGMENT
                continue
            group = groups[at]
            total = batches_of(group)
            if total is None:
                yield {group: pending[group]}, None
            else:
                resume = 0
                while resume is not None and resume < total:  # None: the step ran to its end
                    resume = yield {group: pending[group]}, range(resume, total)
            at += 1

    def watch(self, workers: int, step: Step, ahead: int) -> "Watch | None":
        """What observes a step while it runs (None once the count is settled); `ahead`: the messages each worker
        decodes ahead of the model."""
        return None if self.settled else Watch(self, workers, step[1] is not None, skip=workers * ahead)

    def report(self) -> None:
        if self.fixed:
            return
        tried = ", ".join(f"{k}: {v:.1f} img/s" for k, v in sorted(self.rates.items()))
        log.info("decode workers: settled on %d (tried %s)", self.count, tried or "-")


class Watch:
    """Observes a tuning step as its batches come: after about WINDOW_IMAGES images (timed from the first that
    came after those decoded ahead, so that neither the workers' start-up nor their head start counts) the tuner
    decides; when it changes the count the step stops at the batch just launched, and the rest of the group goes
    to a fresh set of workers. A step that keeps its count runs on: workers are restarted only to change their
    number."""

    def __init__(self, tuner: WorkerTuner, workers: int, stoppable: bool, skip: int = 0) -> None:
        self.tuner, self.workers = tuner, workers
        self.stoppable = stoppable  # False for a tar file: it is read whole, and observed at its end
        # The first messages may have been decoded ahead (during the warm-up, or while the model was busy): they
        # come without waiting and would hide how fast the workers really are.
        self.skip, self.seen = skip, 0
        self.start: tuple[float, int, float] | None = None  # (time, images done, data wait) at the first arrival
        self.decided = False

    def arrived(self, now: float, images: int, waited: float) -> None:
        self.seen += 1
        if self.start is None and self.seen > self.skip:
            self.start = (now, images, waited)

    def after_batch(self, now: float, images: int, waited: float, batch: int) -> int | None:
        """Called after each batch is launched; the batch to resume from when the step must stop, else None."""
        if not self.stoppable or self.decided or self.start is None or images - self.start[1] < WINDOW_IMAGES:
            return None
        return self._decide(now, images, waited, batch)

    def finish(self, now: float, images: int, waited: float) -> None:
        """The step ran to its end before a decision: decide on what it saw."""
        if not self.decided and self.start is not None:
            self._decide(now, images, waited, None)

    def _decide(self, now: float, images: int, waited: float, batch: int | None) -> int | None:
        self.decided = True
        started, before, waited_before = self.start
        self.tuner.observe(self.workers, images - before, now - started, waited - waited_before)
        return None if batch is None or self.tuner.count == self.workers else batch + 1
