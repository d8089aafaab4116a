"""Progress that suits where the output goes: a bar on a terminal, a periodic line in a log file (SLURM,
nohup), where carriage-return bars would fill the log with noise. Shown by one process only (rank 0 of a
torchrun job)."""

from __future__ import annotations

import datetime
import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("progress")


class Progress:
    def __init__(self, desc: str, total: int | None, unit: str, enabled: bool, interval: float = 30.0) -> None:
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.done, self.started = 0, time.monotonic()
        self._last = self.started
        self._bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, unit=unit, desc=desc, smoothing=0.1)

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self.enabled and time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.desc}: {self.done:,}"
        if self.total:
            left = (self.total - self.done) / rate if rate else float("inf")
            eta = str(datetime.timedelta(seconds=round(left))) if left != float("inf") else "?"
            text += f"/{self.total:,} {self.unit} ({100 * self.done / self.total:.1f}%), {rate:,.1f} {self.unit}/s, " \
                    f"ETA {eta}"
        else:
            text += f" {self.unit}, {rate:,.1f} {self.unit}/s"
        return text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
