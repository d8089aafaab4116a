"""Label sets and prompts.

A template marks the label with exactly one underscore (`a photo of a _.`), as in the vendor example; unlike it,
the template applies to every label source. Labels come from a comma-separated list, a UTF-8 file (one per line;
BOM, blank lines and `#` comments ignored) or a named set in `conf/labels/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

PLACEHOLDER = "_"
# CJK ideographs, CJK punctuation, kana, Hangul and full-width forms: text English CLIP was never trained on.
_CJK = re.compile("[\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
                  "\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_LIST_SEPARATORS = re.compile("[,\uff0c]")  # ASCII and full-width comma


@dataclass(frozen=True)
class LabelSet:
    """Labels as shown in outputs, the text each puts into the templates, and one or more templates.

    With several templates a label's embedding is the normalised mean of its prompts' normalised embeddings
    (the CLIP paper's prompt ensembling, as open_clip's zero_shot_classifier builds it).
    """

    name: str
    labels: tuple[str, ...]
    templates: tuple[str, ...]
    texts: tuple[str, ...] = ()  # prompt text per label when it differs from the display name

    def __post_init__(self) -> None:
        if not self.texts:
            object.__setattr__(self, "texts", self.labels)

    @property
    def template(self) -> str:
        return self.templates[0]

    def prompts(self, template: str | None = None) -> list[str]:
        return [apply_template(template or self.template, text) for text in self.texts]

    def to_dict(self) -> dict:
        return {"name": self.name, "labels": list(self.labels), "texts": list(self.texts),
                "templates": list(self.templates)}


def check_template(template: str) -> str:
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise UserError(f"labels.template {template!r} has {count} '{PLACEHOLDER}'; it needs exactly one, marking "
                        "where the label goes, e.g. 'a photo of a _.' (use '_' alone for bare labels)")
    return template


def apply_template(template: str, label: str) -> str:
    return template.replace(PLACEHOLDER, label, 1)


def split_label_list(value: str) -> list[str]:
    return [item.strip() for item in _LIST_SEPARATORS.split(value) if item.strip()]


def read_label_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"label file not found: '{path}' (labels.file / LABELS=file)") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UserError(f"label file '{path}' is not UTF-8 (line {line}); re-save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read label file '{path}': {exc}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _label_and_text(item: Any, source: str) -> tuple[str, str]:
    """A label is a string, or {name: shown in outputs, prompt: put into the template}."""
    if isinstance(item, dict):
        unknown = set(item) - {"name", "prompt"}
        if unknown or "name" not in item:
            raise UserError(f"{source}: label {item!r} must be a string or {{name: ..., prompt: ...}}")
        name = str(item["name"]).strip()
        return name, str(item.get("prompt") or name).strip()
    return str(item).strip(), str(item).strip()


def build_label_set(name: str, items: str | Sequence[Any] | None, file: str | None, template: str,
                    templates: Sequence[str] | None = None) -> LabelSet:
    if items and file:
        raise UserError("both labels.list and labels.file are set; give one label source")
    if file:
        pairs, source = [(x, x) for x in read_label_file(file)], f"label file '{file}'"
    else:
        source = f"label set '{name}'"
        raw = split_label_list(items) if isinstance(items, str) else list(items or [])
        pairs = [p for p in (_label_and_text(item, source) for item in raw) if p[0]]
    labels = [label for label, _ in pairs]
    if not labels:
        raise UserError(f"{source} has no labels: give LABEL_LIST=\"cat,dog\", LABELS=file or labels=<set>")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"{source} repeats labels {duplicates}; each label must appear once")
    chosen = [check_template(t) for t in (templates or [template])]
    if len(set(chosen)) != len(chosen):
        raise UserError(f"labels.templates repeats a template: {chosen}")
    return LabelSet(name=name, labels=tuple(labels), templates=tuple(chosen), texts=tuple(t for _, t in pairs))


def check_language(label_set: LabelSet, takes_chinese: bool, model_path: str, family: str = "clip") -> None:
    """An English-only model's tokenizer may accept any bytes, but the model never learned Chinese: refuse,
    early."""
    if takes_chinese:
        return
    texts = [text for text in label_set.texts if _CJK.search(text)]
    texts[:0] = [f"template {t!r}" for t in label_set.templates if _CJK.search(t)]
    if texts:
        shown = ", ".join(texts[:5]) + (" ..." if len(texts) > 5 else "")
        raise UserError(f"model '{model_path}' ({family}) is English-only and does not take Chinese text ({shown}); "
                        "use English labels, or a multilingual model (chinese_clip, altclip, metaclip_2, siglip2, "
                        "or a multilingual siglip), which take both")
