"""Errors users make (issue 20): each gives one line on stderr naming the problem and the fix, and
exit code 2; a bug keeps its traceback. Also the documented ``loss={clip:1.0}`` override form and
the validation of numbers that make no sense."""
from __future__ import annotations

import errno

import pytest

from clipforge.cli.main import main
from clipforge.train import load_config

TINY = ["model_overrides.embed_dim=32",
        "model_overrides.vision={image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}",
        "model_overrides.text={context_length: 16, width: 32, layers: 1, heads: 2}", "data.train_size=64",
        "data.eval_size=16", "batch_size=16", "warmup_steps=1", "precision=fp32", "progress=false"]


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("override, expected", [
    ("loss={clip:1.0}", {"clip": 1.0}),  # the form README and --help show
    ("loss={clip: 1.0}", {"clip": 1.0}),
    ("loss={clip:1.0,multi_positive:0.5}", {"clip": 1.0, "multi_positive": 0.5}),
    ("loss={clip: 1, siglip: 0.5}", {"clip": 1, "siglip": 0.5}),
])
def test_loss_override_with_or_without_spaces(override, expected):
    assert load_config(overrides=[override]).loss == expected


def test_documented_loss_override_prints_config(capsys):
    assert main(["train", "loss={siglip:1.0}", "model_overrides.init_logit_bias=-10", "--print-config"]) == 0
    assert "siglip: 1.0" in capsys.readouterr().out


@pytest.mark.parametrize("override, named", [
    ("warmup_steps=-5", "warmup_steps"), ("save_every=-1", "save_every"), ("log_every=0", "log_every"),
    ("loss={clip: -1.0}", "loss weight"), ("loss={clip: .nan}", "loss weight"), ("lr=-0.1", "lr"), ("lr=.inf", "lr"),
    ("eval_every=-2", "eval_every"), ("keep_checkpoints=-1", "keep_checkpoints"), ("min_lr_ratio=2", "min_lr_ratio"),
    ("weight_decay=-1", "weight_decay"), ("eps=0", "eps"), ("betas=[0.9, 1.5]", "betas"), ("grad_clip=0", "grad_clip"),
    ("max_seconds=-3", "max_seconds"), ("stop_at=0", "stop_at"), ("data.train_size=0", "data.train_size"),
    ("data.num_workers=-1", "data.num_workers"), ("loss={clip: abc}", "loss weight"),
])
def test_nonsense_numbers_are_refused_with_the_field_named(capsys, override, named):
    err = one_line_error(capsys, ["train", override, "--print-config"])
    assert named in err


