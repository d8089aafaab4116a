import os

import pytest

from pipeline.discovery import discover
from pipeline.errors import UserError


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b.JPG", "a/c.png", "a/b/d.WebP", "notes.txt", "a/e.jpeg", "z.gif", "noext"]:
        _touch(tmp_path / rel, b"12345")
    records = discover(tmp_path)
    assert [r.path for r in records] == ["a/b/d.WebP", "a/c.png", "a/e.jpeg", "b.JPG", "z.gif"]
    assert all(r.size == 5 and r.mtime_ns > 0 for r in records)
    assert [r.path for r in discover(tmp_path, ["png"])] == ["a/c.png"]


def test_symlinks_followed_once_and_loops_not_followed(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    _touch(data / "sub" / "x.jpg")
    _touch(outside / "o.jpg")
    os.symlink(data, data / "sub" / "loop")  # a loop back to the root
    os.symlink(outside, data / "ext")  # a folder outside the dataset: followed
    os.symlink(data / "sub" / "x.jpg", data / "alias.jpg")  # a file link: its own entry
    os.symlink(tmp_path / "missing.jpg", data / "dangling.jpg")
    records = {r.path: r for r in discover(data)}
    assert sorted(records) == ["alias.jpg", "dangling.jpg", "ext/o.jpg", "sub/x.jpg"]
    assert records["dangling.jpg"].size == -1  # kept, so decoding reports it instead of dropping it


def test_single_file_and_missing_dataset(tmp_path):
    _touch(tmp_path / "one.png")
    assert [r.path for r in discover(tmp_path / "one.png")] == ["one.png"]
    with pytest.raises(UserError, match="does not exist"):
        discover(tmp_path / "nope")
    assert discover(tmp_path / "one.png")[0].size == 1
