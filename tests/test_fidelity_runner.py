"""benchmarks/fidelity.py: the statistics behind the verdicts (against scipy and hand-computed cases), the verdict
rules on synthetic clear / null / reversed effects, recipe validation, resumable seed-major runs and the report."""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from benchhelpers import load_benchmark

stats = pytest.importorskip("scipy.stats")


@pytest.fixture(scope="module")
def fid():
    return load_benchmark("fidelity.py", "fidelity_runner")


def recipe(**changes) -> dict:
    raw = {"claim": "c", "paper": "p", "paper_budget": "pb", "machine_budget": "mb", "steps": 10, "batch": 8,
           "train": {"model": "tiny"}, "measures": ["gap", "shapes"], "baseline": "clip",
           "arms": {"clip": {"train": {"loss": {"clip": 1.0}}},
                    "gap": {"train": {"loss": {"clip": 1.0, "uniformity": 0.5, "alignment": 0.5}}}},
           "metrics": {"gap": {"direction": "decrease"}, "object_top1": {"direction": "no_decrease", "margin": 0.02}}}
    raw.update(changes)
    return raw


# ------------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 19, 60])
def test_t_quantiles_match_scipy(fid, df):
    for q in (0.005, 0.025, 0.1, 0.5, 0.9, 0.975, 0.995):
        assert fid.t_ppf(q, df) == pytest.approx(stats.t.ppf(q, df), abs=1e-9)
        x = stats.t.ppf(q, df)
        assert fid.t_cdf(x, df) == pytest.approx(q, abs=1e-12)


def test_paired_interval_matches_scipy_t_interval(fid):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, size=5)
    method = base + rng.normal(0.03, 0.02, size=5)
    d = method - base
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(len(d)))
    got = fid.paired_interval(list(method), list(base))
    assert got["n"] == 5
    assert got["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert got["sd"] == pytest.approx(d.std(ddof=1), abs=1e-12)
    assert (got["low"], got["high"]) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))


def test_paired_interval_by_hand(fid):
    # differences 0.10, 0.12, 0.14: mean 0.12, sd 0.02, t(0.975, 2) = 4.302652729749464 (table value)
    got = fid.paired_interval([0.5, 0.62, 0.44], [0.4, 0.5, 0.3])
    half = 4.302652729749464 * 0.02 / math.sqrt(3)
    assert got["mean"] == pytest.approx(0.12)
    assert got["low"] == pytest.approx(0.12 - half) and got["high"] == pytest.approx(0.12 + half)


def test_paired_interval_needs_the_same_seeds(fid):
    with pytest.raises(ValueError, match="same seeds"):
        fid.paired_interval([0.1, 0.2], [0.1])


# ------------------------------------------------------------------------------------------------ verdicts


def judge(fid, method, base, direction, margin=0.0):
    return fid.verdict(fid.paired_interval(method, base), direction, margin)


def test_clear_effect_is_reproduced_in_the_predicted_direction(fid):
    base = [0.30, 0.35, 0.28, 0.33]
    method = [b + d for b, d in zip(base, [0.10, 0.12, 0.09, 0.11])]
    assert judge(fid, method, base, "increase") == "reproduced"
    assert judge(fid, method, base, "decrease") == "contradicted"
    assert judge(fid, base, method, "decrease") == "reproduced"


def test_null_effect_is_inconclusive(fid):
    base = [0.30, 0.35, 0.28, 0.33]
    method = [b + d for b, d in zip(base, [0.01, -0.012, 0.004, -0.003])]
    assert judge(fid, method, base, "increase") == "inconclusive"
    assert judge(fid, method, base, "decrease") == "inconclusive"


def test_reversed_effect_is_contradicted(fid):
    base = [0.30, 0.35, 0.28]
    method = [b - d for b, d in zip(base, [0.10, 0.08, 0.12])]
    assert judge(fid, method, base, "increase") == "contradicted"


def test_large_spread_is_inconclusive_even_with_a_large_mean(fid):
    # the gap experiment: object top-1 falls by 0.10 on average, with a large spread
    base = [0.30, 0.32, 0.29]
    method = [b + d for b, d in zip(base, [-0.19, -0.02, -0.09])]
    iv = fid.paired_interval(method, base)
    assert iv["low"] < 0 < iv["high"]
    assert fid.verdict(iv, "increase") == "inconclusive"


def test_fewer_than_three_seeds_is_insufficient(fid):
    assert judge(fid, [0.5, 0.6], [0.1, 0.2], "increase") == "insufficient seeds"
    assert judge(fid, [0.5], [0.1], "increase") == "insufficient seeds"


def test_non_inferiority_uses_the_margin(fid):
    # differences 0.0, 0.01, -0.01: mean 0, sd 0.01, half width 4.3027 * 0.01 / sqrt(3) = 0.02484
    base = [0.4, 0.4, 0.4]
    method = [0.4, 0.41, 0.39]
    assert judge(fid, method, base, "no_decrease", margin=0.03) == "reproduced"
    assert judge(fid, method, base, "no_decrease", margin=0.02) == "inconclusive"
    assert judge(fid, [0.30, 0.31, 0.29], base, "no_decrease", margin=0.5) == "contradicted"
    assert judge(fid, [0.40, 0.39, 0.41], base, "no_increase", margin=0.03) == "reproduced"


def test_overall_verdict(fid):
    assert fid.overall(["reproduced", "reproduced", "not judged"]) == "reproduced"
    assert fid.overall(["reproduced", "inconclusive"]) == "partly reproduced"
    assert fid.overall(["reproduced", "contradicted"]) == "mixed"
    assert fid.overall(["inconclusive", "contradicted"]) == "contradicted"
    assert fid.overall(["insufficient seeds", "insufficient seeds"]) == "insufficient seeds"


def test_unknown_direction_is_rejected(fid):
    with pytest.raises(ValueError, match="increase, decrease"):
        fid.verdict(fid.paired_interval([1, 2, 3], [0, 0, 0]), "up")


# ------------------------------------------------------------------------------------------------ recipes


def test_every_shipped_recipe_is_valid(fid):
    names = fid.recipe_names()
    assert {"siglip", "gap", "counting", "hardneg"} <= set(names)
    for name in names:
        r = fid.load_recipe(name)
        assert r.baseline in r.arms and r.metrics


def test_unknown_metric_names_it_and_the_choices(fid):
    raw = recipe(metrics={"gapp": {"direction": "decrease"}})
    with pytest.raises(fid.RecipeError, match=r"metric 'gapp'.*provides: .*gap.*object_top1"):
        fid.parse_recipe("t", raw)


def test_unknown_loss_names_it_and_the_registered_terms(fid):
    raw = recipe()
    raw["arms"]["gap"] = {"train": {"loss": {"clip": 1.0, "unifromity": 0.5}}}
    with pytest.raises(fid.RecipeError,
                       match=r"arm 'gap'.*unknown loss term\(s\) unifromity; registered terms: .*siglip"):
        fid.parse_recipe("t", raw)


def test_unknown_baseline_arm_names_the_arms(fid):
    with pytest.raises(fid.RecipeError, match=r"baseline 'clipp' is not an arm; arms: clip, gap"):
        fid.parse_recipe("t", recipe(baseline="clipp"))


def test_unknown_measure_training_field_and_plugin(fid):
    with pytest.raises(fid.RecipeError, match=r"unknown measure 'gapp'; built-in measures: shapes, gap"):
        fid.parse_recipe("t", recipe(measures=["gapp"]))
    raw = recipe()
    raw["arms"]["gap"] = {"train": {"loss": {"clip": 1.0}, "stepz": 3}}
    with pytest.raises(fid.RecipeError, match=r"arm 'gap'.*stepz.*fields of clipforge.train.TrainConfig"):
        fid.parse_recipe("t", raw)
    raw = recipe()
    raw["arms"]["gap"] = {"function": "bench_adapt:no_such_arm"}
    with pytest.raises(fid.RecipeError, match=r"not a fidelity plug-in.*plug-ins of bench_adapt: fidelity_arm"):
        fid.parse_recipe("t", raw)
    with pytest.raises(fid.RecipeError, match=r"unknown key\(s\) metricz"):
        fid.parse_recipe("t", {**recipe(), "metricz": {}})
    with pytest.raises(fid.RecipeError, match=r"no experiment 'nope'; recipes in .*gap"):
        fid.load_recipe("nope")


def test_function_arm_metrics_are_checked(fid):
    metrics = {"test": {"direction": "increase"}, "object_top1": {"direction": "none"}}
    raw = recipe(measures=[], baseline="zs", metrics=metrics,
                 arms={"zs": {"function": "bench_adapt:fidelity_arm", "params": {"method": "zero-shot"}},
                       "gda": {"function": "bench_adapt:fidelity_arm", "params": {"method": "gda"}}})
    with pytest.raises(fid.RecipeError,
                       match=r"metric 'object_top1': unknown metric for arm 'zs'; it provides: heldout, test"):
        fid.parse_recipe("t", raw)


# ------------------------------------------------------------------------------------------------ runs and report


