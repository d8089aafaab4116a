"""Decode and preprocess images exactly as the model's Hugging Face image processor (PIL backend) does.

We do not call the HF processor per image: it is slower, and its default backend needs torchvision. Parity with
it (same pixel values within 1e-4) is a tested contract: resize with the processor's PIL resample filter on the
8-bit image, centre-crop with its offsets (zero padding when the image is smaller), rescale in float64 then cast
to float32, normalise in float32. Decoding adds what a dataset of real files needs: EXIF orientation, the first
frame of animations, alpha composited onto white (as HF's convert_to_rgb does), 16-bit images scaled rather than
clipped, a pixel-count limit against decompression bombs, and optional reduced-scale JPEG decoding (`draft`).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageDecodeError, ImageError, UserError

# Pillow's own bomb limit is ~89 Mpx with a warning and an error at twice that; we enforce one explicit limit.
DEFAULT_MAX_PIXELS = 178_956_970


@dataclass(frozen=True)
class PreprocessSpec:
    """The processor settings that decide the pixel values (and so the cache fingerprint)."""

    shortest_edge: int | None
    resize_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    resample: int
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def from_hf(cls, processor) -> "PreprocessSpec":
        """Read the settings off a loaded HF image processor (it resolves legacy config forms for us)."""
        size = processor.size
        shortest, resize_hw = None, None
        if processor.do_resize:
            if size.shortest_edge and not size.longest_edge:
                shortest = int(size.shortest_edge)
            elif size.height and size.width:
                resize_hw = (int(size.height), int(size.width))
            else:
                raise UserError(f"unsupported image processor size {size!r}: expected shortest_edge or height+width")
        crop_hw = None
        if processor.do_center_crop:
            crop_hw = (int(processor.crop_size.height), int(processor.crop_size.width))
        return cls(
            shortest_edge=shortest,
            resize_hw=resize_hw,
            crop_hw=crop_hw,
            resample=int(processor.resample),
            rescale_factor=float(processor.rescale_factor) if processor.do_rescale else None,
            mean=tuple(float(x) for x in processor.image_mean) if processor.do_normalize else None,
            std=tuple(float(x) for x in processor.image_std) if processor.do_normalize else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def resize_target(self, width: int, height: int) -> tuple[int, int] | None:
        """(width, height) after the resize step, with HF's rounding (int truncation of the long side)."""
        if self.resize_hw is not None:
            return self.resize_hw[1], self.resize_hw[0]
        if self.shortest_edge is None:
            return None
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)


def decode(path: str | os.PathLike, **kwargs) -> Image.Image:
    """Read and decode one image file (see `decode_bytes`); raises ImageError (ImageReadError when the file
    cannot be read, ImageDecodeError when its bytes do not decode)."""
    from .sources.folder import read_file

    return decode_bytes(read_file(path), **kwargs)


def decode_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_for: PreprocessSpec | None = None,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """An image's bytes as an RGB PIL image; ImageDecodeError says precisely why not.

    `draft_for` (a preprocessing spec) or `draft_size` (width, height) let a JPEG decode at reduced scale, never
    below that size."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below decides; Pillow still refuses beyond twice its own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            if img.width * img.height > max_pixels:
                raise ImageDecodeError("DecompressionBombError", f"{img.width}x{img.height} pixels exceeds "
                                       f"preprocess.max_pixels={max_pixels} (possible decompression bomb)")
            if draft_for is not None:
                draft_size = draft_for.resize_target(img.width, img.height)
            if draft_size is not None and img.format == "JPEG":
                # DCT scaling decodes at 1/2, 1/4 or 1/8 size, never below the requested size.
                img.draft("RGB", draft_size)
            img.load()  # first frame of an animation; raises on truncated data
            # Pixel data is loaded, so the result stays valid once the file is closed.
            return to_rgb(ImageOps.exif_transpose(img) or img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("DecompressionBombError", str(exc)) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(*_why_unidentified(data)) from None
    except MemoryError as exc:  # the machine, not the bytes: worth another try
        raise ImageError("MemoryError", str(exc) or "out of memory while decoding", transient=True) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(type(exc).__name__, str(exc) or repr(exc)) from None


def _why_unidentified(data: bytes) -> tuple[str, str]:
    """Pillow says only "cannot identify image file"; ask the decoder whose magic bytes match for the reason."""
    head = data[:16]
    if not head:
        return "EmptyFile", "empty file (0 bytes)"
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept and accept(head) is True:
            try:
                factory(io.BytesIO(data), "")
            except Exception as exc:  # noqa: BLE001 - the decoder's own complaint is the diagnosis
                return type(exc).__name__, f"looks like {fmt} but {exc}"
    return "UnidentifiedImageError", "not a recognised image format (no decoder matches its first bytes)"


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _sixteen_bit_to_l(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        # HF's convert_to_rgb composites transparency onto white; do the same for parity.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values at 255, turning most photos white; scale to 8 bits instead.
    arr = np.asarray(img, dtype=np.float64)
    peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8), mode="L")


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB PIL image -> float32 array (3, H, W), equal to the HF PIL-backend processor's pixel_values."""
    target = spec.resize_target(img.width, img.height)
    if target is not None and target != img.size:
        img = img.resize(target, resample=spec.resample)
    arr = np.asarray(img)
    if spec.crop_hw is not None:
        arr = center_crop(arr, *spec.crop_hw)
    out = arr.astype(np.float64) * spec.rescale_factor if spec.rescale_factor is not None else arr
    out = out.astype(np.float32)
    if spec.mean is not None:
        out = (out - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """HF's centre crop on an (H, W, C) array, zero-padding symmetrically (ceil) when the image is smaller."""
    height, width = arr.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return arr[top:top + crop_h, left:left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w) + arr.shape[2:], dtype=arr.dtype)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[top_pad:top_pad + height, left_pad:left_pad + width] = arr
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


def load_and_preprocess(data: bytes, spec: PreprocessSpec, *, draft: bool = False,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode + preprocess one image's bytes; returns the pixel array and the decoded (oriented) width and
    height."""
    img = decode_bytes(data, max_pixels=max_pixels, draft_for=spec if draft else None)
    size = img.size
    if draft:
        # Report the image's true size, not the reduced decode size.
        size = _full_size(data)
    return preprocess(img, spec), size


def _full_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as raw:
        w, h = raw.size
        orientation = raw.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
