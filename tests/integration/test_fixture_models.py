"""The tiny CLIP / Chinese-CLIP models we train and ship as test fixtures really work.

Everything goes through the plain Hugging Face API (not our pipeline), offline.
"""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from pipeline.labels import apply_template  # noqa: E402
from tests.helpers import ASSETS, ROOT  # noqa: E402
from tests.helpers import fixtures as F  # noqa: E402
from tests.helpers import synthetic as S  # noqa: E402

pytestmark = pytest.mark.slow
MODEL_DIRS = {"clip": ASSETS / F.CLIP_DIR, "chinese_clip": ASSETS / F.CHINESE_CLIP_DIR}
LANGS = {"clip": ("en",), "chinese_clip": ("zh", "en")}
HELDOUT_SEED = 20240607
HELDOUT_N = 150  # 5 per (colour, shape) pair
MAX_MB = 5.0

# Issue 2's targets, with the template. On this held-out set the shipped models reach 93.3% (CLIP) and 94.0%
# (Chinese-CLIP, zh and en labels) on shapes and on pairs, 100% on colours; bare labels the same.
THRESHOLDS = {"shapes": 0.90, "colors": 0.90, "pairs": 0.80}
BARE_THRESHOLDS = {"shapes": 0.85, "colors": 0.85, "pairs": 0.75}  # bare label, no template


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(2)
    return {k: F.load_model(d) for k, d in MODEL_DIRS.items()}


@pytest.fixture(scope="module")
def heldout(loaded):
    """Held-out images (new seed, sides 64..4000 px), rendered once and preprocessed per model."""
    items = F.heldout_items(HELDOUT_SEED, HELDOUT_N, max_side=4000)
    px = F.render_and_preprocess(np.random.default_rng(HELDOUT_SEED + 1), items,
                                 {k: proc.image_processor for k, (_, proc) in loaded.items()}, chunk=16)
    return items, px


def test_heldout_set_spans_sizes(heldout):
    items, px = heldout
    sides = [max(it.width, it.height) for it in items]
    assert min(min(it.width, it.height) for it in items) >= 64
    assert max(sides) == 4000 and min(sides) < 128
    assert sum(s > 1000 for s in sides) >= 10
    assert {(it.shape, it.color) for it in items} == set(S.pairs())
    assert px["clip"].shape == (HELDOUT_N, 3, 64, 64)
    assert px["chinese_clip"].shape == (HELDOUT_N, 3, 48, 48)  # deliberately not the same input size


@pytest.mark.parametrize("kind,lang", [("clip", "en"), ("chinese_clip", "zh"), ("chinese_clip", "en")])
def test_zero_shot_accuracy(loaded, heldout, kind, lang):
    items, px = heldout
    model, proc = loaded[kind]
    template = S.EN_TEMPLATE if lang == "en" else S.ZH_TEMPLATE
    accs = {}
    for mode, tpl, thr in (("template", template, THRESHOLDS), ("bare", None, BARE_THRESHOLDS)):
        for label_kind in ("shapes", "colors", "pairs"):
            labels = S.labels(label_kind, lang)
            truths = [S.truth_label(label_kind, it.shape, it.color, lang) for it in items]
            acc = F.zero_shot_accuracy((model, proc), px[kind], truths, labels, tpl)
            accs[(mode, label_kind)] = acc
        print(f"\n{kind:13s} labels={lang} {mode:8s} "
              + "  ".join(f"{lk} {100 * accs[(mode, lk)]:5.1f}%" for lk in ("shapes", "colors", "pairs")))
    for (mode, label_kind), acc in accs.items():
        thr = (THRESHOLDS if mode == "template" else BARE_THRESHOLDS)[label_kind]
        assert acc >= thr, f"{kind} {lang} {mode} {label_kind}: {acc:.3f} < {thr}"


def test_zero_shot_accuracy_from_directory_and_pil_images():
    """The documented entry point: a model directory and PIL images (incl. a 4000 px one)."""
    rng = np.random.default_rng(7)
    items = [S.Item("star", "red", 4000, 3000), S.Item("circle", "blue", 64, 64),
             S.Item("cross", "green", 300, 600), S.Item("triangle", "yellow", 1200, 900)]
    images = list(S.render_items(rng, items))
    acc = F.zero_shot_accuracy(MODEL_DIRS["clip"], images, [f"{it.color} {it.shape}" for it in items],
                               S.pair_labels("en"), S.EN_TEMPLATE)
    assert acc >= 0.75
    acc_zh = F.zero_shot_accuracy(MODEL_DIRS["chinese_clip"], images,
                                  [S.pair_label(it.shape, it.color, "zh") for it in items],
                                  S.pair_labels("zh"), S.ZH_TEMPLATE)
    assert acc_zh >= 0.75


