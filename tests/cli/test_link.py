"""``clipforge link`` (CLIPPINGS record linkage): links.csv, the summary against the true entities, fine-tuning,
and one clear error for records without an image or a text."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import clipforge
    from clipforge.models import save_model

    return save_model(clipforge.create_model("tiny", seed=0, **SMALL), tmp_path_factory.mktemp("m") / "clip")


def write_records(root, n_entities=4, per=3, fmt="jsonl"):
    from PIL import Image

    from clipforge.data.shapes import ShapesGenerator

    gen = ShapesGenerator("val", seed=0, image_size=32)
    rng = np.random.default_rng(0)
    rows = []
    (root / "img").mkdir(parents=True, exist_ok=True)
    for e in range(n_entities):
        base = gen.sample(e).image.astype(np.int16)
        for k in range(per):
            noisy = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / "img" / f"{e}_{k}.png")
            rows.append({"id": f"r{e}_{k}", "image": f"img/{e}_{k}.png", "text": f"{gen.sample(e).captions[0]} {k}",
                         "entity": f"E{e}"})
    path = root / f"records.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return path, rows


def test_link_writes_links_and_scores_them_against_the_entities(model_dir, tmp_path, capsys):
    from clipforge import load
    from clipforge.adapt.clippings import embed_records, link_nearest, load_records, read_records
    from clipforge.cli.main import main
    from clipforge.metrics import adjusted_rand_index, pairwise_linkage_metrics

    records, rows = write_records(tmp_path, fmt="csv")
    out = tmp_path / "links.csv"
    assert main(["link", str(records), "--model", str(model_dir), "--out", str(out), "--threshold", "0.9"]) == 0
    got = list(csv.DictReader(out.open()))
    assert [r["id"] for r in got] == [r["id"] for r in rows]
    # the same linkage computed here from the library pieces
    model, tok, pre = load(str(model_dir))
    recs = read_records(records)
    z = embed_records(model, *load_records(recs, pre, tok))
    comp, nn, score = link_nearest(z, 0.9)
    assert [int(r["entity"]) for r in got] == comp.tolist()
    assert [r["nearest_id"] for r in got] == [recs.ids[i] for i in nn]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    truth = [r["entity"] for r in rows]
    assert summary["f1"] == pytest.approx(pairwise_linkage_metrics(truth, comp)["f1"])
    assert summary["adjusted_rand_index"] == pytest.approx(adjusted_rand_index(truth, comp))
    assert main(["link", str(records), "--model", str(model_dir), "--out", str(out), "--method", "cluster",
                 "--modality", "image"]) == 0


def test_link_finetunes_first_and_saves_the_model(model_dir, tmp_path, capsys):
    from clipforge import load
    from clipforge.cli.main import main

    train, _ = write_records(tmp_path / "train", n_entities=4, per=3)
    test, _ = write_records(tmp_path / "test", n_entities=3, per=2)
    saved = tmp_path / "tuned"
    assert main(["link", str(test), "--model", str(model_dir), "--out", str(tmp_path / "l.csv"), "--finetune",
                 str(train), "--steps", "3", "--batch-entities", "4", "--per-entity", "3", "--lr", "1e-3",
                 "--save-model", str(saved)]) == 0
    assert "fine-tuned 3 steps on 12 records of 4 entities" in capsys.readouterr().err
    before, after = load(str(model_dir))[0], load(str(saved))[0]
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


@pytest.mark.parametrize("drop", ["image", "text"])
def test_records_without_image_or_text_are_refused_in_one_line(model_dir, tmp_path, capsys, drop):
    from clipforge.cli.main import main

    records, rows = write_records(tmp_path)
    rows[1][drop] = ""
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["link", str(records), "--model", str(model_dir), "--out", str(tmp_path / "l.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "record 'r0_1'" in err[0] and f"has no {drop}" in err[0] and "give every record" in err[0]


def test_link_names_the_other_bad_inputs(model_dir, tmp_path, capsys):
    from clipforge.cli.main import main

    records, rows = write_records(tmp_path)
    rows[0]["image"] = "img/missing.png"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["link", str(bad), "--model", str(model_dir), "--out", str(tmp_path / "l.csv")]) == 2
    assert "not found" in capsys.readouterr().err
    no_entity = tmp_path / "ne.jsonl"
    no_entity.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "entity"}) + "\n" for r in rows[1:]))
    assert main(["link", str(records), "--model", str(model_dir), "--out", str(tmp_path / "l.csv"), "--finetune",
                 str(no_entity)]) == 2
    assert "needs an entity" in capsys.readouterr().err
    assert main(["link", str(tmp_path / "none.jsonl"), "--model", str(model_dir), "--out", "x.csv"]) == 2
    assert "does not exist" in capsys.readouterr().err
