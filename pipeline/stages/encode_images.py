"""Stage `encode_images`: decode + preprocess in worker processes, run the vision tower in batches, and keep
the embeddings in checksummed chunks of the stage's chunk pool (the machinery, by concern: `pipeline.encoding`).

The stage fills every chunk of the plan that the pool lacks (or holds only provisionally), then lists them; a
shard of a split run (`ctx.shard`) fills only its own groups. An image that cannot be read or decoded
becomes a row with its error, never an exception; one that failed for a reason outside its bytes makes its chunk
provisional, and the stage `Incomplete`: the next run encodes that chunk again.
"""

from __future__ import annotations

import hashlib
import json
import logging

from ..engine import Artifact, ChunkFile, ChunkPool, Incomplete, StageContext, write_chunk_list
from ..encoding.embeddings import chunk_summary
from ..encoding.loop import encode_groups
from ..encoding.plan import Plan, make_plan, shard_of
from ..sources import IMAGES
from .execution import Execution

log = logging.getLogger(__name__)

VERSION = 13


def encode_images(ctx: StageContext, *, records: Artifact, source: dict, model: str, dtype: str, preprocess: dict,
                  draft: bool, max_pixels: int, towers: Artifact | None = None,
                  chunk_images: int | None = None) -> Incomplete | None:
    """`source`: the settings that decide what reading the images gives (see pipeline.sources.DatasetSettings);
    `towers`: an export_towers entry when the towers run on ONNX Runtime or OpenVINO, else torch runs them;
    `chunk_images`: images per chunk where a set must not follow encode.chunk_size (examples: 1, so that adding
    five encodes five, each alone whatever its neighbours)."""
    params = dict(model=model, dtype=dtype, preprocess=preprocess, draft=draft, max_pixels=max_pixels,
                  chunk_images=chunk_images, **exported(towers))
    listed = fill_chunks(ctx, records, ctx.execution.sources.open(source), params)
    if ctx.shard[1] > 1:
        return None  # this shard's part of the pool; a whole run lists and seals it
    summaries = [chunk_summary(ctx.pool, chunk) for chunk in listed]
    write_chunk_list(ctx.out, listed, count=sum(rows for rows, _ in summaries),
                     first_keys=[(first or b"").hex() for _, first in summaries])
    retry = [c for c in listed if not c.final]
    if retry:
        return Incomplete(f"{len(retry)} chunk(s) hold images that failed for reasons outside their bytes")
    return None


def exported(towers: Artifact | None) -> dict:
    """Where an export of the towers lies, and its fingerprint: chunks are keyed by what made them, and an export
    is an input (its int8 calibration is content), not a param."""
    if towers is None:
        return {"export": None, "export_fingerprint": None}
    return {"export": str(towers.path), "export_fingerprint": towers.fingerprint}


def fill_chunks(ctx: StageContext, records: Artifact, source, params: dict) -> list[ChunkFile]:
    """Encode the groups of this shard whose chunks the pool lacks; returns every chunk of the plan that exists
    afterwards, in order."""
    execution: Execution = ctx.execution
    pool = ctx.pool
    identity = ctx.key if not params.get("export_fingerprint") else \
        hashlib.sha256(f"{ctx.key}:{params['export_fingerprint']}".encode()).hexdigest()
    plan = make_plan(records, source.kind, params["chunk_images"] or execution.chunk_size, identity, ctx.memo)
    found = pool.scan()
    index, count = ctx.shard
    mine = [g for g in range(plan.groups) if shard_of(g, count) == index]
    pending = {g: first for g in mine if (first := _first_pending(plan, g, found, pool)) is not None}
    done = len(mine) - len(pending)
    unit = "chunks" if plan.kind == IMAGES else "tar files"
    if done:
        ctx.resumed = True
        who = f"shard {index}/{count}" if count > 1 else "image encoding"
        log.info("resuming %s: %d of %d %s already done", who, done, len(mine), unit)
    written, images = encode_groups(plan, pending, pool, execution, source, params) if pending else ({}, 0)
    found.update(written)
    indexes = {plan.index_key(g) for g in pending} if plan.kind != IMAGES else set()
    encoded = len(set(written) - indexes)
    log.info("encoded %d images in %d chunks; %d %s reused", images, encoded, done, unit)
    for key, value in (("chunks_encoded", encoded), ("chunks_reused", done), ("images_encoded", images)):
        execution.counters[key] = execution.counters.get(key, 0) + value
    return _listing(plan, found, pool)


def _first_pending(plan: Plan, group: int, found: dict[str, ChunkFile], pool: ChunkPool) -> int | None:
    """None when the group is done; else the first chunk of it to encode (0, or later in a tar file read
    before)."""
    if plan.kind == IMAGES:
        chunk = found.get(plan.chunk_key(group, 0))
        return None if chunk is not None and chunk.final else 0
    count = _tar_chunk_count(plan, group, found, pool)
    number = 0
    while (chunk := found.get(plan.chunk_key(group, number))) is not None and chunk.final:
        number += 1
    return None if count is not None and number >= count else number


def _tar_chunk_count(plan: Plan, group: int, found: dict[str, ChunkFile], pool: ChunkPool) -> int | None:
    """How many chunks a tar file makes, once it has been read to its end; None before."""
    index = found.get(plan.index_key(group))
    return None if index is None else json.loads(pool.read(index))["chunks"]


def _listing(plan: Plan, found: dict[str, ChunkFile], pool: ChunkPool) -> list[ChunkFile]:
    if plan.kind == IMAGES:
        return [found[chunk.key] for chunk in plan.chunks if chunk.key in found]
    listed = []
    for group in range(plan.groups):
        count = _tar_chunk_count(plan, group, found, pool)
        number = 0
        while (count is None or number < count) and (chunk := found.get(plan.chunk_key(group, number))) is not None:
            listed.append(chunk)
            number += 1
    return listed
