"""Make the project's test fixtures: tiny real CLIP / Chinese-CLIP models and a sample image set.

No real CLIP weights can be downloaded here, so we train our own tiny ones on the
synthetic shapes of :mod:`tests.helpers.synthetic`, in the real Hugging Face formats:

* ``tiny-clip``: ``CLIPModel`` + CLIP byte-level BPE tokenizer (``vocab.json`` /
  ``merges.txt`` in OpenAI's format) + ``CLIPImageProcessor`` (shortest-side resize, centre crop).
* ``tiny-chinese-clip``: ``ChineseCLIPModel`` + BERT WordPiece ``vocab.txt`` (Chinese and
  English) + ``ChineseCLIPImageProcessor`` with the class defaults (shortest-side resize, centre crop) at
  48 px, a different size from tiny-clip's 64 so that a mix-up of the two processors shows. (OFA-Sys'
  released models resize to a 224x224 square without a crop; tests/unit/test_imaging.py covers that setting.)

Entry point: ``jobs/make_fixtures.py``.  Everything is deterministic for a given seed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.labels import PLACEHOLDER, apply_template

from . import synthetic as S

CLIP_DIR = "models/tiny-clip"
CHINESE_CLIP_DIR = "models/tiny-chinese-clip"
SAMPLE_DIR = "sample"

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _log(msg: str) -> None:
    print(msg, flush=True)


# ====================================================================== tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_pretokenize(texts: Iterable[str]) -> dict[str, int]:
    """Byte-level words (as CLIPTokenizer's normaliser + pre-tokeniser see them) with counts."""
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # empty vocab; only normaliser/pre-tokeniser used
    counts: dict[str, int] = {}
    for t in texts:
        norm = backend.normalizer.normalize_str(t)
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(norm):
            counts[word] = counts.get(word, 0) + 1
    return counts


def train_clip_bpe(texts: Iterable[str], max_merges: int = 2000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE in OpenAI CLIP's format.

    Vocabulary order as in CLIP: the 256 byte characters, the same with ``</w>``, then one
    token per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (the largest id).
    Merges continue until every training word is a single token (or ``max_merges``);
    ties are broken lexicographically, so the result is deterministic.
    """
    counts = _clip_pretokenize(texts)
    words = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(counts)}
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pair_counts: dict[tuple[str, str], int] = {}
        for w, syms in words.items():
            for p in zip(syms, syms[1:]):
                pair_counts[p] = pair_counts.get(p, 0) + counts[w]
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for w, syms in words.items():
            if len(syms) < 2:
                continue
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = tuple(out)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_clip_tokenizer(out_dir: str | os.PathLike, vocab: dict[str, int], merges: list[tuple[str, str]],
                        model_max_length: int = 77):
    """Write ``vocab.json`` + ``merges.txt`` (OpenAI format) and the transformers tokenizer files."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m) for m in merges], model_max_length=model_max_length)
    return tok


def build_bert_vocab(texts: Iterable[str]) -> list[str]:
    """A small BERT WordPiece vocabulary: specials, punctuation, digits, letters and ``##``
    letter pieces (so no ASCII word is ever unknown), every CJK character and every whole
    word of ``texts``."""
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    words: set[str] = set()
    for t in texts:
        for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)):
            words.add(w)
    ascii_punct = [chr(c) for c in range(33, 127) if not chr(c).isalnum()]
    cjk_punct = list("。，、！？：；“”‘’（）《》【】—…·「」")
    base = ascii_punct + cjk_punct + [str(d) for d in range(10)] + [chr(c) for c in range(97, 123)]
    pieces = ["##" + str(d) for d in range(10)] + ["##" + chr(c) for c in range(97, 123)]
    vocab = list(BERT_SPECIALS)
    seen = set(vocab)
    for t in base + pieces + sorted(words):
        if t not in seen:
            vocab.append(t)
            seen.add(t)
    return vocab


