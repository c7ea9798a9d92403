"""The recipes in configs/: every file loads into a valid TrainConfig, names its paper in a comment, and trains
for 2 steps on tiny data with ``clipforge.train`` (steps, batch, data size and tower sizes overridden here; the
loss, its options and the data settings are the recipe's). Recipes that fine-tune or distil from a trained run
(init_from / data.teachers: runs/clip) get the clip recipe's 2-step run instead, and MLCD's offline clusters
are computed from it. One recipe also goes through
``clipforge train --config``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipforge.data.corpora import BUILDERS
from clipforge.train import load_config, train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
FAST = ["steps=2", "batch_size=8", "data.train_size=16", "data.eval_size=8", "save_every=0", "log_every=1",
        "warmup_steps=1", "progress=false", "precision=fp32", "max_seconds=null"]
SMALL_TOWERS = ["model_overrides.vision.image_size=32", "model_overrides.vision.width=32",
                "model_overrides.vision.layers=1", "model_overrides.vision.heads=2", "model_overrides.text.width=32",
                "model_overrides.text.layers=1", "model_overrides.text.heads=2"]


def test_there_is_a_recipe_per_named_set_up():
    expected = {"demo", "clip", "siglip", "lit", "laclip", "dreamlip", "long_clip", "coca", "degla",
                "improved_baselines", "barlip", "byolip", "swalip", "slip", "mobileclip"}
    assert expected <= set(RECIPES), sorted(expected - set(RECIPES))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_validates_and_names_its_paper(name):
    text = (CONFIGS / f"{name}.yaml").read_text()
    comment = " ".join(line for line in text.splitlines() if line.startswith("#"))
    assert '"' in comment and any(str(year) in comment for year in range(2020, 2027)), f"{name}: no paper named"
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.loss and cfg.out_dir.startswith("runs/")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The clip recipe for 2 steps: the trained run that fine-tuning and distillation recipes start from."""
    out = tmp_path_factory.mktemp("recipes") / "clip"
    cfg = load_config(CONFIGS / "clip.yaml", FAST + SMALL_TOWERS + [f"out_dir={out}"])
    train(cfg)
    return out


def small_corpus(name: str, tmp_path_factory) -> str:
    """A few dozen samples of a built corpus (recipes that train on emoji): built here from the Debian
    packages; skipped, naming them, where they are not installed."""
    from clipforge.data.corpora import get_builder

    out = tmp_path_factory.mktemp(f"corpus-{name}") / name
    try:
        get_builder(name)(out, image_size=32, limit=48, progress=False)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        pytest.skip(f"the {name} corpus cannot be built here: {e}")
    return str(out)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_two_steps(name, base_run, tmp_path, tmp_path_factory):
    torch.set_num_threads(1)
    overrides = FAST + [f"out_dir={tmp_path / name}"]
    raw = load_config(CONFIGS / f"{name}.yaml")
    if raw.data.dataset in BUILDERS and raw.data.dataset != "shapes" and not raw.data.root:  # a built corpus
        overrides.append(f"data.root={small_corpus(raw.data.dataset, tmp_path_factory)}")
    if raw.model == "tiny":
        overrides += SMALL_TOWERS
    if raw.init_from:
        overrides.append(f"init_from={base_run}")
    if raw.data.teachers:
        overrides.append(f"data.teachers=[{base_run}]")
    for term, options in raw.loss.items():  # MLCD: the offline clusters of the base run's features of this data
        if isinstance(options, dict) and options.get("clusters"):
            from clipforge.cli.main import main

            clusters = tmp_path / f"{term}.clusters.pt"
            assert main(["data", "cluster", str(base_run), "--k", "4", "--size", "16", "--out", str(clusters)]) == 0
            overrides.append(f"loss.{term}.clusters={clusters}")
    if raw.model_overrides.get("hf_text"):
        minilm = pytest.importorskip("clipforge.interop.pretrained")
        try:
            path = minilm.minilm_l6_path()
        except (FileNotFoundError, ModuleNotFoundError) as e:
            pytest.skip(f"all-MiniLM-L6-v2 is not installed: {e}")
        overrides = [o for o in overrides if not o.startswith("model_overrides.text.")] + \
            [f"model_overrides.hf_text.path={path}", "model_overrides.hf_text.context_length=16"]
    result = train(load_config(CONFIGS / f"{name}.yaml", overrides))
    assert result.step == 2 and len(result.losses) == 2
    assert all(torch.isfinite(torch.tensor(result.losses))), result.losses


def test_cli_runs_a_recipe(tmp_path):
    """``clipforge train --config configs/improved_baselines.yaml`` (in-process), with the loss options it names."""
    from clipforge.cli.main import main

    out = tmp_path / "ib"
    main(["train", "--config", str(CONFIGS / "improved_baselines.yaml"), "--no-eval", *FAST, *SMALL_TOWERS,
          f"out_dir={out}"])
    assert list((out / "checkpoints").glob("step_*2"))
    written = load_config(out / "config.yaml")
    assert written.loss["clip"] == {"weight": 1.0, "label_smoothing": 0.1, "image_view2": True}
