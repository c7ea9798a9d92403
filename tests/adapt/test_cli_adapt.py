"""``clipforge adapt`` end to end on a model trained for a few steps."""
import json

import pytest
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
    """The written adapters are what was fitted (cache keys: support images' features with their labels), and the
    reported test accuracies are what the written tensors give on the test split, recomputed here."""
    import torch.nn.functional as F

    from clipforge.evaluation.suite_data import suite_data
    from clipforge.interop import load
    from clipforge.train import train
    from clipforge.transforms import normalize_batch

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
    adapters = torch.load(out / "adapters.pt", weights_only=True)
    assert adapters["tip-f"]["keys"].shape[0] == 10  # 2 shots x 5 classes
    assert adapters["coop"]["ctx"].shape[0] == 4  # 'a picture of a'

    # the same model and splits, encoded here without the adaptation code
    model, tokenizer, _ = load(tiny_cfg.out_dir)
    model.eval()
    train_split, _, test, _ = suite_data("shapes", model.image_size, 40, 12345).probe_splits("shape")
    assert res["n"]["test"] == len(test.images) > 0

    def encode(images):
        with torch.no_grad():
            return F.normalize(model.encode_image(normalize_batch(torch.stack(list(images)))), dim=-1)

    with torch.no_grad():
        prompts = [t.format(c) for c in test.classnames for t in test.templates]
        emb = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1).view(5, len(test.templates), -1)
        classifier = F.normalize(emb.mean(1), dim=-1)
    scale = model.scale().item()
    feats, labels = encode(test.images), torch.as_tensor(test.labels)
    zero_shot = scale * feats @ classifier.t()
    acc = lambda logits: (logits.argmax(1) == labels).float().mean().item()
    assert res["zero_shot"]["test"] == pytest.approx(acc(zero_shot), abs=1e-9)
    # Tip-Adapter's cache: its keys are the features of 2 train images per class, its values their one-hot labels
    tip = adapters["tip"]
    pool, pool_labels = encode(train_split.images), torch.as_tensor(train_split.labels)
    nearest = (tip["keys"] @ pool.t()).max(1)
    assert torch.allclose(nearest.values, torch.ones(10), atol=1e-4)
    assert torch.equal(pool_labels[nearest.indices], tip["values"].argmax(1))
    assert sorted(tip["values"].argmax(1).tolist()) == sorted(list(range(5)) * 2)
    for m in ("tip", "tip-f"):
        a = adapters[m]
        cache = torch.exp(-a["beta"] * (1 - feats @ a["keys"].t())) @ a["values"]
        assert row[m]["test"] == pytest.approx(acc(zero_shot + a["alpha"] * cache), abs=1e-9), m
    assert not torch.allclose(adapters["tip-f"]["keys"], tip["keys"])  # the -F keys trained
    assert row["coop"]["test"] == pytest.approx(acc(scale * feats @ adapters["coop"]["classifier"].t()), abs=1e-9)