def save_bert_tokenizer(out_dir: str | os.PathLike, vocab: list[str], model_max_length: int = 77):
    from transformers import BertTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=model_max_length)


def unknown_tokens(tokenizer, texts: Sequence[str]) -> list[str]:
    """Texts whose encoding contains the unknown token (CLIP: ``<|endoftext|>`` anywhere but at the end)."""
    bad = []
    unk = tokenizer.unk_token_id
    for t in texts:
        ids = tokenizer(t, truncation=True)["input_ids"]
        body = ids[1:-1]  # strip BOS/CLS and EOS/SEP
        if unk in body or len(body) == 0:
            bad.append(t)
    return bad


# ====================================================================== models


@dataclass
class TinySpec:
    kind: str  # "clip" or "chinese_clip"
    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_mlp: int = 128
    text_hidden: int = 64
    text_layers: int = 2
    text_mlp: int = 128
    heads: int = 4
    projection_dim: int = 64
    max_positions: int = 77
    langs: tuple[str, ...] = ("en",)


def clip_spec() -> TinySpec:
    return TinySpec("clip", langs=("en",))


def chinese_clip_spec() -> TinySpec:
    # a different input size from tiny-clip, so that mixing up the two processors shows
    return TinySpec("chinese_clip", image_size=48, patch_size=12, langs=("zh", "en"))


def make_image_processor(spec: TinySpec):
    if spec.kind == "clip":
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(size={"shortest_edge": spec.image_size},
                                     crop_size={"height": spec.image_size, "width": spec.image_size})
    from transformers import ChineseCLIPImageProcessorPil

    # the class defaults (shortest-side resize + centre crop), scaled down
    return ChineseCLIPImageProcessorPil(size={"shortest_edge": spec.image_size},
                                        crop_size={"height": spec.image_size, "width": spec.image_size})


def make_model(spec: TinySpec, tokenizer):
    vision = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_mlp,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.heads,
                  image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.projection_dim)
    if spec.kind == "clip":
        from transformers import CLIPConfig, CLIPModel

        text = dict(vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_mlp,
                    num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
                    max_position_embeddings=spec.max_positions, projection_dim=spec.projection_dim,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection_dim)
        return CLIPModel(cfg)
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=spec.text_hidden, intermediate_size=spec.text_mlp,
                num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
                max_position_embeddings=spec.max_positions, pad_token_id=tokenizer.pad_token_id,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = ChineseCLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.projection_dim)
    return ChineseCLIPModel(cfg)


def make_processor(spec: TinySpec, image_processor, tokenizer):
    if spec.kind == "clip":
        from transformers import CLIPProcessor

        return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    from transformers import ChineseCLIPProcessor

    return ChineseCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_model(model_dir: str | os.PathLike):
    """(model, processor) from a saved directory, eval mode, via the plain HF API."""
    from transformers import AutoConfig, AutoProcessor, ChineseCLIPModel, CLIPModel

    cfg = AutoConfig.from_pretrained(model_dir)
    cls = {"clip": CLIPModel, "chinese_clip": ChineseCLIPModel}[cfg.model_type]
    model = cls.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    return model, processor


# ====================================================================== training data


def training_items(rng: np.random.Generator, n: int) -> list[S.Item]:
    """Mostly small images near the model's input size, some larger ones, aspect up to 2:1."""
    items = S.sample_items(rng, n, min_side=64, max_side=160)
    out = []
    for it in items:
        u = rng.random()
        if u < 0.25:
            w, h = S.sample_size(rng, 64, 700)
        elif u < 0.4:
            w = h = int(rng.integers(64, 110))
        else:
            w, h = it.width, it.height
        out.append(S.Item(it.shape, it.color, w, h))
    return out


