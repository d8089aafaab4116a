"""Tiny models of the other zero-shot families, in the real Hugging Face formats, as test fixtures.

Companion of :mod:`tests.helpers.fixtures` (tiny CLIP / Chinese-CLIP), which it reuses and leaves unchanged:

* ``tiny-siglip``: a *trained* ``SiglipModel`` (sigmoid loss, learned logit scale and bias) that really
  classifies the synthetic shapes, single- and multi-label; ``SiglipTokenizer`` on a SentencePiece model
  trained here (BPE with byte fallback, English); ``SiglipImageProcessor`` at 64x64 (square resize, no crop,
  mean/std 0.5: the class defaults, scaled down).
* ``tiny-siglip2``: random ``Siglip2Model`` (NaFlex): ``Siglip2ImageProcessor`` (16 px patches, at most 16 of
  them) and ``Siglip2Tokenizer``: a Gemma-style byte-fallback BPE ``tokenizer.json`` trained with ``tokenizers``
  (English + Chinese).
* ``tiny-metaclip2``: random ``MetaClip2Model``, CLIP image processor (64 px), ``XLMRobertaTokenizer``.
* ``tiny-altclip``: random ``AltCLIPModel``, CLIP image processor (56 px), ``XLMRobertaTokenizer``.
  Both XLM-R tokenizers are ``tokenizer.json`` files holding a SentencePiece unigram model trained here
  (English + Chinese), as XLM-R's own was made from its SentencePiece model.
* ``tiny-align``: random ``AlignModel`` (a three-stage EfficientNet), ``EfficientNetImageProcessor`` with
  ALIGN's settings scaled down (square resize to 48, centre crop 40, rescale to [-1, 1], no normalisation),
  ``BertTokenizer`` (uncased ``vocab.txt``, English).

The random models test loading and plumbing, not accuracy. Entry point: ``jobs/make_fixtures.py --only
siglip|siglip2|metaclip2|altclip|align``; deterministic for a given seed.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import string
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.labels import apply_template

from . import fixtures as FX
from . import synthetic as S

SIGLIP_DIR = "models/tiny-siglip"
SIGLIP2_DIR = "models/tiny-siglip2"
METACLIP2_DIR = "models/tiny-metaclip2"
ALTCLIP_DIR = "models/tiny-altclip"
ALIGN_DIR = "models/tiny-align"

FAMILIES = ("siglip", "siglip2", "metaclip2", "altclip", "align")
FAMILY_DIRS = {"siglip": SIGLIP_DIR, "siglip2": SIGLIP2_DIR, "metaclip2": METACLIP2_DIR,
               "altclip": ALTCLIP_DIR, "align": ALIGN_DIR}
FAMILY_LANGS = {"siglip": ("en",), "siglip2": ("en", "zh"), "metaclip2": ("en", "zh"),
                "altclip": ("en", "zh"), "align": ("en",)}
MODEL_TYPES = {"siglip": "siglip", "siglip2": "siglip2", "metaclip2": "metaclip_2", "altclip": "altclip",
               "align": "align"}
MODEL_CLASSES = {"siglip": "SiglipModel", "siglip2": "Siglip2Model", "metaclip2": "MetaClip2Model",
                 "altclip": "AltCLIPModel", "align": "AlignModel"}
TOKENIZER_CLASSES = {"siglip": "SiglipTokenizer", "siglip2": "Siglip2Tokenizer",
                     "metaclip2": "XLMRobertaTokenizer", "altclip": "XLMRobertaTokenizer",
                     "align": "BertTokenizer"}
MAX_BYTES = 2_000_000
SIGLIP_TEXT_LENGTH = 64  # SigLIP's text length: the HF pipeline and model cards pad to max_length=64

XLMR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def _log(msg: str) -> None:
    print(msg, flush=True)


# ====================================================================== corpus and tokenizers


def corpus(langs: Sequence[str]) -> list[str]:
    """Every caption, label and templated label ("a photo of a _.", "一张_的照片。") of ``langs``."""
    texts = []
    for lang in langs:
        texts += [c.text for c in S.all_captions(lang)]
        tpl = S.EN_TEMPLATE if lang == "en" else S.ZH_TEMPLATE
        for kind in ("shapes", "colors", "pairs"):
            labels = S.labels(kind, lang)
            texts += labels + [apply_template(tpl, lab) for lab in labels]
    return texts


def siglip_canonical(text: str) -> str:
    """What ``SiglipTokenizer`` feeds its SentencePiece model: lower case, no punctuation, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def train_sentencepiece(texts: Sequence[str], **options) -> bytes:
    """A SentencePiece model (serialised proto) trained on ``texts``, single-threaded (deterministic).

    No normaliser rule table (``identity``): the tokenizer classes normalise themselves, and the
    NFKC table alone would weigh 240 kB.
    """
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_writer=buf, num_threads=1,
                                   character_coverage=1.0, hard_vocab_limit=False, normalization_rule_name="identity",
                                   shuffle_input_sentence=False, minloglevel=2, **options)
    return buf.getvalue()


