"""The ``key=value`` words of ``clipforge train`` as the shell hands them over.

A shell changes two kinds of override before clipforge sees them:

- **brace expansion**: bash, zsh and fish expand ``loss={clip:1.0,siglip:0.5}`` (braces holding a comma, no
  space) into two words, ``loss=clip:1.0 loss=siglip:0.5``. The help and the docs write dict overrides that way,
  so :func:`rejoin_brace_expansion` puts such a run of words back together: a key given two or more times in a
  row, each time with a ``name:value`` value and no brace, is what expansion makes of ``key={a:1,b:2}`` and
  means nothing else (a config field set twice in a row to a bare ``name:value`` is never meant).
- **word splitting**: ``loss={clip: 1.0}`` unquoted arrives as ``loss={clip:`` and ``1.0}``; a value cannot be
  put back from its pieces with certainty (the spaces are gone), so :func:`check_split_values` names the pieces
  and the quoted override.

:func:`check_config_file_given` refuses a config file given where the overrides go (it belongs to ``--config``).
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError

_EXPANDED = re.compile(r"^([A-Za-z_][\w.]*)=([A-Za-z_][\w]*:[^{}\[\],\s]+)$")  # key=name:value, no brace or comma


def rejoin_brace_expansion(words: list[str]) -> list[str]:
    """``words`` with every run of brace-expanded words rejoined: ``loss=clip:1.0 loss=siglip:0.5`` becomes
    ``loss={clip:1.0,siglip:0.5}``; other words are kept as they are, in order."""
    out: list[str] = []
    i = 0
    while i < len(words):
        match = _EXPANDED.match(words[i])
        j = i + 1
        while match and j < len(words) and (m := _EXPANDED.match(words[j])) and m.group(1) == match.group(1):
            j += 1
        if match and j - i > 1:
            out.append(f"{match.group(1)}={{{','.join(_EXPANDED.match(w).group(2) for w in words[i:j])}}}")
        else:
            out.extend(words[i:j])
        i = j
    return out


def check_split_values(words: list[str]) -> None:
    """Refuse an override whose value the shell split at its spaces (``loss={clip: 1.0}`` unquoted), naming the
    pieces and the quoted override."""
    for i, start in enumerate(words):
        if "=" not in start:
            continue
        pieces = [start]
        for word in words[i + 1:]:
            text = " ".join(pieces)
            if sum(text.count(c) for c in "{[") <= sum(text.count(c) for c in "}]") or "=" in word:
                break
            pieces.append(word)
        if len(pieces) > 1:
            joined = " ".join(pieces)
            raise ConfigError(f"'{pieces[1]}' continues '{start}': the shell split a value at its spaces; quote the "
                              f"override: '{joined}'")


def check_config_file_given(words: list[str]) -> None:
    """Refuse a YAML file (or any existing file) given as an override: ``clipforge train configs/x.yaml``."""
    files = [w for w in words if "=" not in w and (w.endswith((".yaml", ".yml")) or Path(w).is_file())]
    if files:
        raise ConfigError(f"'{files[0]}' is not a key=value override; to train from a config file give it with "
                          f"--config: clipforge train --config {files[0]} [key=value ...]")