def fake_metrics(arm: str, seed: int) -> dict:
    """A clear gap reduction and no change in object top-1 (up to a seed wobble)."""
    wobble = [0.0, 0.01, -0.01, 0.005][seed]
    if arm == "clip":
        return {"gap": 0.5 + wobble, "object_top1": 0.30 + wobble, "train_s": 1.0, "eval_s": 0.5}
    return {"gap": 0.2 + wobble / 2, "object_top1": 0.30 + 1.5 * wobble, "train_s": 2.0, "eval_s": 0.5}


def test_runs_are_seed_major_resumable_and_judged(fid, monkeypatch, tmp_path):
    r = fid.parse_recipe("t", recipe())
    calls = []

    def fake(recipe_, arm, seed, steps, batch, eval_size, precision=None):
        calls.append((arm.name, seed))
        return fake_metrics(arm.name, seed)

    monkeypatch.setattr(fid, "train_and_measure", fake)
    fid.run([r], [0, 1], tmp_path, eval_size=500, log=lambda m: None)
    assert calls == [("clip", 0), ("gap", 0), ("clip", 1), ("gap", 1)]
    fid.run([r], [0, 1, 2], tmp_path, eval_size=500, log=lambda m: None)
    assert calls[4:] == [("clip", 2), ("gap", 2)]  # seeds 0 and 1 were not recomputed
    data = json.loads((tmp_path / "fidelity.json").read_text())
    assert len(data["runs"]) == 6
    env = data["runs"][0]["env"]
    assert {"cpu", "cpu_capability", "threads", "torch", "commit", "load_average", "host"} <= set(env)
    fid.run([r], [0, 1, 2], tmp_path, steps=20, eval_size=500, log=lambda m: None)  # another budget: new runs
    assert len(calls) == 12

    groups = fid.analyse(r, data["runs"])
    assert len(groups) == 1 and groups[0]["steps"] == 10
    comp = groups[0]["comparisons"]["gap"]["metrics"]
    d = np.array([fake_metrics("gap", s)["gap"] - fake_metrics("clip", s)["gap"] for s in range(3)])
    low, high = stats.t.interval(0.95, 2, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(3))
    assert (comp["gap"]["low"], comp["gap"]["high"]) == (pytest.approx(low), pytest.approx(high))
    assert comp["gap"]["verdict"] == "reproduced"
    # object top-1: differences 0, 0.005, -0.005 -> interval +-0.0124, inside the 0.02 margin
    assert comp["object_top1"]["verdict"] == "reproduced"
    assert groups[0]["arms"]["clip"]["stats"]["gap"]["mean"] == pytest.approx(np.mean([0.5, 0.51, 0.49]))


def test_a_precision_override_is_its_own_budget_and_leaves_plain_runs_alone(fid, monkeypatch, tmp_path):
    raw = recipe(train={"model": "tiny", "precision": "bf16"})
    raw["arms"]["fp32_already"] = {"train": {"loss": {"clip": 1.0}, "precision": "fp32"}}
    raw["arms"]["probe"] = {"function": "fake_probe_module:probe", "params": {}}
    probe = types.ModuleType("fake_probe_module")
    probe.probe = lambda **kw: {}
    probe.probe.metrics = ("gap", "object_top1")
    monkeypatch.setitem(sys.modules, "fake_probe_module", probe)
    r = fid.parse_recipe("t", raw)
    assert r.precision_override("clip", None) is None and r.precision_override("clip", "bf16") is None
    assert r.precision_override("clip", "fp32") == "fp32"
    assert r.precision_override("fp32_already", "fp32") is None  # already in that precision: the same experiment
    assert r.precision_override("probe", "fp32") is None  # function arms choose their own numerics
    assert r.fingerprint("clip", 10, 8, 500, "bf16") == r.fingerprint("clip", 10, 8, 500)
    assert r.fingerprint("clip", 10, 8, 500, "fp32") != r.fingerprint("clip", 10, 8, 500)
    assert r.fingerprint("probe", 10, 8, 500, "fp32") == r.fingerprint("probe", 10, 8, 500)
    calls = []

    def fake(recipe_, arm, seed, steps, batch, eval_size, precision=None):
        calls.append((arm.name, seed, precision))
        m = fake_metrics("clip" if arm.name != "gap" else "gap", seed)
        return {**m, "gap": m["gap"] + (0.1 if precision == "fp32" else 0.0)}

    monkeypatch.setattr(fid, "train_and_measure", fake)
    fid.run([r], [0, 1, 2], tmp_path, eval_size=500, log=lambda m: None)  # as the recipe says
    data = fid.run([r], [0, 1, 2], tmp_path, eval_size=500, log=lambda m: None, precision="fp32")
    # only the arms whose precision changes ran again, with the override passed to training
    assert calls[12:] == [(a, s, "fp32") for s in range(3) for a in ("clip", "gap")]
    assert [x.get("precision") for x in data["runs"]].count("fp32") == 6
    groups = fid.analyse(r, data["runs"])
    assert [g["precision"] for g in groups] == [None, "fp32"]  # as many seeds: the recipe's own precision first
    fp32 = groups[1]
    assert {a for a, s in fp32["arms"].items() if s["seeds"] == [0, 1, 2]} == {"clip", "gap", "fp32_already", "probe"}
    assert fp32["arms"]["clip"]["stats"]["gap"]["mean"] == pytest.approx(0.6)  # the fp32 runs, not the bf16 ones
    assert groups[0]["arms"]["clip"]["stats"]["gap"]["mean"] == pytest.approx(0.5)
    section = fid.markdown([r], data)
    assert "training arms in fp32 (`--precision fp32`)" in section
    assert "trained in fp32, not the recipe's precision" not in section  # the plain group has as many seeds
    only_fp32 = {**data, "runs": [x for x in data["runs"] if x["arm"] in ("probe", "fp32_already")
                                  or x.get("precision") == "fp32"]}
    groups = fid.analyse(r, only_fp32["runs"])  # the plain runs of the untouched arms join the fp32 group
    assert [g["precision"] for g in groups] == ["fp32"]
    assert "3 seed(s) per arm; trained in fp32, not the recipe's precision" in fid.markdown([r], only_fp32)


def test_the_summary_judges_the_group_with_every_arm_in_the_recipes_precision(fid):
    # fp32 runs of two arms recorded first, then every arm in the recipe's precision: the summary must judge the
    # complete group, not the one that came first in the file (improved_baselines, 2026-12-04)
    raw = recipe(train={"model": "tiny", "precision": "bf16"})
    raw["arms"]["third"] = {"train": {"loss": {"clip": 1.0, "uniformity": 0.1}}}
    r = fid.parse_recipe("t", raw)

    def row(arm, seed, precision=None):
        run = {"experiment": "t", "arm": arm, "seed": seed, "steps": 10, "batch": 8, "eval_size": 500,
               "metrics": fake_metrics("gap" if arm == "gap" else "clip", seed),
               "fingerprint": r.fingerprint(arm, 10, 8, 500, precision), "seconds": 1.0,
               "env": {"threads": 1, "torch": "t", "commit": None, "load_average": [0.0], "started": "s"}}
        return {**run, "precision": precision} if precision else run

    runs = [row(a, s, "fp32") for s in range(3) for a in ("clip", "gap")]
    runs += [row(a, s) for s in range(3) for a in ("clip", "gap", "third")]
    groups = fid.analyse(r, runs)
    assert [g["precision"] for g in groups] == [None, "fp32"]
    summary = fid.markdown([r], {"runs": runs})
    line = next(x for x in summary.splitlines() if x.startswith("| [t](#t) |"))
    assert "| 3 seed(s) per arm (" in line and "not the recipe's precision" not in line
    assert "No 3-seed run at the default budget yet" not in summary
    # with the complete group only in fp32, that one is judged
    runs_fp32_complete = [row(a, s, "fp32") for s in range(3) for a in ("clip", "gap", "third")]
    runs_fp32_complete += [row(a, s) for s in range(3) for a in ("clip", "gap")]
    assert [g["precision"] for g in fid.analyse(r, runs_fp32_complete)] == ["fp32", None]


def test_precision_reaches_a_function_arm_that_trains_in_one(fid, monkeypatch):
    """A function arm whose function takes ``precision`` (the adapter recipes' base model) is overridden like a
    training arm: its own precision is the function's default (or its param), a different --precision is its own
    fingerprint and is passed to the function; a function without the keyword is left alone."""
    seen = []

    def trains(seed, steps, batch, eval_size, precision="bf16"):
        seen.append(precision)
        return {"gap": 0.5, "object_top1": 0.5}

    trains.metrics = ("gap", "object_top1")
    module = types.ModuleType("fake_trains_module")
    module.trains = trains
    module.plain = lambda **kw: {"gap": 0.5, "object_top1": 0.5}
    module.plain.metrics = ("gap", "object_top1")
    monkeypatch.setitem(sys.modules, "fake_trains_module", module)
    raw = recipe(train={"model": "tiny", "precision": "bf16"})
    raw["arms"]["base"] = {"function": "fake_trains_module:trains", "params": {}}
    raw["arms"]["base32"] = {"function": "fake_trains_module:trains", "params": {"precision": "fp32"}}
    raw["arms"]["plain"] = {"function": "fake_trains_module:plain", "params": {}}
    r = fid.parse_recipe("t", raw)
    assert (r.arm_precision("base"), r.arm_precision("base32"), r.arm_precision("plain")) == ("bf16", "fp32", None)
    assert r.precision_override("base", "fp32") == "fp32" and r.precision_override("base", "bf16") is None
    assert r.precision_override("base32", "fp32") is None and r.precision_override("plain", "fp32") is None
    assert r.fingerprint("base", 10, 8, 500, "fp32") != r.fingerprint("base", 10, 8, 500)
    assert r.fingerprint("base", 10, 8, 500, "bf16") == r.fingerprint("base", 10, 8, 500)
    assert fid.slow_bf16_arms([r], None, fast_bf16=False) == ["t/clip", "t/gap", "t/base"]
    assert fid.slow_bf16_arms([r], "fp32", fast_bf16=False) == []
    fid.train_and_measure(r, r.arms["base"], 0, 10, 8, 500, r.precision_override("base", "fp32"))
    fid.train_and_measure(r, r.arms["base"], 0, 10, 8, 500, r.precision_override("base", None))
    fid.train_and_measure(r, r.arms["base32"], 0, 10, 8, 500, r.precision_override("base32", "fp32"))
    assert seen == ["fp32", "bf16", "fp32"]