def test_broken_yaml_config_names_the_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nloss: {clip: 1.0\nlr: [\n")
    err = one_line_error(capsys, ["train", "--config", str(bad), "--print-config"])
    assert str(bad) in err and "YAML" in err


def test_a_config_file_given_as_an_override_points_to_config(capsys, tmp_path):
    """`clipforge train configs/x.yaml steps=10`: one line naming --config, before anything is trained."""
    config = tmp_path / "x.yaml"
    config.write_text("steps: 5\n")
    for given in (str(config), "configs/missing.yml"):
        assert main(["train", given, "steps=10", f"out_dir={tmp_path / 'run'}"]) == 2
        err = capsys.readouterr().err
        assert f"--config: clipforge train --config {given}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    assert main(["train", "steps", "--print-config"]) == 2
    assert "overrides must look like key=value, got ['steps']" in capsys.readouterr().err


def test_shards_without_root_names_the_setting_and_a_real_command(capsys, tmp_path):
    err = one_line_error(capsys, ["train", "data.dataset=shards", f"out_dir={tmp_path / 'run'}", "steps=1"])
    assert "data.root" in err and "clipforge data build shards" not in err and "clipforge data convert" in err
    err = one_line_error(capsys, ["train", "data.dataset=shards", "data.streaming=true", f"out_dir={tmp_path / 'r'}"])
    assert "data.root" in err


def test_out_dir_that_is_a_file_or_under_a_file(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    for out in (f, f / "run"):
        err = one_line_error(capsys, ["train", "--no-eval", f"out_dir={out}", "steps=1", *TINY])
        assert str(f) in err and "is a file" in err
    assert f.read_text() == "keep me"


def test_training_diverged_is_one_line(capsys, tmp_path):
    err = one_line_error(capsys, ["train", "--no-eval", f"out_dir={tmp_path / 'run'}", "steps=6", "lr=1e3",
                                  "save_every=1", *TINY])
    assert "Lower lr" in err


def test_disk_full_during_a_checkpoint_says_so_and_where(capsys, tmp_path, monkeypatch):
    import clipforge.train.checkpoint as checkpoint

    original = checkpoint.save_model

    def full(model, directory, metadata=None):
        if metadata["step"] == "4":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(model, directory, metadata)

    monkeypatch.setattr(checkpoint, "save_model", full)
    run = tmp_path / "run"
    err = one_line_error(capsys, ["train", "--no-eval", f"out_dir={run}", "steps=6", "save_every=2", *TINY])
    assert "no space left on device" in err and str(run / "checkpoints") in err and "step_0000002" in err
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step_0000002"]  # the half-written one was removed, the last good one kept


def test_disk_full_in_metrics_says_where(capsys, tmp_path, monkeypatch):
    import builtins

    run = tmp_path / "run"
    original_open = builtins.open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(file, mode="r", *args, **kwargs):
        f = original_open(file, mode, *args, **kwargs)
        return FullFile(f) if str(file).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(builtins, "open", fake_open)
    err = one_line_error(capsys, ["train", "--no-eval", f"out_dir={run}", "steps=2", *TINY])
    assert "no space left on device" in err and str(run / "metrics.jsonl") in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    import clipforge.train

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(clipforge.train, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "steps=1"])


def test_user_errors_share_one_base_class():
    from clipforge.errors import ClipforgeError
    from clipforge.train import TrainingDiverged

    assert issubclass(TrainingDiverged, ClipforgeError)
    with pytest.raises(ClipforgeError):
        load_config(overrides=["steps=0"])


def test_non_utf8_captions_in_csv_are_counted(tmp_path):
    from PIL import Image

    from clipforge.data.formats import ReadStats, iter_manifest

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    (tmp_path / "m.csv").write_bytes(b"image,caption\na.png,a red square\nb.png,caf\xe9 au lait\n")
    stats = ReadStats()
    items = list(iter_manifest(tmp_path / "m.csv", stats))
    assert [it["captions"] for it in items] == [["a red square"]]
    assert stats.skipped == {"bad_caption_encoding": 1} and "m.csv:2" in stats.examples["bad_caption_encoding"][0]


def test_a_fresh_run_into_an_earlier_runs_out_dir_is_refused(capsys, tmp_path):
    """Without resume, a second run into an out_dir with checkpoints would replace its metrics and mix its
    checkpoints with the earlier ones (resume=latest then takes the newest step, perhaps the earlier run's)."""
    run = f"out_dir={tmp_path / 'run'}"
    assert main(["train", "--no-eval", run, "steps=2", *TINY]) == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()
    err = one_line_error(capsys, ["train", "--no-eval", run, "steps=1", *TINY])
    assert "holds an earlier run (" in err and "the last step_0000002)" in err and "resume=latest" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert main(["train", "--no-eval", run, "steps=3", "resume=latest", *TINY]) == 0  # continuing it is fine


def test_overrides_may_follow_the_options(capsys):
    """`clipforge train steps=5 --no-eval lr=0.002`: key=value words after an option are overrides too (argparse
    alone calls them unrecognized); other strays are still named."""
    assert main(["train", "steps=5", "--print-config", "lr=0.002", "batch_size=16"]) == 0
    printed = capsys.readouterr().out
    assert "\nsteps: 5\n" in printed and "\nlr: 0.002\n" in printed and "\nbatch_size: 16\n" in printed
    with pytest.raises(SystemExit):
        main(["train", "steps=5", "--print-config", "--bogus", "lr=0.002"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "lr=0.002" not in err
    with pytest.raises(SystemExit):
        main(["embed", "run", "--texts", "a", "--out", "x.npy", "k=v"])  # other commands: no such thing
    assert "unrecognized arguments: k=v" in capsys.readouterr().err


def test_cli_shows_the_settings_a_resume_changes(capsys, tmp_path):
    run = f"out_dir={tmp_path / 'run'}"
    assert main(["train", "--no-eval", run, "steps=4", "stop_at=2", "lr=0.002", *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--no-eval", run, "steps=4", "resume=latest", "lr=0.001", *TINY]) == 0
    out = capsys.readouterr().out
    assert "with changed settings, applied from step 2 on: lr: 0.002 -> 0.001" in out