def make_siglip_tokenizer(out_dir: str | os.PathLike, texts: Sequence[str], vocab_size: int = 400):
    """``SiglipTokenizer`` on a SentencePiece BPE model (byte fallback: nothing is ever unknown) trained on the
    canonicalised ``texts``; ids as in SigLIP's: ``<pad>`` 0, ``</s>`` 1 (also the padding token), ``<unk>`` 2."""
    from transformers import SiglipTokenizer

    proto = train_sentencepiece(sorted({siglip_canonical(t) for t in texts}), model_type="bpe",
                                vocab_size=vocab_size, byte_fallback=True, pad_id=0, eos_id=1, unk_id=2,
                                bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "spiece.model"
    path.write_bytes(proto)
    return SiglipTokenizer(vocab_file=str(path), model_max_length=SIGLIP_TEXT_LENGTH)


def make_gemma_tokenizer(texts: Sequence[str], vocab_size: int = 1000):
    """``Siglip2Tokenizer``: a Gemma-style BPE (``<pad> <eos> <bos> <unk> <mask>``, then the 256 byte-fallback
    tokens ``<0x00>``..``<0xFF>``, then characters and merges; spaces as ``▁``, lower case) trained with
    ``tokenizers`` on ``texts``. Adds ``<eos>`` at the end of each text, as SigLIP 2 was trained."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Siglip2Tokenizer

    specials = GEMMA_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    # training only: merges stay inside "▁word" units (the class itself does not split)
    tk.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  show_progress=False)
    tk.train_from_iterator(sorted(set(texts)), trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return Siglip2Tokenizer(vocab=dict(model["vocab"]), merges=merges, add_bos_token=False, add_eos_token=True,
                            model_max_length=SIGLIP_TEXT_LENGTH)


def make_xlmr_tokenizer(texts: Sequence[str], vocab_size: int = 500, model_max_length: int = 77):
    """``XLMRobertaTokenizer`` (a ``tokenizer.json`` Unigram model) from a SentencePiece unigram model trained on
    ``texts``, ids as in XLM-R (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, then ``<mask>``). Every printable
    ASCII character is a piece, so English never hits ``<unk>``; Chinese is covered for the corpus' characters."""
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    proto = train_sentencepiece(texts, model_type="unigram", vocab_size=vocab_size, bos_id=0, pad_id=1, eos_id=2,
                                unk_id=3, bos_piece="<s>", pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
                                control_symbols=["<mask>"], max_sentencepiece_length=16,
                                required_chars=string.ascii_letters + string.digits + string.punctuation)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = [(sp.id_to_piece(i), 0.0 if sp.is_control(i) or sp.is_unknown(i) else float(sp.get_score(i)))
             for i in range(sp.get_piece_size())]
    assert [p for p, _ in vocab[:5]] == XLMR_SPECIALS, vocab[:5]
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=model_max_length)


