"""`make bench`: our pipeline against the model ceiling, the Hugging Face pipeline and the hardware limit.

    python jobs/bench.py [--out outputs/bench] [--models clip-vit-large-patch14,chinese-clip-vit-base-patch16]
                         [--device cpu|cuda|npu] [--dtype fp32|fp16|bf16] [--repeats 3] [--runtimes-only] [--quick]

Writes bench.json and prints a table with a profile of where our time goes. On a CPU it also measures the
runtimes (torch, ONNX Runtime, OpenVINO; fp32, bf16 where the CPU has it, and int8) on --runtime-models:
`--runtimes-only` measures just those, which is how to re-check model.runtime=auto's order on another CPU;
`--quick` shrinks everything for a smoke test. The benchmark itself is tests/helpers/bench_suite.py.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.config import PROJECT_ROOT  # noqa: E402
from tests.helpers.bench_suite import print_table, run_bench  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "bench"))
    ap.add_argument("--models", default="chinese-clip-vit-base-patch16,siglip-base-patch16-224,clip-vit-large-patch14")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, npu or auto (as device.type)")
    ap.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16 (as device.dtype)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on a CPU, 128 on an accelerator")
    ap.add_argument("--images-base", type=int, default=64)
    ap.add_argument("--images-large", type=int, default=16)
    ap.add_argument("--hf-images", type=int, default=3)
    ap.add_argument("--datapath-images", type=int, default=480)
    ap.add_argument("--quick", action="store_true", help="tiny models and few images: a smoke test")
    ap.add_argument("--runtime-models", default="chinese-clip-vit-base-patch16,clip-vit-large-patch14",
                    help="real-size models for the CPU runtimes table ('' to skip it)")
    ap.add_argument("--runtime-images-base", type=int, default=64)
    ap.add_argument("--runtime-images-large", type=int, default=8)
    ap.add_argument("--runtimes-only", action="store_true", help="measure only the CPU runtimes table")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.datapath_images, args.hf_images = 1, 7, 1
    if args.batch is None:
        args.batch = 128 if args.device not in ("cpu", "auto") else 8
    logging.basicConfig(level=logging.WARNING)
    report = run_bench(args)
    print_table(report)
    print(f"\nfull results: {Path(args.out) / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
