"""Classify a folder of images (or one image) with CLIP / Chinese-CLIP zero-shot.

    python jobs/classify.py dataset.path=photos model.path=models/clip-vit-large-patch14 labels.list='cat,dog'
    python jobs/classify.py -m labels=shapes,colors          # Hydra multirun over label sets
    python jobs/classify.py --model_path M --dataset_path D --label_file L   # the vendor example's flags
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from pipeline import workflow  # noqa: E402
from pipeline.config import register, translate_flags  # noqa: E402
from pipeline.errors import EXIT_USER_ERROR, UserError  # noqa: E402

log = logging.getLogger("classify")
register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        summary = workflow.run(cfg)
    except UserError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_USER_ERROR)
    if cfg.dataset.image and summary.shard is None:
        for path, ranked in workflow.label_distribution(summary.out_dir):
            print(f"{path}:")
            for label, prob in ranked:
                print(f"  {prob:8.4f}  {label}")
    log.info("%s", summary.line())


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *translate_flags(sys.argv[1:])]
    main()