def test_bf16_arms_on_a_cpu_without_fast_bf16_are_named_with_the_fix(fid, monkeypatch, tmp_path):
    raw = recipe(train={"model": "tiny", "precision": "bf16"})
    raw["arms"]["fp32_already"] = {"train": {"loss": {"clip": 1.0}, "precision": "fp32"}}
    r = fid.parse_recipe("t", raw)
    assert fid.slow_bf16_arms([r], None, fast_bf16=False) == ["t/clip", "t/gap"]
    assert fid.slow_bf16_arms([r], "fp32", fast_bf16=False) == []
    assert fid.slow_bf16_arms([r], "bf16", fast_bf16=False) == ["t/clip", "t/gap", "t/fp32_already"]
    assert fid.slow_bf16_arms([r], None, fast_bf16=True) == []
    monkeypatch.setattr(fid, "train_and_measure", lambda rc, arm, seed, *a: fake_metrics(arm.name, seed))
    monkeypatch.setattr(fid, "slow_bf16_arms", lambda recipes, precision: ["t/clip"])
    said = []
    fid.run([r], [0], tmp_path, eval_size=500, log=said.append)
    assert "t/clip train in bf16" in said[0] and "--precision fp32" in said[0]


def test_report_is_spliced_between_markers_and_says_what_has_not_run(fid, monkeypatch, tmp_path):
    r = fid.parse_recipe("t", recipe(steps=10))
    other = fid.parse_recipe("other", recipe())
    monkeypatch.setattr(fid, "train_and_measure", lambda rc, arm, seed, *a: fake_metrics(arm.name, seed))
    fid.run([r], [0, 1, 2], tmp_path, eval_size=500, log=lambda m: None)
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Title\n\nprose stays\n\n{fid.BEGIN}\nold results\n{fid.END}\n\ntail stays\n")
    section = fid.write_report([r, other], tmp_path, doc)
    text = doc.read_text()
    assert "old results" not in text and text.startswith("# Title\n\nprose stays") and text.endswith("tail stays\n")
    assert (tmp_path / "fidelity.md").read_text() == section and "[`fidelity.json`](fidelity.json)" in section
    assert section.split("\n", 4)[4] in text  # the same section in the document (its JSON link relative to it)
    assert "No 3-seed run at the default budget yet:** other" in section
    assert "<details>" in section and "| [t](#t) | c | 3 seed(s) per arm | gap: **reproduced** |" in section
    with pytest.raises(ValueError, match="markers"):
        fid.splice("no markers here", "x")


def test_stale_runs_of_an_edited_recipe_are_not_judged(fid, monkeypatch, tmp_path):
    r = fid.parse_recipe("t", recipe())
    monkeypatch.setattr(fid, "train_and_measure", lambda rc, arm, seed, *a: fake_metrics(arm.name, seed))
    data = fid.run([r], [0, 1, 2], tmp_path, eval_size=500, log=lambda m: None)
    edited = recipe()
    edited["arms"]["gap"] = {"train": {"loss": {"clip": 1.0, "uniformity": 1.0, "alignment": 1.0}}}
    groups = fid.analyse(fid.parse_recipe("t", edited), data["runs"])
    assert groups[0]["comparisons"]["gap"]["metrics"]["gap"]["n"] == 0
    assert groups[0]["comparisons"]["gap"]["overall"] == "insufficient seeds"


def test_stale_says_which_stale_runs_ran_a_superseded_recipe(fid, monkeypatch, tmp_path):
    """``--stale`` counts runs whose recorded code changed; of those, runs of a recipe version since edited (here the
    gap arm's loss) are named apart: no verdict counts them (``analyse`` leaves them out) and no rerun replaces them."""
    r = fid.parse_recipe("t", recipe())
    monkeypatch.setattr(fid, "train_and_measure", lambda rc, arm, seed, *a: fake_metrics(arm.name, seed))
    data = fid.run([r], [0, 1, 2], tmp_path, eval_size=500, log=lambda m: None)
    for cid in {run["env"]["code"] for run in data["runs"]}:
        data["code"][cid] = {"src/clipforge/gone_since.py": "0123456789abcdef"}  # a file the runs ran is gone
    edited = recipe()
    edited["arms"]["gap"] = {"train": {"loss": {"clip": 1.0, "uniformity": 1.0, "alignment": 1.0}}}
    lines = fid.stale_lines(data, set(), {"t": fid.parse_recipe("t", edited)})
    assert lines[0].startswith("6 of 6 recorded runs are not on the current code (3 of them ran a superseded "
                               "version of their recipe")
    assert lines[1].split() == ["t", "6", "(3", "of", "a", "superseded", "recipe)"]
    assert lines[2:] == ["edited units, by the runs that ran them:", "     6  src/clipforge/gone_since.py"]
    assert [fid.of_current_recipe(fid.parse_recipe("t", edited), run) for run in data["runs"]].count(False) == 3
    # the recipe as it was: every stale run is a plain rerun candidate, and a recipe not given is not classed
    assert fid.stale_lines(data, set(), {"t": r})[0] == "6 of 6 recorded runs are not on the current code:"
    assert fid.stale_lines(data, set(), {})[1].split() == ["t", "6"]


def test_a_second_runner_on_the_same_directory_is_refused(fid, monkeypatch, tmp_path):
    from clipforge.locking import LockHeld, exclusive_lock

    r = fid.parse_recipe("t", recipe())
    monkeypatch.setattr(fid, "train_and_measure", lambda rc, arm, seed, *a: fake_metrics(arm.name, seed))
    with exclusive_lock(tmp_path, "fidelity results directory"):
        with pytest.raises(LockHeld, match="in use by pid"):
            fid.run([r], [0], tmp_path, eval_size=500, log=lambda m: None)
    assert not (tmp_path / "fidelity.json").exists()


def test_estimate_projects_measured_seconds_per_step(fid):
    r = fid.parse_recipe("t", recipe(steps=1000, batch=8))

    def run(arm, steps, train_s, eval_s=30.0, eval_size=500):
        return {"experiment": "t", "arm": arm, "steps": steps, "batch": 8, "eval_size": eval_size, "seconds": 0.0,
                "metrics": {"train_s": train_s, "eval_s": eval_s}}

    runs = [run("clip", 200, 400.0), run("gap", 200, 600.0, eval_s=3.0, eval_size=50), run("clip", 5, 40.0)]
    # clip: 2 s/step x 1000 + 30 s; gap: 3 s/step x 1000 + 3 s x 500 / 50; the 5-step run is ignored
    assert fid.estimate_seconds(r, fid.arm_seconds(r, runs), seeds=3) == pytest.approx(3 * ((2000 + 30) + (3000 + 30)))
    assert fid.estimate_seconds(r, fid.arm_seconds(r, runs[:1]), seeds=3) is None  # no run of the gap arm


def test_an_arm_that_returns_no_number_for_a_metric_stops_the_run(fid, monkeypatch, tmp_path):
    r = fid.parse_recipe("t", recipe())
    monkeypatch.setattr(fid, "train_and_measure", lambda rc, arm, seed, *a: {"gap": 0.5, "object_top1": None})
    with pytest.raises(RuntimeError, match="returned no number for object_top1"):
        fid.run([r], [0], tmp_path, eval_size=500, log=lambda m: None)
    assert not (tmp_path / "fidelity.json").exists()


def test_merge_adds_runs_from_other_files_once(fid, tmp_path):
    def run(arm, seed, fp="f1"):
        return {"experiment": "gap", "arm": arm, "seed": seed, "fingerprint": fp, "metrics": {"gap": 0.1}}

    out = tmp_path / "out"
    fid.save_results(out / "fidelity.json", {"version": 1, "runs": [run("clip", 0)]})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    fid.save_results(a, {"version": 1, "runs": [run("clip", 0), run("gap", 0)]})
    fid.save_results(b, {"version": 1, "runs": [run("gap", 0), run("gap", 1), run("gap", 1, fp="f2")]})
    counts = fid.merge_results(out, [a, b])
    assert counts == {str(a): {"added": 1, "replaced": 0, "skipped": 1, "dropped": 0},
                      str(b): {"added": 2, "replaced": 0, "skipped": 1, "dropped": 0}}
    keys = [(r["arm"], r["seed"], r["fingerprint"]) for r in fid.load_results(out / "fidelity.json")["runs"]]
    assert keys == [("clip", 0, "f1"), ("gap", 0, "f1"), ("gap", 1, "f1"), ("gap", 1, "f2")]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        fid.merge_results(out, [tmp_path / "missing.json"])
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="not a fidelity results file"):
        fid.merge_results(out, [tmp_path / "bad.json"])


