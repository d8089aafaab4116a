"""The tiny models of the other families (SigLIP, SigLIP 2, MetaCLIP 2, AltCLIP, ALIGN) we ship as test fixtures
load and run through the plain Hugging Face API, offline; the trained tiny SigLIP really classifies, single- and
multi-label. (The random ones test plumbing only.) Made by ``jobs/make_fixtures.py`` with
``tests/helpers/fixtures_families.py``.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.labels import apply_template  # noqa: E402
from tests.helpers import ASSETS  # noqa: E402
from tests.helpers import fixtures as F  # noqa: E402
from tests.helpers import fixtures_families as FF  # noqa: E402
from tests.helpers import synthetic as S  # noqa: E402

pytestmark = pytest.mark.slow
KINDS = FF.FAMILIES
MODEL_DIRS = {k: ASSETS / FF.FAMILY_DIRS[k] for k in KINDS}
HELDOUT_SEED = 20240607  # the held-out set of test_fixture_models.py
HELDOUT_N = 150
MAX_BYTES = 2_000_000
# the tiny SigLIP's targets, on the held-out set, template "a photo of a _.", through the plain HF API
# (probabilities = sigmoid(logits_per_image); argmax for single-label, score > 0.5 for multi-label)
SINGLE_LABEL = {"shapes": 0.90, "colors": 0.90}
MULTI_LABEL_THRESHOLD = 0.5
MULTI_LABEL_MIN_F1 = 0.90


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run as fast on one thread, and a second one only adds contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def siglip():
    return FF.load_family(MODEL_DIRS["siglip"])


@pytest.fixture(scope="module")
def heldout(siglip):
    """The held-out images (sides 64..4000 px), rendered as test_fixture_models.py does, preprocessed by the
    tiny SigLIP's image processor."""
    items = F.heldout_items(HELDOUT_SEED, HELDOUT_N, max_side=4000)
    px = F.render_and_preprocess(np.random.default_rng(HELDOUT_SEED + 1), items,
                                 {"siglip": siglip[1].image_processor}, chunk=16)["siglip"]
    return items, px


def _images(seed: int, n: int, max_side: int = 600):
    rng = np.random.default_rng(seed)
    items = S.sample_items(rng, n, max_side=max_side)
    return items, list(S.render_items(rng, items))


