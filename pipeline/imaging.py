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
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageDecodeError, ImageError, UserError

if TYPE_CHECKING:  # workers import this module; torch only where a batch goes to a device
    import torch

# Pillow's own bomb limit is ~89 Mpx with a warning and an error at twice that; we enforce one explicit limit.
DEFAULT_MAX_PIXELS = 178_956_970


@dataclass(frozen=True)
class PreprocessSpec:
    """The processor settings that decide the pixel values (and so the cache fingerprint): those of the CLIP,
    Chinese-CLIP, SigLIP and EfficientNet (ALIGN) image processors."""

    shortest_edge: int | None
    resize_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    resample: int
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    rescale_offset: bool = False  # EfficientNet: x * rescale_factor - 1
    top_std: tuple[float, float, float] | None = None  # EfficientNet's include_top: divide by std once more

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
        if getattr(processor, "do_center_crop", False):
            crop_hw = (int(processor.crop_size.height), int(processor.crop_size.width))
        normalize = getattr(processor, "do_normalize", False)
        return cls(
            shortest_edge=shortest,
            resize_hw=resize_hw,
            crop_hw=crop_hw,
            resample=int(processor.resample),
            rescale_factor=float(processor.rescale_factor) if processor.do_rescale else None,
            mean=_triple(processor.image_mean) if normalize else None,
            std=_triple(processor.image_std) if normalize else None,
            rescale_offset=bool(getattr(processor, "rescale_offset", False)) and bool(processor.do_rescale),
            top_std=_triple(processor.image_std) if getattr(processor, "include_top", False) else None,
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


def _triple(values) -> tuple[float, float, float]:
    values = [float(x) for x in (values if isinstance(values, (list, tuple)) else [values] * 3)]
    return tuple(values)


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
    if spec.rescale_offset:
        out -= 1
    if spec.mean is not None:
        out = (out - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    if spec.top_std is not None:
        out = out / np.asarray(spec.top_std, dtype=np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


class Preprocessor:
    """Decoded image -> model inputs, in one of three ways (`params`, hashed into fingerprints, names which, and
    rebuilds the preprocessor in a worker):

    - "spec": our own code replicating the HF processor (`PreprocessSpec`; tested for equal pixels), on the CPU;
    - "device": the same steps as torch ops on the model's device (workers send the decoded 8-bit image; resize,
      crop and normalisation run there: fast next to an accelerator, not bit-equal to the HF processor);
    - "hf": the HF processor itself after our decoding, where the inputs are more than pixels (SigLIP2's NaFlex
      patches, masks and shapes)."""

    def __init__(self, spec: PreprocessSpec | None = None, processor=None, on_device: bool = False) -> None:
        self.spec, self.processor, self.on_device = spec, processor, on_device

    @classmethod
    def from_hf(cls, processor, own: bool, on_device: bool = False) -> "Preprocessor":
        if not own:
            return cls(processor=processor)
        return cls(spec=PreprocessSpec.from_hf(processor), on_device=on_device)

    @property
    def params(self) -> dict:
        if self.spec is not None:
            return {"kind": "device" if self.on_device else "spec", **self.spec.to_dict()}
        return {"kind": "hf", "class": type(self.processor).__name__, "settings": _plain(self.processor.to_dict())}

    @classmethod
    def from_params(cls, params: dict) -> "Preprocessor":
        params = dict(params)
        kind = params.pop("kind")
        if kind in ("spec", "device"):
            return cls(spec=PreprocessSpec.from_dict(params), on_device=kind == "device")
        import transformers

        return cls(processor=getattr(transformers, params["class"]).from_dict(params["settings"]))

    def draft_for(self) -> PreprocessSpec | None:
        return self.spec  # draft decoding needs the resize target: only our own preprocessing knows it

    def apply(self, img: Image.Image) -> np.ndarray | dict[str, np.ndarray]:
        """What a worker sends for one decoded image: pixel values, the 8-bit image itself (on-device
        preprocessing), or the HF processor's arrays."""
        if self.on_device:
            return np.asarray(img, dtype=np.uint8)  # (H, W, 3): a quarter of float32's bytes, any size
        if self.spec is not None:
            return preprocess(img, self.spec)
        out = self.processor(images=[img], return_tensors="np")
        return {key: np.asarray(value[0]) for key, value in out.items()}

    def on(self, images: list, device) -> torch.Tensor:
        """On-device preprocessing of a batch of 8-bit images (H, W, 3), of any sizes, into pixel values."""
        import torch

        return torch.stack([torch_preprocess(torch.as_tensor(a).to(device, non_blocking=True), self.spec)
                            for a in images])


_TORCH_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resample filters -> torch interpolation


def torch_preprocess(image, spec: PreprocessSpec):
    """One 8-bit (H, W, 3) image tensor -> float32 (3, H', W') pixel values, with torch ops on its device:
    antialiased resize (the PIL filter's torch counterpart), centre crop (zero-padded), rescale, normalise."""
    import torch
    import torch.nn.functional as F

    x = image.permute(2, 0, 1).unsqueeze(0).float()
    target = spec.resize_target(int(x.shape[3]), int(x.shape[2]))
    if target is not None and target != (int(x.shape[3]), int(x.shape[2])):
        mode = _TORCH_MODES.get(spec.resample, "bicubic")
        x = F.interpolate(x, size=(target[1], target[0]), mode=mode, antialias=mode != "nearest",
                          align_corners=False if mode != "nearest" else None)
        x = x.clamp(0, 255).round()  # the HF processor resizes an 8-bit image: its result is 8-bit again
    if spec.crop_hw is not None:
        x = _torch_center_crop(x, *spec.crop_hw)
    if spec.rescale_factor is not None:
        x = x * spec.rescale_factor
    if spec.rescale_offset:
        x = x - 1
    if spec.mean is not None:
        mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    if spec.top_std is not None:
        x = x / torch.tensor(spec.top_std, device=x.device).view(1, 3, 1, 1)
    return x[0]


def _torch_center_crop(x, crop_h: int, crop_w: int):
    """`center_crop` for an (N, C, H, W) tensor, zero-padding as HF does when the image is smaller."""
    import torch.nn.functional as F

    height, width = int(x.shape[2]), int(x.shape[3])
    if crop_h > height or crop_w > width:
        new_h, new_w = max(crop_h, height), max(crop_w, width)
        top, left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
        x = F.pad(x, (left, new_w - width - left, top, new_h - height - top))
        height, width = new_h, new_w
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return x[:, :, top:top + crop_h, left:left + crop_w]


def _plain(value):
    """The processor's settings as plain JSON (tuples as lists, enums as their values)."""
    import enum
    import json

    return json.loads(json.dumps(value, default=lambda v: v.value if isinstance(v, enum.Enum) else str(v),
                                 sort_keys=True))


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


def load_and_preprocess(data: bytes, spec: PreprocessSpec | Preprocessor, *, draft: bool = False,
                        max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode + preprocess one image's bytes; returns the model inputs (a pixel array, or a dict of arrays)
    and the decoded (oriented) width and height."""
    preprocessor = spec if isinstance(spec, Preprocessor) else Preprocessor(spec=spec)
    img = decode_bytes(data, max_pixels=max_pixels, draft_for=preprocessor.draft_for() if draft else None)
    size = img.size
    if draft:
        # Report the image's true size, not the reduced decode size.
        size = _full_size(data)
    return preprocessor.apply(img), size


def _full_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as raw:
        w, h = raw.size
        orientation = raw.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
