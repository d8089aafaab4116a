"""An image zoo of broken, odd and hostile files: each is classified or reported precisely; the run finishes."""

from __future__ import annotations

import io
import ctypes
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from .conftest import STATS, job_command, run_job


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def build_zoo(root: Path, outside: Path) -> tuple[set[str], dict[str, str]]:
    """Returns (paths that must classify, {path: error_type} that must be reported)."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    ok, bad = set(), {}

    def put(rel: str, data: bytes, error: str | None = None):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        (bad.__setitem__(rel, error) if error else ok.add(rel))

    jpeg = _jpeg(photo)
    put("truncated.jpg", jpeg[: len(jpeg) // 2], "OSError")
    put("zero.jpg", b"", "EmptyFile")
    put("text.jpg", b"just some text, not a picture\n", "UnidentifiedImageError")
    png = io.BytesIO()
    photo.save(png, "PNG")
    corrupt = bytearray(png.getvalue())
    corrupt[30] ^= 0xFF  # the IHDR chunk's CRC no longer matches
    put("bad_crc.png", bytes(corrupt), "SyntaxError")
    put("bomb.png", _bomb_png(100_000, 100_000), "DecompressionBombError")
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), "red").save(tiny, "PNG")
    put("one_pixel.png", tiny.getvalue())
    strip = io.BytesIO()
    Image.new("RGB", (20000, 20), "blue").save(strip, "PNG")
    put("strip_20000x20.png", strip.getvalue())
    put("cmyk.jpg", _jpeg(photo.convert("CMYK")))
    deep = io.BytesIO()
    Image.fromarray((rng.integers(0, 65535, (50, 60))).astype(np.uint16)).save(deep, "PNG")
    put("sixteen_bit.png", deep.getvalue())
    pal = io.BytesIO()
    photo.quantize(32).save(pal, "PNG", transparency=0)
    put("palette_transparent.png", pal.getvalue())
    la = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 2), dtype=np.uint8), "LA").save(la, "PNG")
    put("gray_alpha.png", la.getvalue())
    gif = io.BytesIO()
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    put("animated.gif", gif.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 8
    put("rotated_exif.jpg", _jpeg(photo, exif=exif))
    for name in ("with space.jpg", "ünïcødé_猫.jpg", "new\nline.jpg", "-leading-dash.jpg", "deep/er/nested.JPG"):
        put(name, jpeg)
    (root / "not-an-image.txt").write_text("ignored by extension")
    # Symlinks: a loop (not followed twice), a folder outside the dataset (followed), a dangling file link.
    os.symlink(root, root / "deep" / "loop")
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "outside.jpg").write_bytes(jpeg)
    os.symlink(outside, root / "linked_outside")
    ok.add("linked_outside/outside.jpg")
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    bad["dangling.jpg"] = "FileNotFoundError"
    os.mkfifo(root / "fifo.jpg")  # opening a FIFO would block forever: must be refused, not hang
    bad["fifo.jpg"] = "NotARegularFile"
    put("unreadable.jpg", jpeg, "PermissionError")
    os.chmod(root / "unreadable.jpg", 0)
    bad_name = os.fsencode(str(root)) + b"/latin1_\xe9t\xe9.jpg"
    with open(bad_name, "wb") as fh:
        fh.write(jpeg)
    ok.add("latin1_\ufffdt\ufffd.jpg")  # shown with replacement characters in the outputs
    return ok, bad


def _without_root_read_override() -> None:
    """Runs in the job's child process before exec: root reads any file whatever its mode, so drop the two
    capabilities that allow it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set; an unreadable file
    is then really unreadable, as for any ordinary user."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_image_zoo(tmp_path):
    data = tmp_path / "zoo"
    ok, bad = build_zoo(data, tmp_path / "elsewhere")
    (tmp_path / "cache").mkdir()
    (tmp_path / "out").mkdir()
    proc = run_job(job_command(data, tmp_path / "out", tmp_path / "cache", "encode.num_workers=2",
                               "encode.batch_size=4", "labels=colors"), preexec_fn=_without_root_read_override)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = pq.read_table(tmp_path / "out" / "predictions.parquet").to_pandas()
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pandas()
    STATS["inputs tried"] += len(ok) + len(bad)
    assert set(preds["path"]) == ok
    got = dict(zip(errors["path"], errors["error_type"]))
    assert got == bad, {k: (got.get(k), bad.get(k)) for k in set(got) | set(bad) if got.get(k) != bad.get(k)}
    assert errors["message"].str.len().min() > 5
    assert len(preds) + len(errors) == len(ok) + len(bad)
    sizes = dict(zip(preds["path"], zip(preds["width"], preds["height"])))
    assert sizes["rotated_exif.jpg"] == (120, 160) and sizes["strip_20000x20.png"] == (20000, 20)
    assert "new\nline.jpg" in set(preds["path"])


def test_unreadable_file_is_retried_by_the_next_run(tmp_path):
    """Permission denied is a failure outside the file's bytes: listed as transient, its chunk provisional, and
    the next run (the file readable again) classifies it; outputs then equal a clean run's. A file whose bytes
    do not decode stays an error and its chunk is not encoded again."""
    import re

    from .conftest import compare_outputs, log_of, render_dataset

    data = tmp_path / "data"
    render_dataset(data, 30, seed=5)
    (data / "part0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    victim = sorted((data / "part1").iterdir())[2]
    args = ("encode.batch_size=4", "encode.chunk_size=8", "encode.num_workers=1", "labels=colors")
    clean = run_job(job_command(data, tmp_path / "clean", tmp_path / "clean-cache", *args))
    assert clean.returncode == 0, clean.stderr
    os.chmod(victim, 0)
    first = run_job(job_command(data, tmp_path / "out", tmp_path / "cache", *args),
                    preexec_fn=_without_root_read_override)
    assert first.returncode == 0, first.stderr
    errors = pq.read_table(tmp_path / "out" / "errors.parquet").to_pandas().set_index("path")
    rel = victim.relative_to(data).as_posix()
    assert errors.loc[rel, "error_type"] == "PermissionError" and errors.loc[rel, "transient"]
    assert errors.loc["part0/broken.jpg", "error_type"] == "OSError" and not errors.loc["part0/broken.jpg", "transient"]
    assert "the next run computes it again" in log_of(first)
    os.chmod(victim, 0o644)
    second = run_job(job_command(data, tmp_path / "out", tmp_path / "cache", *args),
                     preexec_fn=_without_root_read_override)
    assert second.returncode == 0, second.stderr
    encoded = re.search(r"encoded (\d+) images in (\d+) chunks; (\d+) chunks reused", log_of(second))
    assert encoded and encoded.group(2) == "1" and int(encoded.group(3)) >= 2  # only the victim's chunk again
    assert compare_outputs(tmp_path / "out", tmp_path / "clean") == []
    STATS["inputs tried"] += 2
    third = run_job(job_command(data, tmp_path / "out", tmp_path / "cache", *args))
    assert re.search(r"stage encode_images +reused", log_of(third))  # the broken file is not decoded again
