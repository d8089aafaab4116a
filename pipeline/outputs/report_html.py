"""`report.html`: one self-contained page that shows a run, built from its parquet files alone.

Nothing on the page reaches the network: CSS is inline, charts are inline SVG, thumbnails are small base64 JPEGs.
The page carries only aggregates and capped galleries, so a 100M-image run gives a page of the same size as a
1k-image one, and building it streams the parquet files in row groups: counts, histograms and, per label, the
few most and least confident images (heaps), never all rows. It has no scripts. Every piece of text from the run
(paths, labels, messages) goes through `html.escape`.
"""

from __future__ import annotations

import base64
import heapq
import io
import math
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from ..engine.files import atomic_open
from ..errors import ImageError
from ..imaging import decode
from .writers import read_metadata

REPORT_NAME = "report.html"
MAX_BAR_LABELS = 30
MAX_CONFUSION_LABELS = 30
MAX_GALLERY_LABELS = 50
MAX_ERROR_ROWS = 500
HIST_BINS = 20
THUMB_SIDE = 128
THUMB_QUALITY = 70
THUMB_MAX_PIXELS = 100_000_000  # refuse to decode anything bigger for a thumbnail (decompression bombs)

_CSS = """
:root { --fg:#1d2330; --muted:#5b6474; --line:#d8dce3; --bg:#f6f7f9; --accent:#2e6fc9; --bad:#c0392b; }
* { box-sizing: border-box; }
body { margin:0; padding:24px 32px 48px; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
       "Noto Sans","Noto Sans CJK SC",sans-serif; color:var(--fg); background:#fff; }
h1 { font-size:22px; margin:0 0 4px; } h2 { font-size:18px; margin:32px 0 8px; border-bottom:1px solid var(--line);
     padding-bottom:4px; } h3 { font-size:15px; margin:18px 0 6px; } h4 { font-size:13px; margin:8px 0 4px;
     color:var(--muted); font-weight:600; }
.muted, .note { color:var(--muted); } .note { font-size:12px; margin:4px 0; }
dl.kv { display:grid; grid-template-columns:max-content 1fr; gap:4px 16px; margin:8px 0; }
dl.kv dt { color:var(--muted); } dl.kv dd { margin:0; overflow-wrap:anywhere; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin:12px 0; }
.card { background:var(--bg); border:1px solid var(--line); border-radius:6px; padding:8px 14px; min-width:130px; }
.card .v { font-size:20px; font-weight:600; } .card .k { color:var(--muted); font-size:12px; }
.card.bad .v { color:var(--bad); }
svg { max-width:100%; height:auto; } svg text { font-family:inherit; fill:var(--fg); }
table { border-collapse:collapse; font-size:12px; }
th, td { border:1px solid var(--line); padding:3px 6px; text-align:left; vertical-align:top; }
th { background:var(--bg); }
table.confusion td { text-align:right; min-width:34px; } table.confusion td.diag { font-weight:700; }
table.confusion th.pred { writing-mode:vertical-rl; transform:rotate(180deg); white-space:nowrap; }
table.errors td { overflow-wrap:anywhere; white-space:pre-wrap; max-width:520px; }
section.gallery { border-top:1px solid var(--line); margin-top:10px; }
.thumbs { display:flex; flex-wrap:wrap; gap:8px; }
figure.thumb { margin:0; width:140px; font-size:11px; }
figure.thumb img, figure.thumb .missing { display:block; width:128px; height:128px; object-fit:contain;
       background:var(--bg); border:1px solid var(--line); }
figure.thumb .missing { display:flex; align-items:center; justify-content:center; padding:4px; color:var(--muted);
       font-size:10px; overflow:hidden; overflow-wrap:anywhere; text-align:center; }
figcaption { overflow-wrap:anywhere; white-space:pre-wrap; } figcaption .score { font-weight:600; }
"""