def test_model_directories(loaded):
    for kind, d in MODEL_DIRS.items():
        size_mb = F.dir_size(d) / 1e6
        print(f"\n{kind}: {size_mb:.2f} MB")
        assert 0.1 < size_mb < MAX_MB, (kind, size_mb)
        for name in ("model.safetensors", "config.json", "processor_config.json", "preprocessor_config.json",
                     "tokenizer_config.json"):
            assert (d / name).is_file(), (kind, name)
        import json

        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == kind
        model, proc = loaded[kind]
        assert model.config.model_type == kind
        assert type(model).__name__ == {"clip": "CLIPModel", "chinese_clip": "ChineseCLIPModel"}[kind]
        assert type(proc).__name__ == {"clip": "CLIPProcessor", "chinese_clip": "ChineseCLIPProcessor"}[kind]
    # CLIP tokenizer files in OpenAI's format
    d = MODEL_DIRS["clip"]
    import json

    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    byte_chars = F.bytes_to_unicode().values()
    assert all(c in vocab and c + "</w>" in vocab for c in byte_chars)
    assert (d / "merges.txt").read_text(encoding="utf-8").startswith("#version")
    assert loaded["clip"][0].config.text_config.max_position_embeddings >= 77
    assert loaded["clip"][0].config.text_config.eos_token_id == vocab[F.EOS]
    zh_vocab = (MODEL_DIRS["chinese_clip"] / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert zh_vocab[:5] == F.BERT_SPECIALS


def _all_texts(lang):
    texts = [c.text for c in S.all_captions(lang)]
    for kind in ("shapes", "colors", "pairs"):
        labels = S.labels(kind, lang)
        tpl = S.EN_TEMPLATE if lang == "en" else S.ZH_TEMPLATE
        texts += labels + [apply_template(tpl, lab) for lab in labels]
    return texts


def test_tokenizer_round_trip():
    from transformers import AutoTokenizer, BertTokenizer, CLIPTokenizer, CLIPTokenizerFast

    texts = _all_texts("en") + ["This is a photo of red circle.", "A PHOTO OF A BLUE STAR!"]
    for cls in (CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer):
        tok = cls.from_pretrained(MODEL_DIRS["clip"])
        assert F.unknown_tokens(tok, texts) == []
        ids = tok("a photo of a red circle.")["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in ids[1:-1]
        assert tok.decode(ids, skip_special_tokens=True) == "a photo of a red circle ."
        # 77-token truncation as in real CLIP
        long = tok(" ".join(["red"] * 200), truncation=True)["input_ids"]
        assert len(long) == 77 and long[-1] == tok.eos_token_id
        # unseen words and other scripts fall back to bytes, never to the unknown token
        assert F.unknown_tokens(tok, ["zebra", "红色圆形", "naïve café"]) == []
    zh_texts = _all_texts("zh") + _all_texts("en")
    for cls in (BertTokenizer, AutoTokenizer):
        tok = cls.from_pretrained(MODEL_DIRS["chinese_clip"])
        assert F.unknown_tokens(tok, zh_texts) == []
        toks = tok.convert_ids_to_tokens(tok("一张红色圆形的照片。")["input_ids"])
        assert toks == ["[CLS]", "一", "张", "红", "色", "圆", "形", "的", "照", "片", "。", "[SEP]"]
        assert F.unknown_tokens(tok, ["zebra"]) == []  # English falls back to ##letter pieces
        assert F.unknown_tokens(tok, ["狗"]) == ["狗"]  # the check itself is not vacuous


def test_hf_zero_shot_pipeline():
    """transformers' own zero-shot pipeline loads each shipped directory and agrees with the model."""
    from transformers import pipeline

    rng = np.random.default_rng(11)
    items = S.sample_items(rng, 12, max_side=1500)
    images = list(S.render_items(rng, items))
    cases = [("clip", "en", "This is a photo of {}."), ("clip", "en", "a photo of a {}."),
             ("chinese_clip", "zh", "一张{}的照片。"), ("chinese_clip", "en", "a photo of a {}.")]
    for kind, lang, template in cases:
        clf = pipeline("zero-shot-image-classification", model=str(MODEL_DIRS[kind]), device="cpu")
        labels = S.pair_labels(lang)
        outs = [clf(img, candidate_labels=labels, hypothesis_template=template) for img in images]
        for out in outs:
            assert len(out) == 30 and abs(sum(o["score"] for o in out) - 1) < 1e-4
            assert out[0]["score"] >= out[1]["score"]
        top = [out[0]["label"] for out in outs]
        # the same answer as model(**inputs).logits_per_image.argmax(-1) through the plain API
        model, proc = F.load_model(MODEL_DIRS[kind])
        ours = F.zero_shot_predictions(model, proc, images, labels, template.replace("{}", "_"))
        assert top == [labels[i] for i in ours.tolist()], (kind, template)
        correct = sum(t == S.pair_label(it.shape, it.color, lang) for t, it in zip(top, items))
        print(f"\nHF pipeline {kind} {template!r}: {correct}/{len(items)} pairs right")
        assert correct >= 10, (kind, template, top)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_script_end_to_end(tmp_path):
    """jobs/make_fixtures.py for a few steps: the saved models load and give probabilities."""
    from transformers import AutoProcessor, ChineseCLIPModel, CLIPModel

    out = tmp_path / "assets"
    cmd = [sys.executable, str(ROOT / "jobs" / "make_fixtures.py"), "--out", str(out),
           "--steps", "3", "--pool", "48", "--eval", "0", "--seed", "3"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 3/3" in r.stdout

    rng = np.random.default_rng(0)
    images = [S.render(rng, "square", "green", 200, 120), S.render(rng, "star", "orange", 64, 90)]
    for kind, cls, labels in (("clip", CLIPModel, ["a photo of a red circle.", "a photo of a green square."]),
                              ("chinese_clip", ChineseCLIPModel, ["一张红色圆形的照片。", "a photo of a star."])):
        d = out / (F.CLIP_DIR if kind == "clip" else F.CHINESE_CLIP_DIR)
        model = cls.from_pretrained(d).eval()
        proc = AutoProcessor.from_pretrained(d)
        assert model.config.model_type == kind
        inputs = proc(text=labels, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            probs = model(**inputs).logits_per_image.softmax(-1)
        assert probs.shape == (2, 2)
        assert torch.allclose(probs.sum(-1), torch.ones(2), atol=1e-5)
        assert torch.isfinite(probs).all() and (probs > 0).all()
        assert F.dir_size(d) < MAX_MB * 1e6

    # the sample set is produced too, and consistent
    _check_sample(out / F.SAMPLE_DIR)


def test_training_is_deterministic(tmp_path):
    for run in ("a", "b"):
        F.make_all(tmp_path / run, steps=2, seed=5, only="clip", n_pool=32, eval_n=0)
    fa, fb = (tmp_path / r / F.CLIP_DIR / "model.safetensors" for r in ("a", "b"))
    assert _sha(fa) == _sha(fb)
    F.make_all(tmp_path / "c", steps=2, seed=6, only="clip", n_pool=32, eval_n=0)
    assert _sha(tmp_path / "c" / F.CLIP_DIR / "model.safetensors") != _sha(fa)


def _check_sample(root: Path):
    from PIL import Image

    images = sorted(p.name for p in (root / "images").iterdir())
    with open(root / "truth.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["path", "shape", "color"]
    for r in rows:
        assert r["path"] in images
        assert r["shape"] in S.SHAPES and r["color"] in S.COLORS
    assert {(r["shape"], r["color"]) for r in rows} == set(S.pairs())
    exts = {Path(p).suffix for p in images}
    assert {".jpg", ".png", ".webp"} <= exts
    modes = set()
    for p in images:
        with Image.open(root / "images" / p) as im:
            modes.add(im.mode)
            assert 64 <= min(im.size) and max(im.size) <= 4000
    assert {"RGB", "L", "P"} <= modes
    for name, kind, lang in (("shapes", "shapes", "en"), ("colors", "colors", "en"), ("pairs", "pairs", "en"),
                             ("shapes_zh", "shapes", "zh"), ("colors_zh", "colors", "zh"),
                             ("pairs_zh", "pairs", "zh")):
        lines = (root / "labels" / f"{name}.txt").read_text(encoding="utf-8").splitlines()
        assert lines == S.labels(kind, lang)
    assert F.dir_size(root) < 3.5e6


def test_shipped_sample_set():
    _check_sample(ASSETS / F.SAMPLE_DIR)
    n = len(list((ASSETS / F.SAMPLE_DIR / "images").iterdir()))
    assert 30 <= n <= 60


def test_render_contract():
    rng = np.random.default_rng(0)
    import time

    t = time.perf_counter()
    img = S.render(rng, "star", "purple", 4000, 3000)
    assert time.perf_counter() - t < 1.0
    assert img.mode == "RGB" and img.size == (4000, 3000)
    small = S.render(rng, "circle", "red", 64, 64)
    assert small.size == (64, 64)
    # same seed, same pixels
    a = S.render(np.random.default_rng(1), "cross", "orange", 130, 70)
    b = S.render(np.random.default_rng(1), "cross", "orange", 130, 70)
    assert a.tobytes() == b.tobytes()
    # the shape stays in the central square: the side strips are background only
    wide = np.asarray(S.render(np.random.default_rng(2), "square", "red", 400, 100)).astype(int)
    strips = np.concatenate([wide[:, :140], wide[:, -140:]], axis=1)
    red = (strips[..., 0] > 150) & (strips[..., 1] < 90) & (strips[..., 2] < 90)
    assert not red.any()
    centre = wide[:, 150:250]
    assert ((centre[..., 0] > 150) & (centre[..., 1] < 90) & (centre[..., 2] < 90)).sum() > 100
    # captions
    en = {c.text for c in S.all_captions("en")}
    zh = {c.text for c in S.all_captions("zh")}
    for t_ in ("a photo of a red circle.", "red circle", "a photo of a red.", "a photo of a circle.", "circle",
               "red", "something red", "this is a photo of red circle."):
        assert t_ in en, t_
    for t_ in ("一张红色圆形的照片。", "红色圆形", "一张红色的照片。", "一张圆形的照片。", "红色", "圆形"):
        assert t_ in zh, t_
    c = S.caption(np.random.default_rng(0), "star", "blue", "en")
    assert c.shape in ("star", None) and c.color in ("blue", None) and (c.shape or c.color)
