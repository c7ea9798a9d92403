"""Loading a captioner: a CoCa model (anything :func:`clipforge.load` reads whose model has a decoder) or a MacCap
decoder directory (``maccap.json``), with the decoding method checked against the kind.

The one implementation behind ``clipforge caption`` and ``clipforge index --describe``
(:func:`clipforge.serve.describe.load_describer`); both name their own option in the messages (``--method`` or
``--describe-method``).
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError

DECODER_HELP = ("captioning needs a decoder: a CoCa model (model=coca-tiny, trained with "
                "loss={clip: 1.0, caption: 2.0}) "
                "or a MacCap decoder directory (clipforge.captioning.train_maccap(clip, texts).save(DIR))")
METHODS = ("greedy", "beam", "maccap")


def load_captioner(source: str | os.PathLike, method: str | None = None,
                   load_options: dict[str, Any] | None = None, method_option: str = "--method"):
    """(kind, captioner, image transform): kind ``maccap`` (a :class:`~clipforge.captioning.MacCapCaptioner`) for a
    MacCap decoder directory, else ``coca`` (the :class:`clipforge.models.CoCa` in eval mode).

    ``method`` (None, ``greedy``, ``beam`` or ``maccap``) must suit the kind: ``maccap`` for a MacCap directory and
    only for one; ``method_option`` is the option named in the message. A model without a decoder, or a method that
    does not suit, raises :class:`clipforge.errors.ConfigError`."""
    from ..interop import load
    from ..models import CoCa
    from ..transforms import image_transform
    from .maccap import MacCapCaptioner, is_maccap_dir

    if method is not None and method not in METHODS:
        raise ConfigError(f"{method_option} must be one of {', '.join(METHODS)}, got {method!r}")
    if is_maccap_dir(source):
        if method not in (None, "maccap"):
            raise ConfigError(f"'{source}' is a MacCap decoder directory; it decodes with {method_option} maccap "
                              f"(greedy per noise draw, then CLIP re-ranking), not {method_option} {method}")
        cap = MacCapCaptioner.load(source)
        return "maccap", cap, image_transform(cap.image_size)
    if method == "maccap":
        raise ConfigError(f"{method_option} maccap needs a MacCap decoder directory (with maccap.json); "
                          f"'{source}' is not one")
    model, _tok, transform = load(str(source), **(load_options or {}))
    if not isinstance(model, CoCa):
        raise ConfigError(f"'{source}' is a {type(model).__name__} without a captioning decoder; {DECODER_HELP}")
    return "coca", model.eval(), transform


__all__ = ["DECODER_HELP", "METHODS", "load_captioner"]
