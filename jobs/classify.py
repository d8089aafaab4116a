"""Classify a folder of images (or one image) with CLIP / Chinese-CLIP zero-shot.

    python jobs/classify.py dataset.path=photos model.path=models/clip-vit-large-patch14 labels.list='cat,dog'
    python jobs/classify.py -m dataset=sample model=tiny_clip labels=shapes,colors   # multirun over label sets
    python jobs/classify.py --model_path M --dataset_path D --label_file L   # the vendor example's flags
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline import workflow  # noqa: E402
from pipeline.cli import launch, task  # noqa: E402
from pipeline.errors import EXIT_NOT_CLASSIFIED  # noqa: E402

log = logging.getLogger("classify")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
@task
def main(cfg: DictConfig) -> None:
    summary = workflow.run(cfg)
    if cfg.dataset.image and summary.shard is None:
        for path, kind, message in workflow.image_errors(summary.out_dir):
            print(f"{path}: not classified: {kind}: {message}", file=sys.stderr)
        for path, ranked in workflow.label_distribution(summary.out_dir):
            print(f"{path}:")
            for label, prob in ranked:
                print(f"  {prob:8.4f}  {label}")
    log.info("%s", summary.line())
    if summary.error_kinds:
        log.warning("%d images not classified, by kind (all in errors.parquet):", summary.errors)
        for line in summary.error_lines():
            log.warning("%s", line)
    if cfg.dataset.image and summary.shard is None and summary.classified == 0:
        sys.exit(EXIT_NOT_CLASSIFIED)


if __name__ == "__main__":
    launch(main)
