"""The folder source: what it lists, in which order, and how reading an image fails."""

import os

import pyarrow as pa
import pytest

from pipeline.errors import ImageReadError, UserError
from pipeline.sources.folder import FolderSource, read_file


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
    records = _records(FolderSource(tmp_path))
    paths = [r["path"] for r in records]
    assert paths == [b"a-b.jpg", b"a.png", b"a/b/d.WebP", b"a/c.png", b"a/e.jpeg", b"b.JPG", b"z.gif"]
    assert paths == sorted(paths)  # bytewise order of the full path, although the walk goes folder by folder
    assert all(r["size"] == 5 and int(r["version"]) > 0 for r in records)
    assert _paths(FolderSource(tmp_path, ["png"])) == ["a.png", "a/c.png"]


def test_listing_streams_in_batches(tmp_path, monkeypatch):
    from pipeline import sources

    monkeypatch.setattr(sources, "BATCH_ROWS", 3)
    monkeypatch.setattr(sources.batches_of, "__defaults__", (3,))
    for i in range(8):
        _touch(tmp_path / f"d{i % 2}" / f"{i}.jpg")
    batches = list(FolderSource(tmp_path).records())
    assert [b.num_rows for b in batches] == [3, 3, 2]


def test_symlinks_followed_once_and_loops_not_followed(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    _touch(data / "sub" / "x.jpg")
    _touch(outside / "o.jpg")
    os.symlink(data, data / "sub" / "loop")  # a loop back to the root
    os.symlink(outside, data / "ext")  # a folder outside the dataset: followed
    os.symlink(data / "sub" / "x.jpg", data / "alias.jpg")  # a file link: its own entry
    os.symlink(tmp_path / "missing.jpg", data / "dangling.jpg")
    records = {r["path"].decode(): r for r in _records(FolderSource(data))}
    assert sorted(records) == ["alias.jpg", "dangling.jpg", "ext/o.jpg", "sub/x.jpg"]
    assert records["dangling.jpg"]["size"] == -1  # kept, so reading reports it instead of dropping it


def test_single_file_and_missing_dataset(tmp_path):
    _touch(tmp_path / "one.png")
    source = FolderSource(tmp_path / "one.png")
    assert _paths(source) == ["one.png"] and source.root == tmp_path
    with pytest.raises(UserError, match="does not exist"):
        FolderSource(tmp_path / "nope")


def test_touching_a_file_changes_its_record(tmp_path):
    _touch(tmp_path / "a.jpg")
    before = _records(FolderSource(tmp_path))
    st = (tmp_path / "a.jpg").stat()
    os.utime(tmp_path / "a.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _records(FolderSource(tmp_path))[0]["version"] != before[0]["version"]


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