@pytest.mark.parametrize("kind", KINDS)
def test_directory_loads_with_the_auto_classes(kind):
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer

    d = MODEL_DIRS[kind]
    size = F.dir_size(d)
    print(f"\n{kind}: {size / 1e6:.2f} MB: " + " ".join(sorted(p.name for p in d.iterdir())))
    assert 50_000 < size <= MAX_BYTES, (kind, size)
    for name in ("config.json", "model.safetensors", "processor_config.json", "preprocessor_config.json",
                 "tokenizer_config.json"):
        assert (d / name).is_file(), (kind, name)
    assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))
    assert json.loads((d / "config.json").read_text())["model_type"] == FF.MODEL_TYPES[kind]

    model = AutoModel.from_pretrained(d).eval()
    tokenizer = AutoTokenizer.from_pretrained(d)
    image_processor = AutoImageProcessor.from_pretrained(d, backend="pil")
    processor = AutoProcessor.from_pretrained(d)
    assert type(model).__name__ == FF.MODEL_CLASSES[kind]
    assert type(tokenizer).__name__ == type(processor.tokenizer).__name__ == FF.TOKENIZER_CLASSES[kind]
    assert type(image_processor).__name__ == type(processor.image_processor).__name__
    assert type(image_processor).__name__.endswith("Pil")

    # the processor end to end: texts and images in, one score per (image, text)
    _, images = _images(5, 3)
    texts = ["a photo of a red circle.", "a photo of a blue star."]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding="max_length", max_length=64,
                       truncation=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    # random models are not degenerate: different texts, different scores
    assert (logits[:, 0] - logits[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_hf_zero_shot_pipeline(kind):
    """transformers' own zero-shot pipeline runs on each directory (sigmoid scores for the SigLIPs)."""
    from transformers import pipeline

    items, images = _images(11, 6, max_side=1500)
    labels = S.labels("shapes") + S.labels("colors")
    clf = pipeline("zero-shot-image-classification", model=str(MODEL_DIRS[kind]), device="cpu")
    outs = [clf(img, candidate_labels=labels, hypothesis_template="a photo of a {}.") for img in images]
    for out in outs:
        assert sorted(o["label"] for o in out) == sorted(labels)
        scores = [o["score"] for o in out]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        if "siglip" not in kind:  # softmax over the labels; the SigLIPs score each label on its own
            assert abs(sum(scores) - 1) < 1e-4
    if kind == "siglip":  # the trained one: each image's shape and colour are its two best labels
        for it, out in zip(items, outs):
            assert {o["label"] for o in out[:2]} == {it.shape, it.color}, (it, out[:3])


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizers_know_the_labels(kind):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIRS[kind])
    langs = FF.FAMILY_LANGS[kind]
    texts = FF.corpus(langs)  # every caption, label and templated label of the model's languages
    assert FF.unknown_texts(tok, texts) == []
    assert FF.unknown_texts(tok, ["A PHOTO OF A BLUE STAR!", "zebra"]) == []
    if "zh" in langs:
        assert any("红色" in t for t in texts)
        ids = tok("一张红色圆形的照片。", add_special_tokens=False)["input_ids"]
        assert tok.decode(ids).replace(" ", "") == "一张红色圆形的照片。"
    if kind in ("metaclip2", "altclip", "align"):  # no byte fallback: the check itself is not vacuous
        assert FF.unknown_texts(tok, ["狗"]) == ["狗"]
    ids = tok("a photo of a red circle.")["input_ids"]
    decoded = tok.decode(ids, skip_special_tokens=True).replace(" .", ".")
    # SiglipTokenizer drops punctuation before encoding, as SigLIP was trained
    assert decoded == ("a photo of a red circle" if kind == "siglip" else "a photo of a red circle.")
    if kind in ("siglip", "siglip2"):
        assert ids[-1] == tok.eos_token_id  # SigLIP reads the last position
        assert len(tok(["red"], padding="max_length", max_length=64)["input_ids"][0]) == 64


@pytest.mark.parametrize("kind", SINGLE_LABEL)
def test_siglip_single_label_accuracy(siglip, heldout, kind):
    items, px = heldout
    model, processor = siglip
    acc = FF.single_label_accuracy(model, processor, px, items, kind, S.EN_TEMPLATE)
    pairs = FF.single_label_accuracy(model, processor, px, items, "pairs", S.EN_TEMPLATE)
    print(f"\ntiny-siglip held-out top-1: {kind} {100 * acc:.1f}% (pairs {100 * pairs:.1f}%)")
    assert acc >= SINGLE_LABEL[kind], (kind, acc)


def test_siglip_multi_label(siglip, heldout):
    """The 11 shape and colour labels at once: a label is on when its sigmoid score is above 0.5."""
    items, px = heldout
    model, processor = siglip
    rep = FF.multilabel_report(model, processor, px, items, MULTI_LABEL_THRESHOLD, S.EN_TEMPLATE)
    print(f"\ntiny-siglip multi-label at {MULTI_LABEL_THRESHOLD}: own shape and colour above it for "
          f"{100 * rep['both']:.1f}% of images, exactly them {100 * rep['exact']:.1f}%; F1 "
          + " ".join(f"{k} {v:.3f}" for k, v in rep["f1"].items()))
    for label, f1 in rep["f1"].items():
        assert f1 >= MULTI_LABEL_MIN_F1, (label, f1)
    assert rep["both"] >= 0.9


def test_siglip_scores_are_the_hf_pipeline_scores(siglip):
    """Our plain-API scoring (padded to 64 tokens) is what transformers' pipeline computes."""
    from transformers import pipeline

    _, images = _images(13, 2)
    labels = S.labels("colors")
    clf = pipeline("zero-shot-image-classification", model=str(MODEL_DIRS["siglip"]), device="cpu")
    model, processor = siglip
    ours = FF.sigmoid_scores(model, processor, images, [apply_template(S.EN_TEMPLATE, lab) for lab in labels])
    for img, row in zip(images, ours):
        out = {o["label"]: o["score"] for o in clf(img, candidate_labels=labels, hypothesis_template="a photo of a {}.")}
        assert np.allclose([out[lab] for lab in labels], row.numpy(), atol=1e-5)


def test_builds_are_deterministic(tmp_path):
    """The fixture code gives the same bytes for the same seed (a random family, and a few SigLIP training steps
    with its tokenizer training), other weights for another seed."""
    import hashlib

    def digest(d):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}

    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        FF.build_random("metaclip2", tmp_path / name / "metaclip2", seed)
        FF.build_siglip(tmp_path / name / "siglip", steps=2, seed=seed, n_pool=32, log_every=0)
        runs[name] = {k: digest(tmp_path / name / k) for k in ("metaclip2", "siglip")}
    assert runs["a"] == runs["b"]
    for k in ("metaclip2", "siglip"):
        assert runs["c"][k]["model.safetensors"] != runs["a"][k]["model.safetensors"]
