"""The folder source: what it lists, in which order, and how reading an image fails."""

import os

import pyarrow as pa
import pytest

from pipeline.errors import ImageReadError, UserError
from pipeline.sources import Location
from pipeline.sources.folder import DEFAULT_EXTENSIONS, FolderSource, read_file


def _at(path, **kw) -> Location:
    """A local dataset's location (remote-read settings are unused for local files)."""
    return Location(str(path), retries=0, timeout=5.0, **kw)


def _folder(path, extensions=DEFAULT_EXTENSIONS) -> FolderSource:
    return FolderSource(_at(path), extensions=extensions)


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _records(source) -> list[dict]:
    return pa.Table.from_batches(list(source.records())).to_pylist()


def _paths(source) -> list[str]:
    return [r["path"].decode() for r in _records(source)]


def test_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b.JPG", "a/c.png", "a/b/d.WebP", "notes.txt", "a/e.jpeg", "z.gif", "noext", "a-b.jpg", "a.png"]:
        _touch(tmp_path / rel, b"12345")
    records = _records(_folder(tmp_path))
    paths = [r["path"] for r in records]
    assert paths == [b"a-b.jpg", b"a.png", b"a/b/d.WebP", b"a/c.png", b"a/e.jpeg", b"b.JPG", b"z.gif"]
    assert paths == sorted(paths)  # bytewise order of the full path, although the walk goes folder by folder
    assert all(r["size"] == 5 and int(r["version"]) > 0 for r in records)
    assert _paths(_folder(tmp_path, ["png"])) == ["a.png", "a/c.png"]


def test_listing_streams_in_batches(tmp_path, monkeypatch):
    from pipeline import sources

    monkeypatch.setattr(sources, "BATCH_ROWS", 3)
    monkeypatch.setattr(sources.batches_of, "__defaults__", (3,))
    for i in range(8):
        _touch(tmp_path / f"d{i % 2}" / f"{i}.jpg")
    batches = list(_folder(tmp_path).records())
    assert [b.num_rows for b in batches] == [3, 3, 2]