def test_runs_record_the_files_they_executed_and_edits_make_them_stale(fid, monkeypatch, tmp_path, capsys):
    """A run records the source files its code executed (not the ones merely imported); editing one of them marks
    the run as run on changed code in the report and in ``--stale``, and --rerun-stale reruns just that run."""
    src = tmp_path / "repo" / "src"
    src.mkdir(parents=True)
    (src / "used.py").write_text("def f():\n    return 0.5\n")
    (src / "imported_only.py").write_text("def g():\n    return 1.0\n")
    monkeypatch.setattr(fid, "REPO", tmp_path / "repo")
    monkeypatch.setattr(fid, "CODE_ROOTS", (src,))
    monkeypatch.syspath_prepend(str(src))
    import imported_only  # noqa: F401  (imported, never called: must not be recorded)
    import used

    calls = []

    def fake(rc, arm, seed, *a):
        calls.append((arm.name, seed))
        m = fake_metrics(arm.name, seed)
        if arm.name == "gap":  # only the gap arm executes used.py
            m["gap"] = m["gap"] * 2 * used.f()
        return m

    monkeypatch.setattr(fid, "train_and_measure", fake)
    r = fid.parse_recipe("t", recipe())
    data = fid.run([r], [0, 1, 2], tmp_path / "out", eval_size=500, log=lambda m: None)
    by_arm = {run["arm"]: data["code"][run["env"]["code"]] for run in data["runs"]}
    assert list(by_arm["gap"]) == ["src/used.py"] and by_arm["clip"] == {}
    assert all(fid.code_state(run, data) == ("current", []) for run in data["runs"])
    assert "the verdicts judge the code as it is" in fid.markdown([r], data)

    (src / "used.py").write_text("def f():\n    return 0.25\n")  # an edit after the runs
    states = {(run["arm"], run["seed"]): fid.code_state(run, data) for run in data["runs"]}
    assert states[("gap", 0)] == ("changed", ["src/used.py::f"]) and states[("clip", 0)] == ("current", [])
    report = fid.markdown([r], data)
    assert "3 ran code edited since (src/used.py::f)" in report and "(3 on changed code)" in report

    assert fid.stale_summary(data, set()) == ({"t": 3}, {"src/used.py::f": 3})
    assert fid.main(["--stale", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("3 of 6 recorded runs are not on the current code") and "3  src/used.py::f" in printed
    fid.run([r], [0, 1, 2], tmp_path / "out", eval_size=500, log=lambda m: None)  # plain rerun: nothing recomputed
    assert len(calls) == 6
    data = fid.run([r], [0, 1, 2], tmp_path / "out", eval_size=500, log=lambda m: None, rerun_stale=True)
    assert calls[6:] == [("gap", 0), ("gap", 1), ("gap", 2)]  # only the runs on changed code, replaced in place
    assert len(data["runs"]) == 6 and all(fid.code_state(run, data)[0] == "current" for run in data["runs"])

    merged = tmp_path / "merged"
    fid.merge_results(merged, [tmp_path / "out" / "fidelity.json"])  # the manifests travel with the runs
    got = fid.load_results(merged / "fidelity.json")
    assert all(fid.code_state(run, got)[0] == "current" for run in got["runs"])

    (src / "used.py").write_text("def f():\n    return 0.125\n")  # stale again; a fresh run made elsewhere
    fresh = fid.run([r], [0, 1, 2], tmp_path / "elsewhere", eval_size=500, log=lambda m: None)
    counts = fid.merge_results(merged, [tmp_path / "elsewhere" / "fidelity.json"])
    assert counts == {str(tmp_path / "elsewhere" / "fidelity.json"): {"added": 0, "replaced": 3, "skipped": 3,
                                                                        "dropped": 0}}
    got = fid.load_results(merged / "fidelity.json")
    assert [x["metrics"] for x in got["runs"] if x["arm"] == "gap"] == [
        x["metrics"] for x in fresh["runs"] if x["arm"] == "gap"]  # the current runs replaced the stale ones


def traced_module(fid, monkeypatch, tmp_path, name: str):
    """A module ``name`` whose ``f()`` returns 1.0, in a temporary source root that the runner traces, imported: a
    run that calls it records it, and rewriting it takes those runs off the current code. (module, its path)."""
    src = tmp_path / "repo" / "src"
    src.mkdir(parents=True)
    path = src / f"{name}.py"
    path.write_text("def f():\n    return 1.0\n")
    monkeypatch.setattr(fid, "REPO", tmp_path / "repo")
    monkeypatch.setattr(fid, "CODE_ROOTS", (src,))
    monkeypatch.syspath_prepend(str(src))
    return importlib.import_module(name), path


def test_rerun_stale_reaches_stale_runs_of_other_seeds_and_budgets(fid, monkeypatch, tmp_path):
    """Runs recorded at extra seeds or another budget (``--seeds 3 4``, ``--steps 20``) are rerun by a plain
    ``--rerun-stale`` once their code changes; ``--seeds`` / ``--steps`` narrow it; a stale run that these settings
    cannot reproduce (another ``--precision``) is named with the flag that would, not silently skipped."""
    used_b, path = traced_module(fid, monkeypatch, tmp_path, "used_b")

    calls = []

    def fake(rc, arm, seed, steps, batch, eval_size, precision=None):
        calls.append((arm.name, seed, steps, precision))
        scale = used_b.f() if arm.name == "gap" else 1.0
        return {"gap": (0.5 if arm.name == "clip" else 0.2) * scale + seed / 1000, "object_top1": 0.3,
                "train_s": 1.0, "eval_s": 0.5}

    monkeypatch.setattr(fid, "train_and_measure", fake)
    r = fid.parse_recipe("t", recipe())
    out = tmp_path / "out"
    quiet = {"eval_size": 500, "log": lambda m: None}
    fid.run([r], [0, 1, 2], out, **quiet)
    fid.run([r], [3, 4], out, **quiet)
    fid.run([r], [0], out, steps=20, **quiet)
    assert len(calls) == 12
    path.write_text("def f():\n    return 0.5\n")  # the gap arm's code changes: 6 of 12 stale
    data = fid.load_results(out / "fidelity.json")
    assert fid.stale_summary(data, set())[0] == {"t": 6}

    del calls[:]
    fid.run([r], [0, 1, 2], out, rerun_stale=True, **quiet)  # --seeds given: seeds 3 and 4 are not reached
    assert calls == [("gap", s, 10, None) for s in (0, 1, 2)] + [("gap", 0, 20, None)]
    del calls[:]
    fid.run([r], None, out, steps=10, rerun_stale=True, **quiet)  # --steps given: only that budget, every seed
    assert calls == [("gap", 3, 10, None), ("gap", 4, 10, None)]
    data = fid.load_results(out / "fidelity.json")
    assert len(data["runs"]) == 12 and all(fid.code_state(x, data)[0] == "current" for x in data["runs"])

    fid.run([r], [5], out, precision="fp32", **quiet)  # a budget of its own: trained in fp32, not the arm's bf16
    path.write_text("def f():\n    return 0.25\n")
    del calls[:]
    logged = []
    fid.run([r], None, out, rerun_stale=True, eval_size=500, log=logged.append)
    assert sorted(calls) == sorted([("gap", s, 10, None) for s in (0, 1, 2, 3, 4)] + [("gap", 0, 20, None)])
    said = [m for m in logged if "cannot be rerun with these settings" in m]
    assert len(said) == 1 and ("t / gap / seed 5 (10 steps x 8), 1 run: trained in fp32 (--precision fp32 "
                               "--seeds 5 --arms gap)") in said[0]
    del calls[:]
    fid.run([r], [5], out, rerun_stale=True, precision="fp32", **quiet)  # what the message says to run
    assert calls == [("gap", 5, 10, "fp32")]


def test_arms_narrow_the_plan_and_estimate_rerun_stale_projects_only_what_would_run(fid, monkeypatch, tmp_path,
                                                                                    capsys):
    """``--arms`` plans only the named arms, new runs and stale reruns alike (an fp32 rerun of two arms of a recipe
    whose other arms never ran in fp32 must not train those); ``--estimate --rerun-stale`` projects the runs that
    the same invocation would run, from the recorded seconds of their arms, not the whole recipe."""
    used_arms, path = traced_module(fid, monkeypatch, tmp_path, "used_arms")

    calls = []

    def fake(rc, arm, seed, steps, batch, eval_size, precision=None):
        calls.append((arm.name, seed, precision))
        scale = used_arms.f() if arm.name == "gap" else 1.0
        return {"gap": (0.5 if arm.name == "clip" else 0.2) * scale, "object_top1": 0.3,
                "train_s": 100.0 if arm.name == "clip" else 340.0, "eval_s": 10.0}

    monkeypatch.setattr(fid, "train_and_measure", fake)
    r = fid.parse_recipe("t", recipe())
    monkeypatch.setattr(fid, "load_recipe", lambda name: r)
    out = tmp_path / "out"
    quiet = {"eval_size": 500, "log": lambda m: None}
    fid.run([r], [0, 1, 2], out, **quiet)
    fid.run([r], [0, 1], out, precision="fp32", arms=["gap"], **quiet)  # one arm only, in fp32
    assert calls[6:] == [("gap", 0, "fp32"), ("gap", 1, "fp32")]
    path.write_text("def f():\n    return 0.5\n")  # every gap run is stale now: 3 bf16, 2 fp32

    def estimate(*flags):
        assert fid.main(["t", "--estimate", "--rerun-stale", "--out", str(out), *flags]) == 0
        return capsys.readouterr().out.splitlines()

    # bf16: the 3 stale gap runs, 340 s of training + 10 s of evaluation each; on 2 workers 350 + 350 | 350
    got = estimate("--jobs", "2")
    line = next(x for x in got if x.startswith("t "))
    assert line.split()[:7] == ["t", "0.29", "h", "3", "runs", "(3", "reruns,"], got
    assert got[-1].split()[:5] == ["--jobs", "2", "0.19", "h", "of"], got
    said = "\n".join(got)  # the stale fp32 runs need their own invocation: one line names it
    assert "2 stale recorded runs cannot be rerun" in said, got
    assert ("t / gap / seeds 0 1 (10 steps x 8), 2 runs: trained in fp32 (--precision fp32 --seeds 0 1 "
            "--arms gap)") in said
    # fp32, every arm: the 2 stale gap runs and 4 new runs (gap seed 2, projected from gap's fp32 runs; clip's 3
    # never ran in fp32, so nothing to project them from)
    got = estimate("--precision", "fp32")
    note = next(x for x in got if "are new, not reruns" in x)
    assert note.startswith("note: 4 planned run(s)") and "--arms" in note, got
    line = next(x for x in got if x.startswith("t "))
    assert line.split()[1] == "0.29" and "6 runs (2 reruns, 4 new); 3 without a recorded run" in line, got
    got = estimate("--precision", "fp32", "--arms", "gap", "--seeds", "0", "1")  # exactly the stale fp32 runs
    line = next(x for x in got if x.startswith("t "))
    assert line.split()[1] == "0.19" and "2 runs (2 reruns, 0 new)" in line, got

    assert fid.main(["t", "--estimate", "--arms", "gap", "--out", str(out)]) == 0  # the whole budget, of gap only
    assert capsys.readouterr().out.split()[:3] == ["t", "0.29", "h"]
    assert fid.estimate_seconds(r, {"clip": 100.0}, 3, arms=["clip"]) == pytest.approx(300.0)
    assert fid.estimate_seconds(r, {"clip": 100.0}, 3) is None  # every arm: gap has no measured run

    del calls[:]
    fid.run([r], [0, 1], out, rerun_stale=True, precision="fp32", arms=["gap"], **quiet)
    assert calls == [("gap", 0, "fp32"), ("gap", 1, "fp32")]  # no clip run, no new seed
    del calls[:]
    fid.run([r], None, out, rerun_stale=True, arms=["clip"], **quiet)  # the stale runs are gap's: nothing to do
    assert calls == []
    with pytest.raises(SystemExit):
        fid.main(["t", "--estimate", "--arms", "clop", "--out", str(out)])
    assert "no arm 'clop' in t; their arms: clip, gap" in capsys.readouterr().err


def test_rerun_stale_says_which_planned_runs_are_new_not_reruns(fid, monkeypatch, tmp_path):
    """``--rerun-stale`` without ``--steps`` also plans the recipe's default budget: where nothing is recorded there
    (here: runs were recorded at 20 steps only) those runs are new, and the plan says so before running them."""
    monkeypatch.setattr(fid, "train_and_measure", lambda rc, arm, seed, steps, batch, eval_size, precision=None: {
        "gap": 0.5 if arm.name == "clip" else 0.2, "object_top1": 0.3, "train_s": 1.0, "eval_s": 0.5})
    r = fid.parse_recipe("t", recipe())
    out = tmp_path / "out"
    fid.run([r], [0, 1], out, steps=20, eval_size=500, log=lambda m: None)
    logged = []
    fid.run([r], [0, 1], out, steps=20, rerun_stale=True, eval_size=500, log=logged.append)
    assert not [m for m in logged if "are new, not reruns" in m]  # all recorded and current: nothing new
    fid.run([r], None, out, rerun_stale=True, eval_size=500, log=logged.append)
    said = [m for m in logged if "are new, not reruns" in m]
    assert len(said) == 1 and said[0].startswith("note: 6 planned run(s)") and "t 10 steps x 8" in said[0]


UNITS_V1 = '''"""A module."""
SCALE = 2.0


class Model:
    """A class."""
    bias = 1.0

    def forward(self, x):
        return self.bias + x * SCALE

    def unused(self):
        return 0


def helper(x):
    return [v * SCALE for v in x]


def never_called():
    return 1
'''


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_a_run_goes_stale_only_when_code_it_ran_changes(fid, monkeypatch, tmp_path):
    """Units, not files: an edit of a function the run never called, of a docstring or a comment, or a move leaves
    the run current; an edit of a function it ran, of a constant of the module or of an attribute of the class of a
    method it ran makes it stale, named ``file::unit``. A manifest of a run made before units were recorded (a
    file hash) goes stale with any edit of the file."""
    src = tmp_path / "repo" / "src"
    src.mkdir(parents=True)
    mod = src / "unitmod.py"
    mod.write_text(UNITS_V1)
    monkeypatch.setattr(fid, "REPO", tmp_path / "repo")
    monkeypatch.setattr(fid, "CODE_ROOTS", (src,))
    monkeypatch.syspath_prepend(str(src))
    import unitmod

    with fid.CodeTrace() as trace:
        assert unitmod.Model().forward(1.0) == 3.0 and unitmod.helper([1.0]) == [2.0]
    manifest = fid.code_manifest(sorted(trace.files), trace.codes)
    rec = manifest["src/unitmod.py"]
    assert sorted(rec["units"]) == ["<module>", "Model", "Model.forward", "helper"]  # the comprehension is helper's
    old_style = fid.code_manifest(sorted(trace.files))  # a file hash only, as runs recorded before units
    assert fid.changed_files(manifest) == [] and fid.changed_files(old_style) == []

    harmless = [('    return 1\n', '    return 2  # changed, never ran\n'), ('"""A class."""', '"""Another."""'),
                ('    def unused(self):\n        return 0\n', '    def unused(self):\n        return -1\n'),
                ('SCALE = 2.0\n', 'SCALE = 2.0  # a comment\n\n\n')]
    for old, new in harmless:
        _edit(mod, old, new)
        assert fid.changed_files(manifest) == [], new
    assert fid.changed_files(old_style) == ["src/unitmod.py"]  # the file-hash manifest cannot tell

    for old, new, unit in [("self.bias + x * SCALE", "self.bias - x * SCALE", "Model.forward"),
                           ("v * SCALE for", "v / SCALE for", "helper"),
                           ("SCALE = 2.0", "SCALE = 3.0", "<module>"), ("bias = 1.0", "bias = 0.5", "Model")]:
        mod.write_text(UNITS_V1)
        _edit(mod, old, new)
        assert fid.changed_files(manifest) == [f"src/unitmod.py::{unit}"], unit
    mod.write_text("def helper(:\n")  # no longer parses: the file as a whole counts as changed
    assert fid.changed_files(manifest) == ["src/unitmod.py"]
    mod.unlink()
    assert fid.changed_files(manifest) == ["src/unitmod.py"]


def test_code_trace_sees_library_functions_that_ran(fid):
    import torch

    from clipforge import metrics

    with fid.CodeTrace() as trace:
        assert metrics.top1.__name__ == "top1"  # touching the module runs none of its functions
    assert not any(f.endswith("clipforge/metrics.py") for f in trace.files)
    before = sys.gettrace()
    with fid.CodeTrace() as trace:
        assert metrics.top1(torch.eye(3), torch.arange(3)) == 1.0
    assert any(f.endswith("src/clipforge/metrics.py") for f in trace.files)
    assert sys.gettrace() is before  # the previous tracer (a debugger's, coverage's) is back


# ------------------------------------------------------------------------------------------------ prepared inputs


PREP_MODULE = '''
from pathlib import Path

CALLS = []


def make(out, n):
    CALLS.append(n)
    path = Path(out) / "made"
    path.mkdir()
    (path / "n.txt").write_text(str(n))
    return path


make.prepares = "a directory holding n.txt"


def unmarked(out):
    return out
'''


def install_probe(tmp_path, monkeypatch, name: str, text: str) -> None:
    """Module ``name`` with source ``text``, in a folder of its own put first on sys.path (and not yet imported)."""
    src = tmp_path / f"{name}_src"
    src.mkdir()
    (src / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(src))
    sys.modules.pop(name, None)


@pytest.fixture
def prep_module(tmp_path, monkeypatch):
    """A benchmark-style module with a preparation step ``make`` (counting its calls) on sys.path."""
    install_probe(tmp_path, monkeypatch, "fid_prep_probe", PREP_MODULE)
    import fid_prep_probe

    yield fid_prep_probe
    sys.modules.pop("fid_prep_probe", None)


def prepared_recipe(n: int = 3) -> dict:
    raw = recipe(prepare={"pool": {"function": "fid_prep_probe:make", "params": {"n": n}}})
    raw["arms"]["gap"] = {"train": {"loss": {"clip": 1.0}, "data": {"dataset": "shards", "root": "prepared:pool"}}}
    return raw


def test_an_arm_trains_on_a_prepared_input_made_once(fid, prep_module, monkeypatch, tmp_path):
    r = fid.parse_recipe("t", prepared_recipe())
    seen = []

    def fake(recipe_, arm, seed, steps, batch, eval_size, precision=None):
        seen.append((arm.name, arm.spec["train"].get("data", {}).get("root")))
        return fake_metrics(arm.name, seed)

    monkeypatch.setattr(fid, "train_and_measure", fake)
    out = tmp_path / "out"
    fid.run([r], [0, 1], out, eval_size=500, log=lambda m: None)
    made = out / "prepared" / "t"
    (where,) = made.iterdir()
    path = str((where / "made").resolve())
    assert prep_module.CALLS == [3]  # once, before the first arm that names it
    assert seen == [("clip", None), ("gap", path), ("clip", None), ("gap", path)]
    assert (Path(path) / "n.txt").read_text() == "3"
    assert json.loads((where / "done.json").read_text())["path"] == path
    runs = json.loads((out / "fidelity.json").read_text())["runs"]
    assert [r_.get("prepared") for r_ in runs] == [None, {"pool": path}, None, {"pool": path}]
    fid.run([r], [0, 1, 2], out, eval_size=500, log=lambda m: None)  # a later session reuses done.json
    assert prep_module.CALLS == [3] and seen[-1] == ("gap", path)


def test_the_prepared_entry_is_part_of_the_fingerprint_of_the_arms_that_name_it(fid, prep_module):
    a, b = fid.parse_recipe("t", prepared_recipe(3)), fid.parse_recipe("t", prepared_recipe(4))
    plain = fid.parse_recipe("t", {**prepared_recipe(3), "prepare": {}} | {"arms": recipe()["arms"]})
    assert a.fingerprint("gap", 10, 8, 500) != b.fingerprint("gap", 10, 8, 500)
    # an arm that names no prepared input keeps the fingerprint it has without a prepare section
    assert a.fingerprint("clip", 10, 8, 500) == b.fingerprint("clip", 10, 8, 500) == plain.fingerprint(
        "clip", 10, 8, 500)


def test_bad_prepare_entries_name_the_problem(fid, prep_module):
    raw = prepared_recipe()
    raw["arms"]["gap"]["train"]["data"]["root"] = "prepared:pol"
    with pytest.raises(fid.RecipeError, match=r"arm 'gap': prepared:pol names no prepare entry; prepare entries: pool"):
        fid.parse_recipe("t", raw)
    raw = prepared_recipe()
    raw["prepare"]["pool"]["function"] = "fid_prep_probe:unmarked"
    with pytest.raises(fid.RecipeError, match=r"prepare 'pool': 'fid_prep_probe:unmarked' is not a preparation step.*"
                                              r"preparation steps of fid_prep_probe: make"):
        fid.parse_recipe("t", raw)
    raw = prepared_recipe()
    raw["prepare"]["pool"]["parms"] = {}
    with pytest.raises(fid.RecipeError, match=r"prepare 'pool': unknown key\(s\) parms"):
        fid.parse_recipe("t", raw)


# ------------------------------------------------------------------------------------------------ --jobs

PAR_MODULE = '''
import os
from pathlib import Path


def arm(seed, steps, batch, eval_size, pool, shift=0.0, fail_seed=-1):
    if seed == fail_seed:
        raise ValueError("probe failure")
    n = int((Path(pool) / "n.txt").read_text())
    return {"gap": 0.5 - shift + 0.01 * seed * n, "object_top1": 0.3 + 0.001 * seed, "pid": float(os.getpid())}


arm.metrics = ("gap", "object_top1", "pid")


def make(out, n, calls):
    with open(calls, "a") as f:  # every call, from whichever process
        f.write(f"{os.getpid()}\\n")
    path = Path(out) / "made"
    path.mkdir()
    (path / "n.txt").write_text(str(n))
    return path


make.prepares = "a directory holding n.txt"
'''


@pytest.fixture
def par_module(tmp_path, monkeypatch):
    """Function arms and a preparation step in a module that worker processes can import (on sys.path)."""
    install_probe(tmp_path, monkeypatch, "fid_par_probe", PAR_MODULE)
    yield tmp_path / "calls.txt"
    sys.modules.pop("fid_par_probe", None)


def par_recipe(calls, fail_seed: int = -1) -> dict:
    metrics = {"gap": {"direction": "decrease"}, "object_top1": {"direction": "no_decrease", "margin": 0.02}}
    return recipe(measures=[], metrics=metrics, baseline="clip",
                  prepare={"pool": {"function": "fid_par_probe:make", "params": {"n": 2, "calls": str(calls)}}},
                  arms={"clip": {"function": "fid_par_probe:arm", "params": {"pool": "prepared:pool"}},
                        "gap": {"function": "fid_par_probe:arm",
                                "params": {"pool": "prepared:pool", "shift": 0.3, "fail_seed": fail_seed}}})


def test_jobs_run_in_worker_processes_and_record_what_a_sequential_run_records(fid, par_module, tmp_path):
    r = fid.parse_recipe("t", par_recipe(par_module))
    logs: list[str] = []
    fid.run([r], [0, 1, 2], tmp_path / "seq", eval_size=500, log=lambda m: None)
    fid.run([r], [0, 1, 2], tmp_path / "par", eval_size=500, log=logs.append, jobs=2)
    seq, par = (json.loads((tmp_path / d / "fidelity.json").read_text()) for d in ("seq", "par"))

    def by_key(data):
        return {(x["experiment"], x["arm"], x["seed"], x["fingerprint"]): x for x in data["runs"]}

    assert set(by_key(seq)) == set(by_key(par)) and len(par["runs"]) == 6
    for key, x in by_key(par).items():
        timing = ("pid", "total_s")
        assert {k: v for k, v in x["metrics"].items() if k not in timing} == \
               {k: v for k, v in by_key(seq)[key]["metrics"].items() if k not in timing}
        assert x["metrics"]["pid"] != os.getpid()  # measured in a worker, not in this process
        assert x["env"]["code"] in par["code"] and x["prepared"]["pool"].endswith("made")
    assert fid.analyse(r, par["runs"])[0]["comparisons"]["gap"]["metrics"]["gap"]["verdict"] == "reproduced"
    # the prepared input was made once per results directory, although both workers needed it at the start
    assert len(par_module.read_text().split()) == 2  # once for seq, once for par
    assert any("6 runs on 2 worker processes" in m for m in logs)
    assert sum(": 0 s" in m or " s  gap=" in m for m in logs) == 6
    logs.clear()
    fid.run([r], [0, 1, 2], tmp_path / "par", eval_size=500, log=logs.append, jobs=2)  # all recorded: nothing runs
    assert logs == [f"6 runs already in {tmp_path / 'par' / 'fidelity.json'}, skipped"]


def test_a_failed_run_under_jobs_names_itself_and_the_others_are_saved(fid, par_module, tmp_path):
    r = fid.parse_recipe("t", par_recipe(par_module, fail_seed=1))
    with pytest.raises(RuntimeError, match=r"1 of 6 runs failed: t / gap / seed 1 \(10 steps x 8\): ValueError: "
                                           r"probe failure\. The other runs are saved in .*fidelity\.json"):
        fid.run([r], [0, 1, 2], tmp_path, eval_size=500, log=lambda m: None, jobs=2)
    runs = json.loads((tmp_path / "fidelity.json").read_text())["runs"]
    assert sorted((x["arm"], x["seed"]) for x in runs) == [("clip", 0), ("clip", 1), ("clip", 2), ("gap", 0),
                                                          ("gap", 2)]
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        fid.run([r], [0], tmp_path / "other", log=lambda m: None, jobs=0)


def test_longest_first_schedule_by_hand(fid):
    assert fid.longest_first([3, 3, 5, 4, 3], 2) == 10  # 5+3 | 4+3+3: greedy, where 9 (5+4 | 3+3+3) is the best
    assert fid.longest_first([3, 3, 5, 4, 3], 1) == 18
    assert fid.longest_first([7, 1, 1], 4) == 7
    assert fid.longest_first([], 3) == 0


def test_estimate_says_when_shared_base_models_may_be_missing_from_it(fid):
    arms = {"zs": {"function": "bench_adapt:fidelity_arm", "params": {"method": "zero-shot"}},
            "tip": {"function": "bench_adapt:fidelity_arm", "params": {"method": "tip"}}}
    metrics = {"test": {"direction": "increase"}}
    shared = fid.parse_recipe("t", recipe(measures=[], baseline="zs", metrics=metrics, arms=arms,
                                          shares_artifacts=True))
    assert "base model" in fid.estimate_caveat(shared)
    alone = fid.parse_recipe("t", recipe(measures=[], baseline="zs", metrics=metrics, arms=arms))
    assert fid.estimate_caveat(alone) == ""
    assert fid.estimate_caveat(fid.parse_recipe("t", recipe(shares_artifacts=True))) == ""  # training arms only
    out = subprocess.run([sys.executable, str(fid.__file__), "adapt_prompts", "--estimate"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "base model" in out.stdout.splitlines()[0], out.stdout


def test_estimate_uses_runs_at_the_budget_itself_where_an_arm_has_them(fid):
    r = fid.parse_recipe("t", recipe(steps=1000, batch=8))

    def run(arm, steps, seconds, metrics):
        return {"experiment": "t", "arm": arm, "steps": steps, "batch": 8, "eval_size": 500, "seconds": seconds,
                "metrics": metrics}

    runs = [run("clip", 200, 0.0, {"train_s": 400.0, "eval_s": 30.0}),  # scaled: 2030 s
            run("gap", 200, 500.0, {}), run("gap", 1000, 60.0, {})]  # a function arm that cached its base: 60 s
    assert fid.arm_seconds(r, runs) == {"clip": pytest.approx(2030.0), "gap": pytest.approx(60.0)}
    assert fid.arm_seconds(r, runs[:2])["gap"] == pytest.approx(2500.0)  # without it: 500 s x 5


def test_estimate_of_a_recipe_whose_budget_is_under_the_step_floor_uses_its_own_budget_runs(fid):
    r = fid.parse_recipe("t", recipe(steps=30, batch=8))

    def run(arm, steps, train_s):
        return {"experiment": "t", "arm": arm, "steps": steps, "batch": 8, "eval_size": 500, "seconds": 0.0,
                "metrics": {"train_s": train_s, "eval_s": 10.0}}

    runs = [run("clip", 30, 90.0), run("gap", 30, 120.0), run("clip", 5, 1.0), run("gap", 50, 1.0)]
    # the 5- and 50-step runs are below the floor and not the budget: ignored; 30 steps is the budget: used as is
    assert fid.arm_seconds(r, runs) == {"clip": pytest.approx(100.0), "gap": pytest.approx(130.0)}
    assert fid.estimate_seconds(r, fid.arm_seconds(r, runs), seeds=3) == pytest.approx(3 * 230.0)
    assert fid.estimate_seconds(r, fid.arm_seconds(r, runs[2:]), seeds=3) is None
    assert fid.estimate_seconds(r, {"clip": 100.0}, seeds=3) is None  # no measured gap arm


def test_estimate_prefers_runs_on_this_machine_type_and_not_on_an_overloaded_machine(fid):
    r = fid.parse_recipe("t", recipe(steps=1000, batch=8))
    here, other = ("AMD EPYC", "AVX512"), ("AMD EPYC", "AVX2")

    def run(arm, train_s, machine, load=1.0):
        env = {"cpu": machine[0], "cpu_capability": machine[1], "cores": 2, "load_average": [load, load, load],
               "load_average_end": [load, load, load]}
        return {"experiment": "t", "arm": arm, "steps": 1000, "batch": 8, "eval_size": 500, "seconds": 0.0,
                "metrics": {"train_s": train_s, "eval_s": 0.0}, "env": env}

    runs = [run("clip", 100.0, other), run("clip", 300.0, other), run("clip", 700.0, here, load=40.0),
            run("clip", 200.0, here), run("clip", 220.0, here),
            run("gap", 100.0, other), run("gap", 900.0, other, load=40.0), run("gap", 500.0, other, load=6.0)]
    got = fid.arm_seconds(r, runs, machine=here)
    assert got["clip"] == pytest.approx(210.0)  # this machine's unloaded runs only
    assert got["gap"] == pytest.approx(100.0)  # no run here: the unloaded run elsewhere
    assert fid.arm_seconds(r, runs, machine=other)["clip"] == pytest.approx(200.0)  # median of 100 and 300
    assert fid._overloaded(runs[2]) and not fid._overloaded(runs[3]) and not fid._overloaded({"env": {}})


SLOW_MODULE = '''
import os
import time
from pathlib import Path


def arm(seed, steps, batch, eval_size, marks):
    Path(marks, f"{os.getpid()}-{seed}").write_text("started")
    time.sleep(120)
    return {"m": 1.0}


arm.metrics = ("m",)
'''

KILLED_SCRIPT = '''
import sys
from pathlib import Path

sys.path[:0] = [{modules!r}, {benchmarks!r}]
import fidelity

if __name__ == "__main__":
    raw = {{"claim": "c", "paper": "p", "paper_budget": "pb", "machine_budget": "mb", "steps": 10, "batch": 8,
            "baseline": "a", "metrics": {{"m": {{"direction": "increase"}}}}, "shares_artifacts": {shares!r},
            "arms": {{"a": {{"function": "fid_slow_probe:arm", "params": {{"marks": {marks!r}}}}},
                     "b": {{"function": "fid_slow_probe:arm", "params": {{"marks": {marks!r}}}}}}}}}
    fidelity.run([fidelity.parse_recipe("t", raw)], [0], Path({out!r}), jobs={jobs!r})
'''


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="reads worker processes from /proc (Linux)")
@pytest.mark.parametrize("jobs, shares, started", [(2, False, 2), (1, True, 1)], ids=["two-workers", "one-unit-jobs-1"])
def test_a_killed_runner_stops_its_workers(tmp_path, jobs, shares, started):
    """--jobs 2 runs the two arms in two workers; with --jobs 1, a recipe that shares artifacts still runs its unit
    (both arms, one after the other) in one worker process: a `kill` of the runner stops the workers either way."""
    import signal
    import time

    from benchhelpers import BENCHMARKS

    modules, marks = tmp_path / "modules", tmp_path / "marks"
    modules.mkdir()
    marks.mkdir()
    (modules / "fid_slow_probe.py").write_text(SLOW_MODULE)
    script = tmp_path / "go.py"
    script.write_text(KILLED_SCRIPT.format(modules=str(modules), benchmarks=str(BENCHMARKS), marks=str(marks),
                                           out=str(tmp_path / "out"), jobs=jobs, shares=shares))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(marks.iterdir())) < started and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        pids = [int(p.name.split("-")[0]) for p in marks.iterdir()]
        assert len(pids) == started, "each worker should have started a run"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 30  # did not wait for the two-minute runs
        time.sleep(0.5)
        assert not [p for p in pids if Path(f"/proc/{p}").exists() and
                    "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------------------------------------ units


UNIT_MODULE = '''
import os
import tempfile
from pathlib import Path


def arm(seed, steps, batch, eval_size, shift=0.0, where=""):
    """A base per seed, made by whichever arm runs first and reused by the other (as bench_adapt's base model)."""
    cache = Path(os.environ["CLIPFORGE_BENCH_CACHE"])
    base = cache / f"base-s{seed}.txt"
    made = 0.0
    if not base.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        base.write_text("base")
        made = 1.0
    with open(where, "a") as f:  # where the caches were, to check that they are gone afterwards
        f.write(f"{cache}\\\\n")
    return {"gap": 0.5 - shift + 0.01 * seed, "object_top1": 0.3, "made": made, "pid": float(os.getpid()),
            "tmp_in_scratch": float(tempfile.gettempdir() == str(cache.parent))}


arm.metrics = ("gap", "object_top1", "made", "pid", "tmp_in_scratch")
'''


@pytest.fixture
def unit_module(tmp_path, monkeypatch):
    install_probe(tmp_path, monkeypatch, "fid_unit_probe", UNIT_MODULE)
    yield tmp_path / "where.txt"
    sys.modules.pop("fid_unit_probe", None)


def unit_recipe(where, shares: bool = True) -> dict:
    metrics = {"gap": {"direction": "decrease"}, "object_top1": {"direction": "no_decrease", "margin": 0.02}}
    params = {"where": str(where)}
    return recipe(measures=[], metrics=metrics, baseline="clip", shares_artifacts=shares,
                  arms={"clip": {"function": "fid_unit_probe:arm", "params": params},
                        "gap": {"function": "fid_unit_probe:arm", "params": {**params, "shift": 0.3}}})


def test_a_recipe_that_shares_artifacts_runs_each_unit_in_one_fresh_process(fid, unit_module, tmp_path):
    r = fid.parse_recipe("t", unit_recipe(unit_module))
    logs: list[str] = []
    data = fid.run([r], [0, 1], tmp_path / "out", eval_size=500, log=logs.append)
    runs = {(x["arm"], x["seed"]): x for x in data["runs"]}
    assert len(runs) == 4 and len({x["env"]["unit"] for x in runs.values()}) == 1  # one unit: the budget's runs
    assert len({x["metrics"]["pid"] for x in runs.values()}) == 1 and runs["clip", 0]["metrics"]["pid"] != os.getpid()
    # the first arm of each seed made the base, the second reused it; the caches started empty, in a scratch
    # directory that is also the temporary directory, and were removed at the end
    assert [runs[a, s]["metrics"]["made"] for s in (0, 1) for a in ("clip", "gap")] == [1.0, 0.0, 1.0, 0.0]
    assert all(x["metrics"]["tmp_in_scratch"] == 1.0 for x in runs.values())
    first = set(unit_module.read_text().split())
    assert len(first) == 1 and not any(Path(p).exists() for p in first)
    assert any("4 runs as one unit in a fresh process" in m for m in logs)

    # one run on unrecorded code: --rerun-stale reruns its whole unit (in a --jobs worker), with fresh caches again
    stale = next(x for x in data["runs"] if (x["arm"], x["seed"]) == ("gap", 1))
    stale["env"]["code"] = "not-recorded"
    fid.save_results(tmp_path / "out" / "fidelity.json", data)
    states = fid.code_states(data, {"t"})
    assert sorted(s for s, _ in states.values()) == ["unit", "unit", "unit", "unrecorded"]
    logs.clear()
    again = fid.run([r], [0, 1], tmp_path / "out", eval_size=500, log=logs.append, rerun_stale=True, jobs=2)
    runs2 = {(x["arm"], x["seed"]): x for x in again["runs"]}
    assert len(runs2) == 4 and len({x["env"]["unit"] for x in runs2.values()}) == 1
    assert runs2["clip", 0]["env"]["unit"] != runs["clip", 0]["env"]["unit"]
    assert [runs2[a, s]["metrics"]["made"] for s in (0, 1) for a in ("clip", "gap")] == [1.0, 0.0, 1.0, 0.0]
    assert all(s == "current" for s, _ in fid.code_states(again, {"t"}).values())
    assert any(m.startswith("4 runs on 1 worker processes") and "1 unit(s) of several runs" in m for m in logs)

    # a seed missing from the unit: the whole unit runs again, not the new seed alone beside old runs
    logs.clear()
    third = fid.run([r], [0, 1, 2], tmp_path / "out", eval_size=500, log=logs.append)
    assert len(third["runs"]) == 6 and len({x["env"]["unit"] for x in third["runs"]}) == 1
    assert sum("rerunning with its unit" in m for m in logs) == 4

    # a plan of seed 0 alone replaces the unit: the unit's other runs go (they may have reused seed 0's artifacts)
    logs.clear()
    fid.run([r], [0], tmp_path / "out", eval_size=500, log=logs.append, rerun_stale=True)
    assert len(fid.load_results(tmp_path / "out" / "fidelity.json")["runs"]) == 6  # all current: nothing ran
    fourth = fid.load_results(tmp_path / "out" / "fidelity.json")
    fourth["runs"][0]["env"]["code"] = "not-recorded"
    fid.save_results(tmp_path / "out" / "fidelity.json", fourth)
    left = fid.run([r], [0], tmp_path / "out", eval_size=500, log=logs.append, rerun_stale=True)
    assert sorted((x["arm"], x["seed"]) for x in left["runs"]) == [("clip", 0), ("gap", 0)]
    assert any("removed 4 run(s) of the replaced unit" in m and "run their seeds again" in m for m in logs)


def test_without_shared_artifacts_each_run_is_judged_and_rerun_alone(fid, unit_module, monkeypatch, tmp_path):
    r = fid.parse_recipe("t", unit_recipe(unit_module, shares=False))
    assert fid.parse_recipe("t", unit_recipe(unit_module)).shares_artifacts and not r.shares_artifacts
    calls = []
    monkeypatch.setattr(fid, "train_and_measure",
                        lambda rc, arm, seed, *a: calls.append((arm.name, seed)) or fake_metrics(arm.name, seed))
    data = fid.run([r], [0, 1], tmp_path, eval_size=500, log=lambda m: None)  # in this process, as always
    assert "unit" not in data["runs"][0]["env"]
    data["runs"][3]["env"]["code"] = "not-recorded"
    fid.save_results(tmp_path / "fidelity.json", data)
    assert sorted(s for s, _ in fid.code_states(data, set()).values()) == ["current"] * 3 + ["unrecorded"]
    fid.run([r], [0, 1], tmp_path, eval_size=500, log=lambda m: None, rerun_stale=True)
    assert calls[4:] == [("gap", 1)]
    with pytest.raises(fid.RecipeError, match="shares_artifacts is true or false"):
        fid.parse_recipe("t", unit_recipe(unit_module, shares="yes"))


def test_units_are_judged_and_merged_whole(fid, monkeypatch, tmp_path):
    def run(exp, arm, seed, code="new", unit=None):
        env = {"code": code, **({"unit": unit} if unit else {})}
        return {"experiment": exp, "arm": arm, "seed": seed, "fingerprint": f"fp-{arm}", "steps": 10, "batch": 8,
                "eval_size": 500, "metrics": {"gap": 0.1}, "env": env}

    monkeypatch.setattr(fid, "code_state", lambda r, data: ("changed", ["bench_x.py::make_base"])
                        if r["env"]["code"] == "old" else ("current", []))
    present = [run("s", "base", 0, "old", "u1"), run("s", "adapter", 0, "new", "u1"),  # the maker ran stale code
               run("s", "base", 1, "new", "u1"), run("s", "adapter", 1, "new", "u1"),
               run("s", "x", 5, "new", "u2"),  # a unit of its own, on current code
               run("old_s", "base", 0, "old"), run("old_s", "adapter", 0),  # recorded before units: the budget
               run("p", "base", 0, "old"), run("p", "adapter", 0)]  # a recipe that shares nothing
    data = {"version": 1, "runs": present}
    states = fid.code_states(data, {"s", "old_s"})
    assert [states[id(x)][0] for x in present] == ["changed", "unit", "unit", "unit", "current",
                                                   "changed", "unit", "changed", "current"]
    assert states[id(present[1])] == ("unit", ["bench_x.py::make_base"])

    out = tmp_path / "out"
    fid.save_results(out / "fidelity.json", data)
    new = tmp_path / "new.json"  # seed 0 of unit u1 rerun alone (u3), and a partial rerun of the current u2
    fid.save_results(new, {"version": 1, "runs": [run("s", "base", 0, "new", "u3"), run("s", "adapter", 0, "new", "u3"),
                                                  run("s", "x", 5, "new", "u4"), run("s", "x", 6, "new", "u4")]})
    counts = fid.merge_results(out, [new], shared={"s", "old_s"})
    assert counts == {str(new): {"added": 0, "replaced": 2, "skipped": 2, "dropped": 2}}
    got = fid.load_results(out / "fidelity.json")["runs"]
    assert sorted((x["arm"], x["seed"], x["env"].get("unit")) for x in got if x["experiment"] == "s") == [
        ("adapter", 0, "u3"), ("base", 0, "u3"), ("x", 5, "u2")]  # u1's seed 1 went with it; u4 came in whole or not

    # a unit overlapping a current unit (u2, seed 5) and a stale one (u6, seed 7) replaces both: a stale run among the
    # units it overlaps is enough when it is on the current code itself
    fid.save_results(out / "fidelity.json", {"version": 1, "runs": got + [run("s", "x", 7, "old", "u6")]})
    both = tmp_path / "both.json"
    fid.save_results(both, {"version": 1, "runs": [run("s", "x", 5, "new", "u7"), run("s", "x", 7, "new", "u7")]})
    assert fid.merge_results(out, [both], shared={"s", "old_s"}) == {
        str(both): {"added": 0, "replaced": 2, "skipped": 0, "dropped": 0}}
    got = fid.load_results(out / "fidelity.json")["runs"]
    assert sorted((x["arm"], x["seed"], x["env"].get("unit")) for x in got if x["experiment"] == "s") == [
        ("adapter", 0, "u3"), ("base", 0, "u3"), ("x", 5, "u7"), ("x", 7, "u7")]
    # the same unit again finds only current units: skipped whole, as u4 was
    assert fid.merge_results(out, [both], shared={"s", "old_s"})[str(both)]["skipped"] == 2


def test_shipped_recipes_whose_modules_keep_state_between_calls_share_artifacts(fid):
    """A recipe whose function arms' modules (or the benchmark modules they import) cache anything between calls,
    on disk or in memory, must say whether its arms use that state: ``shares_artifacts: true``, otherwise a run
    that reuses the cache would be judged by a trace that never saw the code that made it (see ``unit_key``)."""

    import re

    import yaml

    bench = Path(fid.__file__).parent
    keeps_state = re.compile(r"CLIPFORGE_BENCH_CACHE|gettempdir\(|^_[A-Z][A-Z_]*(: [^=]+)? = \{\}", re.M)

    def modules(name, seen):
        path = bench / f"{name}.py"
        if name in seen or not path.exists():
            return seen
        seen.add(name)
        for other in re.findall(r"^\s*(?:from|import) (bench_\w+)", path.read_text(), re.M):
            modules(other, seen)
        return seen

    missing, declared = [], fid.shared_recipes()
    for path in sorted((bench / "fidelity").glob("*.yaml")):
        refs = set(re.findall(r"(bench_\w+):\w+", path.read_text()))
        stateful = sorted(m for ref in refs for m in modules(ref, set())
                          if keeps_state.search((bench / f"{m}.py").read_text()))
        if stateful and "shares_artifacts" not in (yaml.safe_load(path.read_text()) or {}):
            missing.append(f"{path.stem} ({', '.join(stateful)})")
    assert not missing, (f"declare shares_artifacts: true in {', '.join(missing)} (or false where the arms' "
                         "functions use none of that state)")
    assert {"adapt", "maccap", "mobileclip_reinforced"} <= declared
