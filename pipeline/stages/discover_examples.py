"""Stage `discover_examples`: list the examples (labels.examples) and their labels, and tell apart those that are
images of the dataset from those to encode (`records.arrow`, as `discover` writes the dataset's, for
`encode_examples`). A table's row is a file beside the table when there is one; otherwise, when its path is a key
of the dataset's images (a reviewed review.parquet), that image, whose embedding is the dataset's.

A content stage: it runs every time (an example may have been added, or relabelled) and is fingerprinted by what
it wrote, so the classifier is fitted again exactly when the examples changed.
"""

from __future__ import annotations

import logging
import os

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from ..engine import Artifact, StageContext
from ..sources import IMAGES, RECORDS_SCHEMA, batches_of
from ..sources.examples import label_indices, list_examples
from .discover import RECORDS_FILE, Records

log = logging.getLogger(__name__)

VERSION = 6
EXAMPLES_FILE = "examples.parquet"
EXAMPLES_SCHEMA = pa.schema([("path", pa.string()), ("labels", pa.list_(pa.int32())), ("in_dataset", pa.bool_())])


def discover_examples(ctx: StageContext, *, dataset_records: Artifact, source: dict, labels: list[str],
                      texts: list[str], dataset_kind: str) -> None:
    """`source`: the settings that decide the examples' listing and labels (sources.examples.listing_params);
    `labels`, `texts`: the label set's display names and prompt texts, which example labels are matched to;
    `dataset_kind`: whether the dataset's records are images or tar files (a key `<tar file>/<member>`)."""
    opened = ctx.execution.sources.open(source)
    listed = list_examples(opened)
    indices = label_indices(listed.names, labels, texts)
    records = {row[0]: row for batch in opened.records() for row in _rows(batch)}
    dataset = Records(dataset_records)
    in_dataset = [source["format"] == "manifest" and _missing_beside(records[os.fsencode(key)], opened)
                  and _in_dataset(dataset, key, dataset_kind) for key in listed.keys]
    pq.write_table(pa.table({"path": listed.keys, "labels": indices, "in_dataset": in_dataset},
                            schema=EXAMPLES_SCHEMA), ctx.out / EXAMPLES_FILE)
    wanted = sorted(os.fsencode(key) for key, found in zip(listed.keys, in_dataset) if not found)
    with ipc.new_file(ctx.out / RECORDS_FILE, RECORDS_SCHEMA) as writer:
        for batch in batches_of(records[key] for key in wanted):
            writer.write_batch(batch)
    log.info("examples: %d, of which %d are images of the dataset (their embeddings are the dataset's)",
             len(listed.keys), sum(in_dataset))


def _rows(batch: pa.RecordBatch):
    return zip(*(batch.column(c).to_pylist() for c in ("path", "size", "version")))


def _missing_beside(record: tuple, table) -> bool:
    """Whether a table's row names no file beside the table (a local table's missing file has size -1; a remote
    table's rows are not looked up, so a dataset key wins there)."""
    return record[1] < 0 or table.remote is not None


def _in_dataset(dataset: Records, key: str, kind: str) -> bool:
    path = os.fsencode(key)
    if kind == IMAGES:
        return dataset.contains(path)
    return b"/" in path and dataset.contains(path.split(b"/", 1)[0])  # <tar file>/<member>


def read_examples(artifact: Artifact) -> pa.Table:
    import io

    return pq.read_table(io.BytesIO(artifact.read_bytes(EXAMPLES_FILE)))
