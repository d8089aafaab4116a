"""Every zero-shot dual encoder family transformers ships, scored as its reference scores it: our probabilities
equal `model(**inputs).logits_per_image` through softmax or sigmoid (the family's), within 1e-4, and our top-1
labels equal the HF zero-shot pipeline's; language checks per tokenizer; multi-label mode; hub ids from the cache."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import workflow
from pipeline.config import quote_override_value
from pipeline.errors import UserError
from pipeline.families import FAMILIES, canonical_text
from pipeline.imaging import decode
from tests.helpers import ASSETS, JOB, QUIET, SAMPLE_IMAGES, log_of, run

pytestmark = pytest.mark.slow
MODELS = {"clip": "tiny-clip", "chinese_clip": "tiny-chinese-clip", "siglip": "tiny-siglip",
          "siglip2": "tiny-siglip2", "metaclip_2": "tiny-metaclip2", "altclip": "tiny-altclip", "align": "tiny-align"}
LABELS = ["circle", "square", "triangle", "star", "cross"]
TEMPLATE = "a photo of a _."


def model_dir(family: str):
    return ASSETS / "models" / MODELS[family]


def _classify(compose, family: str, *overrides: str, labels=LABELS, out="out"):
    return workflow.run(compose(f"model.path={model_dir(family)}", "labels=custom",
                                f"labels.list={quote_override_value(','.join(labels))}",
                                f"labels.template={quote_override_value(TEMPLATE)}", "dataset.truth=null",
                                *overrides, out=out, cache=f"cache-{family}"))


def _reference(family: str, images, prompts) -> np.ndarray:
    import transformers

    spec = FAMILIES[family]
    path = model_dir(family)
    model = getattr(transformers, spec.model_class).from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    processor = transformers.AutoImageProcessor.from_pretrained(path, backend="pil")
    text = tokenizer(prompts, return_tensors="pt", **spec.text)
    pixels = processor(images=images, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**text, **pixels).logits_per_image
    return (torch.sigmoid(logits) if spec.scoring == "sigmoid" else logits.softmax(-1)).numpy()


@pytest.mark.parametrize("family", list(MODELS))
def test_probabilities_and_labels_equal_the_references(compose, family):
    summary = _classify(compose, family, "encode.batch_size=5")
    assert summary.classified == summary.discovered == 38
    table = pq.read_table(summary.out_dir / "predictions.parquet").to_pandas()
    ours = np.stack(table["probs"].to_numpy())
    spec = FAMILIES[family]
    prompts = [TEMPLATE.replace("_", label) for label in LABELS]
    prompts = [canonical_text(p) for p in prompts] if spec.canonical else prompts  # as the reference feeds them
    images = [decode(SAMPLE_IMAGES / p) for p in table["path"]]
    reference = _reference(family, images, prompts)
    assert np.abs(ours - reference).max() < 1e-4, family
    if spec.scoring == "softmax":
        assert np.allclose(ours.sum(1), 1, atol=1e-5)
    from transformers import pipeline as hf_pipeline

    zero_shot = hf_pipeline("zero-shot-image-classification", model=str(model_dir(family)))
    for image, label in list(zip(images, table["label"]))[:10]:
        # the prompts as candidate labels, the template "{}": the pipeline sees exactly our text
        best = zero_shot(image, candidate_labels=prompts, hypothesis_template="{}")[0]["label"]
        assert LABELS[prompts.index(best)] == label, family


@pytest.mark.parametrize("family,chinese", [("align", False), ("siglip", False), ("clip", False),
                                            ("siglip2", True), ("metaclip_2", True), ("altclip", True),
                                            ("chinese_clip", True)])
def test_languages_per_tokenizer(compose, family, chinese):
    labels = ["圆形", "正方形"]
    if chinese:
        summary = _classify(compose, family, labels=labels)
        assert set(json.loads((summary.out_dir / "res.json").read_text(encoding="utf-8")).values()) <= set(labels)
    else:
        with pytest.raises(UserError, match=rf"\({family}\) is English-only"):
            _classify(compose, family, labels=labels)


def test_multilabel_on_pairs_with_the_tiny_siglip(compose, tmp_path):
    """Shapes and colours as 11 labels: each image's shape and colour both score above the threshold."""
    from tests.integration.test_evaluation import HELDOUT_N, HELDOUT_SEED
    from tests.helpers import fixtures as F
    from tests.helpers import synthetic as S

    root = tmp_path / "heldout"
    items = F.heldout_items(HELDOUT_SEED, HELDOUT_N, max_side=1000)
    rows = []
    for i, (item, img) in enumerate(zip(items, S.render_items(np.random.default_rng(HELDOUT_SEED + 1), items))):
        (root / "images").mkdir(parents=True, exist_ok=True)
        img.save(root / "images" / f"{i:03d}.png", compress_level=1)
        rows.append({"path": f"{i:03d}.png", "shape": item.shape, "color": item.color})
    pd.DataFrame(rows).to_csv(root / "truth.csv", index=False)
    labels = S.labels("shapes") + S.labels("colors")
    summary = _classify(compose, "siglip", "classify.mode=multilabel", f"dataset.path={root / 'images'}",
                        f"dataset.truth={root / 'truth.csv'}", "dataset.truth_column=shape+color", labels=labels)
    metrics = pd.read_parquet(summary.out_dir / "metrics.parquet")
    f1 = metrics[(metrics.scope == "class") & (metrics.metric == "f1")].set_index("label")["value"]
    print("\nper-label F1:", {k: round(v, 3) for k, v in f1.items()})
    assert len(f1) == 11 and (f1 >= 0.9).all(), f1
    predictions = pd.read_parquet(summary.out_dir / "predictions.parquet")
    truth = {r["path"]: {r["shape"], r["color"]} for r in rows}
    both = np.mean([truth[p] <= set(found) for p, found in zip(predictions["path"], predictions["labels"])])
    assert both >= 0.9
    res = json.loads((summary.out_dir / "res.json").read_text())
    assert all(isinstance(v, list) for v in res.values())
    overall = metrics[metrics.scope == "overall"].set_index("metric")["value"]
    assert overall["mAP"] >= 0.9 and overall["threshold"] == 0.5


