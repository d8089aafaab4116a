"""The vendor's precision test, enforced: the chosen device, dtype and runtime against a torch fp32 CPU run on the
same images.

    python jobs/precision.py model.path=M dataset.path=D device=cuda device.dtype=fp16
    make precision MODEL=M DATASET=D DEVICE=cuda DTYPE=bf16
    make precision MODEL=M DATASET=D RUNTIME=openvino DTYPE=int8

Exit status 0 when every image's probability and embedding cosine reach parity.min_cosine (default 0.99) and the
top-1 agreement reaches parity.min_top1_agreement; 1 otherwise; 2 on bad input.
"""

import copy
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline import parity, workflow  # noqa: E402
from pipeline.cli import launch, task  # noqa: E402
from pipeline.engine.files import atomic_path  # noqa: E402
from pipeline.outputs.writers import read_metadata  # noqa: E402

log = logging.getLogger("precision")


def _variant(cfg: DictConfig, out: Path, cache: Path, **device) -> DictConfig:
    variant = copy.deepcopy(cfg)
    variant.output_dir, variant.cache_dir = str(out), str(cache)
    for key, value in device.items():
        variant.device[key] = value
    return variant


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@task
def main(cfg: DictConfig) -> None:
    out = Path(cfg.output_dir)
    # Fresh caches: the cache leaves the device out of fingerprints, so a shared one would compare a run with itself.
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        candidate = workflow.run(_variant(cfg, out / "candidate", Path(tmp) / "candidate"))
        reference_cfg = _variant(cfg, out / "reference", Path(tmp) / "reference", type="cpu", dtype="fp32",
                                 cpu_half=False)
        reference_cfg.encode.batch_size = cfg.parity.reference_batch_size
        reference_cfg.model.runtime = "torch"
        reference = workflow.run(reference_cfg)
        result = parity.compare(candidate, reference, cfg.parity.min_cosine, cfg.parity.min_top1_agreement)
    with atomic_path(out / "precision.parquet") as tmp_file:
        result.table.to_parquet(tmp_file, index=False)
    ran_on = read_metadata(candidate.out_dir / "predictions.parquet")["config"]["runtime"]
    print(f"precision: {cfg.device.type.value}/{cfg.device.dtype.value} on {ran_on} batch "
          f"{cfg.encode.batch_size or 'default'} vs cpu/fp32 on torch batch {cfg.parity.reference_batch_size}; "
          f"per image in {out / 'precision.parquet'}")
    for line in result.lines():
        print("  " + line)
    if not result.passed:
        sys.exit(1)


if __name__ == "__main__":
    launch(main)
