"""`make fewshot`: what examples bring, measured through the pipeline itself on the fixtures.

For each tiny model (CLIP, SigLIP), label names that say nothing ("kind 1".."kind 5" for the shapes) or the real
ones, and 1, 2, 4, 8, 16 examples per label (rendered apart, a few draws each): top-1 of zero-shot and of the
classifier `auto` chose, on the same images (the bundled sample renders, and 300 held-out renders), the method
chosen, and the expected calibration error before and after the temperature. Medians over the draws.

    .venv/bin/python -m tests.helpers.fewshot_figures [--draws 6] [--out outputs/fewshot]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from collections import Counter
from pathlib import Path

import pandas as pd

from pipeline import workflow
from pipeline.config import PROJECT_ROOT, compose
from tests.helpers import SAMPLE_IMAGES, SAMPLE_TRUTH
from tests.helpers.examples import KIND_LIST, KINDS, SHAPES, render_dataset, render_examples

SHOTS = (1, 2, 4, 8, 16)


def _datasets(root: Path) -> dict[str, tuple[Path, Path]]:
    truth = pd.read_csv(SAMPLE_TRUTH)
    truth["kind"] = [KINDS[SHAPES.index(s)] for s in truth["shape"]]
    truth.to_csv(root / "sample-truth.csv", index=False)
    render_dataset(root / "heldout", 300, seed=2024).to_csv(root / "heldout-truth.csv", index=False)
    return {"sample (37)": (SAMPLE_IMAGES, root / "sample-truth.csv"),
            "held-out (300)": (root / "heldout", root / "heldout-truth.csv")}


def _run(root: Path, model: str, names: str, dataset: tuple[Path, Path], examples: Path | None, tag: str) -> dict:
    images, truth = dataset
    overrides = [f"model={model}", "labels=shapes", f"dataset.path={images}", f"dataset.truth={truth}",
                 f"dataset.truth_column={'kind' if names == 'kinds' else 'shape'}", "report=false",
                 "progress=false", "device=cpu", f"output_dir={root / 'runs' / tag}", f"cache_dir={root / 'cache'}"]
    if names == "kinds":
        overrides.append(KIND_LIST)
    if examples is not None:
        overrides.append(f"labels.examples={examples}")
    summary = workflow.run(compose(overrides))
    metrics = pd.read_parquet(summary.out_dir / "metrics.parquet")
    value = {(s, m): v for s, m, v in zip(metrics["scope"], metrics["metric"], metrics["value"])}
    choice = json.loads((summary.out_dir / "classifier.json").read_text()) if examples else {"method": "-"}
    return {"top1": value[("overall", "top1_accuracy")], "method": choice["method"],
            "zero_shot": value.get(("zero_shot_overall", "top1_accuracy"), value[("overall", "top1_accuracy")]),
            "ece_before": value.get(("calibration", "ece_uncalibrated")),
            "ece_after": value.get(("calibration", "ece_calibrated"))}


def measure(root: Path, draws: int) -> list[dict]:
    datasets = _datasets(root)
    rows = []
    for model in ("tiny_clip", "tiny_siglip"):
        for names in ("kinds", "shapes"):
            for shots in SHOTS:
                for dataset_name, dataset in datasets.items():
                    runs = []
                    for draw in range(draws):
                        folder = root / "examples" / f"{names}-{shots}-{draw}"
                        if not folder.is_dir():
                            render_examples(folder, shots, KINDS if names == "kinds" else SHAPES, seed=1000 + draw)
                        tag = f"{model}-{names}-{shots}-{draw}-{dataset_name.split()[0]}"
                        runs.append(_run(root, model, names, dataset, folder, tag))
                    rows.append(_row(model, names, shots, dataset_name, runs))
                    print(_line(rows[-1]), flush=True)
    return rows


def _row(model, names, shots, dataset, runs: list[dict]) -> dict:
    def median(key):
        values = [r[key] for r in runs if r[key] is not None]
        return statistics.median(values) if values else float("nan")

    lowered = sum(1 for r in runs if r["ece_after"] is not None and r["ece_after"] < r["ece_before"])
    return {"model": model, "names": names, "shots": shots, "dataset": dataset, "zero_shot": median("zero_shot"),
            "auto": median("top1"), "methods": dict(Counter(r["method"] for r in runs)),
            "ece_before": median("ece_before"), "ece_after": median("ece_after"),
            "ece_lowered": f"{lowered}/{sum(1 for r in runs if r['ece_after'] is not None)}"}


def _line(row: dict) -> str:
    methods = " ".join(f"{m} x{n}" for m, n in sorted(row["methods"].items()))
    return (f"| {row['model']} | {row['names']} | {row['dataset']} | {row['shots']} | {row['zero_shot']:.3f} | "
            f"{row['auto']:.3f} | {methods} | {row['ece_before']:.3f} -> {row['ece_after']:.3f} "
            f"({row['ece_lowered']}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "outputs" / "fewshot")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    print("| model | names | images | shots | zero-shot top-1 | auto top-1 | auto chose | ECE before -> after "
          "(draws lowered) |\n|---|---|---|---|---|---|---|---|", flush=True)
    rows = measure(args.out, args.draws)
    (args.out / "fewshot.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
