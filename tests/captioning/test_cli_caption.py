"""``clipforge caption``: CoCa greedy/beam and MacCap directories, records, and the bad-input messages."""
import json

import numpy as np
import pytest
from PIL import Image

from clipforge.cli.main import main
from clipforge.models import create_model, save_model


@pytest.fixture(scope="module")
def coca_dir(tmp_path_factory, small_overrides):
    d = tmp_path_factory.mktemp("coca")
    mm = {"layers": 1, "heads": 2, "n_queries": 4, "pool_heads": 2}
    m = create_model("coca-tiny", seed=0, **small_overrides, multimodal=mm)
    return save_model(m, d / "model")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_coca_captions_an_image_folder(coca_dir, image_dir, tmp_path, method, capsys):
    out = tmp_path / "c.jsonl"
    assert main(["caption", str(coca_dir), "--images", str(image_dir), "--method", method, "--max-len", "6",
                 "--num-beams", "2", "--out", str(out)]) == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"].rsplit("/", 1)[-1] for r in recs] == ["0.png", "1.png", "2.png"]
    assert all(isinstance(r["caption"], str) and 0 <= r["clip_s"] <= 2.5 for r in recs)


def test_dataset_records_and_summary(coca_dir, tmp_path):
    out = tmp_path / "d.jsonl"
    assert main(["caption", str(coca_dir), "--dataset", "shapes:val", "--size", "6", "--max-len", "5",
                 "--out", str(out)]) == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(recs) == 6 and recs[0]["id"] == "shapes:val:0" and recs[0]["references"]
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert set(summary) >= {"bleu4", "cider_d", "clip_s", "ref_clip_s", "attributes"}


def test_maccap_directory(small_clip, image_dir, tmp_path):
    from clipforge.captioning import MacCapConfig, train_maccap

    cfg = MacCapConfig(width=16, layers=1, heads=2, n_queries=2, align_heads=2, n_features=3, max_len=8, n_candidates=2)
    cap, _ = train_maccap(small_clip, ["a red circle.", "two blue squares."], cfg, steps=3, batch_size=4)
    cap.save(tmp_path / "mc")
    out = tmp_path / "m.jsonl"
    assert main(["caption", str(tmp_path / "mc"), "--images", str(image_dir), "--out", str(out)]) == 0
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(recs) == 3 and all(len(r["candidates"]) == 2 and r["caption"] in r["candidates"] for r in recs)
    assert main(["caption", str(tmp_path / "mc"), "--images", str(image_dir), "--method", "beam",
                 "--out", str(out)]) == 2


def test_model_without_decoder_and_empty_folder(small_clip, coca_dir, tmp_path, capsys):
    plain = save_model(small_clip, tmp_path / "clip")
    (tmp_path / "empty").mkdir()
    assert main(["caption", str(plain), "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "without a captioning decoder" in err and "CoCa" in err and "MacCap" in err
    assert main(["caption", str(coca_dir), "--images", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["caption", str(coca_dir), "--images", str(tmp_path / "nowhere.png"),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--images: '" in capsys.readouterr().err
    assert main(["caption", str(plain), "--images", str(tmp_path), "--method", "maccap",
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "needs a MacCap decoder directory" in capsys.readouterr().err
