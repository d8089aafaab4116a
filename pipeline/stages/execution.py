"""How a run does its work: what every stage is handed as `ctx.execution`, and what never enters a fingerprint.

Anything that decides an output (the model's content, the dtype, the preprocessing, the labels, the settings of
the dataset) reaches a stage only as a hashed param; the providers here turn such params into working objects:
`models` a hashed model fingerprint into a loaded model on this run's device, `sources` hashed source settings
into a source at this run's location (`pipeline.sources.SourceProvider`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..devices import DeviceChoice
from ..models import ModelProvider
from ..sources import SourceProvider

ACCELERATOR_BATCH, CPU_BATCH = 128, 8  # encode.batch_size's default: an accelerator needs large batches to hide
# each launch's overhead; a CPU gains nothing past a few images


def default_batch_size(device: DeviceChoice) -> int:
    return ACCELERATOR_BATCH if device.is_accelerator else CPU_BATCH


@dataclass
class Execution:
    """The config's execution settings as the workflow resolved them (their defaults live in pipeline/config.py)."""

    sources: SourceProvider  # opens the dataset where it lives, from a stage's hashed source settings
    models: ModelProvider
    device: DeviceChoice
    batch_size: int  # images per forward pass
    num_workers: int  # decode workers to start with
    max_workers: int  # ... and at most (the tuner grows the count while it pays)
    min_workers: int  # ... and at the first observation, when the model never waited for data
    workers_fixed: bool  # encode.num_workers was set: no tuning
    chunk_size: int  # mean images per checkpoint chunk: what a crash can cost
    timeout: float  # seconds per image; longer is a transient error, tried again by the next run
    warmup_image: str | None
    truth_file: Path | None  # where the truth table is (its content is what the truth stage hashes)
    progress: bool  # a bar on a terminal, else a line every progress_interval seconds; rank 0 only
    progress_interval: float
    pad_to: int | None = None  # pad short batches to this size (accelerators, exported runtimes: fixed shapes)
    counters: dict = field(default_factory=dict)  # where the time went, for logs and the benchmark