def make_bert_tokenizer(out_dir: str | os.PathLike, texts: Sequence[str], model_max_length: int = 64):
    """Uncased ``BertTokenizer`` (``vocab.txt``), built as tiny-chinese-clip's; ALIGN's text length 64."""
    return FX.save_bert_tokenizer(out_dir, FX.build_bert_vocab(texts), model_max_length)


def unknown_texts(tokenizer, texts: Sequence[str]) -> list[str]:
    """Texts whose tokens (special tokens left out) are empty or contain the unknown token."""
    bad = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if not ids or tokenizer.unk_token_id in ids:
            bad.append(t)
    return bad


# ====================================================================== models and processors


def siglip_image_processor(size: int = 64):
    """The class defaults (square resize, bicubic, no crop, mean/std 0.5), at ``size`` x ``size``."""
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5, 0.5, 0.5],
                                   image_std=[0.5, 0.5, 0.5])


def siglip_model(tokenizer, image_size: int = 64, patch_size: int = 8, hidden: int = 64, vision_layers: int = 4,
                 text_layers: int = 2, mlp: int = 128, heads: int = 4):
    from transformers import SiglipConfig, SiglipModel

    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=text_layers,
                num_attention_heads=heads, max_position_embeddings=SIGLIP_TEXT_LENGTH,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                projection_size=hidden)
    vision = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=vision_layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():  # the SigLIP paper's initialisation: t' = log 10, b = -10
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model


def siglip2_parts(texts: Sequence[str]):
    from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model, Siglip2Processor

    tokenizer = make_gemma_tokenizer(texts)
    # 16 px patches as Siglip2Processor's class defaults (patch_size=16, max_num_patches=256), which it passes to
    # the image processor when called without images_kwargs: the model then sees more patches, never a wrong size.
    image_processor = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=16)
    hidden = 32
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=SIGLIP_TEXT_LENGTH,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, projection_size=hidden)
    vision = dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  patch_size=16, num_patches=16)
    model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
    with torch.no_grad():  # scores spread around 0.5 rather than the random draw of the class' init
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(0.0)
    return model, Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer), image_processor


def clip_image_processor(size: int):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def metaclip2_parts(texts: Sequence[str]):
    from transformers import CLIPProcessor, MetaClip2Config, MetaClip2Model

    tokenizer = make_xlmr_tokenizer(texts, model_max_length=77)
    image_processor = clip_image_processor(64)
    hidden = 32
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=64, patch_size=16, projection_dim=hidden)
    model = MetaClip2Model(MetaClip2Config(text_config=text, vision_config=vision, projection_dim=hidden))
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer), image_processor


def altclip_parts(texts: Sequence[str]):
    from transformers import AltCLIPConfig, AltCLIPModel, AltCLIPProcessor

    tokenizer = make_xlmr_tokenizer(texts, model_max_length=77)
    image_processor = clip_image_processor(56)
    hidden = 32
    # text initializer_range 0.2, not 0.02: at 0.02 a random 2-layer RoBERTa gives every text the same embedding
    # (all scores tie). RoBERTa positions start after the padding index: 77 tokens need 77 + 2 positions.
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77 + 2, project_dim=hidden,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, hidden_dropout_prob=0.0, initializer_range=0.2)
    vision = dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=56, patch_size=14, projection_dim=hidden)
    model = AltCLIPModel(AltCLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden))
    return model, AltCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer), image_processor


