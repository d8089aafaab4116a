"""Preprocessing parity with the Hugging Face PIL-backend processors, and decoding of odd files."""

import io

import numpy as np
import pytest
from PIL import Image
from transformers import (ChineseCLIPImageProcessorPil, CLIPImageProcessorPil, EfficientNetImageProcessorPil,
                          SiglipImageProcessorPil)

from pipeline.errors import ImageDecodeError
from pipeline.imaging import PreprocessSpec, center_crop, decode, decode_bytes, load_and_preprocess, preprocess

PROCESSORS = {
    # openai/clip-vit-large-patch14: shortest edge 224, centre crop 224
    "clip-l14": CLIPImageProcessorPil(),
    # OFA-Sys/chinese-clip-vit-base-patch16: square resize to 224x224, no crop
    "chinese-clip-b16": ChineseCLIPImageProcessorPil(size={"height": 224, "width": 224}, do_center_crop=False),
    # the tiny fixture models' settings
    "tiny": CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
    # a crop larger than the resize: exercises HF's zero padding
    "pad": CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 48, "width": 56}),
    # google/siglip-base-patch16-224 (and SigLIP2's fixed-resolution checkpoints): square bilinear, mean/std 0.5
    "siglip-224": SiglipImageProcessorPil(),
    # kakaobrain/align-base: EfficientNet's processor, 289 px, pixels in [-1, 1]
    "align-289": EfficientNetImageProcessorPil(size={"height": 289, "width": 289}, crop_size={"height": 289,
                                               "width": 289}, do_center_crop=True, rescale_factor=1 / 127.5,
                                               rescale_offset=True, do_normalize=False, include_top=False),
    # EfficientNet's own defaults: resize 346, crop 289, normalise, then divide by std again (include_top)
    "efficientnet": EfficientNetImageProcessorPil(do_center_crop=True),
}


def _images(rng):
    sizes = [(640, 480), (480, 640), (224, 224), (225, 224), (64, 64), (1, 1), (20000 // 10, 20), (3, 997),
             (4000 // 4, 3000 // 4), (333, 101)]
    for w, h in sizes:
        yield f"rgb{w}x{h}", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    yield "gray", Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8), "L")
    rgba = rng.integers(0, 256, (60, 80, 4), dtype=np.uint8)
    yield "rgba", Image.fromarray(rgba, "RGBA")
    pal = Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8), "RGB").quantize(16)
    pal.info["transparency"] = 3
    yield "palette-transparent", pal


@pytest.mark.parametrize("name", PROCESSORS)
def test_pixels_equal_hf_processor(name):
    processor = PROCESSORS[name]
    spec = PreprocessSpec.from_hf(processor)
    rng = np.random.default_rng(0)
    for label, img in _images(rng):
        from pipeline.imaging import to_rgb

        rgb = to_rgb(img)
        ours = preprocess(rgb, spec)
        # Processors that convert to RGB themselves get the raw image (so the conversions are compared too); the
        # others (EfficientNet's) would keep one channel of a grey image, which no model takes: they get RGB.
        given = img if getattr(processor, "do_convert_rgb", False) else rgb
        theirs = processor(images=given, return_tensors="np")["pixel_values"][0]
        assert ours.shape == theirs.shape, label
        assert ours.dtype == np.float32
        assert np.abs(ours - theirs).max() <= 1e-4, label


def test_spec_round_trips_through_json_params():
    import json

    for processor in PROCESSORS.values():
        spec = PreprocessSpec.from_hf(processor)
        assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_center_crop_matches_offsets():
    arr = np.arange(5 * 7).reshape(5, 7, 1)
    assert center_crop(arr, 3, 3)[:, :, 0].tolist() == [[9, 10, 11], [16, 17, 18], [23, 24, 25]]
    padded = center_crop(arr, 7, 7)[:, :, 0]
    assert padded.shape == (7, 7) and padded[0].tolist() == [0] * 7 and padded[1].tolist() == list(range(7))


def _save(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = decode(path)
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # blue ends up on top after rotating CW
    _, size = load_and_preprocess(path.read_bytes(), PreprocessSpec.from_hf(PROCESSORS["tiny"]), draft=True)
    assert size == (20, 40)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert np.asarray(decode(path))[0, 0].tolist() == [128, 128, 128]


def test_bad_files_raise_precise_errors(tmp_path):
    good = Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    data = _save(good, "JPEG")
    cases = {
        "truncated.jpg": data[: len(data) // 2],
        "empty.jpg": b"",
        "text.jpg": b"hello, I am not an image\n",
    }
    kinds = {"truncated.jpg": "OSError", "empty.jpg": "EmptyFile", "text.jpg": "UnidentifiedImageError"}
    for name, blob in cases.items():
        with pytest.raises(ImageDecodeError) as info:
            decode_bytes(blob)
        assert info.value.kind == kinds[name] and not info.value.transient, name
        assert str(info.value)
    Image.new("L", (5000, 5000)).save(tmp_path / "big.png")
    with pytest.raises(ImageDecodeError, match="max_pixels") as info:
        decode(tmp_path / "big.png", max_pixels=1_000_000)
    assert info.value.kind == "DecompressionBombError"


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert np.asarray(decode(tmp_path / "anim.gif"))[0, 0].tolist() == [255, 0, 0]


def test_draft_decodes_large_jpeg_at_reduced_scale_close_to_full(tmp_path):
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((4000, 3000), Image.BILINEAR)
    big.save(tmp_path / "big.jpg", quality=90)
    spec = PreprocessSpec.from_hf(PROCESSORS["clip-l14"])
    data = (tmp_path / "big.jpg").read_bytes()
    full, size_full = load_and_preprocess(data, spec)
    fast, size_fast = load_and_preprocess(data, spec, draft=True)
    assert size_full == size_fast == (4000, 3000)
    assert full.shape == fast.shape
    assert np.abs(full - fast).mean() < 0.05  # normalised units; a visually identical input
