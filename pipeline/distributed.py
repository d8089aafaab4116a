"""Data parallelism over devices and machines: torchrun ranks, or independent shard jobs.

Sharding is by checkpoint chunk (chunk k belongs to shard k % count), so each shard writes the very chunks a
one-process run would write, with the same batches inside them: the merged outputs are identical, and a rerun
after any failure skips every chunk that was finished, whichever shard made it. Under torchrun the shards are the
ranks and rank 0 merges once all ranks pass a barrier; as independent jobs (`shard.index`, `shard.count`, e.g. a SLURM array) a final ordinary run merges.
The cache directory must be shared by all shards (one filesystem, e.g. NFS/Lustre on a cluster).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

from .errors import UserError

log = logging.getLogger(__name__)

# The ranks exchange no tensor, only a barrier: gloo serves every device. NCCL would warn that its barrier may
# hang on device 0, HCCL would allocate it on npu:0 from every rank and give up after HCCL_CONNECT_TIMEOUT
# (120 s) when ranks arrive minutes apart, as uneven shards do.
BACKEND = "gloo"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    distributed: bool  # ranks of one torchrun job (else independent jobs)
    local_rank: int = 0

    @property
    def merges(self) -> bool:
        """Whether this process writes the results: rank 0 of a torchrun job, or any unsharded run."""
        return self.count == 1 or (self.distributed and self.index == 0)


def from_environment(index: int, count: int) -> Shard:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if count != 1:
            raise UserError("shard.count is set inside a torchrun job; use one or the other")
        rank = int(os.environ["RANK"])
        return Shard(rank, world, True, int(os.environ.get("LOCAL_RANK", rank)))
    if count < 1 or not 0 <= index < count:
        raise UserError(f"shard.index={index} shard.count={count}: need 0 <= index < count")
    return Shard(index, count, False)


def listing_token(shard: Shard, configured: str | None) -> str | None:
    """The name under which this job's processes share one listing of the dataset: the configured one, else
    torchrun's run id (all ranks of one launch) or a SLURM array's job id (all its tasks); None: list afresh."""
    if configured:
        return configured
    if shard.distributed and os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    if shard.count > 1 and os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-{os.environ['SLURM_ARRAY_JOB_ID']}"
    if shard.count > 1:
        log.warning("shard %d/%d lists the whole dataset itself; give every shard job the same dataset.listing=<name> "
                    "so that the first lists it and the others reuse that listing", shard.index, shard.count)
    return None


def init(shard: Shard, device, timeout_hours: float) -> None:
    """Bind this rank to its device, then join the torchrun process group (gloo; the barrier waits for the
    slowest shard, hence a long timeout)."""
    if not shard.distributed:
        return
    import torch.distributed as dist

    bind_device(device)
    if not dist.is_initialized():
        log.info("rank %d/%d joining process group (%s) on %s", shard.index, shard.count, BACKEND, device)
        dist.init_process_group(BACKEND, timeout=datetime.timedelta(hours=timeout_hours))


def bind_device(device) -> None:
    """Make `device` the current one of this process, as collectives and allocations without an explicit
    device expect."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "npu":
        torch.npu.set_device(device)


def barrier(shard: Shard) -> None:
    if shard.distributed:
        import torch.distributed as dist

        dist.barrier()


def finish(shard: Shard) -> None:
    if shard.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
