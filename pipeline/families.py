"""The zero-shot dual encoders transformers ships, and how each is scored and fed, as its reference does.

| family (`model_type`) | class | scoring | text | images |
|---|---|---|---|---|
| clip | CLIPModel | softmax(exp(logit_scale) * cos) | padded to the longest | shortest-edge resize, centre crop |
| chinese_clip | ChineseCLIPModel | the same | the same | resize (square), its crop |
| metaclip_2 | MetaClip2Model | the same | the same | as CLIP |
| altclip | AltCLIPModel | the same | the same | as CLIP |
| align | AlignModel | softmax(cos / temperature) | padded to 64 (AlignProcessor) | EfficientNet: resize, crop, [-1, 1] |
| siglip | SiglipModel | sigmoid(exp(logit_scale) * cos + logit_bias) | padded to 64 (HF pipeline) | square resize, mean/std 0.5 |
| siglip2 | Siglip2Model (NaFlex) | the same | padded to 64, lower-cased, punctuation stripped | the HF processor's patches |

SigLIP2 checkpoints of a fixed resolution are `siglip` models (SiglipModel with a Gemma tokenizer); `siglip2` is
the NaFlex variant, fed by its own HF image processor after our decoding (variable patches, padded to
`max_num_patches`). SigLIP's own tokenizer lower-cases and strips punctuation itself (`canonicalize_text`);
SigLIP2's lower-cases only, and the reference evaluation strips punctuation as well (big_vision's prompt
canonicalisation; NVlabs/RADIO #142), so we do that before tokenizing.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

SOFTMAX, SIGMOID = "softmax", "sigmoid"
SPEC, HF = "spec", "hf"  # images: our own preprocessing (parity-tested), or the HF processor after our decoding
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Family:
    model_type: str
    model_class: str
    scoring: str  # SOFTMAX: labels compete; SIGMOID: each label is scored on its own
    scale_key: str  # the weight holding the scale: "logit_scale" (its exp) or "temperature" (its inverse)
    bias_key: str | None = None
    multilingual: bool | None = False  # None: decided by the tokenizer's vocabulary (SigLIP has both kinds)
    text: dict = field(default_factory=lambda: {"padding": True})
    canonical: bool = False  # lower-case and strip punctuation from prompts, as the reference does
    images: str = SPEC
    tokenizer_files: tuple[tuple[str, ...], ...] = (("tokenizer.json",),)


_FIXED_64 = {"padding": "max_length", "max_length": 64, "truncation": True}
FAMILIES = {f.model_type: f for f in (
    Family("clip", "CLIPModel", SOFTMAX, "logit_scale",
           tokenizer_files=(("tokenizer.json",), ("vocab.json", "merges.txt"))),
    Family("chinese_clip", "ChineseCLIPModel", SOFTMAX, "logit_scale", multilingual=True,
           tokenizer_files=(("tokenizer.json",), ("vocab.txt",))),
    Family("metaclip_2", "MetaClip2Model", SOFTMAX, "logit_scale", multilingual=True,
           tokenizer_files=(("tokenizer.json",), ("sentencepiece.bpe.model",))),
    Family("altclip", "AltCLIPModel", SOFTMAX, "logit_scale", multilingual=True,
           tokenizer_files=(("tokenizer.json",), ("sentencepiece.bpe.model",))),
    Family("align", "AlignModel", SOFTMAX, "temperature", text={"padding": "max_length", "max_length": 64,
                                                                 "truncation": True},
           tokenizer_files=(("tokenizer.json",), ("vocab.txt",))),
    Family("siglip", "SiglipModel", SIGMOID, "logit_scale", "logit_bias", multilingual=None, text=_FIXED_64,
           tokenizer_files=(("tokenizer.json",), ("spiece.model",), ("tokenizer.model",))),
    Family("siglip2", "Siglip2Model", SIGMOID, "logit_scale", "logit_bias", multilingual=True, text=_FIXED_64,
           canonical=True, images=HF, tokenizer_files=(("tokenizer.json",), ("tokenizer.model",))),
)}
MULTILINGUAL_VOCABULARY = 200_000  # SigLIP's multilingual checkpoints have a 250k vocabulary, English ones 32k


def canonical_text(text: str) -> str:
    """big_vision's prompt canonicalisation: lower case, no punctuation, single spaces."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()
