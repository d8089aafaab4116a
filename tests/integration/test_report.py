"""report.html: built from a hand-made run directory, checked as text and rendered in headless Chromium."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from pipeline.outputs.report_html import MAX_ERROR_ROWS, build_report
from pipeline.outputs.writers import ERRORS_SCHEMA, METADATA_KEY
from tests.helpers import ROOT
LABELS = ["circle", "square", "triangle"]
WEIRD = 'odd <b>&"name\nline.png'  # a real file name: tag, ampersand, quote and a newline
UNICODE = "猫 café.jpg"
MISSING = "gone/missing.jpg"  # classified, then deleted: its thumbnail becomes a placeholder
N_ERRORS = 3


# ---------------------------------------------------------------- fixture run directory


def _schema(meta: dict, truth: bool) -> pa.Schema:
    """predictions.parquet's schema, spelled out here so the fixture pins the contract the report reads."""
    fields = [
        pa.field("path", pa.string(), nullable=False), pa.field("label", pa.string(), nullable=False),
        pa.field("label_index", pa.int32(), nullable=False), pa.field("score", pa.float32(), nullable=False),
        pa.field("topk_labels", pa.list_(pa.string()), nullable=False),
        pa.field("topk_scores", pa.list_(pa.float32()), nullable=False),
        pa.field("probs", pa.list_(pa.float32()), nullable=False),
        pa.field("width", pa.int32(), nullable=False), pa.field("height", pa.int32(), nullable=False),
    ] + ([pa.field("truth", pa.string(), nullable=True)] if truth else [])
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta, ensure_ascii=False)})


