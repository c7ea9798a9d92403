import json
import subprocess
import sys

import numpy as np
import pytest

from clipforge.cli.main import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "train", "eval", "embed"):
        assert cmd in out


@pytest.mark.parametrize("cmd", ["demo", "train", "eval", "embed"])
def test_each_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert "usage: clipforge " + cmd in capsys.readouterr().out


def _command_parsers():
    """(name, parser) of every command and every ``data`` action."""
    import argparse

    from clipforge.cli.main import build_parser

    def subparsers(parser):
        return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})

    for name, parser in subparsers(build_parser()).items():
        yield name, parser
        for action, sub in subparsers(parser).items():
            yield f"{name} {action}", sub


def test_every_option_says_what_it_does_and_its_default():
    """`clipforge COMMAND --help` teaches: no option without a help text, and an option whose default is a
    value (not None or a flag's False) shows it, in the help text or appended by the formatter."""
    import argparse

    missing, no_default = [], []
    for name, parser in _command_parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            flag = f"{name} {action.option_strings[-1]}"
            if not action.help:
                missing.append(flag)
            shown = formatter._get_help_string(action)
            if action.default is not None and action.default is not False and "default" not in shown.lower():
                no_default.append(flag)
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose default --help does not show: {no_default}"
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["upcycle", "--help"])
    assert "experts E per MoE layer (default 4)" in " ".join(out.getvalue().split())


@pytest.mark.parametrize("argv", [
    ["export", "MODEL", "--to", "clipforge", "--out", "OUT"],
    ["upcycle", "MODEL", "--out", "OUT"],
    ["pivot", "MODEL", "--text-file", "MODEL", "--out", "OUT"],
    ["lm-finetune", "MODEL", "--out", "OUT"],
    ["lvlm-train", "--stage", "caption", "--lm", "MODEL", "--out", "OUT"],
    ["train-diffusion", "MODEL", "--out", "OUT"],
    ["diffusion-feedback", "MODEL", "--diffusion", "MODEL", "--method", "diva", "--out", "OUT"],
    ["link", "RECORDS", "--model", "MODEL", "--out", "links.csv", "--finetune", "RECORDS", "--save-model", "OUT"],
], ids=lambda argv: argv[0])
def test_commands_that_write_a_model_directory_refuse_one_that_holds_files(argv, tmp_path, capsys):
    """Checked first, before the (here missing) model is read: a folder of the user's is never mixed with or
    replaced by a model's files unless --overwrite says so."""
    out = tmp_path / "photos"
    out.mkdir()
    (out / "config.json").write_text("{}")
    argv = [str(out) if a == "OUT" else str(tmp_path / "missing") if a in ("MODEL", "RECORDS") else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out} is not empty (config.json)" in err and "--overwrite" in err, err
    assert main([*argv, "--overwrite"]) == 2  # now past the check: the missing model is what stops it
    err = capsys.readouterr().err
    assert "is not empty" not in err and "missing" in err, err
    assert (out / "config.json").read_text() == "{}"


def test_console_script_installed():
    """The ``clipforge`` script pip wrote next to this interpreter runs (``python -m`` would bypass the entry point)."""
    import shutil
    from importlib.metadata import entry_points
    from pathlib import Path

    import tomllib

    from clipforge import __version__

    bindir = Path(sys.executable).parent
    script = shutil.which("clipforge", path=str(bindir)) or shutil.which("clipforge")
    assert script, f"no clipforge console script in {bindir} or on PATH: install the package (pip install -e .)"
    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    installed = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name == "clipforge"}
    assert installed == {"clipforge": declared["clipforge"]}, "installed entry point differs from pyproject.toml"
    out = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"clipforge {__version__}"
    out = subprocess.run([script, "data", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: clipforge data"), out.stderr


SMALL = ["model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
         "text: {context_length: 16, width: 32, layers: 1, heads: 2}}", "data.train_size=128", "data.eval_size=24",
         "batch_size=32", "steps=4", "warmup_steps=1", "progress=false", "precision=fp32"]


def test_train_eval_embed_roundtrip(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", f"out_dir={run}", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "zero-shot object" in out and "chance" in out
    rep = tmp_path / "rep"
    assert main(["eval", str(run), "--size", "24", "--json", "--quiet", "--no-cache", "--out", str(rep)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"zero_shot", "retrieval", "diagnostics"} <= set(res) and res["suite"] == "quick"
    assert json.loads((rep / "results.json").read_text())["zero_shot"]["object"]["confusion_matrix"]
    assert (rep / "report.html").read_text().count("data:image/png;base64,") >= 3
    assert (
        main(["embed", str(run), "--texts", "a red circle", "two blue squares", "--out", str(tmp_path / "t.npy")]) == 0
    )
    emb = np.load(tmp_path / "t.npy")
    assert emb.shape == (2, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # images: a directory with one good and one corrupt image
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (40, 50), (200, 10, 10)).save(imgs / "good.png")
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert main(["embed", str(run), "--images", str(imgs), "--out", str(tmp_path / "i.npy")]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert main(["embed", str(run), "--images", str(imgs), "--skip-bad", "--out", str(tmp_path / "i.parquet")]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "i.parquet")
    assert table.num_rows == 1 and table.column("item")[0].as_py().endswith("good.png")


def test_train_bad_override_is_one_clear_line(capsys):
    assert main(["train", "stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "Traceback" not in err


def test_eval_missing_model_dir(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "model_config.json" in capsys.readouterr().err


def test_demo_warns_when_too_few_steps_fit_its_time_budget():
    """A busy machine makes each step slow; the demo then says its numbers will be near chance and how long to run."""
    from clipforge.cli.demo import plan_steps

    steps, warning = plan_steps(150, 0.35)  # an idle 2-core AVX-512 CPU: 150 / (0.35 * 1.3) = 329 steps
    assert steps == 329 and warning is None
    steps, warning = plan_steps(150, 4.1)  # measured beside two other jobs: 28 steps fit
    assert steps == 28
    assert "only 28 training steps" in warning and "4100 ms per step" in warning
    assert "--seconds 1600" in warning  # 300 steps x 4.1 s x 1.3 = 1599 s, rounded up to ten seconds
    steps, warning = plan_steps(4, 1.0)  # never fewer than 20 steps, even when fewer fit
    assert steps == 20 and "only 3 training steps" in warning


def test_demo_json_smoke(tmp_path, capsys):
    """The demo end to end with a tiny time budget: the JSON line has every promised key."""
    assert main(["demo", "--seconds", "4", "--train-size", "512", "--eval-size", "40", "--out", str(tmp_path / "d"),
                 "--json", "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    for key in (
        "zero_shot_top1",
        "zero_shot_chance",
        "retrieval_i2t_r1",
        "retrieval_t2i_r1",
        "samples_per_second",
        "train_seconds",
    ):
        assert key in res
    assert res["zero_shot_chance"] == pytest.approx(1 / 30)
    from clipforge.train.device import cpu_has_fast_bf16

    assert res["precision"] == ("bf16" if cpu_has_fast_bf16() else "fp32")  # the default, auto, as resolved here
    # the budget is checked before every step, so training ends within one step of it (not a speed test: a loaded
    # machine makes steps slow, never more numerous)
    step_seconds = res["train_seconds"] / res["steps"]
    assert res["steps"] >= 1 and res["train_seconds"] < 4 + 2 * step_seconds + 1
