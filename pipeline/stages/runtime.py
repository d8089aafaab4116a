"""What the stages need at run time that never changes a result, so never enters a fingerprint.

The runner passes one `Runtime` to every stage as `ctx.runtime`. Anything that decides an output (the model's
content, the dtype, the preprocessing, the labels) reaches a stage only as a hashed param; the `ModelProvider`
here only turns the hashed model fingerprint into a loaded model on this run's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..devices import DeviceChoice
from ..models import ModelProvider
from ..sources import Source


@dataclass
class Runtime:
    source: Source  # reads the images' bytes (where the dataset lives is not part of any result)
    models: ModelProvider
    device: DeviceChoice
    batch_size: int = 8
    num_workers: int = 0  # decode workers to start with
    max_workers: int = 0  # ... and at most (the tuner grows the count while it pays)
    workers_fixed: bool = True  # encode.num_workers was set: no tuning
    pad_to: int | None = None  # pad short batches to this size (accelerators: fixed shapes)
    chunk_size: int = 1024  # mean images per checkpoint chunk: what a crash can cost
    timeout: float = 60.0  # seconds per image; longer is a transient error, tried again by the next run
    warmup_image: str | None = None
    truth_file: Path | None = None  # where the truth table is (its content is what the truth stage hashes)
    progress: bool = True  # a bar on a terminal, else a line every progress_interval seconds; rank 0 only
    progress_interval: float = 30.0
    counters: dict = field(default_factory=dict)  # where the time went, for logs and the benchmark