def _draw(path: Path, shape: str, size: tuple[int, int], colour: tuple[int, int, int], mode: str = "RGB") -> None:
    img = Image.new(mode, size, (240, 240, 240) if mode == "RGB" else (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    w, h = size
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(w // 2, h // 5), (w // 5, 4 * h // 5), (4 * w // 5, 4 * h // 5)], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _make_run(base: Path) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(0)
    data, run = base / "data", base / "run"
    run.mkdir(parents=True)
    rows = []  # (path, truth, predicted label index or -1, probs)
    colours = {"circle": (200, 40, 40), "square": (40, 120, 200), "triangle": (40, 160, 70)}
    for i in range(24):
        shape = LABELS[i % 3]
        rel = f"{shape}s/img{i:02d}.jpg" if i % 5 else f"{shape}s/img{i:02d}.png"
        _draw(data / rel, shape, (int(rng.integers(60, 400)), int(rng.integers(60, 400))), colours[shape])
        rows.append((rel, shape))
    _draw(data / WEIRD, "circle", (90, 70), (120, 0, 160), mode="RGBA")
    rows.append((WEIRD, "circle"))
    _draw(data / UNICODE, "square", (300, 200), (0, 0, 0))
    rows.append((UNICODE, "triangle"))
    rows.append((MISSING, None))  # no ground truth for this one

    probs = rng.dirichlet(np.ones(3) * 0.6, size=len(rows)).astype(np.float32)
    for j, (_, truth) in enumerate(rows):  # mostly right, with confidence spread out
        if truth is not None and j % 4:
            probs[j] = np.roll(np.sort(probs[j])[::-1], LABELS.index(truth))
    order = np.argsort(-probs, axis=1, kind="stable")
    best = order[:, 0].astype(np.int32)
    score = probs[np.arange(len(rows)), best]
    unknown = score < 0.4
    label_index = np.where(unknown, -1, best).astype(np.int32)
    label = [("unknown" if u else LABELS[b]) for u, b in zip(unknown, best)]
    meta = {
        "model": {"name": "tiny-clip", "path": "/models/tiny", "family": "clip", "fingerprint": "ab" * 32},
        "label_set": {"name": "shapes", "labels": LABELS, "texts": [f"a photo of a {x}." for x in LABELS],
                      "templates": ["a photo of a {}."]},
        "template": "a photo of a {}.", "templates": ["a photo of a {}."], "config": {"topk": 2},
        "dataset": {"root": str(data)},
    }
    schema = _schema(meta, truth=True)
    sizes = [Image.open(data / p).size if (data / p).exists() else (64, 64) for p, _ in rows]
    table = pa.Table.from_pydict({
        "path": [p for p, _ in rows], "label": label, "label_index": label_index, "score": score,
        "topk_labels": [[LABELS[k] for k in o[:2]] for o in order],
        "topk_scores": [list(probs[j, o[:2]]) for j, o in enumerate(order)],
        "probs": [list(p) for p in probs],
        "width": [w for w, _ in sizes], "height": [h for _, h in sizes],
        "truth": [t for _, t in rows],
    }, schema=schema)
    pq.write_table(table, run / "predictions.parquet")

    errors = [("broken.jpg", "decode", "UnidentifiedImageError", "not a recognised image format", False),
              ('bad <script>alert("x")</script>.jpg', "decode", "OSError", "image file is truncated\n(3 bytes)", False),
              ("empty.png", "decode", "EmptyFile", "empty file (0 bytes)", False)]
    pq.write_table(pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(zip(*errors), ERRORS_SCHEMA)],
                                        schema=ERRORS_SCHEMA), run / "errors.parquet")

    truth_rows = [(t, lab) for (_, t), lab in zip(rows, label) if t is not None]
    pairs: dict[tuple[str, str], int] = {}
    for t, p in truth_rows:
        pairs[(t, p)] = pairs.get((t, p), 0) + 1
    pq.write_table(pa.table({"true_label": pa.array([k[0] for k in pairs], pa.string()),
                             "predicted_label": pa.array([k[1] for k in pairs], pa.string()),
                             "count": pa.array(list(pairs.values()), pa.int64())}), run / "confusion.parquet")
    top1 = float(np.mean([t == p for t, p in truth_rows]))
    metric_rows = [("overall", None, "top1_accuracy", top1), ("overall", None, "top5_accuracy", 1.0),
                   ("overall", None, "mean_per_class_recall", 0.5)]
    for lab in LABELS:
        metric_rows += [("class", lab, "precision", 0.75), ("class", lab, "recall", 0.5),
                        ("class", lab, "support", float(sum(t == lab for t, _ in truth_rows)))]
    pq.write_table(pa.table({"scope": pa.array([r[0] for r in metric_rows], pa.string()),
                             "label": pa.array([r[1] for r in metric_rows], pa.string()),
                             "metric": pa.array([r[2] for r in metric_rows], pa.string()),
                             "value": pa.array([r[3] for r in metric_rows], pa.float64())}),
                   run / "metrics.parquet")
    with open(run / "res.json", "w", encoding="utf-8") as fh:
        json.dump(dict(zip([p for p, _ in rows], label)), fh, ensure_ascii=False)
    return run, data, {"labels": label, "top1": top1}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run, data, info = _make_run(tmp_path_factory.mktemp("report"))
    build_report(run)
    return run, data, info


@pytest.fixture(scope="module")
def page(run_dir):
    return (run_dir[0] / "report.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------- the HTML as text


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.galleries: list[str] = []
        self.error_rows = 0
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        classes = (a.get("class") or "").split()
        if tag == "section" and "gallery" in classes:
            self.galleries.append(a.get("data-label"))
        if tag == "tr" and "error" in classes:
            self.error_rows += 1
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href", "srcset", "action", "poster", "data"):
            if a.get(key):
                self.urls.append(a[key])

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Collect:
    parser = _Collect()
    parser.feed(text)
    parser.close()
    return parser


def test_sections_and_self_contained(page, run_dir):
    doc = _parse(page)
    for section in ("summary", "label-counts", "confidence", "confusion", "galleries", "errors"):
        assert doc.ids.count(section) == 1, section
    assert doc.scripts == 0 and "<link" not in page and "@import" not in page
    assert not [u for u in doc.urls if not u.startswith("data:")]
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "url(" not in page  # no external (or any) CSS resources
    assert doc.imgs and all(src.startswith("data:image/jpeg;base64,") for src in doc.imgs)
    # one gallery per predicted label, most frequent first
    labels = run_dir[2]["labels"]
    counts = {lab: labels.count(lab) for lab in set(labels)}
    assert sorted(doc.galleries) == sorted(counts)
    assert [counts[g] for g in doc.galleries] == sorted(counts.values(), reverse=True)
    assert doc.error_rows == N_ERRORS


def test_summary_content(page, run_dir):
    summary = page[page.index('id="summary"'):page.index('id="label-counts"')]
    for text in ("tiny-clip", "clip", "shapes: 3 labels", "a photo of a {}.", "27", "top-1 accuracy",
                 "top-5 accuracy", "mean per-class recall", f"{run_dir[2]['top1']:.1%}", "100.0%", "50.0%"):
        assert text in summary, text
    assert ">3</div><div class=\"k\">errors" in summary


def test_escaping(page):
    assert html.escape(WEIRD) in page  # in a caption, title, alt
    assert WEIRD not in page and "<b>" not in page
    assert html.escape(UNICODE) in page and UNICODE in page
    assert "<script>" not in page and html.escape('bad <script>alert("x")</script>.jpg') in page
    doc = _parse(page)
    assert any(WEIRD in t for t in doc.text)  # round-trips through a parser as the original string


def test_thumbnails_small_and_placeholders(page, run_dir):
    import base64
    import io

    doc = _parse(page)
    for src in doc.imgs:
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.format == "JPEG" and max(img.size) <= 128
    # the deleted image shows as a placeholder with its path; the weird one (RGBA png) as a thumbnail
    assert re.search(r'class="missing"[^>]*>image unavailable<br>' + re.escape(MISSING), page)
    assert re.search(r'<img src="data:image/jpeg;base64,[^"]+" alt="' + re.escape(html.escape(WEIRD)), page)
    # with a dataset root that does not hold the images, every thumbnail is a placeholder and nothing fails
    out = build_report(run_dir[0], run_dir[0] / "nowhere", thumbs_per_label=2)
    other = out.read_text(encoding="utf-8")
    assert "data:image/jpeg" not in other and other.count('class="missing"') > 0
    build_report(run_dir[0])  # restore the page the browser tests read


def test_atomic_and_capped(tmp_path):
    """A large run: page size does not grow with the row count, galleries and errors are capped."""
    run = tmp_path / "big"
    run.mkdir()
    n, labels = 30_000, [f"label {i:02d}" for i in range(60)]
    rng = np.random.default_rng(1)
    idx = np.minimum(rng.geometric(0.06, size=n) - 1, 59).astype(np.int32)
    probs = rng.dirichlet(np.ones(4), size=n).astype(np.float32)
    meta = {"model": {"name": "m", "family": "chinese_clip"}, "label_set": {"name": "many", "labels": labels}}
    k_off = pa.array(np.arange(0, (n + 1) * 2, 2, dtype=np.int32))
    l_off = pa.array(np.arange(0, (n + 1) * 4, 4, dtype=np.int32))
    table = pa.Table.from_arrays([
        pa.array([f"d/{i}.jpg" for i in range(n)]), pa.array(np.array(labels, dtype=object)[idx], pa.string()),
        pa.array(idx), pa.array(probs.max(axis=1)),
        pa.ListArray.from_arrays(k_off, pa.array(["a"] * 2 * n)),
        pa.ListArray.from_arrays(k_off, pa.array(np.zeros(2 * n, np.float32))),
        pa.ListArray.from_arrays(l_off, pa.array(probs.reshape(-1))),
        pa.array(np.full(n, 10, np.int32)), pa.array(np.full(n, 10, np.int32)),
    ], schema=_schema(meta, truth=False))
    pq.write_table(table, run / "predictions.parquet")
    errs = [(f"e{i}.jpg", "decode", "OSError", "truncated", False) for i in range(MAX_ERROR_ROWS + 100)]
    pq.write_table(pa.Table.from_arrays([pa.array(c) for c in zip(*errs)], schema=ERRORS_SCHEMA),
                   run / "errors.parquet")
    conf = {"true_label": [], "predicted_label": [], "count": []}
    for t in range(45):
        for p in (t, (t + 1) % 45, 50):
            conf["true_label"].append(labels[t])
            conf["predicted_label"].append(labels[p])
            conf["count"].append(100 - t if p == t else 3)
    pq.write_table(pa.table(conf), run / "confusion.parquet")
    (run / "report.html").write_text("old", encoding="utf-8")

    out = build_report(run, tmp_path / "no-images", thumbs_per_label=3)
    page = out.read_text(encoding="utf-8")
    doc = _parse(page)
    assert not [p for p in run.iterdir() if p.name.startswith(".report.html")]  # no temp file left behind
    assert len(doc.galleries) == 50 and "Showing the 50 most frequent of 60 labels" in page
    assert page.count('class="bar"') == 30 and "Showing the 30 most frequent of 60 labels" in page
    assert doc.error_rows == MAX_ERROR_ROWS and f"first {MAX_ERROR_ROWS:,} of {MAX_ERROR_ROWS + 100:,}" in page
    confusion = page[page.index('id="confusion"'):page.index('id="galleries"')]
    assert confusion.count("<tr>") == 31 and ">other</th>" in confusion
    assert page.count('class="bin"') == 20
    assert page.count('class="missing"') == 50 * 6
    assert len(page) < 1_500_000


def test_tolerates_minimal_run(tmp_path):
    """No metadata dataset root, no errors/metrics/confusion files, zero rows: still a page, no confusion."""
    run = tmp_path / "empty-run"
    run.mkdir()
    pq.write_table(_schema({"model": {"name": "m"}}, truth=True).empty_table(), run / "predictions.parquet")
    page = build_report(run).read_text(encoding="utf-8")
    doc = _parse(page)
    assert 'id="confusion"' not in page and doc.galleries == []
    assert {"summary", "label-counts", "confidence", "galleries", "errors"} <= set(doc.ids)


# ---------------------------------------------------------------- jobs/report.py


def test_job_entry_point(run_dir, tmp_path):
    run, data, _ = run_dir
    (run / "report.html").unlink()
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "report.py"), str(run), "--dataset", str(data)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(run / "report.html") and (run / "report.html").stat().st_size > 1000

    empty = tmp_path / "not-a-run"
    empty.mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "report.py"), str(empty)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no predictions.parquet" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- a real browser


