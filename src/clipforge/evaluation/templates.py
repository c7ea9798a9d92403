"""Prompt templates for zero-shot classification and the readers of class-name and template files.

Built-in sets (``TEMPLATE_SETS``):

- ``openai_imagenet``: the 80 ImageNet templates OpenAI published with CLIP (the
  "Prompt_Engineering_for_ImageNet" notebook; the same list CLIP_benchmark uses for ``imagenet1k``);
- ``openai_short``: the 7 of them that notebook reports as the best small ensemble;
- ``simple``: ``a photo of a {c}.``

A template marks the class name with ``{c}`` (CLIP_benchmark's convention); ``{}`` is accepted
too. :func:`as_positional` rewrites both to ``{}``, the form the evaluation suite formats with
``template.format(classname)``. Template ensembling is unchanged: the normalized mean of the
normalized text embeddings of a class's prompts.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

OPENAI_IMAGENET: tuple[str, ...] = (
    'a bad photo of a {c}.', 'a photo of many {c}.', 'a sculpture of a {c}.', 'a photo of the hard to see {c}.',
    'a low resolution photo of the {c}.', 'a rendering of a {c}.', 'graffiti of a {c}.', 'a bad photo of the {c}.',
    'a cropped photo of the {c}.', 'a tattoo of a {c}.', 'the embroidered {c}.', 'a photo of a hard to see {c}.',
    'a bright photo of a {c}.', 'a photo of a clean {c}.', 'a photo of a dirty {c}.', 'a dark photo of the {c}.',
    'a drawing of a {c}.', 'a photo of my {c}.', 'the plastic {c}.', 'a photo of the cool {c}.',
    'a close-up photo of a {c}.', 'a black and white photo of the {c}.', 'a painting of the {c}.',
    'a painting of a {c}.', 'a pixelated photo of the {c}.', 'a sculpture of the {c}.', 'a bright photo of the {c}.',
    'a cropped photo of a {c}.', 'a plastic {c}.', 'a photo of the dirty {c}.', 'a jpeg corrupted photo of a {c}.',
    'a blurry photo of the {c}.', 'a photo of the {c}.', 'a good photo of the {c}.', 'a rendering of the {c}.',
    'a {c} in a video game.', 'a photo of one {c}.', 'a doodle of a {c}.', 'a close-up photo of the {c}.',
    'a photo of a {c}.', 'the origami {c}.', 'the {c} in a video game.', 'a sketch of a {c}.',
    'a doodle of the {c}.', 'a origami {c}.', 'a low resolution photo of a {c}.', 'the toy {c}.',
    'a rendition of the {c}.', 'a photo of the clean {c}.', 'a photo of a large {c}.', 'a rendition of a {c}.',
    'a photo of a nice {c}.', 'a photo of a weird {c}.', 'a blurry photo of a {c}.', 'a cartoon {c}.',
    'art of a {c}.', 'a sketch of the {c}.', 'a embroidered {c}.', 'a pixelated photo of a {c}.', 'itap of the {c}.',
    'a jpeg corrupted photo of the {c}.', 'a good photo of a {c}.', 'a plushie {c}.', 'a photo of the nice {c}.',
    'a photo of the small {c}.', 'a photo of the weird {c}.', 'the cartoon {c}.', 'art of the {c}.',
    'a drawing of the {c}.', 'a photo of the large {c}.', 'a black and white photo of a {c}.', 'the plushie {c}.',
    'a dark photo of a {c}.', 'itap of a {c}.', 'graffiti of the {c}.', 'a toy {c}.', 'itap of my {c}.',
    'a photo of a cool {c}.', 'a photo of a small {c}.', 'a tattoo of the {c}.',
)
OPENAI_SHORT: tuple[str, ...] = (
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
)
SIMPLE: tuple[str, ...] = ("a photo of a {c}.",)
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "openai_imagenet": OPENAI_IMAGENET,
    "openai_short": OPENAI_SHORT,
    "simple": SIMPLE,
}


class PromptError(ValueError):
    """A template or class-name file that cannot be used (the message names the file, the line and the fix)."""


def as_positional(template: str, where: str = "template") -> str:
    """``template`` with its class-name slot as ``{}``; a template without ``{c}`` or ``{}`` is an error."""
    if "{c}" not in template and "{}" not in template:
        raise PromptError(
            f"{where}: {template!r} has no {{c}} where the class name goes; write e.g. 'a photo of a {{c}}.'"
        )
    out = template.replace("{c}", "{}")
    try:
        out.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise PromptError(f"{where}: {template!r} is not a valid template ({e}); use {{c}} for the class name and "
                          "double other braces ({{{{ }}}})") from None
    return out


def read_lines(path: str | Path, what: str) -> list[str]:
    """The non-empty, stripped lines of a UTF-8 text file; a clear error if it is missing or not text."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{what} file {path} does not exist; give an existing file (one entry per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PromptError(f"{what} file {path} is not UTF-8 text; save it as UTF-8, one entry per line") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_templates(path: str | Path) -> list[str]:
    """Templates from a file, one per line, each with ``{c}``; returned in the ``{}`` form."""
    lines = read_lines(path, "templates")
    if not lines:
        raise PromptError(f"templates file {path} is empty; write one template per line, e.g. 'a photo of a {{c}}.'")
    return [as_positional(t, f"{path} line {i + 1}") for i, t in enumerate(lines)]


def resolve_templates(name_or_file: str | Sequence[str]) -> list[str]:
    """A built-in set by name, a file of templates, or a list of templates; in the ``{}`` form."""
    if not isinstance(name_or_file, str):
        return [as_positional(t) for t in name_or_file]
    if name_or_file in TEMPLATE_SETS:
        return [as_positional(t) for t in TEMPLATE_SETS[name_or_file]]
    if Path(name_or_file).is_file():
        return read_templates(name_or_file)
    raise PromptError(f"--templates {name_or_file!r} is neither a built-in set ({', '.join(TEMPLATE_SETS)}) nor an "
                      "existing file; name one of those sets or give a file with one template per line")


def read_classnames(path: str | Path, expected: int | None = None, what: str = "classes") -> list[str]:
    """Class names from a file, one per line; with ``expected``, the line count must match it."""
    names = read_lines(path, "class names")
    if expected is not None and len(names) != expected:
        raise PromptError(f"class names file {path} has {len(names)} lines but the dataset has {expected} {what}; "
                          f"write exactly one name per class, in the order of the class indices")
    return names


__all__ = [
    "OPENAI_IMAGENET",
    "OPENAI_SHORT",
    "SIMPLE",
    "TEMPLATE_SETS",
    "PromptError",
    "as_positional",
    "read_classnames",
    "read_lines",
    "read_templates",
    "resolve_templates",
]
