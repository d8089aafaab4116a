"""Datasets where they live: the same images from a folder, CSV and parquet manifests (relative and absolute
paths), tar shards through a brace pattern, an S3 bucket (moto's server on 127.0.0.1, real protocol) and an
HTTP manifest of URLs (http.server) give identical labels and probabilities, keyed as documented; every bad input
gets its clear error or its error row."""

from __future__ import annotations

import io
import shutil
import tarfile

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline import workflow
from pipeline.config import quote_override_value
from pipeline.errors import UserError
from tests.helpers import SAMPLE_IMAGES, statuses, write_shards
from tests.helpers.servers import http_server, s3_server

pytestmark = pytest.mark.slow
IMAGES = sorted(p for p in SAMPLE_IMAGES.iterdir())  # 38 images, JPEG, PNG and WebP
RUN = ("encode.batch_size=4", "labels=pairs", "dataset.truth=null")  # tar shards of 8 make the batches of a folder


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


def _outputs(summary) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    res = (summary.out_dir / "res.json").read_text(encoding="utf-8")
    import json

    return (json.loads(res), pd.read_parquet(summary.out_dir / "predictions.parquet"),
            pd.read_parquet(summary.out_dir / "errors.parquet"))


def _by_name(predictions: pd.DataFrame, key_to_name) -> dict[str, tuple]:
    return {key_to_name(p): (label, tuple(probs)) for p, label, probs in
            zip(predictions["path"], predictions["label"], predictions["probs"])}


def test_every_source_gives_the_same_labels_and_probabilities(compose, tmp_path, s3_env):
    folder = tmp_path / "folder"
    shutil.copytree(SAMPLE_IMAGES, folder)
    # CSV manifest, paths relative to its folder; parquet manifest, absolute paths
    (tmp_path / "csv" / "imgs").mkdir(parents=True)
    for image in IMAGES:
        shutil.copy(image, tmp_path / "csv" / "imgs" / image.name)
    pd.DataFrame({"path": [f"imgs/{p.name}" for p in IMAGES[::-1]]}).to_csv(tmp_path / "csv" / "list.csv", index=False)
    pd.DataFrame({"file": [str(folder / p.name) for p in IMAGES]}).to_parquet(tmp_path / "abs.parquet")
    shards = write_shards(tmp_path / "shards", IMAGES, per_shard=8)
    # S3 bucket prefix
    fs = s3_env.filesystem()
    fs.mkdir("photos-bucket")
    for image in IMAGES:
        fs.pipe(f"photos-bucket/set1/{image.name}", image.read_bytes())
    sources = {
        "folder": ([f"dataset.path={folder}"], lambda k: k),
        "csv": ([f"dataset.path={tmp_path / 'csv' / 'list.csv'}"], lambda k: k.removeprefix("imgs/")),
        "parquet": ([f"dataset.path={tmp_path / 'abs.parquet'}", "dataset.path_column=file"],
                    lambda k: k.rsplit("/", 1)[1]),
        "tar": ([f"dataset.path={quote_override_value(f'{tmp_path}/shards/data-{{0000..{len(shards) - 1:04d}}}.tar')}"],
                lambda k: k.split("/", 1)[1]),
        "s3": (["dataset.path=s3://photos-bucket/set1/"], lambda k: k),
    }
    with http_server(tmp_path) as base:
        urls = [f"{base}/csv/imgs/{p.name}" for p in IMAGES]
        pd.DataFrame({"path": urls}).to_csv(tmp_path / "urls.csv", index=False)
        sources["http"] = ([f"dataset.path={base}/urls.csv"], lambda k: k.rsplit("/", 1)[1])
        results, keys = {}, {}
        for name, (overrides, key_to_name) in sources.items():
            summary = workflow.run(compose(*RUN, *overrides, out=f"out-{name}", cache=f"cache-{name}"))
            res, predictions, errors = _outputs(summary)
            assert summary.classified == len(IMAGES) and len(errors) == 0, (name, errors)
            results[name] = _by_name(predictions, key_to_name)
            assert sorted(res) == sorted(predictions["path"])
            keys[name] = sorted(predictions["path"])
    reference = results["folder"]
    for name, result in results.items():
        assert result == reference, f"{name} differs from the folder"  # labels and probabilities bit for bit
    assert keys["csv"][0] == "imgs/blue_circle_00.jpg" and keys["parquet"][0] == str(folder / "blue_circle_00.jpg")
    assert keys["tar"][0] == "data-0000.tar/blue_circle_00.jpg" and keys["s3"][0] == "blue_circle_00.jpg"
    assert keys["http"][0] == urls[0]


