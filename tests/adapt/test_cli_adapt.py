"""``clipforge adapt`` end to end on a model trained for a few steps."""
import json

import torch

from clipforge.cli.main import build_parser, main


def test_help_teaches_the_methods(capsys):
    parser = build_parser()
    try:
        parser.parse_args(["adapt", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    for word in ("tip-f", "coop", "gda", "clipn", "Tip-Adapter", "context vectors", "heldout", "adapters.pt"):
        assert word in out, word


def test_adapt_fits_and_writes_before_and_after(tiny_cfg, tmp_path, capsys):
    from clipforge.train import train

    train(tiny_cfg)
    out = tmp_path / "adapt"
    rc = main(["adapt", tiny_cfg.out_dir, "--method", "tip", "tip-f", "coop", "gda", "clipn", "--shots", "2",
               "--size", "40", "--coop-epochs", "2", "--tip-f-epochs", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "tip-f" in printed and "CLIPN" in printed
    res = json.loads((out / "adapt.json").read_text())
    assert res["view"] == "shape" and res["num_classes"] == 5
    row = res["shots"]["2"]
    for m in ("tip", "tip-f", "coop", "gda"):
        assert 0.0 <= row[m]["test"] <= 1.0 and 0.0 <= row[m]["heldout"] <= 1.0
    assert 0.0 <= row["clipn"]["auroc_atd"] <= 1.0 and "mcm" in res["ood"]
    assert res["n"]["test"] > 0 and res["zero_shot"]["test"] >= 0.0
    adapters = torch.load(out / "adapters.pt", weights_only=True)
    assert adapters["tip-f"]["keys"].shape[0] == 10  # 2 shots x 5 classes
    assert adapters["coop"]["ctx"].shape[0] == 4  # 'a picture of a'


def test_unknown_method_is_a_usage_error(capsys):
    try:
        main(["adapt", "x", "--method", "nope"])
    except SystemExit as e:
        assert e.code == 2
    assert "invalid choice" in capsys.readouterr().err