def align_parts(texts: Sequence[str], out_dir: str | os.PathLike):
    from transformers import AlignConfig, AlignModel, AlignProcessor, EfficientNetImageProcessorPil

    tokenizer = make_bert_tokenizer(out_dir, texts, model_max_length=64)
    # ALIGN's processor (resize 346, centre crop 289, bilinear, x/127.5 - 1, no normalisation), scaled down
    image_processor = EfficientNetImageProcessorPil(size={"height": 48, "width": 48},
                                                    crop_size={"height": 40, "width": 40}, do_center_crop=True,
                                                    rescale_factor=1 / 127.5, rescale_offset=True,
                                                    do_normalize=False, include_top=False, resample=2)
    projection = 32
    # initializer_range 0.5 (not 0.02, where every text gets the same embedding) and temperature 0.05, so that
    # the random model's scores differ between labels
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.5)
    # a three-stage EfficientNet (stem 16 channels, strides 2, 1, 2, 2); the last stage's width is the
    # image embedding, so it equals the projection size (640 in ALIGN)
    vision = dict(image_size=40, width_coefficient=0.5, depth_coefficient=1.0, depth_divisor=8,
                  kernel_sizes=[3, 3, 5], in_channels=[32, 16, 24], out_channels=[16, 24, 2 * projection],
                  strides=[1, 2, 2], num_block_repeats=[1, 1, 1], expand_ratios=[1, 4, 4], hidden_dim=64,
                  drop_connect_rate=0.0)
    model = AlignModel(AlignConfig(text_config=text, vision_config=vision, projection_dim=projection,
                                   temperature_init_value=0.05))
    return model, AlignProcessor(image_processor=image_processor, tokenizer=tokenizer), image_processor


def load_family(model_dir: str | os.PathLike):
    """(model, processor) of a saved directory through the Auto classes, eval mode."""
    from transformers import AutoModel, AutoProcessor

    return AutoModel.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def _fresh(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def _save(out: Path, model, processor, image_processor, kind: str) -> int:
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)  # processor_config.json + tokenizer files
    image_processor.save_pretrained(out)  # preprocessor_config.json too, as on the Hub
    for f in out.iterdir():
        f.chmod(0o644)  # safetensors writes its file owner-only
    size = FX.dir_size(out)
    if size > MAX_BYTES:
        raise RuntimeError(f"{kind}: {out} is {size / 1e6:.2f} MB, over {MAX_BYTES / 1e6:.0f} MB")
    return size


def build_random(kind: str, out_dir: str | os.PathLike, seed: int) -> dict:
    """Tokenizer, processor and a randomly initialised model of ``kind`` (not siglip), saved to ``out_dir``."""
    torch.manual_seed(seed)
    out = _fresh(out_dir)
    texts = corpus(FAMILY_LANGS[kind])
    if kind == "siglip2":
        model, processor, image_processor = siglip2_parts(texts)
    elif kind == "metaclip2":
        model, processor, image_processor = metaclip2_parts(texts)
    elif kind == "altclip":
        model, processor, image_processor = altclip_parts(texts)
    elif kind == "align":
        model, processor, image_processor = align_parts(texts, out)
    else:
        raise ValueError(f"no random build for {kind!r}")
    bad = unknown_texts(processor.tokenizer, texts)
    if bad:
        raise RuntimeError(f"{kind}: texts with unknown tokens: {bad[:5]}")
    size = _save(out, model.eval(), processor, image_processor, kind)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"  [{kind}] random weights, {n_params / 1e6:.2f}M parameters, vocab {len(processor.tokenizer)}, "
         f"saved {out} ({size / 1e6:.2f} MB)")
    return {"bytes": size, "params": n_params}


# ====================================================================== SigLIP training


def _siglip_text_inputs(tokenizer, texts: Sequence[str], padding="max_length") -> dict[str, torch.Tensor]:
    kw = {"max_length": SIGLIP_TEXT_LENGTH} if padding == "max_length" else {}
    return dict(tokenizer(list(texts), padding=padding, truncation=True, return_tensors="pt", **kw))


