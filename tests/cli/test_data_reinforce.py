"""``clipforge data reinforce`` (MobileCLIP's reinforced dataset) on a tiny teacher."""
from __future__ import annotations

from clipforge.cli.main import main
from clipforge.models import create_model, save_model
from clipforge.train.reinforce import load_reinforced
from tests.cli.test_cli_errors import one_line_error

TINY = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


def test_data_reinforce_writes_views_captions_and_teacher_embeddings(capsys, tmp_path):
    save_model(create_model("tiny", seed=0, **TINY), tmp_path / "t")
    argv = ["data", "reinforce", "shapes", "--teachers", str(tmp_path / "t"), "--augmentations", "2", "--size", "6",
            "--image-size", "32", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reinforced 6 samples of shapes: 2 augmentations each" in out and "data.reinforced=" in out
    store = load_reinforced(tmp_path / "r")
    assert store.image[0].shape == (6, 2, 32) and len(store.captions) == 6


def test_data_reinforce_bad_inputs_are_one_line(capsys, tmp_path):
    save_model(create_model("tiny", seed=0, **TINY), tmp_path / "t")
    err = one_line_error(capsys, ["data", "reinforce", "shapes", "--teachers", str(tmp_path / "t"), "--size", "4",
                                  "--image-size", "64", "--out", str(tmp_path / "r")])
    assert "reads 32 px images" in err
    err = one_line_error(capsys, ["data", "reinforce", "shapes", "--teachers", str(tmp_path / "t"),
                                  "--augmentations", "0", "--out", str(tmp_path / "r")])
    assert "--augmentations >= 1" in err