def render_and_preprocess(rng: np.random.Generator, items: Sequence[S.Item],
                          processors: dict[str, Callable], chunk: int = 64, raw: bool = False) -> dict[str, torch.Tensor]:
    """Render each item once and run it through every processor; returns pixel_values per processor.

    Streams in chunks so large (4000 px) images never pile up in memory.  ``raw``: stop before
    rescaling/normalising and keep uint8 (4x less memory; see :func:`normalizer`).
    """
    kw = {"do_rescale": False, "do_normalize": False} if raw else {}
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in processors}
    for start in range(0, len(items), chunk):
        imgs = list(S.render_items(rng, items[start:start + chunk]))
        for k, p in processors.items():
            px = p(images=imgs, return_tensors="pt", **kw)["pixel_values"]
            outs[k].append(px.round().to(torch.uint8) if raw else px)
        del imgs
    return {k: torch.cat(v) for k, v in outs.items()}


def normalizer(image_processor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The processor's rescale + normalise, for uint8 pixels from ``render_and_preprocess(raw=True)``."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
    factor = float(image_processor.rescale_factor)
    return lambda x: (x.to(torch.float32) * factor - mean) / std


@dataclass
class CaptionBank:
    """All captions of the training languages, pre-tokenised, with the attributes they name."""
    texts: list[str]
    shape_idx: torch.Tensor  # -1: caption names no shape
    color_idx: torch.Tensor  # -1: caption names no colour
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    by_pair: dict[tuple[int, int], list[np.ndarray]] = field(default_factory=dict)  # (s, c) -> [pair, colour, shape] ids
    # kind -> list of caption-id arrays, one per phrasing (and language), in class order
    class_sets: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def build(cls, tokenizer, langs: Sequence[str]) -> "CaptionBank":
        caps = [c for lang in langs for c in S.all_captions(lang)]
        shapes, colors = list(S.SHAPES), list(S.COLORS)
        s_idx = torch.tensor([shapes.index(c.shape) if c.shape else -1 for c in caps])
        c_idx = torch.tensor([colors.index(c.color) if c.color else -1 for c in caps])
        enc = tokenizer([c.text for c in caps], padding=True, truncation=True, return_tensors="pt")
        bank = cls([c.text for c in caps], s_idx, c_idx, enc["input_ids"], enc["attention_mask"])
        sn, cn = s_idx.numpy(), c_idx.numpy()
        for si in range(len(shapes)):
            for ci in range(len(colors)):
                both = np.flatnonzero((sn == si) & (cn == ci))
                conly = np.flatnonzero((sn == -1) & (cn == ci))
                sonly = np.flatnonzero((sn == si) & (cn == -1))
                bank.by_pair[(si, ci)] = [both, conly, sonly]
        index = {c: i for i, c in enumerate(caps)}
        for lang in langs:
            for kind, group in S.caption_sets(lang):
                bank.class_sets.setdefault(kind, []).append(np.array([index[c] for c in group]))
        return bank

    def sample(self, rng: np.random.Generator, s: int, c: int) -> int:
        group = self.by_pair[(s, c)][rng.choice(3, p=[0.5, 0.25, 0.25])]
        return int(group[rng.integers(len(group))])


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Label-preserving: random horizontal flips and 90-degree rotations (square inputs)."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    k = int(torch.randint(0, 4, (1,), generator=g))
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def _text_features(model, ids, mask):
    return model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output


def _image_features(model, pixel_values):
    return model.get_image_features(pixel_values=pixel_values).pooler_output


def add_class_losses(loss, logits, uniq, sets, si, ci, cls_weight: float, aux, aux_weight: float, img_raw):
    """`loss` plus the image-vs-all-classes terms of each kind (5 shapes, 6 colours, 30 pairs) in this step's
    phrasing, and the auxiliary linear heads' (added in this order: the fixtures are bit-reproducible)."""
    col = {int(c): j for j, c in enumerate(uniq)}
    targets = {"shapes": si, "colors": ci, "pairs": si + len(S.SHAPES) * ci}
    for kind, ids_ in sets.items():
        cols = torch.tensor([col[int(c)] for c in ids_])
        loss = loss + cls_weight * F.cross_entropy(logits[:, cols], targets[kind]) / len(sets)
    if aux_weight:
        loss = loss + aux_weight * (F.cross_entropy(aux["shapes"](img_raw), si)
                                    + F.cross_entropy(aux["colors"](img_raw), ci)) / 2
    return loss


def optimiser_step(loss, model, opt, sched, named, non_finite: str) -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(non_finite)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100.0))