def build_report(run_dir: Path, dataset_root: Path | None = None, *, thumbs_per_label: int = 6) -> Path:
    """Write `run_dir/report.html` (atomically) and return its path."""
    run_dir = Path(run_dir)
    pred_path = run_dir / "predictions.parquet"
    if not pred_path.is_file():
        raise FileNotFoundError(f"{pred_path} does not exist: is {run_dir} a run directory?")
    schema = pq.read_schema(pred_path)
    meta = read_metadata(pred_path)
    if dataset_root is None:
        root = (meta.get("dataset") or {}).get("root")
        dataset_root = Path(root) if root else None
    scan = _scan_predictions(pred_path, "truth" in schema.names, thumbs_per_label)
    errors = _scan_errors(run_dir / "errors.parquet")
    metrics = _read_optional(run_dir / "metrics.parquet")
    confusion = _read_optional(run_dir / "confusion.parquet")

    counts = pd.Series(scan.counts, dtype=np.int64)
    counts = counts.iloc[np.lexsort((counts.index.to_numpy(dtype=str), -counts.to_numpy()))]  # ties by name

    parts = [
        _summary(run_dir, meta, scan, errors, metrics, dataset_root),
        _label_counts(counts),
        _confidence(scan),
    ]
    if confusion is not None:
        parts.append(_confusion(confusion))
    choice = _read_choice(run_dir / "classifier.json")
    if choice is not None or (run_dir / "calibration.parquet").is_file():
        parts.append(_calibration(choice, _read_optional(run_dir / "calibration.parquet"), metrics))
    parts.append(_review(_read_optional(run_dir / "review.parquet"), dataset_root))
    parts.append(_galleries(scan, counts, dataset_root, thumbs_per_label, metrics))
    parts.append(_errors(errors))

    title = f"Report: {run_dir.name}"
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{escape(title)}</h1>\n" + "\n".join(parts) + "\n</body>\n</html>\n")
    out = run_dir / REPORT_NAME
    with atomic_open(out, "w", encoding="utf-8") as fh:
        fh.write(page)
    return out


# ---------------------------------------------------------------- inputs

FINE_BINS = 100_000  # score quantiles from a histogram this fine are exact to 1e-5


@dataclass
class Scan:
    """What the page shows of predictions.parquet, gathered in one streamed pass."""

    rows: int = 0
    counts: Counter = field(default_factory=Counter)
    fine: np.ndarray = field(default_factory=lambda: np.zeros(FINE_BINS, np.int64))  # scores in [0, 1]
    truth_rows: int | None = None  # None: no truth column
    top: dict[str, list] = field(default_factory=dict)  # label -> heap of the most confident (score, -path)
    low: dict[str, list] = field(default_factory=dict)  # label -> heap of the least confident

    def quantile(self, q: float) -> float:
        if not self.fine.sum():
            return float("nan")
        cumulative = np.cumsum(self.fine)
        index = int(np.searchsorted(cumulative, q * cumulative[-1], side="left"))
        return (index + 0.5) / FINE_BINS

    def gallery(self, label: str) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """(most confident first, least confident first); the second leaves out what the first shows."""
        top = sorted(self.top.get(label, []), key=lambda r: (-r[0], r[1]))
        shown = {path for _, path in top}
        low = sorted(self.low.get(label, []), key=lambda r: (r[0], _Desc(r[1])))
        low = [r for r in low if r[1] not in shown][: max(0, self.counts[label] - len(top))]
        return [(p, s) for s, p in top], [(p, s) for s, p in low]


class _Desc(str):
    """A string that sorts backwards (ties among the least confident go by path, descending, as before)."""

    def __lt__(self, other):  # noqa: D105
        return str.__gt__(self, other)


def _scan_predictions(path: Path, has_truth: bool, per_label: int) -> Scan:
    scan = Scan(truth_rows=0 if has_truth else None)
    columns = ["path", "label", "score"] + (["truth"] if has_truth else [])
    for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=65_536):
        paths, labels = batch.column("path").to_pylist(), batch.column("label").to_pylist()
        scores = batch.column("score").to_numpy().astype(np.float64)
        scan.rows += len(paths)
        scan.counts.update(labels)
        finite = scores[np.isfinite(scores)]
        scan.fine += np.histogram(np.clip(finite, 0.0, 1.0), bins=FINE_BINS, range=(0.0, 1.0))[0]
        if has_truth:
            scan.truth_rows += len(paths) - batch.column("truth").null_count
        if per_label:
            _keep_extremes(scan, paths, labels, scores, per_label)
    scan.top = {k: [(s, str(p)) for s, p in v] for k, v in scan.top.items()}
    scan.low = {k: [(-s, p) for s, p in v] for k, v in scan.low.items()}
    return scan


