"""``clipforge lm-finetune`` (LLM2CLIP's caption-contrast stage) on a tiny random Llama."""
from __future__ import annotations

import json

from clipforge.cli.main import main
from tests.cli.test_cli_errors import one_line_error
from tests.reference.tiny_lm import make_tiny_lm


def test_lm_finetune_writes_the_embedder_and_reports_pair_accuracy(capsys, tmp_path, recwarn):
    lm = make_tiny_lm(tmp_path / "lm")
    argv = ["lm-finetune", str(lm), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "8",
            "--train-size", "64", "--eval-size", "32", "--context-length", "16", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out pair accuracy" in out and str(tmp_path / "out") in out
    report = json.loads((tmp_path / "out" / "caption_contrast.json").read_text())
    assert len(report["losses"]) == 2 and (tmp_path / "out" / "config.json").exists()
    assert main(argv[:-1]) == 2  # the first run's model is not replaced unasked
    assert "is not empty" in capsys.readouterr().err
    assert main([*argv[:-1], "--overwrite"]) == 0  # without --quiet: progress lines, and the result said once
    out = capsys.readouterr().out
    assert "caption contrast step 2/2" in out and out.count("held-out pair accuracy") == 1
    assert not [str(w.message) for w in recwarn if "is_gradient_checkpointing" in str(w.message)]  # peft's, not ours


def test_lm_finetune_bad_inputs_are_one_line(capsys, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    assert "no tokenizer files" in one_line_error(capsys, ["lm-finetune", str(bare), "--out", str(tmp_path / "o")])
    lm = make_tiny_lm(tmp_path / "lm")
    capsys.readouterr()
    err = one_line_error(capsys, ["lm-finetune", str(lm), "--out", str(tmp_path / "o"), "--lora-targets", "nope"])
    assert "['nope'] do not exist" in err