def train_siglip(model, tokenizer, pixels: torch.Tensor, shape_idx: torch.Tensor, color_idx: torch.Tensor,
                 steps: int, seed: int, batch_size: int = 128, lr: float = 3e-3, sigmoid_weight: float = 0.1,
                 cls_weight: float = 1.0, aux_weight: float = 1.0, calibration_lr: float = 10.0,
                 normalize: Callable | None = None, log_every: int = 500) -> float:
    """Train a ``SiglipModel`` in place; returns the seconds spent.

    Loss per step, on ``batch_size`` images (random flips / 90-degree turns) against the captions of the
    step (one random caption per image, plus every class of each kind written in one random phrasing):

    * ``sigmoid_weight`` x SigLIP's sigmoid loss, ``-log sigmoid(z * (t * cos + b))`` summed over captions,
      averaged over images, with ``z = +1`` for every caption true of the image (it names only the image's
      shape and/or colour) and ``-1`` otherwise: positives score above 0.5, the rest below, what multi-label
      use needs. The logit scale ``t`` (at most 100) and bias ``b`` learn at ``calibration_lr`` x ``lr``;
    * ``cls_weight`` x cross-entropy of each image against the classes of each kind (the argmax task);
    * ``aux_weight`` x cross-entropy of throw-away linear shape/colour heads on the image embedding.

    The captions are tokenised as the HF pipeline does (padded to 64 tokens), or padded to the longest
    caption, or padded to 64 without an attention mask, at random per step, so that each reading works.
    ``pixels``: uint8 pixels from ``render_and_preprocess(raw=True)`` with ``normalize``, or normalised ones.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    bank = FX.CaptionBank.build(tokenizer, ("en",))  # padded to the longest caption
    full = _siglip_text_inputs(tokenizer, bank.texts, "max_length")
    dim = model.config.vision_config.hidden_size
    aux = torch.nn.ModuleDict({"shapes": torch.nn.Linear(dim, len(S.SHAPES)),
                               "colors": torch.nn.Linear(dim, len(S.COLORS))})
    named = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux.named_parameters()]
    calibration = [model.logit_scale, model.logit_bias]
    rest = [(n, p) for n, p in named if n not in ("logit_scale", "logit_bias")]
    decay = [p for n, p in rest if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in rest if not (p.ndim >= 2 and "embedding" not in n)]
    warm = max(1, min(100, steps // 10))

    def schedule(k):  # linear warm-up, cosine decay to 0
        return min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / max(steps, 1)))

    if normalize is None:
        normalize = lambda x: x  # noqa: E731  (pixels already normalised)
    model.train()
    n = pixels.shape[0]
    t0 = time.time()
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0},
                             {"params": calibration, "weight_decay": 0.0, "lr": lr * calibration_lr}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(n, size=min(batch_size, n), replace=False))
        x = FX._augment(normalize(pixels[idx]), g)
        si, ci = shape_idx[idx], color_idx[idx]
        cap = np.array([bank.sample(rng, int(a), int(b)) for a, b in zip(si, ci)])
        sets = {k: v[rng.integers(len(v))] for k, v in bank.class_sets.items()}
        uniq = np.unique(np.concatenate([cap] + list(sets.values())))
        u = torch.from_numpy(uniq)
        mode = rng.choice(3, p=[0.5, 0.25, 0.25])
        if mode == 1:  # padded to the longest caption of the step
            mask = bank.attention_mask[u]
            keep = int(mask.sum(1).max())
            ids, mask = bank.input_ids[u][:, :keep], mask[:, :keep]
        else:  # padded to 64, with (0) or without (2) the attention mask
            ids, mask = full["input_ids"][u], (full["attention_mask"][u] if mode == 0 else None)
        txt = F.normalize(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
        img_raw = model.get_image_features(pixel_values=x).pooler_output
        img = F.normalize(img_raw, dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias  # [B images, U captions]
        cs, cc = bank.shape_idx[u], bank.color_idx[u]
        pos = (((cs[None, :] == -1) | (cs[None, :] == si[:, None]))
               & ((cc[None, :] == -1) | (cc[None, :] == ci[:, None]))).float()
        loss = -sigmoid_weight * F.logsigmoid((2 * pos - 1) * logits).sum(1).mean()
        loss = FX.add_class_losses(loss, logits, uniq, sets, si, ci, cls_weight, aux, aux_weight, img_raw)
        FX.optimiser_step(loss, model, opt, sched, named, f"siglip: non-finite loss at step {step + 1}")
        if log_every and (step % log_every == 0 or step == steps - 1):
            _log(f"  [siglip] step {step + 1}/{steps} loss {loss.item():.4f} "
                 f"scale {model.logit_scale.exp().item():.1f} bias {model.logit_bias.item():.2f} "
                 f"({time.time() - t0:.0f}s)")
    model.eval()
    return time.time() - t0


def build_siglip(out_dir: str | os.PathLike, steps: int, seed: int, pool: torch.Tensor | None = None,
                 pool_items: Sequence[S.Item] | None = None, n_pool: int = 48000, model_kw: dict | None = None,
                 **train_kw) -> dict:
    """Tokenizer + SigLIP training + save. ``pool``: uint8 64x64 training pixels for ``pool_items``
    (rendered here from seed + 1, the same images as tiny-clip's, when not given)."""
    from transformers import SiglipProcessor

    torch.manual_seed(seed)
    out = _fresh(out_dir)
    texts = corpus(("en",))
    tokenizer = make_siglip_tokenizer(out, texts)
    bad = unknown_texts(tokenizer, texts)
    if bad:
        raise RuntimeError(f"siglip: texts with unknown tokens: {bad[:5]}")
    image_processor = siglip_image_processor()
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if pool is None:
        rng = np.random.default_rng(seed + 1)
        pool_items = FX.training_items(rng, n_pool)
        t = time.time()
        pool = FX.render_and_preprocess(rng, pool_items, {"siglip": image_processor}, raw=True)["siglip"]
        _log(f"  [siglip] rendered {len(pool_items)} training images in {time.time() - t:.1f}s")
    s_idx = torch.tensor([list(S.SHAPES).index(it.shape) for it in pool_items])
    c_idx = torch.tensor([list(S.COLORS).index(it.color) for it in pool_items])
    model = siglip_model(tokenizer, **(model_kw or {}))
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"  [siglip] {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    secs = train_siglip(model, tokenizer, pool, s_idx, c_idx, steps, seed,
                        normalize=FX.normalizer(image_processor), **train_kw)
    size = _save(out, model, processor, image_processor, "siglip")
    _log(f"  [siglip] trained {steps} steps in {secs:.0f}s, saved {out} ({size / 1e6:.2f} MB)")
    return {"seconds": secs, "bytes": size, "params": n_params}


