"""`make scale`: peak memory, wall time and bytes read at 100k, 1M and 10M images (about 30 minutes on 2 cores).

    python jobs/scale.py [--out outputs/scale] [--shards 100000,10000000] [--whole 1000000] [--keep]

The measurements and how the datasets are built: tests/helpers/scale.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import PROJECT_ROOT  # noqa: E402
from tests.helpers.scale import print_table, run_scale  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "scale"))
    ap.add_argument("--shards", default="100000,10000000", help="dataset sizes for the shard comparison")
    ap.add_argument("--whole", type=int, default=1_000_000, help="images of the whole run (0: skip)")
    ap.add_argument("--keep", action="store_true", help="keep the generated datasets and cache")
    args = ap.parse_args()
    report = run_scale(Path(args.out), tuple(int(n) for n in args.shards.split(",")), args.whole, args.keep)
    print_table(report)
    print(f"\nfull results: {Path(args.out) / 'scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
