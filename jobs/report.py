"""Rebuild `report.html` of an earlier run from its parquet files.

    python jobs/report.py outputs/runs/2026-01-01/12-00-00 [--dataset photos]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.errors import EXIT_USER_ERROR  # noqa: E402
from pipeline.outputs.report_html import build_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory holding predictions.parquet")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="dataset root the image paths are relative to (default: the one the run recorded)")
    parser.add_argument("--thumbs", type=int, default=6, help="most / least confident thumbnails per label")
    args = parser.parse_args(argv)
    if not (args.run_dir / "predictions.parquet").is_file():
        print(f"error: {args.run_dir} has no predictions.parquet; pass the directory of a finished run",
              file=sys.stderr)
        return EXIT_USER_ERROR
    if args.dataset is not None and not args.dataset.is_dir():
        print(f"error: --dataset {args.dataset} is not a directory", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.thumbs < 0:
        print("error: --thumbs must be >= 0", file=sys.stderr)
        return EXIT_USER_ERROR
    print(build_report(args.run_dir, args.dataset, thumbs_per_label=args.thumbs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