def test_truth_from_a_manifest_column_and_from_tar_members(compose, tmp_path):
    truth = pd.read_csv(SAMPLE_IMAGES.parent / "truth.csv").dropna(subset=["shape"])
    known = dict(zip(truth["path"], truth["shape"]))
    pd.DataFrame({"path": [str(SAMPLE_IMAGES / p) for p in known], "label": list(known.values())}) \
        .to_csv(tmp_path / "m.csv", index=False)
    from_manifest = workflow.run(compose("labels=shapes", f"dataset.path={tmp_path / 'm.csv'}",
                                         "dataset.truth=null", "dataset.truth_column=label", out="m"))
    write_shards(tmp_path / "shards", [SAMPLE_IMAGES / p for p in sorted(known)], 10, truth=known)
    from_tars = workflow.run(compose("labels=shapes", f"dataset.path={tmp_path / 'shards'}", "dataset.truth=null",
                                     "dataset.truth_member=cls", out="t"))
    for summary in (from_manifest, from_tars):
        metrics = pd.read_parquet(summary.out_dir / "metrics.parquet")
        overall = metrics[metrics.scope == "overall"].set_index("metric")["value"]
        assert overall["images_with_truth"] == len(known) and overall["top1_accuracy"] >= 0.9
        predictions = pd.read_parquet(summary.out_dir / "predictions.parquet")
        assert predictions["truth"].notna().all()


