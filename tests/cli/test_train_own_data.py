"""``clipforge train`` on the user's own data (``data.dataset=csv:FILE`` and the other prefixes) and on a shard set,
with the evaluation at the end of the run (``clipforge.cli.train_data``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from clipforge.cli.main import main
from clipforge.cli.train_data import evaluate_shard_set
from clipforge.data.convert import convert

SMALL = ["model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
         "text: {context_length: 16, width: 32, layers: 1, heads: 2}}", "data.eval_size=24",
         "batch_size=8", "steps=2", "warmup_steps=1", "progress=false", "precision=fp32"]
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


def _pictures(root, n_per_color=14):
    """Colored discs on white, a CSV manifest with named labels, and the same as a captioned image folder."""
    rng = np.random.default_rng(0)
    lines = ["image,caption,label"]
    for color, rgb in COLORS.items():
        (root / "folder" / color).mkdir(parents=True)
        for i in range(n_per_color):
            pixels = np.full((40, 48, 3), 255, np.uint8)
            y, x = rng.integers(8, 30), rng.integers(8, 38)
            yy, xx = np.mgrid[:40, :48]
            pixels[(yy - y) ** 2 + (xx - x) ** 2 < 49] = rgb
            path = root / "folder" / color / f"{i}.png"
            Image.fromarray(pixels).save(path)
            path.with_suffix(".txt").write_text(f"a {color} disc number {i}\n")
            lines.append(f"folder/{color}/{i}.png,a {color} disc number {i},{color}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


def _config(run):
    return yaml.safe_load((run / "config.yaml").read_text())


def test_train_on_a_csv_converts_it_once_and_evaluates_on_its_held_out_val(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPFORGE_DATA", str(tmp_path / "home"))
    csv = _pictures(tmp_path)
    assert main(["train", f"out_dir={tmp_path / 'a'}", f"data.dataset=csv:{csv}", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "zero-shot label (3 classes)" in out and "retrieval val image->text" in out
    cfg = _config(tmp_path / "a")
    root = tmp_path / "home" / "converted"
    (converted,) = root.iterdir()
    assert cfg["data"]["dataset"] == "shards" and cfg["data"]["root"] == str(converted)
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["label_views"]["label"]["classes"] == ["blue", "green", "red"]
    assert manifest["total"] == 42 and manifest["splits"]["val"]["count"] >= 1
    assert manifest["image_size"] == 256  # the floor of the stored size: this model takes 32 px
    written = (converted / "manifest.json").stat().st_mtime_ns
    # a second run on the unchanged source reuses the conversion
    assert main(["train", f"out_dir={tmp_path / 'b'}", f"data.dataset=csv:{csv}", *SMALL]) == 0
    assert [p.name for p in root.iterdir()] == [converted.name]
    assert (converted / "manifest.json").stat().st_mtime_ns == written
    # data.root names where the conversion goes
    assert main(["train", f"out_dir={tmp_path / 'c'}", f"data.dataset=csv:{csv}", f"data.root={tmp_path / 'mine'}",
                 *SMALL]) == 0
    assert (tmp_path / "mine" / "manifest.json").is_file()
    assert _config(tmp_path / "c")["data"]["root"] == str(tmp_path / "mine")


def test_train_on_a_captioned_image_folder_gets_the_folder_view(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPFORGE_DATA", str(tmp_path / "home"))
    _pictures(tmp_path)
    assert main(["train", f"out_dir={tmp_path / 'a'}", f"data.dataset=imagefolder:{tmp_path / 'folder'}", *SMALL]) == 0
    (converted,) = (tmp_path / "home" / "converted").iterdir()
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["label_views"]["folder"]["classes"] == ["blue", "green", "red"]


def test_train_on_a_shard_set_evaluates_at_the_end(tmp_path, capsys):
    """The documented ``data convert`` -> ``data.dataset=shards data.root=DIR`` path: before this the evaluation at the
    end of the run looked the shard set up as a corpus without its root and the command died with a traceback."""
    csv = _pictures(tmp_path)
    convert(csv, tmp_path / "shards", test_fraction=0.3, progress=False)
    assert main(["train", f"out_dir={tmp_path / 'a'}", "data.dataset=shards", f"data.root={tmp_path / 'shards'}",
                 *SMALL]) == 0
    out = capsys.readouterr().out
    assert "zero-shot label (3 classes)" in out and "retrieval test image->text" in out


def test_evaluate_shard_set_prefers_test_and_caps_the_samples(tmp_path):
    """Against the user suite on the whole split (``clipforge eval --dataset shards:DIR``): the same numbers when the
    cap is above the split's size; at most ``size`` samples below it; nothing for a set without a held-out split."""
    from clipforge import create_model
    from clipforge.evaluation.datasets import SpecOptions, load_eval_data
    from clipforge.evaluation.user_suite import run_user_suite
    from clipforge.tokenizer import get_tokenizer

    csv = _pictures(tmp_path)
    convert(csv, tmp_path / "shards", val_fraction=0.3, test_fraction=0.3, progress=False)
    model = create_model("tiny", seed=0).eval()
    tokenizer = get_tokenizer(model.context_length)
    got = evaluate_shard_set(model, tokenizer, str(tmp_path / "shards"), size=1000)
    whole = run_user_suite(model, tokenizer, load_eval_data(f"shards:{tmp_path / 'shards'}", SpecOptions(split="test")),
                           tasks=["zero_shot", "retrieval"], cache_dir=None, progress=False, workers=0).results
    assert set(got) == {"zero_shot", "retrieval"} and set(got["retrieval"]) == {"test"}
    for task in got:
        for name, metrics in got[task].items():
            for k, v in metrics.items():
                if isinstance(v, float):
                    assert v == pytest.approx(whole[task][name][k], abs=1e-6), (task, name, k)
    capped = evaluate_shard_set(model, tokenizer, str(tmp_path / "shards"), size=5)
    assert capped["retrieval"]["test"]["num_images"] == 5
    convert(csv, tmp_path / "train_only", progress=False)
    assert evaluate_shard_set(model, tokenizer, str(tmp_path / "train_only"), size=100) == {}