def _keep_extremes(scan: Scan, paths: list[str], labels: list[str], scores: np.ndarray, per_label: int) -> None:
    """Offer each label's most confident (ties: smaller path first) and least confident (ties: larger path first)
    rows of a batch to its heaps; only a batch's few candidates per label go through Python."""
    names, which = np.unique(np.asarray(labels, dtype=object), return_inverse=True)
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(len(names) + 1))
    for k, label in enumerate(names):
        rows = order[bounds[k]:bounds[k + 1]]
        if len(rows) > 2 * per_label:  # a row outside the batch's top and bottom per_label (by score) cannot win
            ranked = rows[np.argsort(scores[rows], kind="stable")]
            cut = scores[ranked[per_label - 1]], scores[ranked[-per_label]]
            rows = rows[(scores[rows] <= cut[0]) | (scores[rows] >= cut[1])]
        for i in rows.tolist():
            _keep(scan.top.setdefault(label, []), (scores[i], _Desc(paths[i])), per_label)
            _keep(scan.low.setdefault(label, []), (-scores[i], paths[i]), per_label)


def _keep(heap: list, item: tuple, size: int) -> None:
    """Keep the `size` largest items of a stream in a min-heap."""
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif heap[0] < item:
        heapq.heapreplace(heap, item)


@dataclass
class ErrorScan:
    rows: int
    by_type: Counter
    first: list[tuple]  # the first MAX_ERROR_ROWS rows: path, stage, error type, message


def _scan_errors(path: Path) -> ErrorScan | None:
    if not path.is_file():
        return None
    by_type: Counter = Counter()
    first: list[tuple] = []
    rows = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=["path", "stage", "error_type", "message"]):
        columns = [batch.column(i).to_pylist() for i in range(4)]
        by_type.update(columns[2])
        rows += batch.num_rows
        if len(first) < MAX_ERROR_ROWS:
            first += list(zip(*columns))[: MAX_ERROR_ROWS - len(first)]
    return ErrorScan(rows, by_type, first)


def _read_optional(path: Path, columns: list[str] | None = None) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    return pq.read_table(path, columns=columns).to_pandas()


def _templates(meta: dict[str, Any]) -> list[str]:
    label_set = meta.get("label_set") or {}
    for value in (meta.get("templates"), label_set.get("templates"), meta.get("template"), label_set.get("template")):
        if isinstance(value, str) and value:
            return [value]
        if isinstance(value, (list, tuple)) and value:
            return [str(v) for v in value]
    return []


def _overall(metrics: pd.DataFrame | None) -> dict[str, float]:
    if metrics is None or metrics.empty:
        return {}
    rows = metrics[metrics["scope"] == "overall"]
    return {str(m): float(v) for m, v in zip(rows["metric"], rows["value"])}


def _per_class(metrics: pd.DataFrame | None) -> dict[str, dict[str, float]]:
    if metrics is None or metrics.empty:
        return {}
    rows = metrics[(metrics["scope"] == "class") & metrics["label"].notna()]
    out: dict[str, dict[str, float]] = {}
    for label, metric, value in zip(rows["label"], rows["metric"], rows["value"]):
        out.setdefault(str(label), {})[str(metric)] = float(value)
    return out


# ---------------------------------------------------------------- sections