def test_unknown_method_is_a_usage_error(capsys):
    try:
        main(["adapt", "x", "--method", "nope"])
    except SystemExit as e:
        assert e.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_adapt_tmm_gopro_caps_end_to_end_on_shapes(tiny_cfg, tmp_path, capsys):
    """The three methods run from the command on shapes; each reported test accuracy is recomputed here
    from the written adapters (TMM and GOPro: a fresh learner loaded with the written state; CapS: the cache
    whose keys are the support images' captions)."""
    import torch.nn.functional as F

    from clipforge.adapt.gopro import GOProConfig, GOProLearner
    from clipforge.adapt.tmm import TMMConfig, TMMLearner
    from clipforge.evaluation.suite_data import suite_data
    from clipforge.interop import load
    from clipforge.train import train
    from clipforge.transforms import normalize_batch

    train(tiny_cfg)
    out = tmp_path / "adapt"
    rc = main(["adapt", tiny_cfg.out_dir, "--method", "tmm", "gopro", "caps", "--shots", "2", "--size", "40",
               "--tmm-epochs", "2", "--gopro-epochs", "2", "--gopro-views", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tmm" in printed and "gopro" in printed and "caps" in printed
    res = json.loads((out / "adapt.json").read_text())
    row = res["shots"]["2"]
    adapters = torch.load(out / "adapters.pt", weights_only=True)
    assert adapters["caps"]["keys"].shape[0] == row["caps"]["captions"] >= 10  # every caption of 2 x 5 images

    model, tokenizer, _ = load(tiny_cfg.out_dir)
    model.eval()
    _, _, test, _ = suite_data("shapes", model.image_size, 40, 12345).probe_splits("shape")
    with torch.no_grad():
        feats = F.normalize(model.encode_image(normalize_batch(torch.stack(list(test.images)))), dim=-1)
    labels = torch.as_tensor(test.labels)
    acc = lambda logits: (logits.argmax(1) == labels).float().mean().item()
    for name, learner in (("tmm", TMMLearner(model, tokenizer, test.classnames, TMMConfig())),
                          ("gopro", GOProLearner(model, tokenizer, test.classnames, GOProConfig(views=2)))):
        learner.load_state_dict(adapters[name])
        assert row[name]["test"] == pytest.approx(acc(learner.logits(feats)), abs=1e-9), name
        assert 0.0 <= row[name]["heldout"] <= 1.0
    assert row["gopro"]["final_view"] > 0 and row["tmm"]["final_loss"] > 0


def test_adapt_bad_gopro_views_is_one_clear_error(capsys):
    assert main(["adapt", "no-such-run", "--method", "gopro", "--gopro-views", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "at least 2 augmented views" in err and "--gopro" in err


def _own_labelled_data(root, per_class=20):
    """Colored discs with a manifest whose label column holds class names."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = ["image,caption,label"]
    for name, rgb in {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((36, 36, 3), 255, np.uint8)
            y, x = rng.integers(8, 28, size=2)
            yy, xx = np.mgrid[:36, :36]
            pixels[(yy - y) ** 2 + (xx - x) ** 2 < 40] = rgb
            Image.fromarray(pixels).save(root / name / f"{i}.png")
            lines.append(f"{name}/{i}.png,a {name} disc,{name}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


def test_adapt_on_your_own_data_converted_into_a_shard_set(tiny_cfg, tmp_path, capsys):
    """``--dataset shards --data-root DIR``: support sets from the shard set's train split, accuracy on its test split,
    the class names those of the manifest's label column; a shard set without the three splits, a missing
    --data-root and a folder that is not a shard set are one line each."""
    from clipforge.data.convert import convert
    from clipforge.train import train

    train(tiny_cfg)
    src = _own_labelled_data(tmp_path / "src")
    manifest = convert(src, tmp_path / "shards", val_fraction=0.25, test_fraction=0.25, progress=False)
    out = tmp_path / "adapt"
    assert main(["adapt", tiny_cfg.out_dir, "--dataset", "shards", "--data-root", str(tmp_path / "shards"),
                 "--method", "tip", "gda", "--shots", "2", "--out", str(out), "--quiet"]) == 0
    res = json.loads((out / "adapt.json").read_text())
    assert res["classnames"] == ["blue", "green", "red"] and res["view"] == "label"
    assert res["n"]["test"] <= manifest["splits"]["test"]["count"] and res["n"]["test"] > 0
    assert 0.0 <= res["shots"]["2"]["tip"]["test"] <= 1.0
    capsys.readouterr()
    convert(src, tmp_path / "train_only", progress=False)
    for extra, words in (([], "give it with --data-root"),
                         (["--data-root", str(tmp_path / "train_only")], "convert again with --val-fraction"),
                         (["--data-root", str(tmp_path / "src")], "is not a shard set")):
        assert main(["adapt", tiny_cfg.out_dir, "--dataset", "shards", *extra, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
