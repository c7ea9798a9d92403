"""``emoji``: Noto Color Emoji glyphs with their names in 14 languages, labelled by Unicode group and subgroup.

Sources
- Images: Debian ``fonts-noto-color-emoji`` (``NotoColorEmoji.ttf``, SIL OFL 1.1). It is a CBDT
  bitmap font: FreeType gives it at one size only (109 px, 136 x 128 bitmaps), so each emoji is
  drawn at that size with ``embedded_color=True``, composited on white, centered on a square
  and resized to ``image_size`` with Lanczos. A sequence the font has no single glyph for
  (it would draw as several glyphs) or that draws nothing is skipped and counted.
- Emoji list, groups and subgroups: Unicode's ``emoji-test.txt`` from Debian ``unicode-data``
  (Unicode license); the fully-qualified emoji and the components are used.
- Captions: the CLDR English name from ``emoji-test.txt``, then the ``emoji`` package's
  (BSD) English name and aliases, then its names in every other language it provides
  (es, ja, ko, pt, it, fr, de, fa, id, zh, ru, tr, ar). Each caption's language is stored in
  ``caption_langs`` (``ShardDataset(..., languages=["en"])`` keeps only English).
- Labels: ``group`` (10 classes) and ``subgroup`` (about 100 classes).
"""
from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .common import build_corpus, require

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
FONT_PACKAGE = "fonts-noto-color-emoji"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
EMOJI_TEST_PACKAGE = "unicode-data"
BITMAP_SIZE = 109  # the only size of the CBDT strikes in NotoColorEmoji.ttf
STATUSES = ("fully-qualified", "component")
LICENSE = "images: SIL OFL 1.1 (Noto Color Emoji); names: BSD (emoji package), Unicode license (emoji-test.txt)"
GROUP_TEMPLATES = ["an emoji from the group {}.", "a {} emoji.", "an icon of {}."]
SUBGROUP_TEMPLATES = ["an emoji of {}.", "a {} emoji.", "an icon of {}."]


def parse_emoji_test(path: str | os.PathLike = EMOJI_TEST) -> list[dict[str, str]]:
    """Rows ``{"emoji", "name", "status", "group", "subgroup", "version"}`` of Unicode's emoji-test.txt."""
    rows, group, subgroup = [], "", ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and ";" in line and "#" in line:
            codes, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            # comment: "<emoji> E<version> <name>"
            _, version, name = comment.strip().split(" ", 2)
            rows.append({"emoji": "".join(chr(int(c, 16)) for c in codes.split()), "status": status.strip(),
                         "name": name.strip(), "version": version, "group": group, "subgroup": subgroup})
    return rows


def _package_name(code: str) -> str:
    """``:grinning_face:`` -> ``grinning face``."""
    return code.strip(":").replace("_", " ").strip()


def emoji_captions(char: str, cldr_name: str) -> tuple[list[str], list[str]]:
    """(captions, languages): the CLDR name, the package's English name and aliases, then other languages."""
    import emoji

    emoji.config.load_language()  # all languages into EMOJI_DATA (a no-op after the first call)
    data = emoji.EMOJI_DATA.get(char) or emoji.EMOJI_DATA.get(char.replace("\ufe0f", "")) or {}
    caps, langs = [cldr_name], ["en"]

    def add(text: str, lang: str) -> None:
        if text and not any(text == c and lang == lg for c, lg in zip(caps, langs)):
            caps.append(text)
            langs.append(lang)

    if "en" in data:
        add(_package_name(data["en"]), "en")
    for alias in data.get("alias", []):
        add(_package_name(alias), "en")
    for lang in emoji.LANGUAGES:
        if lang != "en" and lang in data:
            add(_package_name(data[lang]), lang)
    return caps, langs


_FONT: dict[str, Any] = {}