def _summary(run_dir: Path, meta: dict, scan: Scan, errors: ErrorScan | None,
             metrics: pd.DataFrame | None, dataset_root: Path | None) -> str:
    model = meta.get("model") or {}
    label_set = meta.get("label_set") or {}
    labels = label_set.get("labels") or []
    n_err = 0 if errors is None else errors.rows
    overall = _overall(metrics)
    cards = [_card("images classified", f"{scan.rows:,}"),
             _card("errors", f"{n_err:,}", bad=n_err > 0)]
    for key, name in (("top1_accuracy", "top-1 accuracy"), ("top5_accuracy", "top-5 accuracy"),
                      ("mean_per_class_recall", "mean per-class recall")):
        if key in overall and not math.isnan(overall[key]):
            cards.append(_card(name, f"{overall[key]:.1%}"))
    if scan.rows:
        cards.append(_card("median confidence", f"{scan.quantile(0.5):.3f}"))
    templates = _templates(meta)
    rows = [
        ("run directory", str(run_dir.resolve())),
        ("model", f"{model.get('name', '?')} ({model.get('family', '?')})"),
        ("model path", model.get("path")),
        ("model fingerprint", (model.get("fingerprint") or "")[:16] or None),
        ("label set", f"{label_set.get('name', '?')}: {len(labels)} labels" if label_set else None),
        ("labels", ", ".join(map(str, labels[:40])) + (f", … ({len(labels) - 40} more)" if len(labels) > 40 else "")
         if labels else None),
        ("template" if len(templates) == 1 else f"templates ({len(templates)})",
         " | ".join(templates[:20]) + (" | …" if len(templates) > 20 else "") if templates else None),
        ("dataset root", str(dataset_root) if dataset_root else "unknown (thumbnails shown as placeholders)"),
    ]
    if scan.truth_rows is not None:
        rows.append(("images with ground truth", f"{scan.truth_rows:,}"))
    kv = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in rows if v)
    return (f'<section id="summary">\n<h2>Summary</h2>\n<div class="cards">{"".join(cards)}</div>\n'
            f'<dl class="kv">{kv}</dl>\n</section>')


def _card(key: str, value: str, bad: bool = False) -> str:
    cls = "card bad" if bad else "card"
    return f'<div class="{cls}"><div class="v">{escape(value)}</div><div class="k">{escape(key)}</div></div>'


def _label_counts(counts: pd.Series) -> str:
    head = '<section id="label-counts">\n<h2>Images per predicted label</h2>\n'
    if counts.empty:
        return head + '<p class="note">No predictions.</p>\n</section>'
    shown = counts.iloc[:MAX_BAR_LABELS]
    note = (f'<p class="note">Showing the {len(shown)} most frequent of {len(counts)} labels.</p>\n'
            if len(counts) > len(shown) else "")
    label_w, bar_w, row_h, right = 180, 520, 20, 70
    width, height = label_w + bar_w + right, row_h * len(shown) + 10
    peak = max(int(shown.max()), 1)
    bars = []
    for i, (label, n) in enumerate(shown.items()):
        y = 5 + i * row_h
        w = max(bar_w * int(n) / peak, 1.0)
        text = _clip(str(label), 26)
        bars.append(
            f'<g class="bar" data-label="{escape(str(label))}"><title>{escape(str(label))}: {int(n):,}</title>'
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" font-size="12">{escape(text)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 5}" fill="#2e6fc9"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 14}" font-size="11">{int(n):,}</text></g>')
    svg = (f'<svg width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="images per label">{"".join(bars)}</svg>')
    return head + note + svg + "\n</section>"


def _confidence(scan: Scan) -> str:
    head = '<section id="confidence">\n<h2>Confidence (top score) histogram</h2>\n'
    if scan.rows == 0:
        return head + '<p class="note">No predictions.</p>\n</section>'
    hist = scan.fine.reshape(HIST_BINS, -1).sum(axis=1)
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    left, bottom, plot_w, plot_h = 50, 30, 600, 200
    width, height = left + plot_w + 20, plot_h + bottom + 20
    peak = max(int(hist.max()), 1)
    bin_w = plot_w / HIST_BINS
    items = [f'<line x1="{left}" y1="{10 + plot_h}" x2="{left + plot_w}" y2="{10 + plot_h}" stroke="#888"/>',
             f'<line x1="{left}" y1="10" x2="{left}" y2="{10 + plot_h}" stroke="#888"/>',
             f'<text x="{left - 6}" y="16" text-anchor="end" font-size="11">{peak:,}</text>',
             f'<text x="{left - 6}" y="{10 + plot_h}" text-anchor="end" font-size="11">0</text>']
    for i, n in enumerate(hist):
        h = plot_h * int(n) / peak
        x = left + i * bin_w
        items.append(f'<rect class="bin" x="{x + 1:.1f}" y="{10 + plot_h - h:.1f}" width="{bin_w - 2:.1f}" '
                     f'height="{h:.1f}" fill="#5a9be6"><title>{edges[i]:.2f}–{edges[i + 1]:.2f}: {int(n):,}'
                     f'</title></rect>')
    for t in np.linspace(0.0, 1.0, 6):
        x = left + plot_w * t
        items.append(f'<text x="{x:.1f}" y="{plot_h + 26}" text-anchor="middle" font-size="11">{t:.1f}</text>')
    svg = (f'<svg width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="confidence histogram">{"".join(items)}</svg>')
    q = [scan.quantile(f) for f in (0.1, 0.5, 0.9)]
    note = (f'<p class="note">{int(scan.fine.sum()):,} images in {HIST_BINS} bins of width {1 / HIST_BINS:.2f}; '
            f'10th / 50th / 90th percentile: {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}.</p>')
    return head + svg + "\n" + note + "\n</section>"


