"""The chunk files of image embeddings: an Arrow IPC file per chunk, one row per image (decoded or failed), in
record order; written into the stage's pool, read back verified, one chunk at a time."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ..engine import Artifact, ChunkFile, ChunkPool
from .decode import ImageRow


def chunk_schema(dim: int) -> pa.Schema:
    return pa.schema([("path", pa.binary()), ("ok", pa.bool_()), ("width", pa.int32()), ("height", pa.int32()),
                      ("error_type", pa.string()), ("error_message", pa.string()), ("transient", pa.bool_()),
                      ("truth", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


def write_chunk(pool: ChunkPool, key: str, rows: list[ImageRow], embeddings: list[np.ndarray],
                dim: int) -> ChunkFile:
    """`embeddings`: the decoded rows' embeddings, in row order (failed rows get zeros). Provisional when a row
    failed for a reason worth retrying."""
    path, width, height, kind, message, transient, truth = (list(col) for col in zip(*rows)) if rows else ([],) * 7
    ok = np.array([k is None for k in kind], dtype=bool)
    full = np.zeros((len(rows), dim), np.float32)
    if embeddings:
        full[ok] = np.concatenate(embeddings)
    table = pa.Table.from_arrays([
        pa.array(path, pa.binary()), pa.array(ok, pa.bool_()), pa.array(width, pa.int32()),
        pa.array(height, pa.int32()), pa.array(kind, pa.string()), pa.array(message, pa.string()),
        pa.array(transient, pa.bool_()), pa.array(truth, pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), dim)], schema=chunk_schema(dim))
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return pool.put(key, sink.getvalue().to_pybytes(), final=not any(transient))


def chunk_rows(pool: ChunkPool, chunk: ChunkFile) -> int:
    """Rows of a chunk, from its footer (no full read)."""
    with pa.memory_map(str(pool.path(chunk))) as source:
        reader = ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def iter_chunks(artifact: Artifact) -> Iterator[pa.Table]:
    """The stage's chunks in record order, each verified as it is read (InputCorrupt when one is damaged)."""
    for chunk in artifact.chunks():
        yield ipc.open_file(pa.py_buffer(artifact.read_chunk(chunk))).read_all()


def embedding_matrix(chunk: pa.Table) -> np.ndarray:
    column = chunk.column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(chunk), column.type.list_size)


def image_count(artifact: Artifact) -> int:
    """How many images the stage covered (classified or failed)."""
    return int(artifact.chunk_list()["count"])
