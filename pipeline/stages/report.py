"""Stage `report` (a sink): report.html in the run directory, from the published parquet files alone."""

from __future__ import annotations

from pathlib import Path

from ..engine import Artifact, StageContext

VERSION = 1


def report(ctx: StageContext, *, published: Artifact, out_dir: str, dataset_root: str | None) -> None:
    """`published` orders this stage after `publish`, whose files in `out_dir` it reads."""
    from ..outputs.report_html import build_report  # pandas and its kin: imported by runs that write a report

    build_report(Path(out_dir), Path(dataset_root) if dataset_root else None)