def render_emoji(char: str, size: int, font_path: str = FONT) -> Image.Image | None:
    """The emoji on white at ``size`` x ``size``; ``None`` when the font has no single glyph for it."""
    font = _FONT.get(font_path)
    if font is None:
        font = _FONT[font_path] = ImageFont.truetype(font_path, BITMAP_SIZE)
    width = font.getlength(char)
    if width == 0 or width > 1.5 * font.getlength("\U0001F600"):  # several glyphs: no ligature for the sequence
        return None
    left, top, right, bottom = font.getbbox(char)
    layer = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
    ImageDraw.Draw(layer).text((-left, -top), char, font=font, embedded_color=True)
    box = layer.getbbox()
    if box is None:
        return None
    layer = layer.crop(box)
    side = max(layer.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(layer, ((side - layer.width) // 2, (side - layer.height) // 2))
    return canvas.convert("RGB").resize((size, size), Image.LANCZOS)


def prepare(payload: dict[str, Any], image_size: int) -> dict[str, Any] | str:
    """Rendering, captions and labels of one emoji, or the reason to skip it."""
    img = render_emoji(payload["emoji"], image_size, payload.get("font", FONT))
    if img is None:
        return "no_single_glyph"
    caps, langs = emoji_captions(payload["emoji"], payload["name"])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"captions": caps, "labels": {"group": payload["group"], "subgroup": payload["subgroup"]},
            "png": buf.getvalue(),
            "extra": {"caption_langs": langs, "emoji": payload["emoji"], "unicode_version": payload["version"]}}


def candidates(
    emoji_test: str | os.PathLike = EMOJI_TEST,
) -> tuple[list[tuple[str, dict]], list[str], list[str], Counter]:
    """(key, payload) per emoji, group names, subgroup names, counts of rows left out by status."""
    rows = parse_emoji_test(require(emoji_test, EMOJI_TEST_PACKAGE))
    groups = list(dict.fromkeys(r["group"] for r in rows))  # Unicode's order
    subgroups = list(dict.fromkeys(r["subgroup"] for r in rows))
    left_out = Counter(r["status"] for r in rows if r["status"] not in STATUSES)
    out = []
    for r in rows:
        if r["status"] not in STATUSES:
            continue
        key = "u" + "-".join(f"{ord(c):04x}" for c in r["emoji"])
        out.append((key, {"emoji": r["emoji"], "name": r["name"], "version": r["version"],
                          "group": groups.index(r["group"]), "subgroup": subgroups.index(r["subgroup"])}))
    return out, groups, subgroups, left_out


def build(out: str | os.PathLike, image_size: int = 128, limit: int | None = None, workers: int = 2,
          shard_bytes: int = 16 << 20, progress: bool = True, leakage_distance: int = 8,
          font: str | os.PathLike = FONT,
          emoji_test: str | os.PathLike = EMOJI_TEST) -> dict:
    """Build the ``emoji`` shards into ``out``; returns the manifest."""
    require(font, FONT_PACKAGE)
    try:
        import emoji as emoji_package
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ModuleNotFoundError("the emoji corpus needs the 'emoji' package: pip install emoji") from e
    cands, groups, subgroups, left_out = candidates(emoji_test)
    for _, payload in cands:
        payload["font"] = str(font)
    views = {"group": {"classes": groups, "templates": GROUP_TEMPLATES},
             "subgroup": {"classes": [s.replace("-", " ") for s in subgroups], "templates": SUBGROUP_TEMPLATES}}
    info = {"source": {"font": str(font), "emoji_test": str(emoji_test)},
            "debian_packages": [FONT_PACKAGE, EMOJI_TEST_PACKAGE],
            "emoji_package_version": getattr(emoji_package, "__version__", "?"),
            "languages": list(emoji_package.LANGUAGES), "license": LICENSE,
            "left_out_before_rendering": dict(left_out)}
    return build_corpus("emoji", out, cands, prepare, views, image_size=image_size, limit=limit, workers=workers,
                        shard_bytes=shard_bytes, progress=progress, info=info,
                        leakage_distance=leakage_distance)