@pytest.mark.parametrize("dataset, words", [
    ("csv:{tmp}/nowhere.csv", "does not exist"),
    ("csv:{tmp}/pairs.csv+shapes", "cannot be mixed"),
    ("tsv:{tmp}/pairs.csv", "expected a .tsv file"),
    ("wds:{tmp}/folder", "no .tar shards"),
    ("imagefolder:{tmp}/bare", "no usable record"),
])
def test_own_data_mistakes_are_one_clear_line(tmp_path, monkeypatch, capsys, dataset, words):
    monkeypatch.setenv("CLIPFORGE_DATA", str(tmp_path / "home"))
    _pictures(tmp_path)
    (tmp_path / "bare" / "x").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "bare" / "x" / "a.png")  # no caption beside it
    assert main(["train", f"out_dir={tmp_path / 'run'}", f"data.dataset={dataset.format(tmp=tmp_path)}", *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_help_teaches_own_data(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "data.dataset=csv:pairs.csv" in out and "clipforge data convert" in out


def test_eval_without_dataset_evaluates_what_the_run_trained_on(tmp_path, monkeypatch, capsys, caplog):
    """``clipforge eval RUN`` for a run trained on its own data reads the run's shard set (its val split here, the
    conversion holding no test split) instead of shapes; ``--dataset`` given still wins."""
    from clipforge.cli.evaluate import run_default_datasets

    monkeypatch.setenv("CLIPFORGE_DATA", str(tmp_path / "home"))
    csv = _pictures(tmp_path)
    run = tmp_path / "a"
    assert main(["train", f"out_dir={run}", f"data.dataset=csv:{csv}", *SMALL]) == 0
    root = _config(run)["data"]["root"]
    assert run_default_datasets(str(run)) == ([f"shards:{root}"], "val")
    assert run_default_datasets(str(tmp_path / "nowhere")) == (["shapes"], None)
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "config.yaml").write_text(f"data:\n  dataset: shards\n  root: {tmp_path / 'deleted'}\n")
    with caplog.at_level("WARNING", logger="clipforge.cli.evaluate"):
        assert run_default_datasets(str(gone)) == (["shapes"], None)
    assert "no held-out split to evaluate here: evaluating on shapes" in caplog.text
    capsys.readouterr()
    assert main(["eval", str(run), "--quiet", "--no-cache", "--json", "--tasks", "zero_shot,retrieval"]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out.strip().splitlines()[-1])
    assert res["dataset"] == f"shards:{root}" and set(res["retrieval"]) == {"val"}
    assert "no --dataset: evaluating on the held-out data" in captured.err
    assert main(["eval", str(run), "--quiet", "--no-cache", "--json", "--tasks", "zero_shot", "--size", "20",
                 "--dataset", "shapes"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dataset"] == "shapes"


def test_a_shard_set_larger_than_the_default_train_size_trains_on_all_of_it(tmp_path, caplog):
    """``data.train_size`` keeps a seeded subset of a shard set; left at its default (20,000) below the train split's
    size it is raised to that size, set explicitly it is kept with a warning; streaming and smaller sets unchanged."""
    import dataclasses

    from clipforge.cli.train_data import fit_train_size
    from clipforge.train import load_config

    root = tmp_path / "big"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"splits": {"train": {"count": 30_000}, "val": {"count": 10}}}))
    cfg = load_config(None, ["data.dataset=shards", f"data.root={root}"])
    assert cfg.data.train_size == 20_000
    assert fit_train_size(cfg).data.train_size == 30_000
    explicit = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_size=5_000))
    with caplog.at_level("WARNING", logger="clipforge.cli.train_data"):
        assert fit_train_size(explicit).data.train_size == 5_000
    assert "data.train_size=30000 uses them all" in caplog.text
    streaming = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, streaming=True))
    assert fit_train_size(streaming) is streaming
    (root / "manifest.json").write_text(json.dumps({"splits": {"train": {"count": 300}}}))
    assert fit_train_size(cfg) is cfg
    shapes = load_config(None, [])
    assert fit_train_size(shapes) is shapes