def train(spec: TinySpec, model, tokenizer, pixels: torch.Tensor, shape_idx: torch.Tensor,
          color_idx: torch.Tensor, steps: int, seed: int, batch_size: int = 128, lr: float = 3e-3,
          cls_weight: float = 1.0, aux_weight: float = 1.0, normalize: Callable | None = None,
          log_every: int = 500) -> float:
    """Train ``model`` in place; returns the seconds spent.

    Loss per step, on a batch of ``batch_size`` images (random flips / 90-degree turns):

    * CLIP's symmetric contrastive loss between the images and one random caption per image
      (naming the colour, the shape or both), with multi-positive targets: caption i matches
      image j whenever j has every attribute caption i names;
    * ``cls_weight`` x cross-entropy of each image against all classes of each kind (5 shapes,
      6 colours, 30 pairs) written in one random phrasing: the zero-shot task itself;
    * ``aux_weight`` x cross-entropy of throw-away linear shape/colour heads on the image
      embedding (not saved): the contrastive terms alone find shape features slowly.

    ``pixels``: normalised pixel values, or uint8 ones with ``normalize`` (see :func:`normalizer`).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    bank = CaptionBank.build(tokenizer, spec.langs)
    aux = torch.nn.ModuleDict({"shapes": torch.nn.Linear(spec.projection_dim, len(S.SHAPES)),
                               "colors": torch.nn.Linear(spec.projection_dim, len(S.COLORS))})
    named = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    warm = max(1, min(100, steps // 10))

    def schedule(k):  # linear warm-up, cosine decay to 0
        return min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / max(steps, 1)))

    if normalize is None:
        normalize = lambda x: x  # noqa: E731  (pixels already normalised)
    model.train()
    n = pixels.shape[0]
    t0 = time.time()
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(n, size=min(batch_size, n), replace=False))
        x = _augment(normalize(pixels[idx]), g)
        si, ci = shape_idx[idx], color_idx[idx]
        cap = np.array([bank.sample(rng, int(a), int(b)) for a, b in zip(si, ci)])
        # one random phrasing per kind, applied to every class: a classification-style contrast
        sets = {k: v[rng.integers(len(v))] for k, v in bank.class_sets.items()}
        uniq = np.unique(np.concatenate([cap] + list(sets.values())))
        u = torch.from_numpy(uniq)
        ids, mask = bank.input_ids[u], bank.attention_mask[u]
        keep = int(mask.sum(1).max())
        txt = F.normalize(_text_features(model, ids[:, :keep], mask[:, :keep]), dim=-1)
        img_raw = _image_features(model, x)
        img = F.normalize(img_raw, dim=-1)
        scale = model.logit_scale.exp().clamp(max=100.0)
        logits = scale * img @ txt.T  # [B images, U captions]
        cs, cc = bank.shape_idx[u], bank.color_idx[u]
        pos = (((cs[None, :] == -1) | (cs[None, :] == si[:, None]))
               & ((cc[None, :] == -1) | (cc[None, :] == ci[:, None]))).float()
        loss_i = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        has = pos.sum(0) > 0  # captions with at least one matching image in the batch
        loss_t = -(pos[:, has] / pos[:, has].sum(0, keepdim=True) * logits[:, has].log_softmax(0)).sum(0).mean()
        loss = (loss_i + loss_t) / 2
        loss = add_class_losses(loss, logits, uniq, sets, si, ci, cls_weight, aux, aux_weight, img_raw)
        optimiser_step(loss, model, opt, sched, named, f"{spec.kind}: non-finite loss at step {step + 1}")
        if log_every and (step % log_every == 0 or step == steps - 1):
            _log(f"  [{spec.kind}] step {step + 1}/{steps} loss {loss.item():.4f} "
                 f"scale {scale.item():.1f} ({time.time() - t0:.0f}s)")
    model.eval()
    return time.time() - t0


# ====================================================================== evaluation


@torch.no_grad()
def zero_shot_predictions(model, processor, images, labels: Sequence[str], template: str | None = S.EN_TEMPLATE,
                          batch_size: int = 64) -> torch.Tensor:
    """Top-1 label index per image via ``model(**inputs).logits_per_image.argmax(-1)``.

    ``images``: a list of PIL images, or precomputed ``pixel_values`` (a tensor) from this processor.
    """
    texts = [apply_template(template or PLACEHOLDER, lab) for lab in labels]
    text_inputs = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    preds = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if isinstance(chunk, torch.Tensor):
            pixel_values = chunk
        else:
            pixel_values = processor(images=list(chunk), return_tensors="pt")["pixel_values"]
        out = model(**text_inputs, pixel_values=pixel_values)
        preds.append(out.logits_per_image.argmax(-1))
    return torch.cat(preds)


def zero_shot_accuracy(model_dir, images, truths: Sequence[str], labels: Sequence[str],
                       template: str | None = S.EN_TEMPLATE) -> float:
    """Top-1 zero-shot accuracy through the plain Hugging Face API.

    ``model_dir``: a saved model directory, or a ``(model, processor)`` pair already loaded.
    ``truths``: the true label (one of ``labels``) per image.  ``template``: ``_`` is replaced
    by the label (``"a photo of a _."``, ``"一张_的照片。"``); ``None`` uses the bare label.
    """
    model, processor = load_model(model_dir) if isinstance(model_dir, (str, os.PathLike)) else model_dir
    labels = list(labels)
    truth_idx = torch.tensor([labels.index(t) for t in truths])
    preds = zero_shot_predictions(model, processor, images, labels, template)
    return float((preds == truth_idx).float().mean())


def heldout_items(seed: int, n: int, max_side: int = 4000) -> list[S.Item]:
    """A held-out set: sizes log-uniform 64..max_side, plus one image at max_side x 3/4 max_side."""
    rng = np.random.default_rng(seed)
    items = S.sample_items(rng, n, min_side=64, max_side=max_side)
    if n:
        it = items[0]
        items[0] = S.Item(it.shape, it.color, max_side, max_side * 3 // 4)
    return items


def accuracy_table(model, processor, pixel_values: torch.Tensor, items: Sequence[S.Item],
                   langs: Sequence[str]) -> dict[tuple[str, str, str], float]:
    """{(lang, kind, 'template'|'bare'): accuracy} for shapes, colours and pairs."""
    res = {}
    for lang in langs:
        tpl = S.EN_TEMPLATE if lang == "en" else S.ZH_TEMPLATE
        for kind in ("shapes", "colors", "pairs"):
            labels = S.labels(kind, lang)
            truths = [S.truth_label(kind, it.shape, it.color, lang) for it in items]
            for mode, t in (("template", tpl), ("bare", None)):
                res[(lang, kind, mode)] = zero_shot_accuracy((model, processor), pixel_values, truths, labels, t)
    return res


def format_table(name: str, res: dict) -> str:
    lines = []
    for lang in sorted({k[0] for k in res}, key=lambda x: x != "zh"):
        for mode in ("template", "bare"):
            vals = "  ".join(f"{kind} {100 * res[(lang, kind, mode)]:5.1f}%" for kind in ("shapes", "colors", "pairs"))
            lines.append(f"{name:18s} labels={lang} {mode:8s} {vals}")
    return "\n".join(lines)


# ====================================================================== build everything


def build_model(spec: TinySpec, out_dir: str | os.PathLike, steps: int, seed: int,
                pool: dict[str, torch.Tensor] | None = None, pool_items: Sequence[S.Item] | None = None,
                n_pool: int = 48000, **train_kw) -> dict:
    """Tokenizer + model training + save.  Returns timing info.

    ``pool``: uint8 training pixels per model kind from ``render_and_preprocess(raw=True)``
    (with the matching ``pool_items``); rendered here when not given.
    """
    torch.manual_seed(seed)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    captions = [c.text for lang in spec.langs for c in S.all_captions(lang)]
    label_texts = [lab for lang in spec.langs for k in ("shapes", "colors", "pairs") for lab in S.labels(k, lang)]
    if spec.kind == "clip":
        vocab, merges = train_clip_bpe(captions + label_texts)
        tokenizer = save_clip_tokenizer(out, vocab, merges, spec.max_positions)
    else:
        vocab = build_bert_vocab(captions + label_texts)
        tokenizer = save_bert_tokenizer(out, vocab, spec.max_positions)
    bad = unknown_tokens(tokenizer, captions + label_texts)
    if bad:
        raise RuntimeError(f"{spec.kind}: captions with unknown tokens: {bad[:5]}")
    image_processor = make_image_processor(spec)
    processor = make_processor(spec, image_processor, tokenizer)

    if pool is None or spec.kind not in pool:
        rng = np.random.default_rng(seed + 1)
        pool_items = training_items(rng, n_pool)
        t = time.time()
        pool = render_and_preprocess(rng, pool_items, {spec.kind: image_processor}, raw=True)
        _log(f"  [{spec.kind}] rendered {len(pool_items)} training images in {time.time() - t:.1f}s")
    shapes, colors = list(S.SHAPES), list(S.COLORS)
    s_idx = torch.tensor([shapes.index(it.shape) for it in pool_items])
    c_idx = torch.tensor([colors.index(it.color) for it in pool_items])

    model = make_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"  [{spec.kind}] {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    secs = train(spec, model, tokenizer, pool[spec.kind], s_idx, c_idx, steps, seed,
                 normalize=normalizer(image_processor), **train_kw)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)  # transformers 5: processor_config.json (+ tokenizer files)
    image_processor.save_pretrained(out)  # preprocessor_config.json too, as on the Hub, for older readers
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    _log(f"  [{spec.kind}] trained {steps} steps in {secs:.0f}s, saved {out} ({size / 1e6:.2f} MB)")
    return {"seconds": secs, "bytes": size, "params": n_params}


def _save_variants(img: Image.Image, path: Path, fmt: str) -> None:
    if fmt == "jpg":
        img.save(path, "JPEG", quality=85)
    elif fmt == "png":
        img.save(path, "PNG", optimize=True)
    elif fmt == "webp":
        img.save(path, "WEBP", quality=80)
    else:
        raise ValueError(fmt)


def build_sample(out_dir: str | os.PathLike, seed: int) -> list[dict]:
    """The sample dataset: one JPEG per (colour, shape) pair at mixed sizes, plus PNG, WebP,
    RGBA PNG, palette PNG and greyscale JPEG files; ``truth.csv`` and label files."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (96, 80), (128, 160), (200, 150), (240, 320), (300, 300), (400, 260), (512, 384),
             (640, 480), (480, 640), (800, 600), (1024, 768), (1200, 900), (1500, 1000), (1000, 1500)]
    rows = []

    def put(shape, color, w, h, fmt, mode="RGB", known=True):
        img = S.render(rng, shape, color, w, h)
        n = sum(1 for r in rows if r["stem"] == f"{color}_{shape}")
        name = f"{color}_{shape}_{n:02d}.{fmt}"
        if mode == "L":
            img = img.convert("L")
            name = f"grey_{shape}_{n:02d}.{fmt}"
        elif mode == "P":
            img = img.quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        elif mode == "RGBA":
            img = img.convert("RGBA")
            a = np.full((h, w), 255, np.uint8)
            a[: h // 10] = 0  # transparent strip at the top, away from the shape's centre
            img.putalpha(Image.fromarray(a, "L"))
        _save_variants(img, out / "images" / name, fmt)
        rows.append({"stem": f"{color}_{shape}", "path": name, "shape": shape, "color": color,
                     "known": known, "w": w, "h": h, "mode": mode})

    for k, (s, c) in enumerate(S.pairs()):
        w, h = sizes[int(rng.integers(len(sizes)))]
        put(s, c, w, h, "jpg")
    extras = [("png", "RGB", (320, 240)), ("png", "RGB", (150, 150)), ("webp", "RGB", (640, 480)),
              ("webp", "RGB", (200, 300)), ("png", "P", (256, 256)), ("png", "RGBA", (300, 200)),
              ("jpg", "L", (400, 300)), ("jpg", "RGB", (2400, 1800))]
    allp = S.pairs()
    for fmt, mode, (w, h) in extras:
        s, c = allp[int(rng.integers(len(allp)))]
        put(s, c, w, h, fmt, mode, known=(mode != "L"))
    with open(out / "truth.csv", "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["path", "shape", "color"])
        for r in sorted(rows, key=lambda r: r["path"]):
            if r["known"]:
                wr.writerow([r["path"], r["shape"], r["color"]])
    for kind in ("shapes", "colors", "pairs"):
        for lang, suffix in (("en", ""), ("zh", "_zh")):
            (out / "labels" / f"{kind}{suffix}.txt").write_text(
                "".join(lab + "\n" for lab in S.labels(kind, lang)), encoding="utf-8")
    return rows


def dir_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def make_all(out_root: str | os.PathLike, steps: int | None = None, seed: int = 0, only: str | None = None,
             n_pool: int = 48000, eval_n: int = 300, eval_max_side: int = 4000) -> dict:
    """Build the fixtures under ``out_root``; ``only``: 'clip', 'chinese_clip' or 'sample'."""
    torch.set_num_threads(2)
    out_root = Path(out_root)
    specs = {"clip": clip_spec(), "chinese_clip": chinese_clip_spec()}
    kinds = [k for k in specs if only in (None, k)]
    report: dict = {}
    if kinds:
        # render the training images once, preprocess them for every model being trained
        rng = np.random.default_rng(seed + 1)
        items = training_items(rng, n_pool)
        t = time.time()
        pool = render_and_preprocess(rng, items, {k: make_image_processor(specs[k]) for k in kinds}, raw=True)
        _log(f"rendered {len(items)} training images in {time.time() - t:.1f}s")
        dirs = {"clip": out_root / CLIP_DIR, "chinese_clip": out_root / CHINESE_CLIP_DIR}
        for k in kinds:
            _log(f"training {k} ...")
            report[k] = build_model(specs[k], dirs[k], steps if steps is not None else default_steps(k),
                                    seed, pool=pool, pool_items=items)
        del pool
        if eval_n:
            ev = heldout_items(seed + 1000, eval_n, eval_max_side)
            t = time.time()
            loaded = {k: load_model(dirs[k]) for k in kinds}
            px = render_and_preprocess(np.random.default_rng(seed + 1001), ev,
                                       {k: loaded[k][1].image_processor for k in kinds}, chunk=16)
            _log(f"held-out set: {len(ev)} images, sides 64..{eval_max_side} px, rendered in {time.time() - t:.1f}s")
            for k in kinds:
                res = accuracy_table(*loaded[k], px[k], ev, specs[k].langs)
                report[k]["accuracy"] = res
                _log(format_table(k, res))
    if only in (None, "sample"):
        rows = build_sample(out_root / SAMPLE_DIR, seed + 2000)
        _log(f"sample set: {len(rows)} images, {dir_size(out_root / SAMPLE_DIR) / 1e6:.2f} MB")
    return report


def default_steps(kind: str) -> int:
    return {"clip": 4000, "chinese_clip": 4000}[kind]