def _confusion(confusion: pd.DataFrame) -> str:
    head = ('<section id="confusion">\n<h2>Confusion matrix</h2>\n'
            '<p class="note">Rows: true label; columns: predicted label. Shading is the share of the row.</p>\n')
    if confusion.empty:
        return head + '<p class="note">No images with ground truth.</p>\n</section>'
    conf = confusion.assign(true_label=confusion["true_label"].fillna("(none)").astype(str),
                            predicted_label=confusion["predicted_label"].fillna("(none)").astype(str))
    matrix = conf.pivot_table(index="true_label", columns="predicted_label", values="count",
                              aggfunc="sum", fill_value=0)
    row_tot = matrix.sum(axis=1)
    true_order = sorted(matrix.index, key=lambda t: (-int(row_tot[t]), t))
    note = ""
    if len(true_order) > MAX_CONFUSION_LABELS:
        note = (f'<p class="note">Showing the {MAX_CONFUSION_LABELS} most frequent of {len(true_order)} true labels; '
                f'predictions of any other label are summed under "other".</p>\n')
        true_order = true_order[:MAX_CONFUSION_LABELS]
        cols = list(true_order)
    else:
        col_tot = matrix.sum(axis=0)
        cols = list(true_order) + sorted((c for c in matrix.columns if c not in set(true_order)),
                                         key=lambda c: (-int(col_tot[c]), c))
    shown_cols = [c for c in cols if c in matrix.columns]
    sub = matrix.reindex(index=true_order, columns=cols, fill_value=0)
    other = (matrix.loc[true_order].sum(axis=1) - matrix.loc[true_order, shown_cols].sum(axis=1)
             if len(shown_cols) < len(matrix.columns) else None)
    header = "".join(f'<th class="pred" title="{escape(c)}">{escape(_clip(c, 24))}</th>' for c in cols)
    if other is not None:
        header += '<th class="pred">other</th>'
    rows = []
    for t in true_order:
        total = int(row_tot[t])
        cells = []
        values = [(c, int(sub.at[t, c])) for c in cols] + ([("other", int(other[t]))] if other is not None else [])
        for c, n in values:
            share = n / total if total else 0.0
            colour = "46,160,90" if c == t else "192,57,43"
            style = f' style="background:rgba({colour},{0.08 + 0.8 * share:.2f})"' if n else ""
            cls = ' class="diag"' if c == t else ""
            cells.append(f'<td{cls}{style} title="{escape(t)} → {escape(c)}: {n:,} ({share:.0%})">'
                         f'{n if n else ""}</td>')
        rows.append(f'<tr><th title="{escape(t)}">{escape(_clip(t, 30))}</th>{"".join(cells)}'
                    f'<td class="total">{total:,}</td></tr>')
    table = (f'<table class="confusion"><thead><tr><th>true \\ predicted</th>{header}<th>total</th></tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>')
    return head + note + table + "\n</section>"


