"""CLIP-MoE in miniature on the fidelity runner (recipe ``benchmarks/fidelity/clip_moe.yaml``).

Zhang et al. 2024, "CLIP-MoE: Towards Building Mixture of Experts for CLIP with Diversified Multiplet Upcycling".
The paper's claim: a dense CLIP upcycled into a sparse top-2 mixture of experts whose experts were first fine-tuned
on disjoint clusters of the data (Diversified Multiplet Upcycling, DMU), then trained with its routers, retrieves
and classifies zero-shot better than the dense model it came from, given the same extra training.

Every arm of a seed starts from one dense ``tiny`` CLIP trained ``base_steps`` on ``shapes`` (cached per seed
under ``$CLIPFORGE_BENCH_CACHE``, so the arms differ only in how they spend the extra ``steps``):

- ``dense``: the dense model trained ``steps`` more steps, every parameter, {clip: 1}.
- ``dense_wide``: the same, from the dense model with every FFN widened to twice its hidden width by
  :func:`widen_ffn` (function-preserving: two copies of each hidden unit, the output weights halved). It has the
  *active* FFN parameters of a top-2 MoE token (two expert FFNs of the dense width), which the paper's baseline
  (the dense model) does not; it separates "more active parameters" from "experts and routing".
- ``moe_copies``: sparse upcycling with identical experts (4 experts, top-2), every parameter trained ``steps``
  steps with {clip: 1, moe_balance: 0.01}: upcycling without the multiplet stage.
- ``moe_dmu``: DMU: 3 multiplet stages of ``stage_steps`` FFN-only steps on in-cluster batches (clusters from
  the model's own features), then ``steps`` router-only steps with {clip: 1, moe_balance: 0.01}, as the official
  recipe trains the routers. Its stages are extra FFN steps the other arms do not get (reported as
  ``extra_ffn_steps``).

Metrics: the runner's ``shapes`` measure (zero-shot top-1 on held-out splits, val retrieval R@1), plus the
seconds each arm trained after the base.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # fidelity_measures is a module beside this file
    sys.path.insert(0, str(HERE))

from fidelity_measures import MEASURES  # noqa: E402

from clipforge.models import create_model, load_model, save_model  # noqa: E402
from clipforge.models.clip import CLIP  # noqa: E402
from clipforge.train import DataConfig, TrainConfig, train  # noqa: E402
from clipforge.train.upcycle import MultipletConfig, diversified_multiplet  # noqa: E402

CACHE = Path(os.environ.get("CLIPFORGE_BENCH_CACHE", "/tmp/clipforge-bench-moe"))
METHODS = ("dense", "dense_wide", "moe_copies", "moe_dmu")


def widen_ffn(model: CLIP, factor: int = 2) -> CLIP:
    """A dense copy of ``model`` whose every transformer FFN has ``factor`` times the hidden width and computes the
    same function: hidden unit j of the wide FFN is a copy of unit j mod H of the narrow one (same input weights and
    bias), and each output weight is divided by ``factor``, so the copies' contributions sum to the original's.
    Only plain ``CLIP`` models (the ViT and text transformer towers) are widened."""
    if type(model) is not CLIP:
        raise TypeError(f"widen_ffn widens plain CLIP models, got {type(model).__name__}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    cfg = model.cfg
    wide = create_model(cfg, vision={"mlp_ratio": cfg.vision.mlp_ratio * factor},
                        text={"mlp_ratio": cfg.text.mlp_ratio * factor})
    state = model.state_dict()
    wide_state = wide.state_dict()
    if set(state) != set(wide_state):
        raise ValueError(f"widened model's parameters differ from the model's: {sorted(set(state) ^ set(wide_state))}")
    for name, value in state.items():
        target = wide_state[name]
        if value.shape == target.shape:
            target.copy_(value)
        elif name.endswith(".mlp.0.weight") or name.endswith(".mlp.0.bias"):  # [H, C] / [H] -> [factor H, ...]
            target.copy_(value.repeat(factor, *([1] * (value.dim() - 1))))
        elif name.endswith(".mlp.2.weight"):  # [C, H] -> [C, factor H]
            target.copy_(value.repeat(1, factor) / factor)
        else:
            raise ValueError(f"widen_ffn: unexpected shape change of {name}: {tuple(value.shape)} -> "
                             f"{tuple(target.shape)}")
    return wide


def _config(name: str, out: Path, seed: int, steps: int, batch: int, train_size: int, precision: str,
            **kw) -> TrainConfig:
    return TrainConfig(model="tiny", data=DataConfig(train_size=train_size, seed=seed), batch_size=batch,
                       steps=steps, lr=1e-3, warmup_steps=min(20, max(1, steps // 10)), save_every=0, log_every=25,
                       seed=seed, out_dir=str(out / name), progress=False, precision=precision, **kw)


def dense_base(seed: int, base_steps: int, batch: int, train_size: int, precision: str) -> Path:
    """The dense starting model of a seed: the ``tiny`` CLIP trained ``base_steps`` x ``batch`` on ``train_size``
    shapes scenes, saved once (a ``.partial`` directory renamed when done) and reused by every arm of the seed."""
    out = CACHE / f"dense-tiny-s{seed}-b{base_steps}x{batch}-t{train_size}-{precision}"
    if not (out / "model").exists():
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        run = train(_config("train", partial, seed, base_steps, batch, train_size, precision))
        save_model(run.model.eval(), partial / "model")
        shutil.rmtree(partial / "train", ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        partial.rename(out)
    return out / "model"


def moe_arm(seed: int, steps: int, batch: int, eval_size: int, method: str = "dense", base_steps: int = 240,
            stage_steps: int = 40, experts: int = 4, top_k: int = 2, clusters: int = 4, train_size: int = 4000,
            precision: str = "fp32") -> dict:
    """Fidelity plug-in of clip_moe.yaml: ``method`` (one of :data:`METHODS`, see the module docstring) spends
    ``steps`` x ``batch`` of extra training on the seed's dense base, then the ``shapes`` measure scores it."""
    import tempfile

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    base = dense_base(seed, base_steps, batch, train_size, precision)
    extra_ffn_steps = 0
    with tempfile.TemporaryDirectory(prefix="fidelity-moe-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if method == "dense":
            cfg = _config(method, tmp, seed, steps, batch, train_size, precision, init_from=str(base))
        elif method == "dense_wide":
            save_model(widen_ffn(load_model(base)), tmp / "init")
            cfg = _config(method, tmp, seed, steps, batch, train_size, precision, init_from=str(tmp / "init"))
        else:
            multiplet = MultipletConfig(experts=experts, top_k=top_k, seed=seed, batch_size=batch,
                                        train_size=train_size, lr=1e-3, clusters=clusters,
                                        stage_steps=stage_steps if method == "moe_dmu" else 0)
            moe, _ = diversified_multiplet(load_model(base).eval(), multiplet)
            save_model(moe, tmp / "init")
            extra_ffn_steps = (experts - 1) * stage_steps if method == "moe_dmu" else 0
            trainable = ["*.mlp.router.weight"] if method == "moe_dmu" else []
            cfg = _config(method, tmp, seed, steps, batch, train_size, precision, init_from=str(tmp / "init"),
                          loss={"clip": 1.0, "moe_balance": 0.01}, trainable=trainable)
        run = train(cfg)
        seconds = time.perf_counter() - t0
        model = run.model.eval()
    active = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n and "router" not in n)
    if method.startswith("moe"):
        active = active * top_k // experts  # the FFN parameters one token passes through
    metrics = MEASURES["shapes"].fn(model, eval_size)
    return {**metrics, "extra_seconds": seconds, "extra_ffn_steps": extra_ffn_steps, "active_ffn_params": active}


moe_arm.metrics = (*MEASURES["shapes"].metrics, "extra_seconds", "extra_ffn_steps", "active_ffn_params")
