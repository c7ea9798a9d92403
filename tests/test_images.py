"""The pixel limit of clipforge.images: a header declaring too many pixels is refused before anything is decoded."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import clipforge
from clipforge.images import ImageLoadError, ImageTooLargeError, load_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 13000, height: int = 13000) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: about 20 KB that decode to hundreds of MB."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_bomb_png_is_small_and_declares_13000_squared():
    data = bomb_png()
    assert len(data) < 40_000
    assert Image.open(io.BytesIO(data)).size == (13000, 13000)  # the header, read without decoding


def test_decompression_bomb_is_refused_from_the_header_without_allocating():
    data = bomb_png()
    if not peak_rss_reset():
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    base = peak_rss_mb()
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as e:
        load_image(data)
    took = time.perf_counter() - t0
    grew = peak_rss_mb() - base
    msg = str(e.value)
    # the message names the declared size, the limit and how to raise it
    assert "13000 x 13000" in msg and "40,000,000" in msg and "CLIPFORGE_MAX_IMAGE_PIXELS" in msg
    assert isinstance(e.value, ImageLoadError)  # callers that skip unreadable images keep working
    # decoding it takes 169 MB as mode "1" and 507 MB as RGB; the header check allocates nothing of that
    assert grew < 50, f"peak RSS grew by {grew:.0f} MB"
    assert took < 1.0


def test_pixel_limit_is_configurable_by_argument_and_environment(monkeypatch):
    data = _png(100, 60)  # 6000 pixels
    assert load_image(data, max_pixels=6000).size == (100, 60)
    with pytest.raises(ImageTooLargeError, match="100 x 60"):
        load_image(data, max_pixels=5999)
    monkeypatch.setenv("CLIPFORGE_MAX_IMAGE_PIXELS", "5000")
    with pytest.raises(ImageTooLargeError, match="5,000"):
        load_image(data)
    monkeypatch.setenv("CLIPFORGE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="CLIPFORGE_MAX_IMAGE_PIXELS"):
        load_image(data)


def test_a_lazily_opened_pil_image_is_checked_before_it_is_decoded():
    lazy = Image.open(io.BytesIO(bomb_png()))
    with pytest.raises(ImageTooLargeError):
        load_image(lazy)
    # an image already in memory was decoded by someone else: nothing to protect, it is converted as usual
    arr = np.zeros((80, 80, 3), np.uint8)
    assert load_image(Image.fromarray(arr), max_pixels=100).size == (80, 80)


def test_every_loader_goes_through_the_limit(tmp_path):
    """The preprocessing transform, the shard/convert decoder and a path all refuse the bomb."""
    from clipforge.data.formats import to_uint8_chw

    data = bomb_png()
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    transform = clipforge.image_transform(32)
    for call in (lambda: transform(data), lambda: to_uint8_chw(data), lambda: load_image(path)):
        with pytest.raises(ImageTooLargeError):
            call()