def _galleries(scan: Scan, counts: pd.Series, dataset_root: Path | None, per_label: int,
               metrics: pd.DataFrame | None) -> str:
    head = '<section id="galleries">\n<h2>Galleries per predicted label</h2>\n'
    if counts.empty:
        return head + '<p class="note">No predictions.</p>\n</section>'
    labels = list(counts.index[:MAX_GALLERY_LABELS])
    note = (f'<p class="note">Showing the {len(labels)} most frequent of {len(counts)} labels.</p>\n'
            if len(counts) > len(labels) else "")
    note += (f'<p class="note">For each label, the {per_label} most confident and the {per_label} least confident '
             f'images{"" if dataset_root else "; the dataset root is unknown, so images show as placeholders"}.</p>\n')
    per_class = _per_class(metrics)
    sections = []
    for label in labels:
        top, low = scan.gallery(label)
        stats = per_class.get(str(label), {})
        extra = "".join(f" · {k} {stats[k]:.2f}" if k != "support" else f" · support {int(stats[k]):,}"
                        for k in ("precision", "recall", "support") if k in stats)
        parts = [f'<section class="gallery" data-label="{escape(str(label))}">',
                 f'<h3>{escape(str(label))} <span class="muted">({int(counts[label]):,} images{escape(extra)})'
                 '</span></h3>', '<h4>Most confident</h4>', _thumbs(top, dataset_root, "top")]
        if low:
            parts += ['<h4>Least confident</h4>', _thumbs(low, dataset_root, "low")]
        parts.append("</section>")
        sections.append("\n".join(parts))
    return head + note + "\n".join(sections) + "\n</section>"


def _thumbs(rows: list[tuple[str, float]], dataset_root: Path | None, kind: str,
            captions: list[str] | None = None) -> str:
    figs = []
    for number, (path, score) in enumerate(rows):
        data = _thumbnail(dataset_root / path) if dataset_root is not None else None
        epath = escape(str(path))
        if data is not None:
            img = (f'<img src="data:image/jpeg;base64,{data}" alt="{epath}" title="{epath}" '
                   f'loading="lazy" decoding="async">')
        else:
            img = f'<div class="missing" title="{epath}">image unavailable<br>{epath}</div>'
        extra = f"<br>{escape(captions[number])}" if captions else ""
        figs.append(f'<figure class="thumb">{img}<figcaption><span class="score">{score:.3f}</span> '
                    f'{epath}{extra}</figcaption></figure>')
    return f'<div class="thumbs {kind}">{"".join(figs)}</div>'


REVIEW_SHOWN = 24


def _review(review: pd.DataFrame | None, dataset_root: Path | None) -> str:
    head = '<section id="review">\n<h2>Review first</h2>\n'
    if review is None or review.empty:
        return head + '<p class="note">Nothing to review.</p>\n</section>'
    shown = review.head(REVIEW_SHOWN)
    captions = [f"{row.label}" + (f" / {row.runner_up} {row.runner_up_score:.3f}" if row.runner_up else "")
                + f" · {row.reason}" + (f" · zero-shot: {row.zero_shot_label}" if row.reason == "disagree" else "")
                for row in shown.itertuples()]
    note = (f'<p class="note">The {len(shown)} images of review.parquet ({len(review):,} rows) a person should look '
            'at first: where zero-shot and the adapted classifier disagree, then by the margin between the first two '
            'labels (score, path, label / runner-up, reason). Correct the label column of review.parquet and give '
            'it back as EXAMPLES= (labels.examples): the next run encodes no image of the dataset again.</p>\n')
    rows = list(zip(shown["path"], shown["score"].astype(float)))
    return head + note + _thumbs(rows, dataset_root, "review", captions) + "\n</section>"


def _read_choice(path: Path) -> dict | None:
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _calibration(choice: dict | None, reliability: pd.DataFrame | None, metrics: pd.DataFrame | None) -> str:
    head = '<section id="calibration">\n<h2>Classifier and calibration</h2>\n'
    parts = []
    if choice is not None:
        settings = ", ".join(f"{k}={v:g}" for k, v in (choice.get("settings") or {}).items())
        parts.append(f'<dl class="kv"><dt>classifier</dt><dd>{escape(choice["method"])}'
                     f'{escape(f"({settings})" if settings else "")}</dd>'
                     f'<dt>chosen by</dt><dd>{escape(choice.get("rule", ""))}</dd>'
                     f'<dt>examples</dt><dd>{choice.get("used", 0)} used, {choice.get("failed", 0)} failed</dd>'
                     f'<dt>temperature</dt><dd>{choice.get("temperature", 1.0):.3f}</dd></dl>')
    if reliability is not None and not reliability.empty:
        ece = {r.metric: r.value for r in metrics.itertuples() if r.scope == "calibration"} \
            if metrics is not None else {}
        parts.append(_reliability_svg({name: group for name, group in reliability.groupby("scores", sort=False)}))
        parts.append(f'<p class="note">On the images with truth (examples left out): expected calibration error '
                     f'{ece.get("ece_uncalibrated", float("nan")):.3f} before the temperature, '
                     f'{ece.get("ece_calibrated", float("nan")):.3f} after.</p>')
    elif choice is not None and choice.get("calibration_before"):
        bins = {name: pd.DataFrame(choice[key]["bins"]) for name, key in
                (("uncalibrated", "calibration_before"), ("calibrated", "calibration_after"))}
        parts.append(_reliability_svg(bins))
        parts.append(f'<p class="note">On the examples, each scored by a classifier fitted without it: expected '
                     f'calibration error {choice["calibration_before"]["ece"]:.3f} before the temperature, '
                     f'{choice["calibration_after"]["ece"]:.3f} after.</p>')
    return head + "\n".join(parts) + "\n</section>"