def test_bad_inputs_get_error_rows_and_the_counts_add_up(compose, tmp_path):
    good = IMAGES[:6]
    # a manifest: a row whose file is missing
    rows = [str(p) for p in good] + [str(tmp_path / "gone.jpg")]
    pd.DataFrame({"path": rows}).to_csv(tmp_path / "m.csv", index=False)
    summary = workflow.run(compose(f"dataset.path={tmp_path / 'm.csv'}", "dataset.truth=null", out="m"))
    _, predictions, errors = _outputs(summary)
    assert summary.discovered == len(predictions) + len(errors) == 7
    assert errors.set_index("path").loc[str(tmp_path / "gone.jpg"), "error_type"] == "FileNotFoundError"
    # tar shards: a member that is not an image, and a shard cut short
    shards = write_shards(tmp_path / "shards", good, per_shard=3)
    with tarfile.open(shards[0], "a") as tar:
        info = tarfile.TarInfo("notes.jpg")
        info.size = 9
        tar.addfile(info, io.BytesIO(b"not a jpg"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    summary = workflow.run(compose(f"dataset.path={tmp_path / 'shards'}", "dataset.truth=null", out="t",
                                   cache="cache-t"))
    _, predictions, errors = _outputs(summary)
    by_path = errors.set_index("path")
    assert by_path.loc["data-0000.tar/notes.jpg", "error_type"] == "UnidentifiedImageError"
    truncated = by_path.loc["data-0001.tar"]
    assert truncated["error_type"] == "TruncatedTar" and not truncated["transient"]
    assert summary.discovered == len(predictions) + len(errors) and len(predictions) >= 3
    assert statuses(summary)["encode_images"] == "ran"
    again = workflow.run(compose(f"dataset.path={tmp_path / 'shards'}", "dataset.truth=null", out="t2",
                                 cache="cache-t"))
    assert statuses(again)["encode_images"] == "reused"  # the truncation lies in the data: not read again


def test_http_404_and_unreachable_hosts_are_error_rows(compose, tmp_path):
    (tmp_path / "site").mkdir()
    shutil.copy(IMAGES[0], tmp_path / "site" / IMAGES[0].name)
    from tests.helpers.servers import free_port

    with http_server(tmp_path / "site") as base:
        closed = f"http://127.0.0.1:{free_port()}/nothing-listens.jpg"
        rows = [f"{base}/{IMAGES[0].name}", f"{base}/missing.jpg", closed]
        pd.DataFrame({"path": rows}).to_csv(tmp_path / "site" / "urls.csv", index=False)
        summary = workflow.run(compose(f"dataset.path={base}/urls.csv", "dataset.truth=null", "dataset.retries=1",
                                       "dataset.io_timeout=5"))
    _, predictions, errors = _outputs(summary)
    by_path = errors.set_index("path")
    assert list(predictions["path"]) == [rows[0]]
    assert by_path.loc[rows[1], "error_type"] == "FileNotFoundError" and not by_path.loc[rows[1], "transient"]
    assert by_path.loc[closed, "transient"] and "after 2 attempts" in by_path.loc[closed, "message"]
    assert not summary.artifacts["encode_images"].final  # the unreachable host is tried again next run


@pytest.mark.parametrize("make,message", [
    (lambda tmp, s3: (pd.DataFrame({"file": ["a.jpg"]}).to_csv(tmp / "m.csv", index=False), tmp / "m.csv")[1],
     "has no column 'path'"),
    (lambda tmp, s3: (pd.DataFrame({"path": ["a.jpg", "b.jpg", "a.jpg"]}).to_csv(tmp / "m.csv", index=False),
                      tmp / "m.csv")[1], "lists 1 paths more than once"),
    (lambda tmp, s3: quote_override_value(f"{tmp}/none-{{0000..0003}}.tar"), "matches no shard"),
    (lambda tmp, s3: "s3://no-such-bucket/prefix/", "bucket 'no-such-bucket' does not exist"),
])
def test_global_problems_stop_before_any_image_is_read(compose, tmp_path, s3_env, monkeypatch, make, message):
    from pipeline.stages import encode_images, encode_labels

    for module, name in ((encode_images, "encode_images"), (encode_labels, "encode_labels")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the model ran or an image was read"))
    with pytest.raises(UserError, match=message):
        workflow.run(compose(f"dataset.path={make(tmp_path, s3_env)}", "dataset.truth=null"))


def test_wrong_credentials_are_refused_clearly(compose, s3_env, monkeypatch):
    fs = s3_env.filesystem()
    fs.mkdir("private")
    fs.pipe("private/x/a.jpg", IMAGES[0].read_bytes())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(UserError, match="refused.*check the credentials"):
        workflow.run(compose("dataset.path=s3://private/x/", "dataset.truth=null"))


def test_a_changed_object_re_encodes_only_its_chunk(compose, s3_env):
    fs = s3_env.filesystem()
    fs.mkdir("changing")
    for image in IMAGES:
        fs.pipe(f"changing/p/{image.name}", image.read_bytes())
    args = ("dataset.path=s3://changing/p/", "dataset.truth=null", "encode.chunk_size=8")
    first = workflow.run(compose(*args))
    chunks = len(first.artifacts["encode_images"].chunks())
    same = workflow.run(compose(*args, out="same"))
    assert statuses(same)["discover"] == "unchanged" and statuses(same)["encode_images"] == "reused"
    fs.pipe(f"changing/p/{IMAGES[5].name}", IMAGES[6].read_bytes())  # new content, new ETag
    changed = workflow.run(compose(*args, out="changed"))
    assert statuses(changed)["encode_images"] == "resumed" and chunks > 2
    assert changed.counters["chunks_encoded"] == 1 and changed.counters["chunks_reused"] == chunks - 1
    predictions = pd.read_parquet(changed.out_dir / "predictions.parquet").set_index("path")
    before = pd.read_parquet(first.out_dir / "predictions.parquet").set_index("path")
    # the changed object now holds the other image's bytes, and is classified as that image was
    assert predictions.loc[IMAGES[5].name, "label"] == before.loc[IMAGES[6].name, "label"]
    assert np.allclose(predictions.loc[IMAGES[5].name, "probs"], before.loc[IMAGES[6].name, "probs"], atol=1e-5)


def test_tar_shards_are_split_between_processes_by_shard(compose, tmp_path):
    """shard.index/count split a tar source by shard file: each process reads only its shards, the merge none."""
    write_shards(tmp_path / "shards", IMAGES, per_shard=8)  # 5 shards
    args = (*RUN, f"dataset.path={tmp_path / 'shards'}")
    reference = workflow.run(compose(*args, out="ref", cache="ref-cache"))
    encoded = []
    for index in (1, 0):
        part = workflow.run(compose(*args, f"shard.index={index}", "shard.count=2", out=f"part{index}"))
        assert part.shard is not None and not (part.out_dir / "res.json").exists()
        encoded.append(part.counters["images_encoded"])
    assert encoded == [16, 22]  # shards 1 and 3 (8 + 8 images); shards 0, 2 and 4 (8 + 8 + 6)
    merged = workflow.run(compose(*args, out="merged"))
    assert merged.counters["images_encoded"] == 0 and merged.counters["chunks_reused"] == 5
    assert (merged.out_dir / "res.json").read_bytes() == (reference.out_dir / "res.json").read_bytes()
    assert pq.read_table(merged.out_dir / "predictions.parquet").equals(
        pq.read_table(reference.out_dir / "predictions.parquet"))


def test_shard_jobs_share_one_listing_by_name(compose, tmp_path):
    """Shard jobs given one dataset.listing list the folder once (the first); a run without it lists again and
    sees what changed since."""
    folder = tmp_path / "photos"
    shutil.copytree(SAMPLE_IMAGES, folder)
    args = (*RUN, f"dataset.path={folder}", "encode.chunk_size=8")
    first = workflow.run(compose(*args, "shard.index=0", "shard.count=2", "dataset.listing=job-42", out="s0"))
    assert statuses(first)["discover"] == "changed"
    shutil.copy(IMAGES[0], folder / "added-later.jpg")  # after the listing: not part of this job
    second = workflow.run(compose(*args, "shard.index=1", "shard.count=2", "dataset.listing=job-42", out="s1"))
    assert statuses(second)["discover"] == "reused"
    merged = workflow.run(compose(*args, "dataset.listing=job-42", out="merge"))
    assert statuses(merged)["discover"] == "reused" and merged.discovered == len(IMAGES)
    assert merged.counters["images_encoded"] == 0
    fresh = workflow.run(compose(*args, out="fresh"))  # no listing name: list again, notice the new file
    assert statuses(fresh)["discover"] == "changed" and fresh.discovered == len(IMAGES) + 1
    assert fresh.counters["chunks_encoded"] <= 2  # only the chunks around the new file


def test_a_bucket_is_listed_a_page_at_a_time_and_sorted_on_disk(s3_env, monkeypatch):
    """The listing streams the store's pages (3 objects a page here) and sorts the records in runs spilled to disk
    (4 rows a run): every image once, in bytewise order of key, the non-images left out."""
    from pipeline.sources import Location, remote, sorting
    from pipeline.sources.bucket import BucketSource

    fs = s3_env.filesystem()
    fs.mkdir("paged")
    names = ["b/z.jpg", "a.jpg", "b/a.png", "Z.jpg", "a b.webp", "notes.txt", "b/c/d.jpg", "é.jpg", "0.png"]
    for name in names:
        fs.pipe(f"paged/p/{name}", name.encode())
    pages = []
    listed = remote.list_objects

    def paged(where, prefix, page=1000):
        for path, info in listed(where, prefix, page=3):
            pages.append(path)
            yield path, info
    monkeypatch.setattr("pipeline.sources.bucket.list_objects", paged)
    monkeypatch.setattr(sorting, "RUN_ROWS", 4)
    source = BucketSource(Location(path="s3://paged/p/", retries=0, timeout=10), extensions=["jpg", "png", "webp"])
    records = [row for batch in source.records() for row in zip(*(batch.column(c).to_pylist() for c in
                                                                  ("path", "size")))]
    images = sorted(n.encode() for n in names if not n.endswith(".txt"))
    assert [path for path, _ in records] == images
    assert [size for _, size in records] == [len(path) for path in images]
    assert len(pages) == len(names)
    assert not BucketSource(Location(path="s3://paged/p/", retries=0, timeout=10), extensions=["jpg"]).holds_only_tars()