def _chromium() -> str:
    exe = shutil.which("chromium")
    if exe:
        return exe
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and we are not root to apt-get install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            if done.returncode:
                pytest.skip(f"installing chromium failed ({' '.join(cmd)}): {done.stderr[-500:]}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"installing chromium failed: {exc}")
    exe = shutil.which("chromium")
    if not exe:
        pytest.skip("apt-get installed chromium but no `chromium` is on PATH")
    return exe


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = _chromium()
    profile = tmp_path_factory.mktemp("chromium-profile")

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, errors="replace")

    return run


def test_browser_dom(browser, run_dir):
    run, _, info = run_dir
    build_report(run)
    done = browser("--enable-logging=stderr", "--v=0", "--dump-dom", (run / "report.html").as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    doc = _parse(done.stdout)
    for section in ("summary", "label-counts", "confidence", "confusion", "galleries", "errors"):
        assert section in doc.ids, section
    assert len(doc.galleries) == len(set(info["labels"]))
    assert doc.error_rows == N_ERRORS
    assert any(WEIRD in t for t in doc.text)
    assert doc.scripts == 0
    console = [line for line in done.stderr.splitlines()
               if "Uncaught" in line or ("CONSOLE(" in line and "error" in line.lower())]
    assert not console, console


def test_browser_screenshot(browser, run_dir, tmp_path):
    run = run_dir[0]
    shot = tmp_path / "shot.png"
    done = browser(f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars",
                   (run / "report.html").as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # not one flat colour: text, bars, thumbnails
