"""Load any image a user or a dataset hands us as an RGB ``PIL.Image``, or fail with a clear error.

Accepted sources: a ``PIL.Image``, a path (``str`` or ``os.PathLike``), raw encoded ``bytes``,
a binary file object, a ``numpy`` array (H x W, or H x W x C, uint8) or a uint8 ``torch``
tensor (C x H x W). Modes are converted to RGB:

- grayscale (``L``, ``1``) is replicated to three channels;
- transparency (``RGBA``, ``LA``, ``PA``, palette images with a transparent color) is
  composited over white, the background a viewer shows, instead of PIL's default black;
- ``CMYK`` and ``YCbCr`` go through PIL's conversion;
- 16-bit and 32-bit integer or float images (``I;16``, ``I``, ``F``) are scaled by their
  bit depth to 0-255 (float images are assumed to lie in [0, 1]).

Anything that cannot be decoded raises :class:`ImageLoadError`, whose message names the file.

Every decode here is bounded: the size an image declares in its header is checked before any
pixel is decoded, and an image with more than :func:`max_image_pixels` pixels (40,000,000 by
default, ``CLIPFORGE_MAX_IMAGE_PIXELS`` or the ``max_pixels`` argument to change it) raises
:class:`ImageTooLargeError`. A 20 KB PNG can declare 13000 x 13000 pixels, which would take
0.5 GB as RGB; PIL's own guard (``Image.MAX_IMAGE_PIXELS``, 89 M pixels, a warning up to twice
that) lets it through. Every loader of clipforge (preprocessing, datasets, shards, conversion,
the index and the search server) decodes through :func:`load_image`.
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageLoadError(ValueError):
    """An image could not be read or decoded; ``source`` names it."""

    def __init__(self, source: Any, reason: str):
        self.source = source
        super().__init__(f"cannot load image {describe_source(source)}: {reason}")


class ImageTooLargeError(ImageLoadError):
    """An image declares more pixels than the limit (:func:`max_image_pixels`); nothing was decoded."""

    def __init__(self, source: Any, size: tuple[int, int], limit: int):
        self.size, self.limit = size, limit
        super().__init__(source, f"it declares {size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, more than the "
                                 f"limit of {limit:,}; shrink the image, or raise the limit "
                                 f"(CLIPFORGE_MAX_IMAGE_PIXELS, or --max-image-pixels for clipforge serve)")


DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
MAX_PIXELS_ENV = "CLIPFORGE_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """The pixel limit of :func:`load_image`: ``$CLIPFORGE_MAX_IMAGE_PIXELS`` if set, else 40,000,000."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None or not value.strip():
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        limit = int(value.replace("_", ""))
    except ValueError:
        limit = 0
    if limit < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={value!r} is not a positive whole number of pixels; "
                         f"set it to e.g. {DEFAULT_MAX_IMAGE_PIXELS} or unset it")
    return limit


def check_image_size(img: Image.Image, source: Any, max_pixels: int | None = None) -> None:
    """Raise :class:`ImageTooLargeError` if ``img`` (opened, not yet decoded) declares more than the limit."""
    limit = max_image_pixels() if max_pixels is None else int(max_pixels)
    w, h = img.size
    if w * h > limit:
        raise ImageTooLargeError(source, (w, h), limit)


def describe_source(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return f"'{name}'"
    return f"<{type(source).__name__}>"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (see the module docstring for the rules)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float64) / 65535.0
        img = Image.fromarray(np.round(arr * 255).astype(np.uint8), mode="L")
    elif img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.round(np.clip(arr / top, 0, 1) * 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        img = Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _from_array(arr: np.ndarray, source: Any) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageLoadError(source, f"arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, mode="L")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Image.fromarray(arr, mode="RGB" if arr.shape[-1] == 3 else "RGBA")
    raise ImageLoadError(source, f"expected an H x W or H x W x 3/4 array, got shape {tuple(arr.shape)}")


def load_image(source: Any, max_pixels: int | None = None) -> Image.Image:
    """Return ``source`` as a fully decoded RGB image, or raise :class:`ImageLoadError`.

    ``max_pixels``: the most pixels an encoded image may declare (default :func:`max_image_pixels`);
    a larger one raises :class:`ImageTooLargeError` before it is decoded. Arrays, tensors and PIL
    images already decoded are in memory already and are not checked.
    """
    if isinstance(source, Image.Image):
        img = source
        if getattr(img, "_im", None) is None and getattr(img, "fp", None) is not None:  # opened lazily, not decoded
            check_image_size(img, source, max_pixels)
    else:
        try:
            import torch

            if isinstance(source, torch.Tensor):
                t = source.detach().cpu()
                if t.ndim == 3 and t.shape[0] in (1, 3, 4):
                    t = t.permute(1, 2, 0)
                return to_rgb(_from_array(t.numpy(), source))
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        if isinstance(source, np.ndarray):
            return to_rgb(_from_array(source, source))
        if isinstance(source, (str, os.PathLike)):
            if not os.path.exists(source):
                raise ImageLoadError(source, "no such file")
            if os.path.isdir(source):
                raise ImageLoadError(source, "it is a directory")
            opener = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageLoadError(source, "empty data")
            opener = io.BytesIO(bytes(source))
        elif hasattr(source, "read"):
            opener = source
        else:
            raise ImageLoadError(source, f"unsupported source type {type(source).__name__} "
                                         "(give a PIL image, a path, bytes, a file object or a uint8 array)")
        try:
            img = Image.open(opener)  # reads the header only
        except UnidentifiedImageError:
            raise ImageLoadError(source, "not a recognized image format (corrupt or not an image)") from None
        except Image.DecompressionBombError as e:
            raise ImageLoadError(source, f"image too large ({e})") from None
        except OSError as e:
            raise ImageLoadError(source, str(e)) from None
        check_image_size(img, source, max_pixels)
    try:
        img.load()  # decode now: truncated files fail here, not later inside a worker
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(source, f"decoding failed ({e}); the file is probably truncated or corrupt") from None