# ====================================================================== SigLIP evaluation (plain HF API)


@torch.no_grad()
def sigmoid_scores(model, processor, images, texts: Sequence[str], padding="max_length",
                   batch_size: int = 64) -> torch.Tensor:
    """``sigmoid(model(**inputs).logits_per_image)``: [images, texts]. ``images``: PIL images or this
    processor's ``pixel_values``; ``padding``: "max_length" (64 tokens, as the HF pipeline) or "longest"."""
    text_inputs = _siglip_text_inputs(processor.tokenizer, texts, padding)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if isinstance(chunk, torch.Tensor):
            pixel_values = chunk
        else:
            pixel_values = processor.image_processor(images=list(chunk), return_tensors="pt")["pixel_values"]
        out.append(model(**text_inputs, pixel_values=pixel_values).logits_per_image.sigmoid())
    return torch.cat(out)


def single_label_accuracy(model, processor, images, items: Sequence[S.Item], kind: str,
                          template: str | None = S.EN_TEMPLATE, padding="max_length") -> float:
    """Top-1 accuracy of the argmax of the sigmoid scores over ``S.labels(kind)``."""
    labels = S.labels(kind, "en")
    probs = sigmoid_scores(model, processor, images, [apply_template(template or "_", lab) for lab in labels],
                           padding)
    truth = torch.tensor([labels.index(S.truth_label(kind, it.shape, it.color)) for it in items])
    return float((probs.argmax(-1) == truth).float().mean())


def multilabel_labels() -> list[str]:
    """The 11 multi-label labels: the 5 shapes, then the 6 colours."""
    return S.labels("shapes", "en") + S.labels("colors", "en")


