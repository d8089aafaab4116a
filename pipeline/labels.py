"""Label sets and prompts.

A template marks the label with exactly one underscore (`a photo of a _.`), as in the vendor example; unlike it,
the template applies to every label source. Labels come from a comma-separated list, a UTF-8 file (one per line;
BOM, blank lines and `#` comments ignored) or a named set in `conf/labels/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import UserError

PLACEHOLDER = "_"
# CJK ideographs, CJK punctuation, kana, Hangul and full-width forms: text English CLIP was never trained on.
_CJK = re.compile("[\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
                  "\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
_LIST_SEPARATORS = re.compile("[,\uff0c]")  # ASCII and full-width comma


@dataclass(frozen=True)
class LabelSet:
    name: str
    labels: tuple[str, ...]
    template: str

    @property
    def prompts(self) -> list[str]:
        return [apply_template(self.template, label) for label in self.labels]

    def to_dict(self) -> dict:
        return {"name": self.name, "labels": list(self.labels), "template": self.template}


def check_template(template: str) -> str:
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise UserError(f"labels.template {template!r} has {count} '{PLACEHOLDER}'; it needs exactly one, marking "
                        "where the label goes, e.g. 'a photo of a _.' (use '_' alone for bare labels)")
    return template


def apply_template(template: str, label: str) -> str:
    return template.replace(PLACEHOLDER, label, 1)


def split_label_list(value: str | Sequence[str]) -> list[str]:
    items = _LIST_SEPARATORS.split(value) if isinstance(value, str) else [str(v) for v in value]
    return [item.strip() for item in items if item.strip()]


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


def build_label_set(name: str, items: str | Sequence[str] | None, file: str | None, template: str) -> LabelSet:
    if items and file:
        raise UserError("both labels.list and labels.file are set; give one label source")
    if file:
        labels, source = read_label_file(file), f"label file '{file}'"
    else:
        labels, source = split_label_list(items or []), f"label set '{name}'"
    if not labels:
        raise UserError(f"{source} has no labels: give LABEL_LIST=\"cat,dog\", LABELS=file or labels=<set>")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError(f"{source} repeats labels {duplicates}; each label must appear once")
    return LabelSet(name=name, labels=tuple(labels), template=check_template(template))


def check_language(label_set: LabelSet, takes_chinese: bool, model_path: str) -> None:
    """English CLIP's tokenizer accepts any bytes but the model never learned Chinese: refuse, early."""
    if takes_chinese:
        return
    texts = [label for label in label_set.labels if _CJK.search(label)]
    if _CJK.search(label_set.template):
        texts.insert(0, f"template {label_set.template!r}")
    if texts:
        shown = ", ".join(texts[:5]) + (" ..." if len(texts) > 5 else "")
        raise UserError(f"model '{model_path}' is English CLIP and does not take Chinese text ({shown}); "
                        "use English labels, or a Chinese-CLIP model (model_type chinese_clip, which takes both)")
