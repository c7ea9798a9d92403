"""``clipforge lvlm-train`` (the LVLM's caption, discriminative and UniME stages) on a tiny random Llama."""
from __future__ import annotations

import json
import shutil

import torch

import clipforge
from clipforge.cli.main import main
from clipforge.models.lvlm import LVLM
from tests.cli.test_cli_errors import one_line_error
from tests.reference.tiny_lm import make_tiny_lm

SMALL = ["--steps", "2", "--batch-size", "4", "--train-size", "16", "--eval-size", "8", "--quiet"]


def test_three_stages_write_loadable_embedders(capsys, tmp_path):
    lm = make_tiny_lm(tmp_path / "lm")
    assert main(["lvlm-train", "--stage", "caption", "--lm", str(lm), "--out", str(tmp_path / "cap"), *SMALL]) == 0
    out = capsys.readouterr().out
    assert out.count("held-out caption loss") == 1 and "caption step" not in out  # --quiet: the result alone
    assert main(["lvlm-train", "--stage", "caption", "--lm", str(lm), "--out", str(tmp_path / "cap2"),
                 *SMALL[:-1]]) == 0
    out = capsys.readouterr().out
    assert "caption step 2/2" in out and out.count("held-out caption loss") == 1  # with progress lines: once
    assert main(["lvlm-train", "--stage", "discriminative", "--init-from", str(tmp_path / "cap"),
                 "--soft-prompt-tokens", "2", "--lora-rank", "2", "--out", str(tmp_path / "disc"), *SMALL]) == 0
    assert main(["lvlm-train", "--stage", "unime", "--init-from", str(tmp_path / "cap"), "--teacher", str(lm),
                 "--kd-steps", "2", "--hard-negatives", "2", "--out", str(tmp_path / "unime"), *SMALL]) == 0
    for stage, soft in (("cap", None), ("disc", (2, 32)), ("unime", None)):
        report = json.loads((tmp_path / stage / "lvlm_train.json").read_text())
        assert len(report["losses"]) == 2
        model, tokenizer, _ = clipforge.load(str(tmp_path / stage))
        assert isinstance(model, LVLM) and model.cfg.lvlm.lora_rank == 0  # adapters merged on save
        assert (None if model.soft_prompt_image is None else tuple(model.soft_prompt_image.shape)) == soft
        with torch.no_grad():
            assert model.encode_text(tokenizer(["a red circle"])).shape == (1, 32)
    assert len(json.loads((tmp_path / "unime" / "lvlm_train.json").read_text())["kd_losses"]) == 2


def test_lvlm_train_bad_inputs_are_one_line(capsys, tmp_path):
    lm = make_tiny_lm(tmp_path / "lm")
    bare = tmp_path / "bare"
    shutil.copytree(lm, bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    capsys.readouterr()  # writing the tiny LM shows a progress bar
    out = ["--out", str(tmp_path / "o")]
    assert "has no tokenizer files" in one_line_error(capsys, ["lvlm-train", "--stage", "caption", "--lm", str(bare),
                                                               *out])
    assert "--lm DIR" in one_line_error(capsys, ["lvlm-train", "--stage", "caption", *out])
    err = one_line_error(capsys, ["lvlm-train", "--stage", "discriminative", "--lm", str(lm), "--lora-targets", "nope",
                                  *out, *SMALL])
    assert "['nope'] do not exist in the language model" in err
    assert "--teacher DIR" in one_line_error(capsys, ["lvlm-train", "--stage", "unime", "--lm", str(lm), *out])