def multilabel_report(model, processor, images, items: Sequence[S.Item], threshold: float = 0.5,
                      template: str | None = S.EN_TEMPLATE, padding="max_length") -> dict:
    """Scores of the 11 shape and colour labels; an image has a label when its score is above ``threshold``.

    Returns ``f1`` (per label), ``both`` (share of images whose own shape and colour are both above the
    threshold), ``exact`` (share with exactly their two labels) and ``probs``.
    """
    labels = multilabel_labels()
    probs = sigmoid_scores(model, processor, images, [apply_template(template or "_", lab) for lab in labels],
                           padding)
    truth = torch.zeros_like(probs, dtype=torch.bool)
    for i, it in enumerate(items):
        truth[i, labels.index(it.shape)] = truth[i, labels.index(it.color)] = True
    pred = probs > threshold
    f1 = {}
    for j, lab in enumerate(labels):
        tp = int((pred[:, j] & truth[:, j]).sum())
        fp = int((pred[:, j] & ~truth[:, j]).sum())
        fn = int((~pred[:, j] & truth[:, j]).sum())
        f1[lab] = 2 * tp / max(2 * tp + fp + fn, 1)
    own = probs[truth].view(len(items), 2)
    return {"f1": f1, "both": float((own > threshold).all(1).float().mean()),
            "exact": float((pred == truth).all(1).float().mean()), "probs": probs}


def siglip_report(model, processor, pixel_values: torch.Tensor, items: Sequence[S.Item],
                  threshold: float = 0.5) -> str:
    lines = []
    for padding in ("max_length", "longest"):
        for mode, tpl in (("template", S.EN_TEMPLATE), ("bare", None)):
            accs = {k: single_label_accuracy(model, processor, pixel_values, items, k, tpl, padding)
                    for k in ("shapes", "colors", "pairs")}
            lines.append(f"siglip labels=en {mode:8s} padding={padding:10s} "
                         + "  ".join(f"{k} {100 * v:5.1f}%" for k, v in accs.items()))
        rep = multilabel_report(model, processor, pixel_values, items, threshold, S.EN_TEMPLATE, padding)
        lines.append(f"siglip multi-label padding={padding} threshold {threshold}: own shape+colour above "
                     f"{100 * rep['both']:.1f}%, exact {100 * rep['exact']:.1f}%, F1 min "
                     f"{min(rep['f1'].values()):.3f}: "
                     + " ".join(f"{k} {v:.3f}" for k, v in rep["f1"].items()))
    return "\n".join(lines)


# ====================================================================== build everything


def default_steps(kind: str) -> int:
    return {"siglip": 4000}.get(kind, 0)


def make_families(out_root: str | os.PathLike, steps: int | None = None, seed: int = 0, only: str | None = None,
                  n_pool: int = 48000, eval_n: int = 300, eval_max_side: int = 4000) -> dict:
    """Build the family fixtures under ``out_root``; ``only``: one of :data:`FAMILIES` (None: all).

    On one thread: the bytes do not depend on the thread count (how float sums are split), and tiny models
    gain little from a second thread, which costs a lot on a busy machine.
    """
    torch.set_num_threads(1)
    out_root = Path(out_root)
    report: dict = {}
    for kind in FAMILIES:
        if only not in (None, kind):
            continue
        out = out_root / FAMILY_DIRS[kind]
        if kind != "siglip":
            report[kind] = build_random(kind, out, seed)
            continue
        _log("training siglip ...")
        report[kind] = build_siglip(out, steps if steps is not None else default_steps(kind), seed, n_pool=n_pool)
        if eval_n:
            model, processor = load_family(out)
            items = FX.heldout_items(seed + 1000, eval_n, eval_max_side)
            t = time.time()
            px = FX.render_and_preprocess(np.random.default_rng(seed + 1001), items,
                                          {"siglip": processor.image_processor}, chunk=16)["siglip"]
            _log(f"held-out set: {len(items)} images, sides 64..{eval_max_side} px, rendered in "
                 f"{time.time() - t:.1f}s")
            _log(siglip_report(model, processor, px, items))
    return report
