"""``clipforge train``'s key=value words as a real shell hands them over (bash is the reference: the words below
are what it makes of the command lines the help and the docs print)."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from clipforge.cli.main import main
from clipforge.cli.train_overrides import check_split_values, rejoin_brace_expansion
from clipforge.errors import ConfigError
from clipforge.train import load_config

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is the reference shell here")


def shell_words(line: str) -> list[str]:
    """The words bash passes to a program for ``line`` (brace expansion and word splitting included)."""
    done = subprocess.run(["bash", "-c", f"printf '%s\\n' {line}"], capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


@needs_bash
@pytest.mark.parametrize("line, loss", [
    ("loss={clip:1.0,caption:2.0} steps=3", {"clip": 1.0, "caption": 2.0}),  # --help's CoCa example, unquoted
    ("steps=3 loss={clip:1.0,multi_positive:0.5,siglip:0.25}", {"clip": 1.0, "multi_positive": 0.5, "siglip": 0.25}),
    ("loss={clip:1.0} steps=3", {"clip": 1.0}),  # no comma: bash leaves it alone, and so does the rejoining
    ("'loss={clip: 1.0, siglip: 0.5}' steps=3", {"clip": 1.0, "siglip": 0.5}),  # quoted
])
def test_a_brace_expanded_dict_override_is_put_back_together(line, loss):
    words = shell_words(line)
    if "," in line and "'" not in line:
        assert len([w for w in words if w.startswith("loss=")]) > 1  # what bash really did to it
    cfg = load_config(None, rejoin_brace_expansion(words))
    assert cfg.loss == loss and cfg.steps == 3


def test_words_that_are_not_an_expansion_are_kept_as_given():
    kept = ["lr=1e-3", "lr=2e-3", "data.caption_sources=original=1,rewrites=1", "x=a:b", "steps=3", "x=c:d"]
    assert rejoin_brace_expansion(kept) == kept  # repeated plain values, a lone name:value, a run broken by steps
    assert rejoin_brace_expansion(["a=x:1", "b=y:2"]) == ["a=x:1", "b=y:2"]  # different keys
    assert rejoin_brace_expansion([]) == []


@needs_bash
def test_a_value_split_at_its_spaces_names_the_quoted_override(capsys):
    words = shell_words("loss={clip: 1.0, siglip: 0.5} steps=3")
    assert words[:2] == ["loss={clip:", "1.0,"]
    with pytest.raises(ConfigError, match=r"'1\.0,' continues 'loss=\{clip:'.*quote the override: "
                                          r"'loss=\{clip: 1\.0, siglip: 0\.5\}'"):
        check_split_values(words)
    check_split_values(["loss={clip:1.0}", "steps=3", "trainable=['*.router.weight']"])  # nothing split
    assert main(["train", *shell_words("loss={clip: 1.0} --print-config")]) == 2
    assert "quote the override: 'loss={clip: 1.0}'" in capsys.readouterr().err


@needs_bash
def test_the_cli_trains_with_the_help_texts_unquoted_loss(capsys):
    assert main(["train", "--print-config", *shell_words("model=coca-tiny loss={clip:1.0,caption:2.0}")]) == 0
    assert "loss:\n  clip: 1.0\n  caption: 2.0\n" in capsys.readouterr().out