def test_symlinks_followed_once_and_loops_not_followed(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    _touch(data / "sub" / "x.jpg")
    _touch(outside / "o.jpg")
    os.symlink(data, data / "sub" / "loop")  # a loop back to the root
    os.symlink(outside, data / "ext")  # a folder outside the dataset: followed
    os.symlink(data / "sub" / "x.jpg", data / "alias.jpg")  # a file link: its own entry
    os.symlink(tmp_path / "missing.jpg", data / "dangling.jpg")
    records = {r["path"].decode(): r for r in _records(_folder(data))}
    assert sorted(records) == ["alias.jpg", "dangling.jpg", "ext/o.jpg", "sub/x.jpg"]
    assert records["dangling.jpg"]["size"] == -1  # kept, so reading reports it instead of dropping it


def test_single_file_and_missing_dataset(tmp_path):
    _touch(tmp_path / "one.png")
    source = FolderSource(_at(tmp_path / "one.png", single_image=True))
    assert _paths(source) == ["one.png"] and source.root == tmp_path
    with pytest.raises(UserError, match="does not exist"):
        _folder(tmp_path / "nope")


def test_touching_a_file_changes_its_record(tmp_path):
    _touch(tmp_path / "a.jpg")
    before = _records(_folder(tmp_path))
    st = (tmp_path / "a.jpg").stat()
    os.utime(tmp_path / "a.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _records(_folder(tmp_path))[0]["version"] != before[0]["version"]


def test_read_errors_say_whether_a_retry_can_help(tmp_path):
    _touch(tmp_path / "ok.jpg", b"bytes")
    assert read_file(tmp_path / "ok.jpg") == b"bytes"
    os.mkfifo(tmp_path / "fifo.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    for name, kind in (("fifo.jpg", "NotARegularFile"), ("dangling.jpg", "FileNotFoundError")):
        with pytest.raises(ImageReadError) as info:
            read_file(tmp_path / name)
        assert info.value.kind == kind and not info.value.transient  # the record itself says so
    import builtins

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")

    real_open = builtins.open
    builtins.open = denied
    try:
        with pytest.raises(ImageReadError) as info:
            read_file(tmp_path / "ok.jpg")
    finally:
        builtins.open = real_open
    assert info.value.kind == "PermissionError" and info.value.transient


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
def test_manifest_formats_sorted_records_and_truth(tmp_path, suffix):
    import pandas as pd

    from pipeline.sources.manifest import ManifestSource

    for name in ("b.jpg", "a.png", "c/d.jpg"):
        _touch(tmp_path / "imgs" / name, b"123")
    table = pd.DataFrame({"path": ["imgs/b.jpg", str(tmp_path / "imgs" / "a.png"), "imgs/c/d.jpg",
                                   "imgs/missing.jpg"], "label": ["cat", "dog", "", "cat"]})
    manifest = tmp_path / f"list{suffix}"
    if suffix == ".parquet":
        table.to_parquet(manifest)
    elif suffix == ".jsonl":
        table.to_json(manifest, orient="records", lines=True)
    else:
        table.to_csv(manifest, sep="\t" if suffix == ".tsv" else ",", index=False)
    source = ManifestSource(_at(manifest), path_column="path", truth_column="label")
    records = {r["path"].decode(): r for r in _records(source)}
    keys = list(records)
    assert keys == sorted(keys, key=str.encode) and set(keys) == set(table["path"])
    assert records["imgs/b.jpg"]["size"] == 3 and records["imgs/missing.jpg"]["size"] == -1
    assert source.read(b"imgs/b.jpg") == b"123" and source.read(str(tmp_path / "imgs/a.png").encode()) == b"123"
    truth = pa.Table.from_batches(list(source.truth()))
    assert truth.column("path").to_pylist() == sorted(truth.column("path").to_pylist(), key=str.encode)
    assert dict(zip(truth.column("path").to_pylist(), truth.column("truth").to_pylist())) == {
        "imgs/b.jpg": "cat", str(tmp_path / "imgs" / "a.png"): "dog", "imgs/missing.jpg": "cat"}
    with pytest.raises(ImageReadError):
        source.read(b"imgs/missing.jpg")


def test_format_is_detected_from_the_value(tmp_path):
    from pipeline.sources import detect_format

    _touch(tmp_path / "images" / "a.jpg")
    _touch(tmp_path / "shards" / "x.tar")
    exts = ["jpg"]
    assert detect_format(str(tmp_path / "images"), exts) == "folder"
    assert detect_format(str(tmp_path / "shards"), exts) == "tar"
    assert detect_format("data/x-{0..3}.tar", exts) == "tar" and detect_format("x.tar.gz", exts) == "tar"
    assert detect_format("list.parquet", exts) == "manifest" and detect_format("https://h/m.jsonl", exts) == "manifest"
    assert detect_format("s3://bucket/prefix/", exts) == "bucket"
    with pytest.raises(UserError, match="must name a manifest"):
        detect_format("https://example.com/photos/", exts)


def test_tar_members_grouped_by_key_with_truth(tmp_path):
    import io
    import json
    import tarfile

    from pipeline.sources.tars import TarSource

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in [("a/x.jpg", b"img1"), ("a/x.json", json.dumps({"meta": {"label": "cat"}}).encode()),
                           ("a/x.cls", b"7\n"), ("y.seg.png", b"img2"), ("y.txt", b"a dog"), ("readme", b"skip")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for member, truths in (("cls", ["7", None]), ("txt", [None, "a dog"]), ("json.meta.label", ["cat", None])):
        source = TarSource(_at(tmp_path / "s.tar"), ["jpg", "png"], truth_member=member)
        got = list(source.members(b"s.tar"))
        assert [(m.name, m.data, m.truth) for m in got] == [("a/x.jpg", b"img1", truths[0]),
                                                            ("y.seg.png", b"img2", truths[1])]
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[:700])
    source = TarSource(_at(tmp_path / "s.tar"), ["jpg", "png"])
    with pytest.raises(ImageReadError) as info:
        list(source.members(b"s.tar"))
    assert info.value.kind == "TruncatedTar" and not info.value.transient


def test_records_slices_read_only_the_batches_they_overlap(tmp_path):
    """Slices of a records file with uneven batches equal the same slice of the whole table, at every edge."""
    import pyarrow.ipc as ipc

    from pipeline.sources import RECORDS_SCHEMA
    from pipeline.stages.discover import Records

    sizes, row = [3, 1, 5, 2], 0
    with ipc.new_file(tmp_path / "records.arrow", RECORDS_SCHEMA) as writer:
        for size in sizes:
            paths = [b"p%02d" % (row + k) for k in range(size)]
            writer.write_batch(pa.record_batch([paths, [1] * size, ["v"] * size], schema=RECORDS_SCHEMA))
            row += size
    records = Records(tmp_path / "records.arrow")
    whole = [b"p%02d" % k for k in range(row)]
    assert records.count == row == 11 and records.paths() == whole
    for start in range(row + 1):
        for stop in range(start, row + 2):
            assert records.paths(start, stop) == whole[start:stop], (start, stop)


def test_a_manifest_without_truth_is_not_read_for_it(tmp_path):
    """The truth stage runs on every run: a manifest with no truth column answers from its schema, without reading
    its rows (100M of them, at scale)."""
    import pyarrow.parquet as pq

    from pipeline.sources.manifest import ManifestSource

    pq.write_table(pa.table({"path": ["b.jpg", "a.jpg"]}), tmp_path / "plain.parquet")
    plain = ManifestSource(_at(tmp_path / "plain.parquet"), path_column="path", truth_column="label")
    plain._stream = None  # reading a row would fail: the schema alone says there is no truth
    assert plain.truth() is None
    pq.write_table(pa.table({"path": ["b.jpg", "a.jpg"], "label": ["dog", "cat"]}), tmp_path / "labelled.parquet")
    truth = pa.Table.from_batches(list(ManifestSource(_at(tmp_path / "labelled.parquet"), path_column="path",
                                                      truth_column="label").truth()))
    assert sorted(zip(truth.column("path").to_pylist(), truth.column("truth").to_pylist())) == \
        [("a.jpg", "cat"), ("b.jpg", "dog")]


def test_a_source_opened_without_a_setting_refuses_the_work_that_needs_it(tmp_path):
    """A stage opens its source from the params it hashes: a setting it did not hash is not there to be read."""
    from pipeline.sources import READING, RECORDS, TAR, DatasetSettings, SourceProvider
    from pipeline.sources.tars import TarSource

    _touch(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="opened without 'extensions'"):
        list(FolderSource(_at(tmp_path)).records())
    import tarfile

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        tar.add(tmp_path / "a.jpg", "a.jpg")
    with pytest.raises(ValueError, match="opened without 'extensions'"):
        list(TarSource(_at(tmp_path / "s.tar")).members(b"s.tar"))
    settings = DatasetSettings(TAR, {"extensions": ["jpg"], "path_column": "path", "truth_column": "label",
                                     "truth_member": "cls"})
    assert settings.params(RECORDS) == {"input": "dataset", "format": "tar"}
    assert settings.params(READING) == {"input": "dataset", "format": "tar", "extensions": ["jpg"],
                                        "truth_member": "cls"}
    provider = SourceProvider({"dataset": _at(tmp_path / "s.tar")})
    reading = provider.open(settings.params(READING))
    assert [m.name for m in reading.members(b"s.tar")] == ["a.jpg"] and reading is provider.open(
        settings.params(READING))


def test_a_manifest_is_sorted_and_checked_on_disk_in_bounded_runs(tmp_path, monkeypatch):
    """More rows than a run: sorted runs spilled and merged give the order a sort in memory gives, duplicates
    across runs are found, and every format streams."""
    import pyarrow.parquet as pq

    from pipeline.sources import sorting
    from pipeline.sources.manifest import ManifestSource

    monkeypatch.setattr(sorting, "RUN_ROWS", 7)
    rng = __import__("random").Random(3)
    paths = [f"d{rng.randrange(1000):03d}/{i}.jpg" for i in range(100)] + ["é.jpg", "z.jpg", "a b.jpg"]
    rng.shuffle(paths)
    table = pa.table({"path": paths, "label": [f"l{i % 3}" for i in range(len(paths))]})
    for suffix in (".parquet", ".csv", ".tsv", ".jsonl"):
        manifest = tmp_path / f"m{suffix}"
        if suffix == ".parquet":
            pq.write_table(table, manifest, row_group_size=10)
        elif suffix == ".jsonl":
            manifest.write_text("".join(__import__("json").dumps(r) + "\n" for r in table.to_pylist()))
        else:
            sep = "\t" if suffix == ".tsv" else ","
            rows = "".join(f"{r['path']}{sep}{r['label']}\n" for r in table.to_pylist())
            manifest.write_text(f"path{sep}label\n" + rows)
        source = ManifestSource(_at(manifest), path_column="path", truth_column="label")
        listed = [r["path"] for r in _records(source)]
        assert listed == sorted(p.encode() for p in paths), suffix
        truth = pa.Table.from_batches(list(source.truth()))
        assert truth.column("path").to_pylist() == sorted(paths, key=str.encode)
    pq.write_table(pa.table({"path": paths + paths[5:8]}), tmp_path / "dup.parquet", row_group_size=10)
    with pytest.raises(UserError, match="lists 3 paths more than once"):
        _records(ManifestSource(_at(tmp_path / "dup.parquet"), path_column="path"))
