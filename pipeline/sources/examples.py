"""Examples (`labels.examples`): a few images per label, as a folder or a table.

- A folder holds one subfolder per label, named after the label or its prompt text (`examples/cat/1.jpg`,
  searched recursively below it, by `dataset.extensions`); an example's key is its path in the folder.
- A table (.csv, .tsv, .parquet, .jsonl) has columns `path` and `label`. A path is a file relative to the table
  (or absolute, or a URL), as in a dataset manifest; where no such file is there and the path is a key of the
  dataset's images (as `predictions.parquet` and `review.parquet` write them), it is that image: its embedding
  is taken from the dataset's, never encoded again, so a reviewed `review.parquet` goes back in as it is. In
  multi-label mode a label may name several, joined by `|`.

Everything here reads only names (subfolders, the table's two columns): the label checks run before any image
is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from . import EXAMPLES, FOLDER, MANIFEST, RECORDS, TRUTH, DatasetSettings, Location
from .manifest import SUFFIXES

PATH_COLUMN, LABEL_COLUMN = "path", "label"
LABEL_SEPARATOR = "|"


@dataclass(frozen=True)
class ExampleList:
    """Every example's key (as its source lists it) and the label names it was given, in key order."""

    keys: list[str]
    names: list[list[str]]


def example_settings(location: Location, extensions: list[str]) -> DatasetSettings:
    """The examples as a set of images: a folder, or a table listing them (settings fixed: columns path, label).
    Listing them is their RECORDS and TRUTH uses at once (`listing_params`)."""
    path = location.path
    if "://" not in path and Path(path).is_dir():
        return DatasetSettings(FOLDER, {"extensions": extensions}, EXAMPLES)
    if path.lower().endswith(SUFFIXES):
        return DatasetSettings(MANIFEST, {"path_column": PATH_COLUMN, "truth_column": LABEL_COLUMN}, EXAMPLES)
    raise UserError(f"labels.examples={path!r}: give a folder with a subfolder per label, or a table "
                    f"({', '.join(SUFFIXES)}) with columns {PATH_COLUMN},{LABEL_COLUMN}")


def list_examples(source) -> ExampleList:
    """The examples and their labels, from names alone: `source` is the examples' folder or table source, opened
    with the settings `example_settings` gives."""
    if source.format == FOLDER:
        listed = source.records()
        keys = [os.fsdecode(path) for batch in listed for path in batch.column("path").to_pylist()]
        loose = [key for key in keys if "/" not in key]
        if loose:
            raise UserError(f"labels.examples {source.describe()}: {len(loose)} images lie outside a label's "
                            f"subfolder ({', '.join(loose[:3])}); put each example in the subfolder of its label")
        return ExampleList(keys, [[key.split("/", 1)[0]] for key in keys])
    truth = source.truth()
    if truth is None:
        raise UserError(f"labels.examples {source.describe()}: the table has no '{LABEL_COLUMN}' column; give it "
                        f"columns {PATH_COLUMN},{LABEL_COLUMN}")
    rows = [row for batch in truth for row in zip(*(batch.column(c).to_pylist() for c in ("path", "truth")))]
    keys, labels = [key for key, _ in rows], [label for _, label in rows]
    empty = [key for key, label in zip(keys, labels) if not (label or "").strip()]
    if empty:
        raise UserError(f"labels.examples {source.describe()}: {len(empty)} rows have no label "
                        f"({', '.join(empty[:3])} ...); every example needs one")
    order = sorted(range(len(keys)), key=lambda i: keys[i].encode("utf-8", "surrogateescape"))
    return ExampleList([keys[i] for i in order], [_split(labels[i]) for i in order])


def _split(label: str) -> list[str]:
    return [part.strip() for part in label.split(LABEL_SEPARATOR) if part.strip()]


def label_indices(names: list[list[str]], labels: Sequence[str], texts: Sequence[str]) -> list[list[int]]:
    """Each example's labels as indices of the label set, matched by display name or by prompt text; an example
    naming a label outside the set stops the run here, with the names it used."""
    index = {text: i for i, text in enumerate(texts)}
    index.update({label: i for i, label in enumerate(labels)})  # a display name wins over another's prompt text
    unknown = sorted({name for row in names for name in row if name not in index})
    if unknown:
        raise UserError(f"labels.examples names labels that are not in the label set: {', '.join(unknown[:10])}"
                        f"{' ...' if len(unknown) > 10 else ''}; the labels are {', '.join(labels[:20])}"
                        f"{' ...' if len(labels) > 20 else ''} (name an example's folder or label after one)")
    return [[index[name] for name in row] for row in names]


def listing_params(settings: DatasetSettings) -> dict:
    """What listing the examples hashes: their records and the labels their source carries."""
    return {**settings.params(RECORDS), **settings.params(TRUTH)}
