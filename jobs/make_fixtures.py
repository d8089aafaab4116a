#!/usr/bin/env python
"""Make the test fixtures: tiny trained CLIP / Chinese-CLIP / SigLIP models, tiny random SigLIP 2, MetaCLIP 2,
AltCLIP and ALIGN models, and the sample image set.

    python jobs/make_fixtures.py --out tests/assets            # everything (~40 min on 2 cores)
    python jobs/make_fixtures.py --out /tmp/x --only clip --steps 5 --pool 256 --eval 0
    python jobs/make_fixtures.py --out tests/assets --only siglip   # one family (siglip2, metaclip2, altclip, align)

Deterministic for a given --seed (and the same torch/transformers versions).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("siglip", "siglip2", "metaclip2", "altclip", "align")  # tests/helpers/fixtures_families.py


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output root (tests/assets)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default: per-model default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["clip", "chinese_clip", "sample", *FAMILIES], default=None)
    ap.add_argument("--pool", type=int, default=48000, help="number of pre-rendered training images")
    ap.add_argument("--eval", type=int, default=300, help="held-out images for the accuracy report (0: skip)")
    ap.add_argument("--eval-max-side", type=int, default=4000)
    args = ap.parse_args(argv)

    from tests.helpers import fixtures, fixtures_families

    t = time.time()
    if args.only not in FAMILIES:
        fixtures.make_all(args.out, steps=args.steps, seed=args.seed, only=args.only, n_pool=args.pool,
                          eval_n=args.eval, eval_max_side=args.eval_max_side)
    if args.only is None or args.only in FAMILIES:
        fixtures_families.make_families(args.out, steps=args.steps, seed=args.seed, only=args.only,
                                        n_pool=args.pool, eval_n=args.eval, eval_max_side=args.eval_max_side)
    print(f"done in {time.time() - t:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
