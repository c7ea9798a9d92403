"""One runner for the fidelity experiments: does each method show, over several seeds, the effect its paper claims?

    python benchmarks/fidelity.py NAME|all [--seeds 0 1 2] [--steps N] [--out DIR] [--threads 1] [--eval-size 500]
    python benchmarks/fidelity.py NAME --precision fp32    # bf16 recipes on a CPU without fast bf16 (AVX2 only)
    python benchmarks/fidelity.py --list
    python benchmarks/fidelity.py --report-only [--out DIR] [--docs docs/fidelity.md]
    python benchmarks/fidelity.py NAME ... --time          # seconds per step of each training arm, steps in 30 min
    python benchmarks/fidelity.py NAME|all --estimate      # projected time from the runs already recorded
    python benchmarks/fidelity.py --merge A.json B.json    # add runs made elsewhere (other machines, sessions)
    python benchmarks/fidelity.py --stale [NAME ...]       # which recorded runs the tree's edits take off the code
    python benchmarks/fidelity.py NAME|all --rerun-stale   # rerun the runs whose code changed since (any seed)
    python benchmarks/fidelity.py NAME --rerun-stale --arms A B --estimate   # only arms A and B; how long it takes
    python benchmarks/fidelity.py all --jobs 16            # 16 runs side by side (one per core), longest first

Every experiment is a recipe, ``benchmarks/fidelity/NAME.yaml``, one per claim: the paper and its budget, the
budget this machine runs by default, the arms (a training config, or a function of a benchmark module), the
baseline arm, the measures, and for each metric the direction the paper predicts. Runs go seed-major (seed 0 of
every arm of every named experiment, then seed 1, ...) so that an interrupted ``all`` leaves whole seeds behind.
Each run's numbers and environment (host, CPU model, threads, torch, git commit, load average) are appended to
``OUT/fidelity.json`` as soon as the run ends; runs already there (same recipe, arm, seed and budget) are not
recomputed, so ``all`` can be spread over several sessions. Each run also records the source files (clipforge's and
benchmarks/') its Python code executed, with their hashes; the report says how many runs behind each table ran files
edited since, and ``--rerun-stale`` reruns exactly those. ``OUT/fidelity.md`` holds the tables and verdicts;
``--docs FILE`` also replaces the generated section of FILE (between the markers below).

Verdicts are computed here, never typed: for every method arm and metric, the paired difference (method minus
baseline, same seed) over the seeds, its mean, sd and 95% t-interval. ``reproduced`` when the interval excludes
zero in the paper's direction, ``contradicted`` when it excludes zero the other way, ``inconclusive`` otherwise,
``insufficient seeds`` with fewer than three paired seeds. A ``no_decrease`` claim ("no loss of accuracy") is
reproduced when the interval's lower end is above ``-margin`` and contradicted when the whole interval is below
zero (``no_increase`` mirrors it). Metrics with direction ``none`` are reported with their interval, not judged.

Prepared inputs: a recipe's ``prepare`` section names artifacts that arms train on but that must exist first (a
curated shard set, a cluster file computed from another model): ``NAME: {function: "module:function", params:
{...}}``, the function declaring ``.prepares`` (what it writes). An arm names one by the string ``"prepared:NAME"``
anywhere in its training fields or params (``data: {dataset: shards, root: "prepared:curated"}``); the runner calls
``function(out=DIR, **params)`` once, before the first arm that needs it, with DIR =
``OUT/prepared/RECIPE/NAME-<hash of the entry>``, and substitutes the path it returns (kept in ``DIR/done.json``,
so a later session reuses it). The entry is part of the fingerprint of every arm that names it.

Units: a recipe whose arms reuse what another of its runs made (one base model per seed shared by the adapter arms,
a captioner cached on disk, a teacher shared by every seed) says ``shares_artifacts: true``. Its runs of one budget
are then one unit: the runs of the unit that an invocation plans are made together in one fresh worker process
whose caches start empty, recorded with one ``env.unit`` id, judged on the current code only when every run of the
unit is (a reused artifact's maker is in the unit, so its trace covers it), rerun together (``--rerun-stale``
reruns the whole unit when one of its runs is stale or missing) and merged together. Every ``--jobs`` worker
serves one unit only, so nothing a unit leaves in memory reaches another.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import datetime as _dt
import functools
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # the measures and the plug-in arms are modules beside this file
    sys.path.insert(0, str(HERE))
from fidelity_measures import MEASURES  # noqa: E402

CODE_ROOTS = (REPO / "src" / "clipforge", HERE)  # whose executed files a run records (library and benchmark modules)
RECIPES = HERE / "fidelity"
DEFAULT_OUT = RECIPES / "results"
BEGIN = "<!-- fidelity:begin (generated by benchmarks/fidelity.py; do not edit by hand) -->"
END = "<!-- fidelity:end -->"
DIRECTIONS = ("increase", "decrease", "no_decrease", "no_increase", "none")
MIN_SEEDS = 3
ESTIMATE_MIN_STEPS = 100  # shorter runs are mostly start-up and would inflate --estimate
PREPARE_WAIT_S = 7 * 24 * 3600.0  # how long a --jobs worker waits for another one making the same prepared input
RECIPE_KEYS = {"title", "claim", "paper", "paper_budget", "machine_budget", "steps", "batch", "train", "measures",
               "baseline", "arms", "metrics", "notes", "prepare", "shares_artifacts"}
PREPARE_KEYS = {"function", "params"}
PREPARED = "prepared:"  # an arm's string value "prepared:NAME" stands for the path recipe.prepare[NAME] returns
ARM_KEYS = {"label", "train", "function", "params"}
METRIC_KEYS = {"label", "direction", "margin"}


# ---------------------------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function with ``df`` degrees of freedom."""
    if t * t < df:  # near zero, x = df / (df + t^2) rounds to 1: use I_x(a, b) = 1 - I_{1-x}(b, a)
        tail = 0.5 * (1.0 - betainc(0.5, df / 2.0, t * t / (df + t * t)))
    else:
        tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_ppf(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    if not 0.0 < q < 1.0 or df < 1:
        raise ValueError(f"t_ppf needs 0 < q < 1 and df >= 1, got q={q}, df={df}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def paired_interval(method: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> dict:
    """Paired differences ``method[i] - baseline[i]`` (same seed): n, mean, sd and the two-sided t-interval."""
    if len(method) != len(baseline):
        raise ValueError(f"paired values need the same seeds: {len(method)} method vs {len(baseline)} baseline values")
    diffs = [float(m) - float(b) for m, b in zip(method, baseline)]
    n = len(diffs)
    out: dict[str, Any] = {"n": n, "mean": statistics.fmean(diffs) if diffs else None, "sd": None, "low": None,
                           "high": None, "level": level}
    if n >= 2:
        sd = statistics.stdev(diffs)
        half = t_ppf(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, low=out["mean"] - half, high=out["mean"] + half)
    return out


def verdict(interval: Mapping[str, Any], direction: str, margin: float = 0.0, min_seeds: int = MIN_SEEDS) -> str:
    """The verdict for one metric from its paired interval and the direction the paper predicts."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction '{direction}'; choose from {', '.join(DIRECTIONS)}")
    if direction == "none":
        return "not judged"
    if interval["n"] < min_seeds:
        return "insufficient seeds"
    low, high = interval["low"], interval["high"]
    if direction in ("decrease", "no_increase"):  # mirror: judge the negated difference
        low, high = -high, -low
    if high < 0:
        return "contradicted"
    if direction in ("increase", "decrease"):
        return "reproduced" if low > 0 else "inconclusive"
    return "reproduced" if low > -margin else "inconclusive"


def overall(verdicts: Sequence[str]) -> str:
    """One line per method arm from its judged metrics."""
    judged = [v for v in verdicts if v != "not judged"]
    if not judged:
        return "not judged"
    if "insufficient seeds" in judged:
        return "insufficient seeds"
    if all(v == "reproduced" for v in judged):
        return "reproduced"
    if "contradicted" in judged:
        return "mixed" if "reproduced" in judged else "contradicted"
    return "partly reproduced" if "reproduced" in judged else "inconclusive"


# ---------------------------------------------------------------------------------------------- recipes


class RecipeError(ValueError):
    """A recipe names something that does not exist; the message names it and the valid choices."""


def _plugin(ref: str, where: str, marker: str = "metrics") -> Callable:
    """``module:function`` of a module in benchmarks/; the function must declare ``.metrics`` (names it returns), or
    with ``marker="prepares"`` a ``.prepares`` string (what a preparation step writes)."""
    if ref.count(":") != 1:
        raise RecipeError(f"{where}: '{ref}' is not 'module:function' (a function of a module in {HERE}), "
                          f"e.g. 'bench_adapt:fidelity_arm'")
    module_name, fn_name = ref.split(":")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        found = sorted(p.stem for p in HERE.glob("*.py"))
        raise RecipeError(f"{where}: cannot import '{module_name}' ({e}); modules in {HERE}: "
                          f"{', '.join(found)}") from None
    kind = {"metrics": tuple, "prepares": str}[marker]
    fn = getattr(module, fn_name, None)
    if not callable(fn) or not isinstance(getattr(fn, marker, None), kind):
        choices = sorted(n for n, v in vars(module).items()
                         if callable(v) and isinstance(getattr(v, marker, None), kind))
        what = ("a fidelity plug-in (a function with a .metrics tuple)" if marker == "metrics" else
                "a preparation step (a function with a .prepares description)")
        label = "plug-ins" if marker == "metrics" else "preparation steps"
        raise RecipeError(f"{where}: '{ref}' is not {what}; {label} of {module_name}: "
                          f"{', '.join(choices) or '(none)'}")
    return fn


def _prepared_refs(value: Any) -> set[str]:
    """The names of every ``"prepared:NAME"`` string inside a (nested) recipe value."""
    if isinstance(value, str):
        return {value[len(PREPARED):]} if value.startswith(PREPARED) else set()
    if isinstance(value, Mapping):
        return set().union(*(_prepared_refs(v) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(*(_prepared_refs(v) for v in value))
    return set()


def _substitute(value: Any, paths: Mapping[str, str]) -> Any:
    """``value`` with every ``"prepared:NAME"`` string replaced by ``paths[NAME]``."""
    if isinstance(value, str) and value.startswith(PREPARED):
        return paths[value[len(PREPARED):]]
    if isinstance(value, Mapping):
        return {k: _substitute(v, paths) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_substitute(v, paths) for v in value]
    return value


def _check_keys(got: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(allowed))}")


def _merge(base: Mapping, layer: Mapping) -> dict:
    """Deep merge of plain mappings; a ``loss`` that a layer states replaces the base's (as in clipforge train)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in layer.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "loss" else v
    return out


def _train_config(shared: Mapping, arm: Mapping, where: str):
    """The TrainConfig of a training arm: shared fields <- the arm's fields (a stated ``loss`` replaces the shared
    one)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from clipforge.losses import available
    from clipforge.train import TrainConfig

    try:
        merged = OmegaConf.structured(TrainConfig)
        for layer in (shared, arm):
            layer = dict(layer)
            if "loss" in layer:
                OmegaConf.update(merged, "loss", layer.pop("loss"), merge=False)
            merged = OmegaConf.merge(merged, OmegaConf.create(layer))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise RecipeError(f"{where}: invalid training config: {key + ': ' if key else ''}{str(e).splitlines()[0]} "
                          f"(fields of clipforge.train.TrainConfig: "
                          f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))})") from None
    names = set(available())
    unknown = [k for k in cfg.loss if k not in names]
    if unknown:
        raise RecipeError(f"{where}: unknown loss term(s) {', '.join(unknown)}; registered terms: "
                          f"{', '.join(sorted(names))}")
    return cfg


@dataclasses.dataclass
class Arm:
    name: str
    label: str
    spec: dict  # the recipe's arm entry merged with the shared training fields (what the fingerprint hashes)
    function: Callable | None = None
    params: dict = dataclasses.field(default_factory=dict)
    prepared: tuple[str, ...] = ()  # the prepare entries it names ("prepared:NAME")

    @property
    def is_training(self) -> bool:
        return self.function is None

    @property
    def takes_precision(self) -> bool:
        """Whether ``--precision`` reaches this arm: a training arm, or a function arm whose function trains a model
        and takes its precision as a ``precision`` keyword (e.g. the adapter recipes' shared base model)."""
        if self.function is None:
            return True
        try:
            return "precision" in inspect.signature(self.function).parameters
        except (TypeError, ValueError):
            return False


@dataclasses.dataclass
class Metric:
    name: str
    label: str
    direction: str
    margin: float = 0.0


@dataclasses.dataclass
class Prepare:
    name: str
    function: Callable
    params: dict
    spec: dict  # {"function": ref, "params": params}: what the fingerprint and the directory name hash

    def directory(self, out: Path, recipe: str) -> Path:
        digest = hashlib.sha256(json.dumps(self.spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return out / "prepared" / recipe / f"{self.name}-{digest}"


@dataclasses.dataclass
class Recipe:
    name: str
    title: str
    claim: str
    paper: str
    paper_budget: str
    machine_budget: str
    steps: int
    batch: int
    train: dict
    measures: list[str]
    baseline: str
    arms: dict[str, Arm]
    metrics: dict[str, Metric]
    notes: str = ""
    prepare: dict[str, Prepare] = dataclasses.field(default_factory=dict)
    shares_artifacts: bool = False  # its runs of one budget are one unit (see ``unit_key``)
    raw: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # the mapping it was parsed from

    def arm_precision(self, arm: str) -> str | None:
        """The precision an arm's recipe trains it in: a training arm's own field or TrainConfig's default; a
        function arm's ``precision`` param or its function's default for it; None for a function arm that takes
        no precision (it chooses its own numerics)."""
        a = self.arms[arm]
        if a.is_training:
            from clipforge.train import TrainConfig

            return a.spec["train"].get("precision", TrainConfig.precision)
        if not a.takes_precision:
            return None
        default = inspect.signature(a.function).parameters["precision"].default
        return a.params.get("precision", None if default is inspect.Parameter.empty else default)

    def precision_override(self, arm: str, precision: str | None) -> str | None:
        """The precision a ``--precision`` run trains this arm in, when it differs from the arm's own (None: the
        arm trains as its recipe says; a function arm that takes no ``precision`` is never overridden)."""
        if precision is None or not self.arms[arm].takes_precision:
            return None
        return None if precision == self.arm_precision(arm) else precision

    def fingerprint(self, arm: str, steps: int, batch: int, eval_size: int, precision: str | None = None) -> str:
        """What makes two runs of an arm the same experiment (the seed aside); the prepare entries it names are
        part of it (arms that name none keep the fingerprint they had before prepare existed), and so is a
        ``--precision`` that differs from the arm's own (runs without one keep their fingerprint)."""
        what = {"arm": self.arms[arm].spec, "measures": self.measures, "steps": steps, "batch": batch,
                "eval_size": eval_size}
        if self.arms[arm].prepared:
            what["prepared"] = {n: self.prepare[n].spec for n in self.arms[arm].prepared}
        override = self.precision_override(arm, precision)
        if override is not None:
            what["precision"] = override
        blob = json.dumps(what, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def measure_fns(self) -> list[tuple[Callable, tuple[str, ...]]]:
        out = []
        for m in self.measures:
            if m in MEASURES:
                out.append((MEASURES[m].fn, MEASURES[m].metrics))
            else:
                fn = _plugin(m, f"recipe '{self.name}': measure")
                out.append((fn, fn.metrics))
        return out


def parse_recipe(name: str, raw: Mapping) -> Recipe:
    """Validate a recipe mapping (from YAML); every unknown name fails here, before any training."""
    where = f"recipe '{name}'"
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: a recipe is a mapping with keys {', '.join(sorted(RECIPE_KEYS))}")
    _check_keys(raw, RECIPE_KEYS, where)
    missing = [k for k in ("claim", "paper", "paper_budget", "machine_budget", "steps", "batch", "baseline", "arms",
                           "metrics") if k not in raw]
    if missing:
        raise RecipeError(f"{where}: missing key(s) {', '.join(missing)}")
    for key in ("steps", "batch"):
        if not isinstance(raw[key], int) or raw[key] < 1:
            raise RecipeError(f"{where}: {key} must be a positive integer, got {raw[key]!r}")
    measures = list(raw.get("measures") or [])
    for m in measures:
        if m not in MEASURES and ":" not in str(m):
            raise RecipeError(f"{where}: unknown measure '{m}'; built-in measures: {', '.join(MEASURES)}, "
                              f"or 'module:function' of a benchmark module")
    shared = dict(raw.get("train") or {})
    prepare: dict[str, Prepare] = {}
    if not isinstance(raw.get("prepare") or {}, Mapping):
        raise RecipeError(f"{where}: prepare is a mapping NAME: {{function: 'module:function', params: {{...}}}}")
    for pname, spec in (raw.get("prepare") or {}).items():
        pw = f"{where}, prepare '{pname}'"
        if not isinstance(spec, Mapping) or "function" not in spec:
            raise RecipeError(f"{pw}: an entry is a mapping with keys {', '.join(sorted(PREPARE_KEYS))} "
                              f"(function required)")
        _check_keys(spec, PREPARE_KEYS, pw)
        params = dict(spec.get("params") or {})
        prepare[pname] = Prepare(pname, _plugin(str(spec["function"]), pw, "prepares"), params,
                                 {"function": spec["function"], "params": params})
    if not isinstance(raw.get("shares_artifacts", False), bool):
        raise RecipeError(f"{where}: shares_artifacts is true or false (true: its arms reuse what another arm or "
                          f"seed made, e.g. one base model per seed), got {raw['shares_artifacts']!r}")
    if not isinstance(raw["arms"], Mapping) or len(raw["arms"]) < 2:
        raise RecipeError(f"{where}: arms needs at least two named arms (a baseline and a method)")
    arms: dict[str, Arm] = {}
    for arm_name, spec in raw["arms"].items():
        aw = f"{where}, arm '{arm_name}'"
        if not isinstance(spec, Mapping):
            raise RecipeError(f"{aw}: an arm is a mapping with keys {', '.join(sorted(ARM_KEYS))}")
        _check_keys(spec, ARM_KEYS, aw)
        if ("function" in spec) == ("train" in spec):
            raise RecipeError(f"{aw}: give exactly one of 'train' (TrainConfig fields, e.g. loss) or 'function' "
                              f"('module:function' of a benchmark module)")
        refs = _prepared_refs(dict(spec))
        unknown = sorted(refs - set(prepare))
        if unknown:
            raise RecipeError(f"{aw}: {', '.join(PREPARED + u for u in unknown)} names no prepare entry; "
                              f"prepare entries: {', '.join(prepare) or '(none: add a prepare section)'}")
        if "train" in spec:
            fields = _merge(shared, dict(spec["train"]))
            _train_config({}, fields, aw)
            arms[arm_name] = Arm(arm_name, spec.get("label", arm_name), {"train": fields}, prepared=tuple(sorted(refs)))
        else:
            fn = _plugin(str(spec["function"]), aw)
            params = dict(spec.get("params") or {})
            arms[arm_name] = Arm(arm_name, spec.get("label", arm_name),
                                 {"function": spec["function"], "params": params}, fn, params, tuple(sorted(refs)))
    if raw["baseline"] not in arms:
        raise RecipeError(f"{where}: baseline '{raw['baseline']}' is not an arm; arms: {', '.join(arms)}")
    if any(a.is_training for a in arms.values()) and not measures:
        raise RecipeError(f"{where}: training arms need measures; built-in measures: {', '.join(MEASURES)}")
    recipe = Recipe(name=name, title=str(raw.get("title", name)), claim=str(raw["claim"]), paper=str(raw["paper"]),
                    paper_budget=str(raw["paper_budget"]), machine_budget=str(raw["machine_budget"]),
                    steps=raw["steps"], batch=raw["batch"], train=shared, measures=measures, baseline=raw["baseline"],
                    arms=arms, metrics={}, notes=str(raw.get("notes", "")), prepare=prepare,
                    shares_artifacts=raw.get("shares_artifacts", False), raw=copy.deepcopy(dict(raw)))
    measured = {m for _, names in recipe.measure_fns() for m in names}
    if not isinstance(raw["metrics"], Mapping) or not raw["metrics"]:
        raise RecipeError(f"{where}: metrics needs at least one metric with a direction")
    for metric, spec in raw["metrics"].items():
        mw = f"{where}, metric '{metric}'"
        spec = spec or {}
        _check_keys(spec, METRIC_KEYS, mw)
        for arm in arms.values():
            provided = set(arm.function.metrics) if arm.function else measured
            if metric not in provided:
                raise RecipeError(f"{mw}: unknown metric for arm '{arm.name}'; it provides: "
                                  f"{', '.join(sorted(provided))}")
        direction = spec.get("direction")
        if direction not in DIRECTIONS:
            raise RecipeError(f"{mw}: direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        margin = float(spec.get("margin", 0.0))
        if margin < 0 or (margin and direction not in ("no_decrease", "no_increase")):
            raise RecipeError(f"{mw}: margin (>= 0) applies to no_decrease / no_increase only")
        recipe.metrics[metric] = Metric(metric, str(spec.get("label", metric)), direction, margin)
    return recipe


def recipe_names(directory: Path = RECIPES) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_recipe(name: str, directory: Path = RECIPES) -> Recipe:
    import yaml

    path = directory / f"{name}.yaml"
    if not path.exists():
        raise RecipeError(f"no experiment '{name}'; recipes in {directory}: {', '.join(recipe_names(directory))}")
    return parse_recipe(name, yaml.safe_load(path.read_text()))


# ---------------------------------------------------------------------------------------------- runs


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor or machine name where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def this_machine() -> tuple[str, str]:
    """The CPU model and vector ISA of this machine, as ``environment`` records them for each run (the vector ISA torch
    dispatches to, AVX2, AVX512, ...: the same "AMD EPYC" name covers CPUs whose bf16 GEMMs differ 6x in speed,
    docs/performance.md, so the name alone does not say which machine ran a run)."""
    import torch

    return _cpu_name(), torch.backends.cpu.get_cpu_capability()


def environment(threads: int) -> dict:
    """Where a run ran: host, CPU model, cores, threads, torch, Python, git commit, load average, the malloc
    settings of the environment (``clipforge.allocator``), time."""
    import torch

    from clipforge.allocator import GLIBC_ENV

    cpu, capability = this_machine()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True, check=True)
            return done.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"host": platform.node(), "cpu": cpu, "cpu_capability": capability,
            "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "commit": git("rev-parse", "HEAD"),
            "dirty": bool(status) if status is not None else None, "load_average": list(os.getloadavg()),
            "malloc": {k: os.environ[k] for k in GLIBC_ENV if k in os.environ} or "glibc defaults",
            "started": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def ensure_prepared(recipe: Recipe, name: str, out: Path, log: Callable[[str], None] = print) -> str:
    """The path of the recipe's prepared input ``name``: read from its ``done.json`` when a previous run made it (and
    it still exists), else made now by its function and recorded."""
    from clipforge.locking import exclusive_lock

    prep = recipe.prepare[name]
    where = prep.directory(out, recipe.name)
    path = _made(where)
    if path is not None:
        return path
    # workers of --jobs may need the same input at once: one makes it, the others wait here and then read done.json
    with exclusive_lock(out / "prepared" / ".locks" / f"{recipe.name}-{where.name}", "prepared input",
                        timeout=PREPARE_WAIT_S):
        path = _made(where)
        return path if path is not None else _prepare(recipe, prep, where, log)


def _made(where: Path) -> str | None:
    """The path a finished preparation in ``where`` recorded, if it still exists."""
    done = where / "done.json"
    if done.exists():
        path = json.loads(done.read_text())["path"]
        if Path(path).exists():
            return path
    return None


def _prepare(recipe: Recipe, prep: Prepare, where: Path, log: Callable[[str], None]) -> str:
    name = prep.name
    done = where / "done.json"
    where.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    made = prep.function(out=where, **prep.params)
    if made is None or not Path(made).exists():
        raise RuntimeError(f"recipe '{recipe.name}', prepare '{name}': {prep.spec['function']} returned {made!r}, "
                           "not the path of what it wrote")
    path = str(Path(made).resolve())
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"path": path, "seconds": seconds, "spec": prep.spec}, indent=1, default=str) + "\n")
    log(f"prepared {recipe.name} / {name} in {seconds:.0f} s: {path}")
    return path


def resolve_arm(recipe: Recipe, arm: Arm, out: Path, log: Callable[[str], None] = print) -> Arm:
    """The arm with every ``"prepared:NAME"`` replaced by the path of that prepared input (made first if missing);
    an arm that names none is returned as it is."""
    if not arm.prepared:
        return arm
    paths = {n: ensure_prepared(recipe, n, out, log) for n in arm.prepared}
    return dataclasses.replace(arm, spec=_substitute(arm.spec, paths), params=_substitute(arm.params, paths))


class CodeTrace:
    """The Python functions of clipforge and of benchmarks/ that ran while the trace was on, by source file.

    A run records, for every such file, a hash of the file and a hash of each *unit* of it that ran (a function or
    method, the body of a class, the module's top level), so the report can tell, for every run, whether the code it
    executed has changed since (``--rerun-stale`` reruns such runs); an edit elsewhere in the same file (a refactor
    of a function the run never called, a comment, a docstring) leaves the run current. Why not a code hash in the
    fingerprint: the library imports every loss term and model at start-up, so a hash of what a run *imports*
    changes with any edit anywhere and would invalidate the whole table (about a day of CPU time) after every
    commit; the code a run *executes* is what can change its numbers. ``sys.settrace`` sees only Python calls (no
    per-line or C-call events: the hook returns None for the frame), which costs little next to the tensor work of
    a step. Code run in DataLoader worker processes is not seen; the recipes train with ``data.num_workers: 0``.
    This file (the runner's bookkeeping, recipe parsing and report) is left out, so that improving the report does
    not mark every run stale; the measures it applies are in ``fidelity_measures.py`` and are recorded like any
    library file. Cost: a 20-step ``tiny`` run makes about 0.5 million Python calls, about 0.15 s of hook time
    (under 1%)."""

    def __init__(self) -> None:
        self.codes: dict[str, set[tuple[int, str]]] = {}  # file -> (first line, name) of each code object that ran
        self._roots = tuple(str(r.resolve()) + os.sep for r in CODE_ROOTS)
        self._runner = str(Path(__file__).resolve())  # bookkeeping and report: edits to them change no number
        self._seen: dict[int, Any] = {}  # id -> code object (kept alive, so that an id is never reused)
        self._previous = None

    @property
    def files(self) -> set[str]:
        return set(self.codes)

    def _hook(self, frame, event, arg):
        code = frame.f_code
        if id(code) not in self._seen:
            self._seen[id(code)] = code
            name = code.co_filename
            if name.startswith(self._roots) and name != self._runner:
                self.codes.setdefault(name, set()).add((code.co_firstlineno, code.co_name))
        return None

    def __enter__(self) -> CodeTrace:
        self._previous = sys.gettrace()
        sys.settrace(self._hook)
        threading.settrace(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(self._previous)
        threading.settrace(self._previous)  # type: ignore[arg-type]


def file_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return None


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)
MODULE_UNIT = "<module>"


def _without_docstring(body: list) -> list:
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:]
    return body or [ast.Pass()]


def _shell(node):
    """A copy of a def or class statement with its body emptied: what running the enclosing code evaluates of it
    (name, arguments and their defaults, decorators, bases)."""
    node = copy.copy(node)
    node.body = [ast.Pass()]
    return node


@functools.lru_cache(maxsize=256)  # a report checks every run against the same files: parse each version once
def code_units(source: str) -> tuple[dict[str, str], list[tuple[int, int, bool, str]]]:
    """The units of a module's source and their hashes, and the line span of each.

    Units: every function or method not inside another function (``name``, ``Class.method``; what a nested
    function or lambda does belongs to its enclosing unit), every class (``Class``: its body with each method and
    nested class cut to its signature), and ``<module>`` (the top level, each def and class cut to its signature).
    A hash is of the unit's syntax tree without its docstring, so comments, docstrings, blank lines and moves do
    not count as changes. Spans: (first line, last line, is_function, unit); a decorated def starts at its first
    decorator, as its code object's first line does. Cached by source text: callers must not modify the result."""
    tree = ast.parse(source)
    nodes: dict[str, list[str]] = {}
    spans: list[tuple[int, int, bool, str]] = []

    def visit(body: list, prefix: str) -> None:
        for node in body:
            if not isinstance(node, (*_DEFS, ast.ClassDef)):
                continue
            name = prefix + node.name
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            spans.append((first, node.end_lineno or node.lineno, isinstance(node, _DEFS), name))
            unit = copy.copy(node)
            if isinstance(node, _DEFS):
                unit.body = _without_docstring(node.body)
            else:
                unit.body = [_shell(n) if isinstance(n, (*_DEFS, ast.ClassDef)) else n
                             for n in _without_docstring(node.body)]
                visit(node.body, name + ".")
            nodes.setdefault(name, []).append(ast.dump(unit))  # a getter and its setter share a name: both count

    visit(tree.body, "")
    top = [_shell(n) if isinstance(n, (*_DEFS, ast.ClassDef)) else n for n in _without_docstring(tree.body)]
    nodes[MODULE_UNIT] = [ast.dump(ast.Module(body=top, type_ignores=[]))]
    hashes = {name: hashlib.sha256("\n".join(dumps).encode()).hexdigest()[:12] for name, dumps in nodes.items()}
    return hashes, spans


def executed_units(source: str, codes: set[tuple[int, str]]) -> dict[str, str]:
    """{unit: hash} of the units of ``source`` that the code objects ``codes`` ((first line, name) pairs) belong
    to, with the module's top level and every class enclosing one of them (their code decides what the unit sees:
    constants, class attributes, defaults)."""
    hashes, spans = code_units(source)
    ran = {MODULE_UNIT}
    for line, name in codes:
        inside = [s for s in spans if s[0] <= line <= s[1]] if name != "<module>" else []
        functions = [s for s in inside if s[2]]
        if functions:  # the innermost def: a method rather than its class, a def rather than the module
            unit = min(functions, key=lambda s: s[1] - s[0])[3]
        elif inside:  # a class body runs (or a lambda in a class attribute)
            unit = min(inside, key=lambda s: s[1] - s[0])[3]
        else:
            unit = MODULE_UNIT
        parts = unit.split(".")
        ran.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in hashes)
    return {u: hashes[u] for u in sorted(ran) if u in hashes}


def code_manifest(files: Sequence[str], codes: Mapping[str, set[tuple[int, str]]] | None = None) -> dict[str, Any]:
    """{path relative to the repository: record} of the given files: with ``codes`` (a trace's), {"file": content
    hash, "units": {unit: hash} of the units that ran}; without, the content hash (None for a file that is gone)."""
    out: dict[str, Any] = {}
    for f in sorted(files):
        p = Path(f)
        try:
            rel = p.resolve().relative_to(REPO).as_posix()
        except ValueError:
            rel = str(p)
        if codes is None:
            out[rel] = file_hash(p)
            continue
        try:
            units = executed_units(p.read_text(encoding="utf-8"), codes.get(f, set()))
        except (OSError, SyntaxError, ValueError):
            units = None  # unreadable now: only the file hash can tell
        out[rel] = {"file": file_hash(p), "units": units}
    return out


def manifest_id(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def changed_files(manifest: Mapping[str, Any], repo: Path | None = None) -> list[str]:
    """What of a recorded manifest differs from the tree now: ``file.py::unit`` for each unit that ran and has
    changed or gone (``file.py`` alone when the file has gone or its run recorded no units; manifests of runs made
    before units were recorded hold a file hash, and any edit of such a file counts)."""
    root = repo or REPO
    out = []
    for rel, record in manifest.items():
        now = file_hash(root / rel)
        if not isinstance(record, Mapping):
            if now != record:
                out.append(rel)
            continue
        if now == record.get("file"):
            continue
        try:
            current = code_units((root / rel).read_text(encoding="utf-8"))[0] if now is not None else None
        except (OSError, SyntaxError, ValueError):
            current = None
        if current is None or record.get("units") is None:
            out.append(rel)
            continue
        out.extend(f"{rel}::{u}" for u, h in sorted(record["units"].items()) if current.get(u) != h)
    return out


def train_and_measure(recipe: Recipe, arm: Arm, seed: int, steps: int, batch: int, eval_size: int,
                      precision: str | None = None) -> dict:
    """One run: train the arm (or call its function) and return its metrics plus train_s / eval_s; ``precision``
    (fp32 or bf16) replaces the training precision of the recipe."""
    if not arm.is_training:
        t0 = time.perf_counter()
        params = {**arm.params, **({"precision": precision} if precision is not None else {})}
        metrics = dict(arm.function(seed=seed, steps=steps, batch=batch, eval_size=eval_size, **params))
        metrics.setdefault("total_s", time.perf_counter() - t0)
        return metrics
    from clipforge.train import train

    fields = dict(arm.spec["train"])
    fields.update(steps=steps, batch_size=batch, seed=seed, save_every=0, eval_every=0, progress=False)
    if precision is not None:
        fields["precision"] = precision
    fields.setdefault("warmup_steps", max(1, steps // 10))  # recipes that state no warmup: 10% of the steps
    with tempfile.TemporaryDirectory(prefix="fidelity-") as out:
        cfg = _train_config({}, {**fields, "out_dir": out}, f"recipe '{recipe.name}', arm '{arm.name}'").validate()
        result = train(cfg)
    model = result.model.eval()
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    for fn, _ in recipe.measure_fns():
        metrics.update(fn(model, eval_size))
    return {**metrics, "train_s": result.train_seconds, "eval_s": time.perf_counter() - t0}


def time_steps(recipe: Recipe, arm: Arm, window: int, steps: int, precision: str | None = None) -> dict:
    """Seconds per optimizer step of a training arm at the recipe's batch: one run of ``steps`` steps logging every
    ``window`` steps; the median over the logged windows after the first (which pays the start-up) of batch / samples
    per second, so that a burst of load on a shared machine moves it less. Also the steps that fit in 30 minutes."""
    from clipforge.train import train

    if steps < 3 * window:
        raise ValueError(f"--time-steps WINDOW STEPS needs STEPS >= 3 x WINDOW (two windows after the first), "
                         f"got {window} {steps}")
    fields = {**arm.spec["train"], "steps": steps, "batch_size": recipe.batch, "seed": 0, "save_every": 0,
              "eval_every": 0, "progress": False, "warmup_steps": 1, "log_every": window,
              **({"precision": precision} if precision else {})}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="fidelity-time-") as out:
        cfg = _train_config({}, {**fields, "out_dir": out}, f"recipe '{recipe.name}', arm '{arm.name}'").validate()
        train(cfg)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    loads.append(os.getloadavg()[0])
    sps = [r["samples_per_second"] for r in rows if "samples_per_second" in r][1:]
    per_step = recipe.batch / statistics.median(sps)
    return {"s_per_step": per_step, "steps_in_30_min": int(1800 / per_step), "windows": len(sps),
            "load_average": statistics.fmean(loads)}


def load_results(path: Path) -> dict:
    if not path.exists():
        return {"version": 1, "runs": []}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path} is not a fidelity results file (a JSON object with a 'runs' list); move it away or "
                         f"choose another --out")
    return data


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


DEFAULT_SEEDS = (0, 1, 2)


def plan(recipes: Sequence[Recipe], seeds: Sequence[int] | None, steps: int | None = None,
         batch: int | None = None, arms: Collection[str] | None = None) -> list[tuple[Recipe, str, int, int, int]]:
    """Seed-major order: every arm of every recipe at seed 0, then seed 1, ... (``seeds`` None: DEFAULT_SEEDS;
    ``arms`` None: every arm, else only the recipes' arms of these names)."""
    return [(r, arm, seed, steps or r.steps, batch or r.batch) for seed in (DEFAULT_SEEDS if seeds is None else seeds)
            for r in recipes for arm in r.arms if arms is None or arm in arms]


def stale_entries(recipes: Sequence[Recipe], data: Mapping, planned: Collection[tuple], seeds: Sequence[int] | None,
                  steps: int | None, batch: int | None, eval_size: int, precision: str | None,
                  states: Mapping[int, tuple[str, list[str]]],
                  arms: Collection[str] | None = None) -> tuple[list[tuple], list[tuple[int, str]]]:
    """What ``--rerun-stale`` adds to a plan: the recorded runs of ``recipes`` (of ``arms`` only, unless None) not
    on the current code that the plan lacks because they ran another seed (reached when ``seeds`` is None, i.e. no
    ``--seeds`` was given) or another budget (reached unless ``steps`` / ``batch`` name one), as plan entries in
    seed-major order; and why each stale run that no invocation with these settings can reproduce was left out (its
    recipe changed since it ran, or it ran with another ``--precision`` or ``--eval-size``): one line per recipe,
    budget and reason, with the number of runs it stands for and the flags of the invocation that would rerun
    them (its arms and seeds; the invocation skips those of its runs that are current)."""
    by_name = {r.name: r for r in recipes}
    extra: dict[tuple, tuple] = {}
    groups: dict[tuple, list[dict]] = {}  # (recipe, steps, batch, reason, flag) -> the runs left out for it
    for run_ in data["runs"]:
        recipe = by_name.get(run_["experiment"])
        if recipe is None or states[id(run_)][0] == "current":
            continue
        arm, seed, st, bt = run_["arm"], run_["seed"], run_["steps"], run_["batch"]
        if (seeds is not None and seed not in seeds) or (steps is not None and st != steps) or (
                batch is not None and bt != batch) or (arms is not None and arm not in arms):
            continue
        why: tuple[str, str] | None = None  # (reason, the flag of an invocation that would rerun it)
        override = recipe.precision_override(arm, precision) if arm in recipe.arms else None
        if run_["eval_size"] != eval_size:
            why = (f"evaluated on {run_['eval_size']} samples", f"--eval-size {run_['eval_size']}")
        elif arm not in recipe.arms:
            why = ("the recipe has no such arm any more", "")
        elif run_.get("precision") != override:
            trained = run_.get("precision") or recipe.arm_precision(arm)
            why = (f"trained in {trained}", f"--precision {trained}")
        elif recipe.fingerprint(arm, st, bt, eval_size, override) != run_["fingerprint"]:
            why = ("its recipe changed since it ran", "")
        if why is not None:
            groups.setdefault((recipe.name, st, bt) + why, []).append(run_)
            continue
        entry = (recipe, arm, seed, st, bt)
        key = (recipe.name, arm, seed, st, bt)
        if key not in planned:
            extra.setdefault(key, entry)
    order = {r.name: i for i, r in enumerate(recipes)}
    ranked = sorted(extra.values(), key=lambda e: (e[2], order[e[0].name], list(e[0].arms).index(e[1]), e[3], e[4]))
    left_out = []
    for (name, st, bt, reason, flag), runs_ in groups.items():
        arms_, seeds_ = dict.fromkeys(r["arm"] for r in runs_), dict.fromkeys(r["seed"] for r in runs_)  # in order
        a_, s_ = ", ".join(arms_), " ".join(map(str, seeds_))
        line = (f"{name} / {a_} / seed{'s' if len(seeds_) > 1 else ''} {s_} ({st} steps x {bt}), {len(runs_)} "
                f"run{'s' if len(runs_) > 1 else ''}: {reason}")
        if flag:
            recipe = by_name[name]
            line += (f" ({flag} --seeds {s_}" + (f" --steps {st}" if st != recipe.steps else "") +
                     (f" --batch {bt}" if bt != recipe.batch else "") + f" --arms {' '.join(arms_)})")
        left_out.append((len(runs_), line))
    return ranked, left_out


def run(recipes: Sequence[Recipe], seeds: Sequence[int] | None, out: Path, steps: int | None = None,
        batch: int | None = None, eval_size: int = 500, threads: int = 1, log: Callable[[str], None] = print,
        rerun_stale: bool = False, precision: str | None = None, jobs: int = 1,
        arms: Collection[str] | None = None) -> dict:
    """Run every missing (recipe, arm, seed) and append it to ``out/fidelity.json`` as soon as it ends (of ``arms``
    only, unless None: ``--arms``); with
    ``rerun_stale`` also the recorded runs whose executed code has changed since or was not recorded (the new run
    replaces the old one; with ``seeds`` None, stale runs of every recorded seed, and with ``steps`` / ``batch``
    None, of every recorded budget: see ``stale_entries``); ``seeds`` None plans DEFAULT_SEEDS; ``precision``
    trains every training arm in fp32 or bf16 instead of its recipe's.

    ``jobs`` > 1 runs the runs side by side in that many worker processes of ``threads`` torch threads each, longest
    first (by the recorded runs), instead of one after the other in plan order; each run is the same computation
    as in a sequential runner (a fresh process per worker, the seed set by the training config), and this process
    alone writes ``fidelity.json``. A failed run does not stop the others: they are saved, and the error names it.
    The workers are started with ``spawn``: a script that calls this with ``jobs`` > 1 must guard its entry point
    (``if __name__ == "__main__":``), as for any spawned multiprocessing."""
    import torch

    from clipforge.locking import exclusive_lock

    torch.set_num_threads(threads)
    slow = slow_bf16_arms(recipes, precision)
    if slow:
        log(f"note: {', '.join(slow)} train in bf16, and this CPU has no fast bf16 kernels (AVX2 only: bf16 GEMMs "
            "run several times slower than fp32); --precision fp32 trains them in fp32 instead, as a budget of "
            "its own")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    with exclusive_lock(out, "fidelity results directory"):  # a second runner on the same --out stops here
        if jobs > 1:
            return _run_parallel_locked(recipes, seeds, out, steps, batch, eval_size, threads, jobs, log, rerun_stale,
                                        precision, arms)
        return _run_locked(recipes, seeds, out, steps, batch, eval_size, threads, log, rerun_stale, precision, arms)


def slow_bf16_arms(recipes: Sequence[Recipe], precision: str | None, fast_bf16: bool | None = None) -> list[str]:
    """``recipe/arm`` of the training arms that would train in bf16 on a CPU without fast bf16 kernels."""
    from clipforge.train.device import cpu_has_fast_bf16

    if fast_bf16 is None:
        import torch

        fast_bf16 = torch.cuda.is_available() or cpu_has_fast_bf16()
    if fast_bf16:
        return []
    return [f"{r.name}/{a.name}" for r in recipes for a in r.arms.values() if a.takes_precision and
            (r.precision_override(a.name, precision) or r.arm_precision(a.name)) == "bf16"]


def code_state(run: Mapping, data: Mapping) -> tuple[str, list[str]]:
    """('current' | 'changed' | 'unrecorded', changed files) for one recorded run against the tree now."""
    manifest = data.get("code", {}).get(run.get("env", {}).get("code"))
    if manifest is None:
        return "unrecorded", []
    changed = changed_files(manifest)
    return ("changed" if changed else "current"), changed


# A run's code trace records what its own process executed *during that run*. An arm that reuses what another arm
# made (a base model trained once per seed and kept in memory, a captioner cached on disk, a teacher shared by every
# seed) executes only the reuse, so an edit of the code that made the artifact would leave the reusing run looking
# current. A recipe that ``shares_artifacts`` therefore runs, reruns, is judged and is merged in units: all the runs
# of one (recipe, budget) that one invocation plans are made together in one fresh process whose caches start empty
# (``$CLIPFORGE_BENCH_CACHE`` and the temporary directory point into a new scratch directory), so whatever a run of
# the unit reused, another run of the same unit made, and the unit's traces together cover it. A unit is on the
# current code only when every one of its runs is.


def unit_key(run: Mapping, shared: bool) -> tuple:
    """The unit a recorded run belongs to: for a recipe that ``shares_artifacts``, the runs made by one process
    (the same ``env.unit``), or, for runs recorded before units existed, every run of its budget (experiment, steps,
    batch, eval size, precision); any other run is a unit of its own."""
    if not shared:
        return ("run",) + _key(run)
    unit = run.get("env", {}).get("unit")
    if unit:
        return ("unit", unit)
    return ("budget", run["experiment"], run["steps"], run["batch"], run["eval_size"], run.get("precision"))


def code_states(data: Mapping, shared: Collection[str]) -> dict[int, tuple[str, list[str]]]:
    """``code_state`` of every run (by ``id``), where a run on current code whose unit holds a run that is not
    becomes ('unit', that run's changed files): it may have reused what that run's stale code made. ``shared``:
    the names of the recipes that share artifacts."""
    own = {id(r): code_state(r, data) for r in data["runs"]}
    units: dict[tuple, list[dict]] = {}
    for r in data["runs"]:
        units.setdefault(unit_key(r, r["experiment"] in shared), []).append(r)
    out = {}
    for members in units.values():
        stale = [own[id(r)] for r in members if own[id(r)][0] != "current"]
        for r in members:
            out[id(r)] = own[id(r)] if own[id(r)][0] != "current" or not stale else (
                "unit", sorted({f for _, files in stale for f in files}))
    return out


def stale_summary(data: Mapping, shared: Collection[str],
                  states: Mapping[int, tuple[str, list[str]]] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """What the tree's edits take from the verdicts: ``(runs not on the current code by recipe, changed units by
    the number of runs that ran them)``, a run counting when it ran edited code itself or shares a unit with one
    that did (:func:`code_states`; ``states``: those already computed); runs recorded without a code manifest are
    left out."""
    from collections import Counter

    recipes: Counter[str] = Counter()
    units: Counter[str] = Counter()
    states = code_states(data, shared) if states is None else states
    for r in data["runs"]:
        state, files = states[id(r)]
        if state in ("changed", "unit"):
            recipes[r["experiment"]] += 1
            units.update(files if state == "changed" else [])
    return recipes, units


def of_current_recipe(recipe: Recipe, run: Mapping) -> bool:
    """Whether ``run`` (of ``recipe``) ran the recipe as it is now: its arm still exists and the fingerprint of its
    budget is the one recorded. Runs of a superseded version stay in the results file as history; no verdict
    counts them, and ``--rerun-stale`` plans new runs beside them rather than reruns of them."""
    return run["arm"] in recipe.arms and run["fingerprint"] == recipe.fingerprint(
        run["arm"], run["steps"], run["batch"], run["eval_size"], run.get("precision"))


def stale_lines(data: Mapping, shared: Collection[str], recipes: Mapping[str, Recipe]) -> list[str]:
    """What ``--stale`` prints: the runs not on the current code by recipe (``stale_summary``), how many of them
    ran a superseded version of their recipe (of the ``recipes`` given; runs of other recipes are not classed), and
    the edited units by the runs that ran them."""
    states = code_states(data, shared)
    by_recipe, by_unit = stale_summary(data, shared, states)
    old: dict[str, int] = {}
    for r in data["runs"]:
        recipe = recipes.get(r["experiment"])
        if states[id(r)][0] in ("changed", "unit") and recipe is not None and not of_current_recipe(recipe, r):
            old[r["experiment"]] = old.get(r["experiment"], 0) + 1
    total, superseded = sum(by_recipe.values()), sum(old.values())
    lines = [f"{total} of {len(data['runs'])} recorded runs are not on the current code" + (
        f" ({superseded} of them ran a superseded version of their recipe: no verdict counts those, and "
        "--rerun-stale plans new runs beside them, not reruns)" if superseded else "") + (":" if total else "")]
    for name, n in sorted(by_recipe.items()):
        lines.append(f"  {name:30s} {n:4d}" + (f"  ({old[name]} of a superseded recipe)" if old.get(name) else ""))
    if by_unit:
        lines.append("edited units, by the runs that ran them:")
        for unit, n in sorted(by_unit.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {n:4d}  {unit}")
    return lines


def shipped_recipes(names: Collection[str], directory: Path = RECIPES) -> dict[str, Recipe]:
    """The shipped recipes among ``names``, loaded (a name with no recipe file is left out)."""
    shipped = set(recipe_names(directory))
    return {n: load_recipe(n, directory) for n in sorted(set(names) & shipped)}


def shared_recipes(directory: Path = RECIPES) -> set[str]:
    """The names of the shipped recipes that share artifacts (read from their YAML, without importing their
    modules)."""
    import yaml

    out = set()
    for path in directory.glob("*.yaml"):
        raw = yaml.safe_load(path.read_text()) or {}
        if isinstance(raw, Mapping) and raw.get("shares_artifacts") is True:
            out.add(path.stem)
    return out


@dataclasses.dataclass
class Task:
    """One (recipe, arm, seed) run of a plan, and whether it still has to run."""
    recipe: Recipe
    arm: str
    seed: int
    steps: int
    batch: int
    override: str | None  # a --precision that differs from the arm's own
    fingerprint: str
    run: bool = True  # False: recorded already (on the current code, or stale without --rerun-stale)
    note: str = ""  # why it is skipped or rerun, for the log

    @property
    def key(self) -> tuple:
        return self.recipe.name, self.arm, self.seed, self.fingerprint

    @property
    def label(self) -> str:
        return (f"{self.recipe.name} / {self.arm} / seed {self.seed} ({self.steps} steps x {self.batch}" +
                (f", {self.override})" if self.override else ")"))


def _key(run: Mapping) -> tuple:
    return run["experiment"], run["arm"], run["seed"], run["fingerprint"]


def classify(entry: tuple, data: Mapping, path: Path, eval_size: int, rerun_stale: bool,
             precision: str | None, states: Mapping[int, tuple[str, list[str]]] | None = None) -> Task:
    """The task of one plan entry, marked to run unless ``data`` holds it on the current code (or holds it at all,
    without ``rerun_stale``). ``states``: ``code_states`` of ``data`` (default: each run's own code state)."""
    recipe, arm_name, seed, st, bt = entry
    override = recipe.precision_override(arm_name, precision)
    task = Task(recipe, arm_name, seed, st, bt, override, recipe.fingerprint(arm_name, st, bt, eval_size, override))
    old = [r for r in data["runs"] if _key(r) == task.key]
    if old:
        state, changed = states[id(old[-1])] if states is not None else code_state(old[-1], data)
        state = "of its unit changed" if state == "unit" else state
        if not rerun_stale or state == "current":
            task.run = False
            task.note = f"already in {path}, skipped" + ("" if state == "current" else (
                f" (its code is {state}{': ' + ', '.join(changed[:3]) if changed else ''}; --rerun-stale reruns it)"))
        else:
            task.note = f"rerunning, its code is {state}" + (f" ({', '.join(changed[:3])})" if changed else "")
    return task


def plan_tasks(recipes: Sequence[Recipe], seeds: Sequence[int] | None, data: Mapping, path: Path, steps, batch,
               eval_size: int, rerun_stale: bool, precision: str | None,
               log: Callable[[str], None] | None = None, arms: Collection[str] | None = None) -> list[Task]:
    """Every task of the plan (of ``arms`` only, unless None), classified (see ``classify``), with ``rerun_stale``
    also the stale recorded runs of other seeds and budgets (see ``stale_entries``; ``log`` hears about those it
    cannot rerun, and about planned runs that rerun nothing: new seeds, budgets or arms, such as the recipe's default
    steps at another ``--eval-size`` or the arms never trained at another ``--precision``);
    in a recipe that shares artifacts, the tasks of one budget run together or not at all: if one of them has to
    run, they all do."""
    states = code_states(data, {r.name for r in recipes if r.shares_artifacts})
    entries = plan(recipes, seeds, steps, batch, arms)
    if rerun_stale:
        extra, left_out = stale_entries(recipes, data, {(e[0].name,) + e[1:] for e in entries}, seeds, steps,
                                        batch, eval_size, precision, states, arms)
        entries += extra
        if left_out and log is not None:
            log(f"{sum(n for n, _ in left_out)} stale recorded runs cannot be rerun with these settings:\n" +
                "\n".join(f"  {why}" for _, why in left_out))
    tasks = [classify(e, data, path, eval_size, rerun_stale, precision, states) for e in entries]
    for unit in units_of(tasks):
        why = next((t for t in unit if t.run), None)
        if why is None or len(unit) == 1:
            continue
        for t in unit:
            if not t.run:
                t.run = True
                t.note = (f"rerunning with its unit ({t.recipe.name} shares artifacts between its runs; "
                          f"{why.arm} / seed {why.seed} runs)")
    new = [t for t in tasks if t.run and not t.note]  # no recorded run of this key: nothing stale to redo
    if rerun_stale and new and log is not None:
        budgets = sorted({f"{t.recipe.name} {t.steps} steps x {t.batch}" + (f" {t.override}" if t.override else "")
                          for t in new})
        log(f"note: {len(new)} planned run(s) are new, not reruns ({'; '.join(budgets)}; evaluation size "
            f"{eval_size}); to rerun only what is stale, name its budget with --steps (and --seeds) and its arms "
            "with --arms")
    return tasks


def units_of(tasks: Sequence[Task]) -> list[list[Task]]:
    """The tasks grouped into the units that run in one process, in plan order: all the tasks of one budget of a
    recipe that shares artifacts, one task of any other."""
    units: dict[tuple, list[Task]] = {}
    for t in tasks:
        key = (t.recipe.name, t.steps, t.batch, t.override) if t.recipe.shares_artifacts else (id(t),)
        units.setdefault(key, []).append(t)
    return list(units.values())


def measure_task(task: Task, out: Path, eval_size: int, threads: int, log: Callable[[str], None] = print,
                 tag: str | None = None) -> tuple[dict, dict]:
    """Run one task under the code trace: (its record for fidelity.json, the manifest of the code it executed)."""
    recipe = task.recipe
    arm = resolve_arm(recipe, recipe.arms[task.arm], out, log)  # prepared inputs made (once) before the trace
    env = environment(threads)
    t0 = time.perf_counter()
    with CodeTrace() as trace:
        metrics = train_and_measure(recipe, arm, task.seed, task.steps, task.batch, eval_size, task.override)
    manifest = code_manifest(sorted(trace.files), trace.codes)
    env["code"] = manifest_id(manifest)
    bad = [m for m in recipe.metrics if not isinstance(metrics.get(m), (int, float))]
    if bad:
        raise RuntimeError(f"{tag or task.label}: the arm returned no number for {', '.join(bad)} (got {metrics}); "
                           f"its measure or function must return every metric it declares")
    env["load_average_end"] = list(os.getloadavg())
    record = {"experiment": recipe.name, "arm": task.arm, "seed": task.seed, "steps": task.steps,
              "batch": task.batch, "eval_size": eval_size, "fingerprint": task.fingerprint,
              "seconds": time.perf_counter() - t0, "metrics": {k: float(v) for k, v in metrics.items()}, "env": env}
    if task.override:  # trained in another precision than its recipe's: its own budget group in the report
        record["precision"] = task.override
    if arm.prepared:  # where its prepared inputs were (their entries are in the fingerprint)
        record["prepared"] = {n: ensure_prepared(recipe, n, out, log) for n in arm.prepared}
    return record, manifest


def replace_unit(data: dict, records: Sequence[dict], shared: bool) -> list[dict]:
    """Put the runs of one unit into ``data`` in place of the runs with the same keys; in a recipe that shares
    artifacts, the other runs of the units they replace go too (they may have reused what a replaced run made).
    Returns those other runs."""
    keys = {_key(r) for r in records}
    hit = {unit_key(r, shared) for r in data["runs"] if _key(r) in keys} if shared else set()
    dropped = [r for r in data["runs"] if _key(r) not in keys and unit_key(r, shared) in hit]
    data["runs"] = [r for r in data["runs"] if _key(r) not in keys and unit_key(r, shared) not in hit]
    data["runs"].extend(records)
    return dropped


def store_unit(path: Path, data: dict, results: Sequence[tuple[dict, dict]], shared: bool,
               log: Callable[[str], None] = print) -> None:
    """Add the runs of one unit with their code manifests (see ``replace_unit``), and save the file."""
    for record, manifest in results:
        data.setdefault("code", {})[record["env"]["code"]] = manifest
    dropped = replace_unit(data, [record for record, _ in results], shared)
    if dropped:
        log(f"removed {len(dropped)} run(s) of the replaced unit that this plan did not rerun (" +
            ", ".join(f"{r['arm']} / seed {r['seed']}" for r in dropped[:6]) + (", ..." if len(dropped) > 6 else "") +
            "): they may have reused what a replaced run made; run their seeds again to restore them")
    save_results(path, data)


def _summary(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def _skipped_log(tasks: Sequence[Task], path: Path, log: Callable[[str], None]) -> None:
    skipped = [t for t in tasks if not t.run]
    if skipped:
        stale = sum("--rerun-stale" in t.note for t in skipped)
        log(f"{len(skipped)} runs already in {path}, skipped" +
            (f" ({stale} of them on code changed since; --rerun-stale reruns those)" if stale else ""))


def _run_locked(recipes, seeds, out: Path, steps, batch, eval_size: int, threads: int, log,
                rerun_stale: bool = False, precision: str | None = None, arms: Collection[str] | None = None) -> dict:
    path = out / "fidelity.json"
    data = load_results(path)
    tasks = plan_tasks(recipes, seeds, data, path, steps, batch, eval_size, rerun_stale, precision, log, arms)
    index = {id(t): i for i, t in enumerate(tasks, 1)}
    for t in tasks:
        if t.note and not t.run:
            log(f"[{index[id(t)]}/{len(tasks)}] {t.label}: {t.note}")
    for unit in units_of([t for t in tasks if t.run]):
        for t in unit:
            if t.note:
                log(f"[{index[id(t)]}/{len(tasks)}] {t.label}: {t.note}")
        if not unit[0].recipe.shares_artifacts:  # in this process, as it always ran
            task = unit[0]
            tag = f"[{index[id(task)]}/{len(tasks)}] {task.label}"
            record, manifest = measure_task(task, out, eval_size, threads, log, tag)
            store_unit(path, data, [(record, manifest)], False, log)
            log(f"{tag}: {record['seconds']:.0f} s  {_summary(record['metrics'])}")
            continue
        log(f"{unit[0].recipe.name}: {len(unit)} runs as one unit in a fresh process (the recipe shares artifacts "
            "between its runs)")
        scratch = tempfile.mkdtemp(prefix="fidelity-unit-")
        try:
            with _stoppable_pool(1) as pool:
                results = pool.submit(*_unit_call(unit, out, eval_size, threads, scratch)).result()
        finally:  # the worker removes it too, unless it was killed
            shutil.rmtree(scratch, ignore_errors=True)
        store_unit(path, data, results, True, log)
        for t, (record, _) in zip(unit, results):
            log(f"[{index[id(t)]}/{len(tasks)}] {t.label}: {record['seconds']:.0f} s  {_summary(record['metrics'])}")
    return data


def _pool(workers: int):
    """Spawned worker processes, each used for one unit only (``max_tasks_per_child``, Python 3.11+): nothing a unit
    leaves in memory reaches the next one."""
    import concurrent.futures
    import multiprocessing

    if sys.version_info < (3, 11):
        raise RuntimeError("running fidelity units in worker processes (--jobs, or a recipe that shares artifacts) "
                           "needs Python 3.11 or later (ProcessPoolExecutor's max_tasks_per_child)")
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                  max_tasks_per_child=1)


@contextlib.contextmanager
def _stoppable_pool(workers: int):
    """``_pool(workers)`` whose workers stop with the runner: a ``kill`` (SIGTERM) of this process or Ctrl-C, or any
    exception out of the ``with`` block, terminates the runs in flight instead of waiting for them (their results
    would be lost anyway). Without this, SIGTERM's default action leaves the workers running on, orphaned, and
    the interpreter's exit after an exception waits for every run in flight to end (``shutdown()`` forgets them).
    On a clean exit the pool is shut down normally."""
    # a `kill` becomes SystemExit, so that the except clause below runs (only the main thread may set handlers)
    on_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _exit_on_signal) if on_main else None
    pool = _pool(workers)
    try:
        yield pool
    except BaseException:
        # ProcessPoolExecutor has no public way to stop running calls before Python 3.14's terminate_workers()
        workers_now = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers_now:
            proc.terminate()
        for proc in workers_now:
            proc.join(timeout=10)
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    pool.shutdown()


def _unit_call(unit: Sequence[Task], out: Path, eval_size: int, threads: int, scratch: str) -> tuple:
    """The function and arguments that run one unit in a worker (see ``run_unit_in_worker``), its caches in the new
    empty directory ``scratch``."""
    # the workers import this file under its own name: as __main__ or as a test's alias it could not be unpickled
    module = importlib.import_module(Path(__file__).stem)
    recipe = unit[0].recipe
    return (module.run_unit_in_worker, recipe.name, recipe.raw,
            [(t.arm, t.seed, t.steps, t.batch, t.override) for t in unit], str(out), eval_size, threads,
            uuid.uuid4().hex if recipe.shares_artifacts else None, scratch)


def run_unit_in_worker(name: str, raw: Mapping, entries: Sequence[tuple], out: str, eval_size: int, threads: int,
                       unit: str | None, scratch: str) -> list[tuple[dict, dict]]:
    """``measure_task`` for each (arm, seed, steps, batch, override) of one unit, in a fresh worker process whose
    caches start empty: ``$CLIPFORGE_BENCH_CACHE``, ``$TMPDIR`` and ``tempfile``'s directory point into the new
    directory ``scratch`` (removed at the end, here and by the parent), set before the recipe's modules are imported
    here. The recipe is
    parsed again from its mapping (a parsed recipe holds functions of modules the parent may have loaded under
    another name). ``unit``: the id recorded in every run's ``env.unit`` (recipes that share artifacts)."""
    import torch

    os.environ["TMPDIR"] = scratch
    os.environ["CLIPFORGE_BENCH_CACHE"] = os.path.join(scratch, "bench-cache")
    tempfile.tempdir = scratch
    try:
        torch.set_num_threads(threads)
        recipe = parse_recipe(name, raw)
        results = []
        for arm, seed, steps, batch, override in entries:
            task = Task(recipe, arm, seed, steps, batch, override,
                        recipe.fingerprint(arm, steps, batch, eval_size, override))
            record, manifest = measure_task(task, Path(out), eval_size, threads, lambda m: print(m, flush=True))
            if unit is not None:
                record["env"]["unit"] = unit
            results.append((record, manifest))
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def longest_first(seconds: Sequence[float], workers: int) -> float:
    """Wall-clock of jobs of these lengths on ``workers`` processes that each take the longest job left when they
    become free (what ``--jobs`` does); within 4/3 of the best schedule (Graham's bound)."""
    loads = [0.0] * max(1, workers)
    for s in sorted(seconds, reverse=True):
        i = loads.index(min(loads))
        loads[i] += s
    return max(loads)


def task_seconds(task: Task, runs: Sequence[dict], cache: dict | None = None) -> float | None:
    """The projected seconds of one task from the recorded runs of its arm (see ``arm_seconds``), scaled to its
    steps; None when its arm has no such run."""
    cache = {} if cache is None else cache
    key = (task.recipe.name, task.override)
    if key not in cache:
        cache[key] = arm_seconds(task.recipe, runs, task.override)
    s = cache[key].get(task.arm)
    return None if s is None else s * task.steps / task.recipe.steps


def unit_seconds(units: Sequence[Sequence[Task]], runs: Sequence[dict]) -> list[float | None]:
    """The projected seconds of each unit (see ``units_of``): the sum of its tasks' ``task_seconds``; None where a
    task's arm has no recorded run to project from."""
    cache: dict = {}
    out: list[float | None] = []
    for unit in units:
        secs = [task_seconds(t, runs, cache) for t in unit]
        out.append(None if any(s is None for s in secs) else sum(secs))
    return out


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def _run_parallel_locked(recipes, seeds, out: Path, steps, batch, eval_size: int, threads: int, jobs: int, log,
                         rerun_stale: bool = False, precision: str | None = None,
                         arms: Collection[str] | None = None) -> dict:
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    path = out / "fidelity.json"
    data = load_results(path)
    tasks = plan_tasks(recipes, seeds, data, path, steps, batch, eval_size, rerun_stale, precision, log, arms)
    _skipped_log(tasks, path, log)
    units = units_of([t for t in tasks if t.run])
    if not units:
        return data
    est = dict(zip(map(id, units), unit_seconds(units, data["runs"])))
    known = [s for s in est.values() if s is not None]
    # longest first, so that no long unit starts last; units never measured (no estimate) go first of all
    order = sorted(units, key=lambda u: -(est[id(u)] if est[id(u)] is not None else math.inf))
    workers = min(jobs, len(order))
    n_runs = sum(len(u) for u in order)
    shared = [u for u in order if len(u) > 1]
    log(f"{n_runs} runs on {workers} worker processes ({threads} torch thread(s) each)" +
        (f", {len(shared)} unit(s) of several runs made in one process each" if shared else "") +
        (f"; projected from the recorded runs: {sum(known) / 3600:.1f} h of CPU, about "
         f"{longest_first(known, workers) / 3600:.1f} h of wall-clock" if known else
         "; no recorded run of these arms to project the time from") +
        (f" ({len(order) - len(known)} units without an estimate, started first)" if 0 < len(known) < len(order)
         else ""))
    failed: list[tuple[list[Task], BaseException]] = []
    left = sum(known)
    done_runs = 0
    scratch = {id(u): tempfile.mkdtemp(prefix="fidelity-unit-") for u in order}
    try:
        with _stoppable_pool(workers) as pool:
            futures = {pool.submit(*_unit_call(u, out, eval_size, threads, scratch[id(u)])): u for u in order}
            for fut in concurrent.futures.as_completed(futures):
                u = futures[fut]
                shutil.rmtree(scratch[id(u)], ignore_errors=True)
                done_runs += len(u)
                left -= est[id(u)] or 0.0
                what = u[0].label if len(u) == 1 else f"{u[0].recipe.name}: unit of {len(u)} runs"
                tag = f"[{done_runs}/{n_runs}] {what}"
                try:
                    results = fut.result()
                except BrokenProcessPool as e:
                    raise RuntimeError(f"{tag}: a worker process died ({e}); was it killed for memory? The finished "
                                       f"runs are in {path}; rerun the same command with fewer --jobs") from e
                except Exception as e:  # one failed unit: the others go on, and are saved
                    failed.append((u, e))
                    log(f"{tag}: FAILED: {type(e).__name__}: {e}")
                    continue
                store_unit(path, data, results, u[0].recipe.shares_artifacts, log)
                for t, (record, _) in zip(u, results):
                    log(f"{tag}{'' if len(u) == 1 else ': ' + t.label}: {record['seconds']:.0f} s  "
                        f"{_summary(record['metrics'])}" +
                        (f"  (about {max(left, 0.0) / workers / 60:.0f} min left)" if known else ""))
    finally:  # each worker removes its own too, unless it was killed
        for where in scratch.values():
            shutil.rmtree(where, ignore_errors=True)
    if failed:
        labels = [(u[0].label if len(u) == 1 else f"{u[0].recipe.name} (unit of {len(u)} runs)", e) for u, e in failed]
        kind = "units" if shared else "runs"
        raise RuntimeError(f"{len(failed)} of {len(order)} {kind} failed: " +
                           "; ".join(f"{lab}: {type(e).__name__}: {e}" for lab, e in labels[:5]) +
                           ("; ..." if len(failed) > 5 else "") +
                           f". The other runs are saved in {path}; the same command reruns only the failed ones")
    return data


def merge_results(out: Path, files: Sequence[Path], shared: Collection[str] | None = None) -> dict:
    """Add the runs of other results files (made on other machines or in other sessions, with their own
    ``--out``) to ``out/fidelity.json``. A run is identified by (experiment, arm, seed, fingerprint); one
    already present is kept, not duplicated, unless the present one ran code that has changed since (or was not
    recorded) and the incoming one ran the code as it is now: then the incoming run replaces it (a
    ``--rerun-stale`` made elsewhere). Runs of a recipe that shares artifacts come in by units (see ``unit_key``):
    an incoming unit is added whole, replaces the present units it overlaps when any of them is not on the current
    code and it is (their other runs go too, current ones included), or is skipped whole. ``shared``: the recipes
    that share artifacts (default: the shipped ones). Returns the counts added, replaced, skipped and dropped
    (present runs of a replaced unit that the incoming one lacks) per file."""
    from clipforge.locking import exclusive_lock

    shared = shared_recipes() if shared is None else set(shared)
    counts = {}
    with exclusive_lock(out, "fidelity results directory"):
        path = out / "fidelity.json"
        data = load_results(path)
        for f in files:
            if not Path(f).exists():
                raise FileNotFoundError(f"--merge: {f} does not exist")
            added = replaced = skipped = dropped = 0
            other = load_results(Path(f))
            for cid, manifest in other.get("code", {}).items():  # the code manifests its runs refer to
                data.setdefault("code", {}).setdefault(cid, manifest)
            incoming: dict[tuple, list[dict]] = {}
            for r in other["runs"]:
                incoming.setdefault(unit_key(r, r["experiment"] in shared), []).append(r)
            states = code_states(data, shared)  # of the present runs (the keys of one file's units do not overlap)
            for members in incoming.values():
                is_shared = members[0]["experiment"] in shared
                keys = {_key(r) for r in members}
                present = [r for r in data["runs"] if _key(r) in keys]
                if not present:
                    data["runs"].extend(members)
                    added += len(members)
                    continue
                hit = {unit_key(r, is_shared) for r in present}
                # one stale run among the units it overlaps is enough: an incoming unit on the current code then
                # replaces them all, current ones included (their runs are current in the incoming unit too)
                present_stale = any(states[id(r)][0] != "current" for r in data["runs"]
                                    if id(r) in states and unit_key(r, is_shared) in hit)
                if present_stale and all(code_state(r, data)[0] == "current" for r in members):
                    gone = replace_unit(data, members, is_shared)
                    replaced += len(present)
                    added += len(members) - len(present)
                    dropped += len(gone)
                else:
                    skipped += len(members)
            counts[str(f)] = {"added": added, "replaced": replaced, "skipped": skipped, "dropped": dropped}
        save_results(path, data)
    return counts


# ---------------------------------------------------------------------------------------------- analysis


def analyse(recipe: Recipe, runs: Sequence[dict]) -> list[dict]:
    """One group per budget (steps, batch, eval size, precision override) at which this recipe's current arms have
    runs."""
    groups: dict[tuple[int, int, int, str | None], dict[str, dict[int, dict]]] = {}
    for r in runs:
        if r["experiment"] != recipe.name or not of_current_recipe(recipe, r):
            continue  # a run of an older version of the recipe
        key = (r["steps"], r["batch"], r["eval_size"], r.get("precision"))
        groups.setdefault(key, {}).setdefault(r["arm"], {})[r["seed"]] = r
    absorbed = set()  # plain groups whose every arm also sits in an override's group: shown there only
    for (steps, batch, eval_size, precision), by_arm in groups.items():
        if precision is None:
            continue
        # arms that --precision leaves alone (function arms; arms already in that precision) ran the same
        # experiment without an override: their runs at this budget belong to the override's group too
        plain = groups.get((steps, batch, eval_size, None), {})
        for name, seeds in plain.items():
            if recipe.precision_override(name, precision) is None:
                by_arm.setdefault(name, dict(seeds))
        if plain and all(recipe.precision_override(name, precision) is None for name in plain):
            absorbed.add((steps, batch, eval_size, None))
    groups = {k: v for k, v in groups.items() if k not in absorbed}
    out = []
    # first the group with the most seeds of the baseline, then of its least-run arm (an arm without runs counts
    # as none, so a group that has every arm comes before one that lacks some), then the recipe's own precision,
    # then the most steps: the first is the group the summary judges
    most_seeds_first = sorted(groups.items(), key=lambda kv: (-len(kv[1].get(recipe.baseline, {})),
                                                               -min(len(kv[1].get(a, {})) for a in recipe.arms),
                                                               kv[0][3] is not None, -kv[0][0]))
    for (steps, batch, eval_size, precision), by_arm in most_seeds_first:
        arms = {}
        for name in recipe.arms:
            seeds = by_arm.get(name, {})
            stats = {}
            for metric in recipe.metrics:
                vals = [seeds[s]["metrics"][metric] for s in sorted(seeds)]
                stats[metric] = {"mean": statistics.fmean(vals) if vals else None,
                                 "sd": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}
            arms[name] = {"seeds": sorted(seeds), "stats": stats}
        base = by_arm.get(recipe.baseline, {})
        comparisons = {}
        for name in recipe.arms:
            if name == recipe.baseline:
                continue
            mine = by_arm.get(name, {})
            paired = sorted(set(mine) & set(base))
            per_metric = {}
            for metric, spec in recipe.metrics.items():
                iv = paired_interval([mine[s]["metrics"][metric] for s in paired],
                                     [base[s]["metrics"][metric] for s in paired])
                per_metric[metric] = {**iv, "verdict": verdict(iv, spec.direction, spec.margin)}
            comparisons[name] = {"seeds": paired, "metrics": per_metric,
                                 "overall": overall([m["verdict"] for m in per_metric.values()])}
        out.append({"steps": steps, "batch": batch, "eval_size": eval_size, "precision": precision, "arms": arms,
                    "comparisons": comparisons,
                    "runs": [r for a in by_arm.values() for r in a.values()]})
    return out


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _direction_text(m: Metric) -> str:
    return {"increase": "higher", "decrease": "lower", "no_decrease": f"not lower (margin {m.margin:g})",
            "no_increase": f"not higher (margin {m.margin:g})", "none": "not judged"}[m.direction]


def _overloaded(run: Mapping) -> bool:
    """Whether a run ran on a machine with more than twice as many runnable processes as cores, at its start or end
    (a shared machine: its seconds say more about the neighbours than about the run)."""
    env = run.get("env") or {}
    loads = [env[k][0] for k in ("load_average", "load_average_end") if env.get(k)]
    return bool(loads) and max(loads) > 2 * (env.get("cores") or 1)


def arm_seconds(recipe: Recipe, runs: Sequence[dict], precision: str | None = None,
                machine: tuple[str, str] | None = None) -> dict[str, float]:
    """Projected seconds of one run of each arm at the recipe's default budget: the median over its recorded runs at
    its batch, of the budget's own steps or of at least ESTIMATE_MIN_STEPS (a shorter run, scaled, would project its
    start-up), the training seconds scaled to the budget's steps (the evaluation seconds added as measured). Of an
    arm's runs, only the most telling are used: those at the budget itself where it has any (a function arm's time
    need not scale with its steps: it may reuse a base model that an earlier run trained), then of those the ones
    made on ``machine`` (CPU model and vector ISA, this machine's by default: the same CPU name covers machines
    whose speeds differ several-fold), then the ones not made on an overloaded machine (``_overloaded``). Arms
    without such a run are missing."""
    machine = this_machine() if machine is None else machine
    per_arm: dict[str, list[tuple[tuple[bool, bool, bool], float]]] = {}
    for r in runs:
        if r["experiment"] != recipe.name or r["arm"] not in recipe.arms or r["batch"] != recipe.batch:
            continue
        if r["steps"] < ESTIMATE_MIN_STEPS and r["steps"] != recipe.steps:
            continue  # start-up (data, first steps) would dominate a projection scaled from so few steps
        if r.get("precision") != recipe.precision_override(r["arm"], precision):  # another precision's speed
            continue
        m, scale = r["metrics"], recipe.steps / r["steps"]
        if "train_s" in m:  # training arms: training scales with the steps, evaluation with the evaluation size
            secs = m["train_s"] * scale + m.get("eval_s", 0.0) * 500 / r["eval_size"]
        else:  # function arms: all of it scaled with the steps (an upper bound when evaluation is a large part)
            secs = r["seconds"] * max(scale, 1.0)
        env = r.get("env") or {}
        rank = (r["steps"] == recipe.steps, (env.get("cpu"), env.get("cpu_capability")) == tuple(machine),
                not _overloaded(r))
        per_arm.setdefault(r["arm"], []).append((rank, secs))
    out = {}
    for arm, ranked in per_arm.items():
        best = max(rank for rank, _ in ranked)
        out[arm] = statistics.median(secs for rank, secs in ranked if rank == best)
    return out


def estimate_seconds(recipe: Recipe, per_arm: Mapping[str, float], seeds: int,
                     arms: Collection[str] | None = None) -> float | None:
    """Projected time of ``seeds`` seeds of every arm (of ``arms`` only, unless None) at the recipe's default
    budget, from ``per_arm`` (what ``arm_seconds`` returns: one measured source, so the runs and precision behind it
    are the caller's one choice); None without a measured run of every such arm."""
    wanted = [arm for arm in recipe.arms if arms is None or arm in arms]
    if not set(wanted) <= set(per_arm):
        return None
    return seeds * sum(per_arm[arm] for arm in wanted)


def estimate_caveat(recipe: Recipe) -> str:
    """What ``--estimate`` cannot see of ``recipe``, or "": a recipe whose function arms share artifacts may have
    recorded runs that got them (a base model per seed) from a run of another recipe in the same process, so the
    projection leaves out the time to make them (adapt_prompts: 0.05 h projected for seeds 3-5, though its three
    900-step base models alone take about 25 minutes of one core at clip's 0.56 s per step)."""
    if recipe.shares_artifacts and any(not a.is_training for a in recipe.arms.values()):
        return ("  (function arms sharing artifacts: a base model they train per seed is not counted where the "
                "recorded runs got it from another recipe run in the same process)")
    return ""


def markdown(recipes: Sequence[Recipe], data: dict, source: str = "fidelity.json") -> str:
    """The generated section: per experiment, the claim, the budgets, mean ± sd per arm, the paired differences with
    their 95% intervals and verdicts, and every run in a collapsible block."""
    runs = data["runs"]
    all_states = code_states(data, {r.name for r in recipes if r.shares_artifacts})
    lines = ["## Results (generated)", "",
             f"Generated by `python benchmarks/fidelity.py --report-only` from [`{source}`]({source}) "
             f"({len(runs)} runs recorded; every run's numbers and environment are there). "
             f"A verdict needs at least {MIN_SEEDS} seeds of both arms; "
             "the interval is the 95% t-interval of the paired difference (method minus baseline, same seed).", ""]
    summary = ["| experiment | paper's claim | runs at the default budget | verdict |", "|---|---|---|---|"]
    body: list[str] = []
    missing = []
    for recipe in recipes:
        groups = analyse(recipe, runs)
        default = [g for g in groups if (g["steps"], g["batch"], g["eval_size"]) == (recipe.steps, recipe.batch, 500)]
        if default and default[0]["comparisons"]:
            g = default[0]
            verdicts = "; ".join(f"{recipe.arms[a].label}: **{c['overall']}**" for a, c in g["comparisons"].items())
            n = min(len(a["seeds"]) for a in g["arms"].values())
            states = [all_states[id(r)][0] for r in g["runs"]]
            drift = ", ".join(f"{states.count(k)} on {k} code" for k in ("changed", "unrecorded") if k in states)
            if "unit" in states:
                drift += (", " if drift else "") + f"{states.count('unit')} in a unit with those"
            where = f"; trained in {g['precision']}, not the recipe's precision" if g["precision"] else ""
            summary.append(f"| [{recipe.name}](#{recipe.name}) | {recipe.claim} | {n} seed(s) per arm"
                           f"{f' ({drift})' if drift else ''}{where} | {verdicts} |")
        else:
            summary.append(f"| [{recipe.name}](#{recipe.name}) | {recipe.claim} | none | no 3-seed run yet |")
        if not default or min(len(a["seeds"]) for a in default[0]["arms"].values()) < MIN_SEEDS:
            missing.append(recipe.name)
        body += [f"### {recipe.name}", "", f"**{recipe.title}.** {recipe.paper}. Claim: {recipe.claim}", "",
                 f"- paper's budget: {recipe.paper_budget}",
                 f"- default budget here: {recipe.steps} steps x batch {recipe.batch}; {recipe.machine_budget}",
                 f"- run: `python benchmarks/fidelity.py {recipe.name} --seeds 0 1 2`", ""]
        if recipe.notes:
            body += [recipe.notes.strip(), ""]
        if not groups:
            body += ["No run recorded yet.", ""]
            continue
        for g in groups:
            arms_seen = {a: s for a, s in g["arms"].items() if s["seeds"]}
            body += [f"#### {g['steps']} steps x batch {g['batch']}, {g['eval_size']} evaluation samples per split"
                     + (f", training arms in {g['precision']} (`--precision {g['precision']}`)" if g["precision"]
                        else "")
                     + ("" if (g["steps"], g["batch"], g["eval_size"]) == (recipe.steps, recipe.batch, 500)
                        else " (not the default budget)"), ""]
            body += ["| arm | seeds | " + " | ".join(m.label for m in recipe.metrics.values()) + " |",
                     "|---|---|" + "---:|" * len(recipe.metrics)]
            for a, s in arms_seen.items():
                st = s["stats"]
                cells = [_num(st[m]["mean"]) + (f" ± {_num(st[m]['sd'])}" if st[m]["sd"] is not None else "")
                         for m in recipe.metrics]
                seeds = ", ".join(map(str, s["seeds"]))
                body.append(f"| {recipe.arms[a].label} | {seeds} | " + " | ".join(cells) + " |")
            body += ["", "| method vs baseline | metric | paper predicts | paired seeds | difference (mean ± sd) | "
                         "95% interval | verdict |", "|---|---|---|---:|---:|---|---|"]
            for a, c in g["comparisons"].items():
                for m, r in c["metrics"].items():
                    spec = recipe.metrics[m]
                    iv = f"[{_num(r['low'], True)}, {_num(r['high'], True)}]" if r["low"] is not None else "–"
                    sd = f" ± {_num(r['sd'])}" if r["sd"] is not None else ""
                    body.append(f"| {recipe.arms[a].label} vs {recipe.arms[recipe.baseline].label} | {spec.label} | "
                                f"{_direction_text(spec)} | {r['n']} | {_num(r['mean'], True)}{sd} | {iv} | "
                                f"{r['verdict']} |")
                body.append(f"| {recipe.arms[a].label} | **overall** | | | | | **{c['overall']}** |")
            states = {id(r): all_states[id(r)] for r in g["runs"]}
            changed = sorted({f for st, files in states.values() if st == "changed" for f in files})
            counts = {k: sum(st == k for st, _ in states.values())
                      for k in ("current", "changed", "unrecorded", "unit")}
            body += ["", f"Code: {counts['current']} of {len(g['runs'])} runs executed only code unchanged since; "
                     + (f"{counts['changed']} ran code edited since ({', '.join(changed[:6])}"
                        f"{', ...' if len(changed) > 6 else ''}); " if counts["changed"] else "")
                     + (f"{counts['unrecorded']} were made before runs recorded their files; "
                        if counts["unrecorded"] else "")
                     + (f"{counts['unit']} ran unchanged code but in one unit with those (the recipe shares "
                        "artifacts between its runs, so they may have reused what stale code made); "
                        if counts["unit"] else "")
                     + ("`--rerun-stale` reruns those." if len(g["runs"]) > counts["current"] else
                        "the verdicts judge the code as it is.")]
            keys = sorted({k for r in g["runs"] for k in r["metrics"]})
            body += ["", "<details><summary>every run</summary>", "",
                     "| arm | seed | " + " | ".join(keys) + " | threads | torch | commit | code | load at start | "
                     "started |", "|---|---:|" + "---:|" * len(keys) + "---:|---|---|---|---:|---|"]
            for r in sorted(g["runs"], key=lambda r: (r["seed"], list(recipe.arms).index(r["arm"]))):
                e = r["env"]
                body.append(f"| {recipe.arms[r['arm']].label} | {r['seed']} | "
                            + " | ".join(_num(r["metrics"].get(k)) for k in keys)
                            + f" | {e['threads']} | {e['torch']} | {(e['commit'] or '?')[:10]}"
                            + ("+" if e.get("dirty") else "")
                            + f" | {states[id(r)][0]} | {e['load_average'][0]:.1f} | {e['started']} |")
            body += ["", "</details>", ""]
    if missing:
        lines += [f"**No {MIN_SEEDS}-seed run at the default budget yet:** " + ", ".join(missing) + ". Their verdicts "
                  "below are not available until `python benchmarks/fidelity.py NAME --seeds 0 1 2` has run.", ""]
    return "\n".join(lines + summary + [""] + body).rstrip() + "\n"


def splice(doc: str, section: str, path: str = "the document") -> str:
    """Replace what lies between the generated-section markers of ``doc``."""
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise ValueError(f"{path} needs exactly one pair of markers, in order:\n{BEGIN}\n{END}\n"
                         f"add them where the generated results belong")
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{section}{END}{tail}"


def write_report(recipes: Sequence[Recipe], out: Path, docs: Path | None) -> str:
    data = load_results(out / "fidelity.json")
    section = markdown(recipes, data, "fidelity.json")
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.md").write_text(section)
    if docs is not None:  # the same section, its link to the JSON relative to the document
        link = os.path.relpath((out / "fidelity.json").resolve(), docs.resolve().parent)
        docs.write_text(splice(docs.read_text(), markdown(recipes, data, link), str(docs)))
    return section


def print_plan_estimate(recipes: Sequence[Recipe], a: argparse.Namespace) -> int:
    """``--estimate --rerun-stale``: per recipe, the runs this invocation would run without ``--estimate`` (stale
    reruns and missing runs) and their projected time (``unit_seconds``); the total and, with ``--jobs``, the
    wall-clock of the units scheduled longest first over all recipes, as the runner schedules them."""
    path = a.out / "fidelity.json"
    data = load_results(path)
    tasks = [t for t in plan_tasks(recipes, a.seeds, data, path, a.steps, a.batch, a.eval_size, True, a.precision,
                                   print, a.arms) if t.run]
    units = units_of(tasks)  # a unit is of one recipe
    secs = unit_seconds(units, data["runs"])
    known = [s for s in secs if s is not None]
    for r in recipes:
        mine = [(u, s) for u, s in zip(units, secs) if u[0].recipe is r]
        n = sum(len(u) for u, _ in mine)
        reruns = sum(1 for u, _ in mine for t in u if t.note)
        what = f"{n} runs ({reruns} reruns, {n - reruns} new)" if n else "nothing to run"
        missing = sum(len(u) for u, s in mine if s is None)
        print(f"{r.name:14s} {sum(s for _, s in mine if s is not None) / 3600:6.2f} h  {what}" +
              (f"; {missing} without a recorded run of their arm at this precision and batch, not counted"
               if missing else "") + estimate_caveat(r))
    print(f"{'total':14s} {sum(known) / 3600:6.2f} h (runs with a recorded run of their arm only)")
    if a.jobs > 1:
        print(f"{'--jobs ' + str(a.jobs):14s} {longest_first(known, a.jobs) / 3600:6.2f} h of wall-clock, "
              f"longest first (one unit is {max(known, default=0) / 3600:.2f} h at most)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="experiments (recipe names) or 'all'")
    ap.add_argument("--seeds", type=int, nargs="+",
                    help="seeds to run (default: 0 1 2; with --rerun-stale and no --seeds, the stale runs of every "
                    "recorded seed are rerun too)")
    ap.add_argument("--steps", type=int, help="steps per run (default: each recipe's budget)")
    ap.add_argument("--batch", type=int, help="batch size (default: each recipe's)")
    ap.add_argument("--eval-size", type=int, default=500, help="held-out samples per evaluation split (verdicts in the "
                    "docs use 500; smaller only for smoke runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1: bit-identical reruns)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run this many runs side by side, each in its own worker process with --threads threads "
                    "(e.g. --jobs 16 on 16 cores), longest first (the runs of a recipe that shares artifacts run "
                    "together in one worker); the results are those of a sequential run. With "
                    "--estimate: also the wall-clock on that many workers")
    ap.add_argument("--arms", nargs="+", metavar="ARM",
                    help="run (and --time, --estimate) only these arms of the named experiments (default: every "
                    "arm), e.g. the two arms "
                    "whose fp32 runs are stale: --rerun-stale --precision fp32 --arms clip improved")
    ap.add_argument("--precision", choices=("fp32", "bf16"),
                    help="train every training arm in this precision instead of its recipe's (e.g. fp32 on a CPU "
                    "without fast bf16 kernels, where bf16 is several times slower); such runs are their own "
                    "budget in the report, labelled with the precision")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where fidelity.json and fidelity.md live")
    ap.add_argument("--docs", type=Path, help="also replace the generated section of this markdown file")
    ap.add_argument("--rerun-stale", action="store_true",
                    help="also rerun recorded runs whose executed source files have changed since (or were not "
                    "recorded), of every recorded seed and budget unless --seeds, --steps or --batch narrow it; "
                    "the new run replaces the old one")
    ap.add_argument("--report-only", action="store_true",
                    help="regenerate the markdown from OUT/fidelity.json, train nothing")
    ap.add_argument("--list", action="store_true", help="list the experiments and their default budgets")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="FILE",
                    help="add the runs of these fidelity.json files to OUT/fidelity.json (duplicates skipped), "
                         "then regenerate the report")
    ap.add_argument("--stale", action="store_true",
                    help="the recorded runs (by recipe) that ran code edited since, and the edited units they ran: "
                         "run it before and after an edit of src/ or benchmarks/ to see which verdicts it would "
                         "take off the current code (a changed signature or module constant counts for every run "
                         "that imported the module)")
    ap.add_argument("--estimate", action="store_true",
                    help="print the projected time of the named experiments at their default budgets and the "
                    "given seeds, from the runs in OUT/fidelity.json; with --rerun-stale, of the runs that this "
                    "invocation would run (stale reruns and missing runs, narrowed by --seeds, --steps, --batch, "
                    "--arms, --precision)")
    ap.add_argument("--time", action="store_true",
                    help="measure the seconds per step of every training arm of the named experiments at their batch "
                    "(one short run each, see --time-steps) and the steps that fit in 30 minutes")
    ap.add_argument("--time-steps", type=int, nargs=2, default=[10, 60], metavar=("WINDOW", "STEPS"),
                    help="--time: one run of STEPS steps per arm, timed in windows of WINDOW steps")
    a = ap.parse_args(argv)
    try:
        all_names = recipe_names()
        names = all_names if (not a.names or a.names == ["all"]) else a.names
        if not a.names and not (a.report_only or a.list or a.estimate or a.time or a.merge or a.stale):
            ap.error("name an experiment or 'all' (see --list)")
        if (a.steps is not None and a.steps < 1) or (a.batch is not None and a.batch < 1) or a.eval_size < 1:
            ap.error("--steps, --batch and --eval-size must be positive")
        if a.jobs < 1 or a.threads < 1:
            ap.error("--jobs and --threads must be at least 1")
        if a.seeds is not None and len(set(a.seeds)) != len(a.seeds):
            ap.error(f"--seeds repeats a seed: {a.seeds}")
        recipes = [load_recipe(n) for n in names]
        if a.arms is not None:
            known = sorted({arm for r in recipes for arm in r.arms})
            unknown = [arm for arm in a.arms if arm not in known]
            if unknown:
                ap.error(f"--arms: no arm {', '.join(map(repr, unknown))} in {', '.join(r.name for r in recipes)}; "
                         f"their arms: {', '.join(known)}")
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.list:
        for r in recipes:
            precisions = sorted({r.arm_precision(a.name) for a in r.arms.values() if a.takes_precision})
            print(f"{r.name:14s} {r.steps:5d} steps x {r.batch:3d} {'/'.join(precisions) or '-':9s} arms: "
                  f"{', '.join(r.arms)}  -- {r.claim}")
        return 0
    if a.time:
        import torch

        torch.set_num_threads(a.threads)
        timed: dict[str, dict] = {}  # the same arm in several recipes (clip at batch 128) is timed once
        for r in recipes:
            for arm in r.arms.values():
                if a.arms is not None and arm.name not in a.arms:
                    continue
                if not arm.is_training:
                    print(f"{r.name:14s} {arm.name:14s} function arm, not timed here (see --estimate after a run)")
                    continue
                override = r.precision_override(arm.name, a.precision)
                key = json.dumps([arm.spec, r.batch, override], sort_keys=True, default=str)
                t = timed[key] = timed.get(key) or time_steps(r, resolve_arm(r, arm, a.out), *a.time_steps,
                                                              precision=override)
                print(f"{r.name:14s} {arm.name:14s} batch {r.batch:3d}: {t['s_per_step']:.3f} s/step, "
                      f"{t['steps_in_30_min']} steps in 30 min (median of {t['windows']} windows; {a.threads} threads, "
                      f"load average {t['load_average']:.1f})",
                      flush=True)
        return 0
    if a.stale:
        data = load_results(a.out / "fidelity.json")
        if a.names and a.names != ["all"]:  # else every recorded run, of a shipped recipe or not
            data = {**data, "runs": [r for r in data["runs"] if r["experiment"] in set(a.names)]}
        recipes_now = shipped_recipes({r["experiment"] for r in data["runs"]})
        print("\n".join(stale_lines(data, shared_recipes(), recipes_now)))
        return 0
    if a.estimate and a.rerun_stale:
        return print_plan_estimate(recipes, a)
    if a.estimate:
        runs = load_results(a.out / "fidelity.json")["runs"]
        total, lengths = 0.0, []
        for r in recipes:
            per_arm = {k: v for k, v in arm_seconds(r, runs, a.precision).items() if a.arms is None or k in a.arms}
            s = estimate_seconds(r, per_arm, len(a.seeds or DEFAULT_SEEDS), a.arms)
            print(f"{r.name:14s} " + (f"{s / 3600:6.2f} h" if s is not None else
                                      f"  no run of every arm at batch {r.batch} with {r.steps} or >= "
                                      f"{ESTIMATE_MIN_STEPS} steps") + estimate_caveat(r))
            total += s or 0.0
            if s is not None:  # a recipe that shares artifacts runs as one unit per budget, in one worker
                lengths += [s] if r.shares_artifacts else [v for v in per_arm.values()
                                                            for _ in (a.seeds or DEFAULT_SEEDS)]
        print(f"{'total':14s} {total / 3600:6.2f} h (experiments with a measured run only)")
        if a.jobs > 1:
            print(f"{'--jobs ' + str(a.jobs):14s} {longest_first(lengths, a.jobs) / 3600:6.2f} h of wall-clock, "
                  f"longest run first (one run is {max(lengths, default=0) / 3600:.2f} h at most)")
        return 0
    if a.merge:
        try:
            for f, c in merge_results(a.out, a.merge).items():
                print(f"{f}: {c['added']} runs added, {c['replaced']} replaced runs on changed or unrecorded code, "
                      f"{c['skipped']} already present" + (
                          f", {c['dropped']} runs dropped with the units they belonged to (replaced by incoming "
                          "units that lack them)" if c["dropped"] else ""))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif not a.report_only:
        cores = os.cpu_count() or 1
        if a.jobs * a.threads > cores:
            print(f"note: --jobs {a.jobs} x --threads {a.threads} asks for more threads than the {cores} cores here; "
                  "the runs will slow each other down", file=sys.stderr)
        from clipforge import allocator

        allocator.configure()  # as `clipforge train` runs (freed memory kept for reuse; no number changes); the
        # --jobs workers inherit it through the environment, and environment() records it
        try:
            run(recipes, a.seeds, a.out, a.steps, a.batch, a.eval_size, a.threads, rerun_stale=a.rerun_stale,
                precision=a.precision, jobs=a.jobs, arms=a.arms)
        except RuntimeError as e:
            if a.jobs == 1:
                raise
            print(f"error: {e}", file=sys.stderr)
            return 1
    whole = a.report_only or a.merge
    section = write_report([load_recipe(n) for n in all_names] if whole else recipes, a.out, a.docs)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
