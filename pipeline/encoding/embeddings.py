"""The chunk files of image embeddings: an Arrow IPC file per chunk, one row per image (decoded or failed), in
record order; written into the stage's pool, read back verified, one chunk at a time."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from ..engine import Artifact, ChunkFile, ChunkPool
from .decode import ImageRow


# (rows, first key) of the chunks this process wrote, by chunk name (which holds the content's checksum, so an entry
# can never be stale): listing them needs no read back, which on a cache in a bucket would be a GET per chunk.
_WRITTEN: dict[str, tuple[int, bytes | None]] = {}


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
    chunk = pool.put(key, sink.getvalue().to_pybytes(), final=not any(transient))
    _WRITTEN[chunk.name] = (len(rows), path[0] if rows else None)
    return chunk


def chunk_summary(pool: ChunkPool, chunk: ChunkFile) -> tuple[int, bytes | None]:
    """Rows of a chunk and the key of its first row: memory-mapped on local disk (the footer and one column's
    first value), else read whole (and verified) from the pool's store."""
    if chunk.name in _WRITTEN:
        return _WRITTEN[chunk.name]
    path = pool.path(chunk)
    with (pa.memory_map(str(path)) if path.exists() else pa.BufferReader(pool.read(chunk))) as source:
        reader = ipc.open_file(source)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        first = next((b.column(0)[0].as_py() for b in batches if b.num_rows), None)
        return sum(b.num_rows for b in batches), first


def lookup(artifact: Artifact, keys: list[bytes]) -> dict[bytes, pa.Table]:
    """The rows of these keys (a few examples among the dataset's images), reading only the chunks that can hold
    them, each verified: chunks are in key order, except that a tar file's members keep their stored order within
    the chunks of that tar file (`<tar file>/<member>`)."""
    firsts = [bytes.fromhex(key) for key in artifact.chunk_list()["first_keys"]]
    chunks = artifact.chunks()
    wanted: dict[int, set[bytes]] = {}
    for key in keys:
        for index in _candidates(firsts, key):
            wanted.setdefault(index, set()).add(key)
    found: dict[bytes, pa.Table] = {}
    for index in sorted(wanted):
        table = ipc.open_file(pa.py_buffer(artifact.read_chunk(chunks[index]))).read_all()
        paths = table.column("path").to_pylist()
        for row, path in enumerate(paths):
            if path in wanted[index]:
                found[path] = table.slice(row, 1)
    return found


def _candidates(firsts: list[bytes], key: bytes) -> range:
    """The chunks that may hold `key`: the one whose range it falls in, and for a tar member every chunk of that
    tar file (their first keys share its prefix)."""
    import bisect

    at = bisect.bisect_right(firsts, key) - 1
    start = stop = max(at, 0)
    stop = at + 1 if at >= 0 else 0
    prefix = key.split(b"/", 1)[0] + b"/"
    while start > 0 and firsts[start - 1].startswith(prefix):
        start -= 1
    while stop < len(firsts) and firsts[stop].startswith(prefix):
        stop += 1
    return range(start, stop)


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