def test_multilabel_is_refused_for_softmax_families(compose):
    with pytest.raises(UserError, match="softmax makes the labels compete"):
        _classify(compose, "clip", "classify.mode=multilabel")


def test_draft_decoding_refused_for_variable_patch_models(compose):
    with pytest.raises(UserError, match="variable number of patches"):
        _classify(compose, "siglip2", "preprocess.draft=true")


def test_hub_id_from_the_local_cache_or_a_clear_error(tmp_path):
    """MODEL=org/name resolves through the Hugging Face cache when the snapshot is there; never downloads."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-clip" / "snapshots" / "0123abcd"
    shutil.copytree(ASSETS / "models" / "tiny-clip", snapshot)
    (cache / "models--tiny-org--tiny-clip" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-clip" / "refs" / "main").write_text("0123abcd")
    args = [sys.executable, str(JOB), "dataset=sample", "labels=shapes", f"hydra.run.dir={tmp_path / 'o'}",
            f"cache_dir={tmp_path / 'c'}", *QUIET]
    ok = run(args + ["model.path=tiny-org/tiny-clip"], env={"HF_HUB_CACHE": str(cache)})
    assert ok.returncode == 0, log_of(ok)[-2000:]
    assert len(json.loads((tmp_path / "o" / "res.json").read_text())) == 38
    missing = run(args + ["model.path=tiny-org/not-downloaded"], env={"HF_HUB_CACHE": str(cache)})
    assert missing.returncode == 2
    assert "huggingface-cli download tiny-org/not-downloaded" in log_of(missing)
    assert "nothing is downloaded at run time" in log_of(missing)