def _reliability_svg(bins: dict[str, pd.DataFrame]) -> str:
    """A reliability diagram: accuracy against mean confidence per bin, one polyline per set of scores."""
    size, pad = 260, 36
    items = [f'<rect x="{pad}" y="10" width="{size}" height="{size}" fill="none" stroke="#888"/>',
             f'<line x1="{pad}" y1="{10 + size}" x2="{pad + size}" y2="10" stroke="#bbb" stroke-dasharray="4 3"/>',
             f'<text x="{pad + size / 2}" y="{size + 34}" text-anchor="middle" font-size="11">confidence</text>',
             f'<text x="12" y="{10 + size / 2}" font-size="11" transform="rotate(-90 12 {10 + size / 2})" '
             'text-anchor="middle">accuracy</text>']
    colours = {"uncalibrated": "#c0392b", "calibrated": "#2e6fc9"}
    for number, (name, table) in enumerate(bins.items()):
        filled = table[table["count"] > 0]
        points = " ".join(f"{pad + size * c:.1f},{10 + size * (1 - a):.1f}"
                          for c, a in zip(filled["confidence"], filled["accuracy"]))
        colour = colours.get(name, "#555")
        items.append(f'<polyline class="{escape(name)}" points="{points}" fill="none" stroke="{colour}" '
                     f'stroke-width="2"/>')
        items.append(f'<text x="{pad + size + 8}" y="{24 + 16 * number}" font-size="11" fill="{colour}">'
                     f'{escape(name)}</text>')
    width, height = pad + size + 110, size + 44
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="reliability diagram">{"".join(items)}</svg>')



def _thumbnail(path: Path) -> str | None:
    """A base64 JPEG at most THUMB_SIDE px on its longer side, or None if the file can't be read as an image."""
    try:
        rgb = decode(path, max_pixels=THUMB_MAX_PIXELS, draft_size=(THUMB_SIDE, THUMB_SIDE))
        rgb.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=THUMB_QUALITY, optimize=True)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    except (ImageError, OSError):  # a broken image becomes a placeholder, never a failed report
        return None


def _errors(errors: ErrorScan | None) -> str:
    head = '<section id="errors">\n<h2>Images that could not be classified</h2>\n'
    if errors is None:
        return head + '<p class="note">No errors.parquet in this run.</p>\n</section>'
    if not errors.rows:
        return head + '<p class="note">None: every image was classified.</p>\n</section>'
    summary = ", ".join(f"{escape(str(t))}: {int(n):,}" for t, n in errors.by_type.most_common())
    note = f'<p class="note">{errors.rows:,} errors ({summary}).</p>\n'
    if errors.rows > len(errors.first):
        note += f'<p class="note">Showing the first {len(errors.first):,} of {errors.rows:,} rows.</p>\n'
    rows = "".join(f'<tr class="error"><td>{escape(str(p))}</td><td>{escape(str(s))}</td><td>{escape(str(t))}</td>'
                   f'<td>{escape(str(m))}</td></tr>' for p, s, t, m in errors.first)
    table = (f'<table class="errors"><thead><tr><th>path</th><th>stage</th><th>error type</th><th>message</th></tr>'
             f'</thead><tbody>{rows}</tbody></table>')
    return head + note + table + "\n</section>"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # newlines and tabs in a label or path become spaces in a chart
    return text if len(text) <= width else text[: width - 1] + "…"
