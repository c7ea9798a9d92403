"""Which files are images: the one list of image suffixes, and the one folder walk, that every reader of clipforge uses.

Training on an image folder (:func:`clipforge.data.formats.iter_image_folder`), ``clipforge eval --dataset
imagefolder:`` / ``wds:``, ``clipforge index --images``, ``clipforge embed --images`` and ``clipforge caption
--images`` all decide what an image is here, so a folder that one command reads is a folder every command reads
(a ``.tif`` scan that ``clipforge index`` found used to be invisible to ``clipforge train``). Every suffix listed is
one that :func:`clipforge.images.load_image` (PIL) decodes.

A webdataset sample names its members by extension (``000017.png``, ``000017.txt``); its image is the member
whose extension is one of :data:`WDS_IMAGE_KEYS` (the suffixes without the dot). A sample with more than one
image member is ambiguous; readers take the first in :data:`WDS_IMAGE_KEYS` order (webdataset's decoded
samples) or in the tar's order (the byte-range reader of ``clipforge eval``), and say so in their docstrings.
"""
from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_KEYS = tuple(s[1:] for s in IMAGE_SUFFIXES)


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an image by its suffix (any case: ``IMG_0001.JPG`` is one); the file is not read."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def find_images(root: str | os.PathLike) -> list[Path]:
    """The image files under the folder ``root``, recursively (:meth:`pathlib.Path.rglob`), sorted by path;
    files only, so a folder named ``x.png`` is not one."""
    return sorted(p for p in Path(root).rglob("*") if is_image_file(p) and p.is_file())


__all__ = ["IMAGE_SUFFIXES", "WDS_IMAGE_KEYS", "is_image_file", "find_images"]
