"""The training loop, readable top to bottom.

    build model, loss, optimizer, schedule -> (resume) -> for each step:
        micro-batches -> features -> loss terms -> backward -> clip -> step -> log / eval / save

bf16 autocast covers the towers; losses run in fp32 on the features. With ``accum_steps > 1``
the features of all micro-batches are computed once without gradients and each micro-batch
is then recomputed with gradients against the cached rest, so the loss is exactly the
full-batch contrastive loss (as OpenCLIP does), not an average of smaller-batch losses.

Loss terms declare the ``LossInputs.extra`` entries they read (``extra_keys``) and whether they
need the model's logit bias (``needs_logit_bias``); every entry the program can produce, with the
code that makes it from a batch, is declared once in :mod:`.inputs`, and the loop produces only
those asked for: text features of the samples' hard-negative captions, count
counterfactuals, synthetic captions (ALIP) and short tags (HQ-CLIP), and image features of a
second augmented view of each image (SimCLR/SLIP), all encoded by the towers with gradients,
cached and recomputed like the features under accumulation; projected token features
(``image_tokens``, ``text_tokens``, ``text_mask``: Norton, DreamLIP) from the same tower passes
as the features (``return_tokens``), joined across micro-batches like them; the embeddings of
an EMA copy of the model (DeGLA), whose weights are checkpointed with the run so that a resumed
run is exact; and the stored embeddings of frozen teachers (MobileCLIP, :mod:`.teachers`). A
plain CLIP run builds none of it. Loss terms with trainable heads of their own (BYOL's predictors,
SwAV's prototypes) train with the model: their parameters join the optimizer (no weight decay), the
gradient averaging and clipping, and the checkpoint (``state.pt``, ``loss_terms``).

Several processes (``distributed.nproc=N`` or torchrun, :mod:`.distributed`) run this same loop,
each on its slice of every global batch; ``dist`` is a no-op for one process. Per step they
agree on batch sizes (``even_shares``), the loss terms gather features across them, the logged
values are means over ranks and gradients are averaged before the optimizer step. Rank 0 alone
writes, logs and evaluates.

Nothing already written is lost (docs/security.md, "Training runs"): rank 0 holds the run
directory's lock for the whole run; checkpoints are written atomically (:mod:`.checkpoint`) and
only when the weights are finite and give finite features on a fixed probe batch; a resumed run
applies the hyperparameters it is given from the checkpoint's step on (logged) and refuses another
architecture; metrics.jsonl records past the checkpoint's step move to metrics.superseded.jsonl.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..errors import ClipforgeError, ConfigError, RunDirectoryError, disk_full, is_disk_full
from ..locking import LockHeld, exclusive_lock
from ..losses import EMATeacher, LossInputs, build_composite
from ..models import load_model
from .checkpoint import (
    is_sharded_checkpoint,
    list_checkpoints,
    load_sharded,
    load_state,
    load_weights,
    repair_latest,
    resolve_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    write_atomic,
)
from .config import TrainConfig, to_dict, to_yaml
from .data import sum_stream_stats
from .device import DevicePlan, device_plan
from .distributed import (
    Dist,
    DistributedRunStopped,
    GradientOverlap,
    adopt_slurm_environment,
    check_batch_split,
    launch,
    launched,
    local_rank,
    peer_lost,
    process_group,
)
from .fsdp import (
    Trainables,
    check_wrappable,
    checkpoint_tensors,
    clip_grad_norm,
    full_model,
    is_sharded,
    local,
    restore_checkpoint_tensors,
    shard_model,
)
from .inputs import EMA_KEYS, PRODUCED, encode_ema, encode_extras
from .optim import build_optimizer, build_scheduler
from .report import Reporters, check_reporters
from .setup import build_loader, build_model, token_outputs

logger = logging.getLogger(__name__)

FEATURES = ("image_features", "text_features")
TOKENS = ("image_tokens", "text_tokens", "text_mask")  # model outputs with return_tokens, LossInputs fields


class TrainingDiverged(ClipforgeError, RuntimeError):
    """Raised when the loss becomes NaN or infinite, or the weights stop giving finite features; the last
    good checkpoint is kept and named."""


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # loss at every optimizer step of this invocation
    samples_seen: int
    train_seconds: float
    samples_per_second: float
    skipped: int
    eval: dict[str, Any] = field(default_factory=dict)
    out_dir: str = ""
    checkpoint: str = ""  # the checkpoint written at the end
    model: Any = None  # the trained model (from that checkpoint when distributed.nproc started processes)


def autocast_context(precision: str, device_type: str = "cpu"):
    """The forward passes' autocast for ``precision`` on a device type (train/device.py decides which)."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device_type=device_type, dtype=torch.float16)
    return contextlib.nullcontext()


def _join(parts: list[dict]) -> dict:
    """Concatenate each extra entry of the micro-batches along the batch dimension (per teacher for lists)."""
    def cat(values):
        return [torch.cat(per) for per in zip(*values)] if isinstance(values[0], list) else torch.cat(values)

    return {key: cat([p[key] for p in parts]) for key in parts[0]}


def _loss_inputs(out: dict, batch: dict, extra: dict | None = None) -> LossInputs:
    # a model's own extra outputs (CoCa: caption_logits, caption_targets) go to the loss terms too
    model_extra = {k: v for k, v in out.items() if k not in (*FEATURES, *TOKENS, "logit_scale", "logit_bias")}
    extra = {**model_extra, **(extra or {})}
    return LossInputs(
        image_features=out["image_features"].float(),
        text_features=out["text_features"].float(),
        logit_scale=out["logit_scale"].float(),
        logit_bias=None if out["logit_bias"] is None else out["logit_bias"].float(),
        image_tokens=out["image_tokens"].float() if "image_tokens" in out else None,
        text_tokens=out["text_tokens"].float() if "text_tokens" in out else None,
        text_mask=out.get("text_mask"),
        extra=extra,
    )


def _quiet(*args, **kwargs) -> None:
    pass


# ------------------------------------------------------------------ the run directory


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an ``out_dir`` that is a file or lies under one, before anything is written."""
    path = Path(out_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise RunDirectoryError(f"out_dir '{out_dir}' cannot be a run directory: '{p}' is a file, not a "
                                        "directory; choose another out_dir")
            return


def _lock_run(stack: contextlib.ExitStack, out_dir: Path, dist: Dist) -> None:
    """Rank 0 takes the run directory's lock (held until ``stack`` closes); every rank learns whether it could, so
    that all of them stop with the holder named instead of the others waiting in a collective for rank 0."""
    refused, kind = None, None
    if dist.is_main:
        try:
            stack.enter_context(exclusive_lock(out_dir, what="training run"))
        except LockHeld as e:
            refused, kind = str(e), "held"
        except OSError as e:  # e.g. no permission to create out_dir or its lock file
            refused, kind = f"cannot lock the run directory '{out_dir}' ({e}); choose an out_dir you can write", "os"
    if dist.enabled:
        refused, kind = dist.all_gather_object((refused, kind))[0]
    if refused:
        raise LockHeld(refused) if kind == "held" else RunDirectoryError(refused)


def _append_json(path: Path, record: dict, file=None) -> None:
    """Append one JSON line to ``path`` (or to its open ``file``); a full disk is named as such."""
    try:
        if file is not None:
            file.write(json.dumps(record) + "\n")
            file.flush()
        else:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
    except OSError as e:
        if is_disk_full(e):
            found = list_checkpoints(path.parent)
            kept = f"the last complete checkpoint {found[-1]} is kept" if found else ""
            raise disk_full(e, str(path), kept) from None
        raise


def _supersede_metrics(out_dir: Path, step: int, mark: dict) -> None:
    """On resume: the records of ``metrics.jsonl`` past the checkpoint's step (they are trained again) move to
    ``metrics.superseded.jsonl``, and a record marking the resume point is appended."""
    path = out_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    keep, aside = [], []
    for line in lines:
        try:
            past = json.loads(line).get("step", 0) > step
        except (ValueError, AttributeError, TypeError):  # a line torn by a kill: kept aside
            past = True
        (aside if past else keep).append(line)
    if aside:
        with open(out_dir / "metrics.superseded.jsonl", "a") as f:
            f.write("".join(line + "\n" for line in aside))
        write_atomic(path, "".join(line + "\n" for line in keep))
    _append_json(path, {"step": step, "resume": {**mark, "superseded_records": len(aside)}})


# ------------------------------------------------------------------ resuming with changed settings

# what may differ between a checkpoint's run and its resumption without being reported
NOT_SETTINGS = ("resume", "stop_at", "max_seconds", "progress", "out_dir")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
        return out
    return {prefix.rstrip("."): tree}


def _changed_settings(ckpt: Path, cfg: TrainConfig) -> dict[str, list]:
    """{key: [checkpoint's value, this run's value]} for the config keys that differ from the checkpoint's run."""
    saved = ckpt / "config.yaml"
    if not saved.exists():
        return {}
    from omegaconf import OmegaConf

    old = _flat(OmegaConf.to_container(OmegaConf.load(saved), resolve=True))
    new = _flat(to_dict(cfg))
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k.split(".")[0] not in NOT_SETTINGS}


def _check_architecture(ckpt: Path, model) -> None:
    """The model being resumed must be the checkpoint's architecture (same tensor shapes are not enough)."""
    saved = ckpt / "model_config.json"
    if not saved.exists() or not hasattr(model, "cfg"):
        return
    old, new = _flat(json.loads(saved.read_text())), _flat(json.loads(json.dumps(model.cfg.to_dict())))
    diff = [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise ConfigError(f"resume: the configured model is not the architecture of {ckpt} ({', '.join(diff[:6])}); "
                          "the architecture cannot change on resume: set model/model_overrides as in its config.yaml, "
                          f"or start a new run from its weights with init_from={ckpt}")


def _apply_hyperparameters(optimizer, fresh_groups: list[dict]) -> None:
    """After the optimizer's state was restored: its hyperparameters (peak lr, weight decay, betas, eps) become
    this run's again (a restored state dict brings the checkpoint's). ``fresh_groups``: the groups as built, before
    a scheduler touched them; the peak lr goes to ``initial_lr``, where the schedule reads it."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update({k: v for k, v in fresh.items() if k not in ("params", "lr", "initial_lr")})
        group["initial_lr"] = fresh["lr"]


# ------------------------------------------------------------------ checking weights before a checkpoint


PROBE_TEXTS = ("a photo of a dog", "two red squares and a blue circle")


def _probe_batch(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch (seeded noise images, two captions) that never touches the global RNG."""
    size = model.image_size
    images = torch.rand(len(PROBE_TEXTS), 3, size, size, generator=torch.Generator().manual_seed(0))
    return images, tokenizer(list(PROBE_TEXTS))


def _unusable(model, probe: tuple[torch.Tensor, torch.Tensor], plan: DevicePlan, dist: Dist) -> str:
    """Why the weights cannot be promoted to a checkpoint ("" if they can): non-finite weights, or non-finite
    features of the probe batch (weights that exploded while staying finite). Every rank calls it; with sharded
    weights each checks its shards and the names are gathered, and the probe batch runs through the sharded
    model on every rank."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(local(t)).all()]
    if any(is_sharded(p) for p in model.parameters()):
        bad = sorted({name for names in dist.all_gather_object(bad) for name in names})
    if bad:
        return f"hold non-finite values (in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), plan.autocast():
            image, text = model.encode_image(probe[0]).float(), model.encode_text(probe[1]).float()
    finally:
        model.train(was_training)
    if not (torch.isfinite(image).all() and torch.isfinite(text).all()):
        big = max(local(t).abs().max().item() for t in model.state_dict().values()
                  if t.is_floating_point() and local(t).numel())
        return f"give non-finite features for a fixed probe batch (largest weight {big:.3g})"
    return ""


def train(cfg: TrainConfig, evaluate: Callable | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns losses, throughput and final evaluation.

    ``evaluate(model, tokenizer) -> dict`` is called (on rank 0) every ``eval_every`` steps and
    at the end. Under a launcher (torchrun) this process is one rank of the run; with
    ``distributed.nproc > 1`` and no launcher, the processes are started here and rank 0's
    result is returned, its model loaded from the final checkpoint.
    """
    cfg.validate()
    adopt_slurm_environment()  # srun with several tasks: the launcher variables from SLURM's
    plan = device_plan(cfg.device, cfg.precision, local_rank=local_rank())  # an absent device fails here, first
    check_reporters(list(cfg.report_to))  # so does a reporter whose package is missing
    check_out_dir(cfg.out_dir)
    if cfg.distributed.nproc > 1 and not launched():
        check_batch_split(cfg.batch_size, cfg.accum_steps, cfg.distributed.nproc)
        result = launch(_train_in_started_process, cfg.distributed.nproc, cfg, evaluate)
        result.model = load_model(result.checkpoint).train()
        return result
    with process_group(cfg.distributed.nproc, cfg.distributed.timeout_minutes, plan.backend, plan.device) as dist:
        return _train(cfg, evaluate, dist, plan)


def _train_in_started_process(cfg: TrainConfig, evaluate: Callable | None) -> TrainResult:
    result = train(cfg, evaluate)
    result.model = None  # the weights reach the caller through the final checkpoint, not the pipe
    return result


def _train(cfg: TrainConfig, evaluate: Callable | None, dist: Dist, plan: DevicePlan) -> TrainResult:
    """This process's part of the run, with the run directory locked (by rank 0) throughout."""
    check_batch_split(cfg.batch_size, cfg.accum_steps, dist.world_size)
    with contextlib.ExitStack() as stack:
        _lock_run(stack, Path(cfg.out_dir), dist)
        try:
            return _train_locked(cfg, evaluate, dist, plan)
        except Exception as e:
            if not (dist.enabled and peer_lost(e)):
                raise
            found = list_checkpoints(cfg.out_dir)
            where = f"the last complete checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise DistributedRunStopped(
                f"another process of the run stopped (it died, or did not answer within distributed.timeout_minutes="
                f"{cfg.distributed.timeout_minutes}); rank {dist.rank} of {dist.world_size} stops too ({first}); "
                f"{where}: resume with resume=latest") from e


def _train_locked(cfg: TrainConfig, evaluate: Callable | None, dist: Dist, plan: DevicePlan) -> TrainResult:
    say = logger.info if dist.is_main else _quiet  # the CLI shows INFO lines on stdout
    out_dir = Path(cfg.out_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    plan.apply()
    if plan.note:
        say(f"note: {plan.note}")

    model, tokenizer = build_model(cfg, say)
    fsdp_run = cfg.distributed.strategy == "fsdp"  # sharded checkpoints; weights sharded too with several ranks
    if fsdp_run:
        check_wrappable(model)
    model.to(plan.device)
    dist.broadcast_model(model)  # every rank starts from rank 0's weights
    loss_fn = build_composite(cfg.loss).to(plan.device)
    needs_bias = sorted(name for name, term in loss_fn.terms.items() if getattr(term, "needs_logit_bias", False))
    if needs_bias and model.logit_bias is None:
        raise ValueError(f"the loss terms {needs_bias} need a logit bias: add model_overrides.init_logit_bias=-10 "
                         "(and model_overrides.init_logit_scale=2.3026 as in SigLIP)")
    ckpt = None
    if cfg.resume:  # the weights of a replicated checkpoint are read before the model is sharded
        ckpt = resolve_checkpoint(out_dir, cfg.resume)
        _check_architecture(ckpt, model)
        if not is_sharded_checkpoint(ckpt):
            if fsdp_run and dist.enabled:
                raise ConfigError(f"{ckpt} was written with distributed.strategy=ddp (model.safetensors and a full "
                                  "optimizer state); resume it with distributed.strategy=ddp, or start a new "
                                  f"strategy=fsdp run from its weights with init_from={ckpt}")
            load_weights(model, ckpt)
    ema_needed = bool(loss_fn.extra_keys() & set(EMA_KEYS))
    ema = EMATeacher(model, cfg.ema_momentum) if ema_needed else None  # a full copy, made before any sharding
    sharded = fsdp_run and dist.enabled
    if sharded:
        shard_model(model, plan.device, dist.world_size, plan.effective_precision,
                    cfg.distributed.reshard_after_forward, cfg.distributed.cpu_offload)
    trainables = Trainables(model, loss_fn)  # names the optimizer's state in sharded checkpoints
    overlap_wanted = plan.device.type == "cuda" if cfg.distributed.overlap is None else cfg.distributed.overlap
    overlap = GradientOverlap(dist, [p for p in model.parameters() if p.requires_grad]) \
        if dist.enabled and not sharded and overlap_wanted else None  # ddp: all-reduces during the last backward
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    # loss terms with their own trainable heads (BYOL's predictors, SwAV's prototypes) train with the model
    head_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if head_params:
        dist.broadcast_model(loss_fn)
        optimizer.add_param_group({"params": head_params, "weight_decay": 0.0})
    fresh_groups = [dict(g) for g in optimizer.param_groups]  # this run's hyperparameters, before any restore
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)

    start_step, samples_seen, skipped_total = 0, 0, 0
    needs = loss_fn.extra_keys()
    from_model = needs & set(getattr(model, "extra_outputs", ()))
    unsupported = needs - PRODUCED - from_model
    if unsupported:
        lacking = sorted(
            name for name, term in loss_fn.terms.items() if unsupported & set(getattr(term, "extra_keys", ()))
        )
        coca = " (a CoCa model such as model=coca-tiny returns caption_logits and caption_targets)" \
            if unsupported & {"caption_logits", "caption_targets"} else ""
        raise ValueError(f"the loss terms {lacking} need inputs {sorted(unsupported)} that the training program does "
                         f"not produce{coca}; docs/losses.md lists what it feeds, and from which data. Use those "
                         "terms from your own loop with clipforge.losses")
    if from_model and cfg.accum_steps > 1:
        raise ValueError(f"the model's outputs {sorted(from_model)} are per micro-batch: train them with accum_steps=1")
    forward = {"return_tokens": True} if token_outputs(model, needs) else {}  # only when a term reads tokens

    scaler = plan.make_scaler()  # fp16 only: loss scaling, its state saved with the checkpoints
    stream_state, changed = None, {}
    if ckpt is not None:
        state = load_state(ckpt)
        if head_params:
            if "loss_terms" not in state:
                raise ConfigError(f"{ckpt} holds no weights for the loss terms' heads {sorted(cfg.loss)}: resume it "
                                 "with the loss it was trained with, or start a new run with init_from")
            loss_fn.load_state_dict(state["loss_terms"])
        if is_sharded_checkpoint(ckpt):  # the weights and the optimizer state, resharded for this run's ranks
            restore_checkpoint_tensors(ckpt, model, trainables, optimizer, load_sharded)
        else:
            optimizer.load_state_dict(state["optimizer"])
        _apply_hyperparameters(optimizer, fresh_groups)
        # the schedule continues from the checkpoint's position with this run's lr, warmup, steps and min_lr_ratio
        scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio,
                                    last_epoch=int(state["scheduler"]["last_epoch"]))
        changed = _changed_settings(ckpt, cfg)
        if changed and dist.is_main:
            logger.info("resuming from %s with changed settings, applied from step %d on: %s", ckpt, int(state["step"]),
                     ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items()))
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_step, samples_seen, skipped_total = int(state["step"]), int(state["samples_seen"]), int(state["skipped"])
        stream_state = dist.this_rank(state.get("data_stream"))
        if ema is not None:
            if "ema" in state:
                ema.load_state_dict(state["ema"])
            else:
                ema = EMATeacher(full_model(model), cfg.ema_momentum)
                say(f"note: {ckpt} holds no EMA teacher; it starts from the resumed weights")

    with dist.main_first():  # rank 0 stores rewrites / teacher embeddings on the way; the others read them
        loader = build_loader(cfg, model, tokenizer, needs, out_dir, start_step, stream_state, dist.rank,
                              dist.world_size, pin_memory=plan.pin_memory, terms=tuple(loss_fn.terms.values()))
    metrics_path = out_dir / "metrics.jsonl"
    if dist.is_main:
        repair_latest(out_dir)
        if ckpt is not None:
            _supersede_metrics(out_dir, start_step, {"checkpoint": str(ckpt), "changed": changed})
        try:
            write_atomic(out_dir / "config.yaml", to_yaml(cfg))
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(e, str(out_dir / "config.yaml")) from None
            raise
    metrics_file = open(metrics_path, "a") if dist.is_main else None
    reporters = Reporters(list(cfg.report_to), out_dir, to_dict(cfg), start_step, enabled=dist.is_main)
    probe = plan.move(_probe_batch(model, tokenizer))
    # the checkpoint each step was saved in by this invocation (a resumed step is saved already, in this run)
    saved: dict[int, Path | None] = {}
    if ckpt is not None and ckpt.parent.resolve() == (out_dir / "checkpoints").resolve():
        saved[start_step] = ckpt

    def save(step: int) -> Path | None:
        """Every rank calls it (the stream positions are gathered); rank 0 writes and returns the checkpoint.
        Weights that do not give finite features on the probe batch are never promoted: TrainingDiverged."""
        if step in saved:  # the end of a run on the save cadence: written once
            return saved[step] if dist.is_main else None
        why = _unusable(model, probe, plan, dist)  # the same weights on every rank: every rank stops
        if why:
            found = list_checkpoints(out_dir)
            where = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
            raise TrainingDiverged(f"the weights after step {step} {why}, so they were not saved; {where}. Lower lr "
                                   f"(now {cfg.lr}), keep grad_clip on, or train in precision=fp32, then resume from "
                                   "that checkpoint.")
        streams = dist.all_gather_object(loader.state_dict()) if cfg.data.streaming else None
        tensors = checkpoint_tensors(model, trainables, optimizer) if fsdp_run else None  # every rank: its shards
        if not dist.is_main and not fsdp_run:
            saved[step] = None
            return None
        state = {"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "step": step, "samples_seen": samples_seen, "skipped": skipped_total}
        if not fsdp_run:
            state["optimizer"] = optimizer.state_dict()
        if ema is not None:
            state["ema"] = ema.state_dict()
        if head_params:
            state["loss_terms"] = loss_fn.state_dict()
        if scaler is not None:
            state["grad_scaler"] = scaler.state_dict()
        if streams is not None:  # where each rank's stream stands after the batches of `step`
            state["data_stream"] = streams[0] if dist.world_size == 1 else streams
        if fsdp_run:  # every rank writes its shards; rank 0 the rest, and promotes the checkpoint when complete
            saved[step] = save_sharded_checkpoint(
                out_dir, step, tensors, state, json.dumps(model.cfg.to_dict(), indent=2), to_yaml(cfg),
                cfg.keep_checkpoints, dist.is_main, lambda value: dist.all_gather_object(value)[0])
        else:
            saved[step] = save_checkpoint(out_dir, step, model, state, to_yaml(cfg), keep=cfg.keep_checkpoints)
        return saved[step]

    def log(record: dict):
        if metrics_file is not None:
            _append_json(metrics_path, record, metrics_file)
            reporters.log(record)

    def backward(loss: torch.Tensor) -> None:
        (loss if scaler is None else scaler.scale(loss)).backward()

    def loss_of(inputs: LossInputs) -> dict:
        inputs.rank, inputs.world_size = dist.rank, dist.world_size  # the terms gather the global batch
        return loss_fn(inputs)

    losses: list[float] = []
    step = start_step
    batches = iter(loader)
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=not (cfg.progress and dist.is_main),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    train_time, t_window, n_window, samples_this_run = 0.0, time.perf_counter(), 0, 0
    eval_result: dict = {}
    model.train()
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            micro_batches, skipped = dist.even_shares([next(batches) for _ in range(cfg.accum_steps)])
            micro_batches = [plan.move(b) for b in micro_batches]
            skipped_total += skipped
            if not micro_batches:
                step += 1  # every sample of this step was unreadable: the step still counts as consumed
                scheduler.step()
                continue
            optimizer.zero_grad(set_to_none=True)
            with plan.autocast():
                ema_extra = [encode_ema(ema, b) for b in micro_batches]
            if len(micro_batches) == 1:
                with plan.autocast():
                    out = model(micro_batches[0]["images"], micro_batches[0]["texts"], **forward)
                    extra = {**encode_extras(model, micro_batches[0]), **ema_extra[0]}
                logs = loss_of(_loss_inputs(out, micro_batches[0], extra))
                if overlap is not None:
                    overlap.arm()
                backward(logs["loss"])
            else:
                with torch.no_grad(), plan.autocast():
                    cached = [model(b["images"], b["texts"], **forward) for b in micro_batches]
                    cached_extra = [encode_extras(model, b) for b in micro_batches]
                for k, b in enumerate(micro_batches):
                    with plan.autocast():
                        out = model(b["images"], b["texts"], **forward)
                        own_extra = encode_extras(model, b)
                    joined = dict(out)
                    for key in (*FEATURES, *(t for t in TOKENS if t in out)):  # this micro-batch's rows with gradients
                        joined[key] = torch.cat([c[key] if j != k else out[key] for j, c in enumerate(cached)])
                    if k > 0:  # the full-batch loss is recomputed per micro-batch: its scale and bias get gradient once
                        for key in ("logit_scale", "logit_bias"):
                            joined[key] = None if out[key] is None else out[key].detach()
                    extra = _join(
                        [{**(own_extra if j == k else c), **e} for j, (c, e) in enumerate(zip(cached_extra, ema_extra))]
                    )
                    logs = loss_of(_loss_inputs(joined, b, extra))
                    if overlap is not None and k == len(micro_batches) - 1:
                        overlap.arm()
                    backward(logs["loss"])
                for p in head_params:  # every micro-batch's backward gave the heads the full-batch gradient once
                    if p.grad is not None:
                        p.grad /= len(micro_batches)
            logs = dist.mean_over_ranks(logs)  # each rank holds its share: the mean is the global-batch value
            loss_value = logs["loss"]
            if not math.isfinite(loss_value):  # the same mean on every rank: all of them stop here
                last = list_checkpoints(out_dir)
                where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step}; {where}. Lower lr (now {cfg.lr}), keep grad_clip on, "
                    "or train in precision=fp32, then resume from that checkpoint."
                )
            done = overlap.finish() if overlap is not None else frozenset()  # buckets averaged during backward
            dist.average_gradients(model, done)  # the replicated rest (FSDP has reduce-scattered the sharded ones)
            if head_params:
                dist.average_gradients(loss_fn)
            if scaler is not None:
                scaler.unscale_(optimizer)  # clipping and the logged norm see the true gradients
            grad_norm = None
            if cfg.grad_clip:
                params = [*model.parameters(), *head_params]
                grad_norm = clip_grad_norm(params, cfg.grad_clip) if sharded else \
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            if scaler is not None:
                scaler.step(optimizer)  # skipped when a gradient is inf/NaN (the scale then shrinks)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            step += 1
            n = dist.world_size * sum(b["images"].shape[0] for b in micro_batches)
            samples_seen += n
            samples_this_run += n
            n_window += n
            losses.append(loss_value)
            train_time += time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                sps = n_window / max(now - t_window, 1e-9)
                t_window, n_window = now, 0
                record = {
                    "step": step,
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_second": sps,
                    "skipped": skipped_total,
                    "logit_scale": model.scale().detach().item(),
                    **logs,
                }
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log(record)
                bar.set_postfix(loss=f"{loss_value:.3f}", sps=f"{sps:.0f}")
            bar.update(1)
            if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                whole = full_model(model)  # a sharded model is gathered on every rank (a collective)
                if dist.is_main:
                    eval_result = evaluate(whole, tokenizer)
                    log({"step": step, "eval": eval_result})
            if cfg.save_every and step % cfg.save_every == 0:
                save(step)
            if cfg.stop_at is not None and step >= cfg.stop_at:
                break
            if cfg.max_seconds is not None and dist.rank0_decides(train_time >= cfg.max_seconds):
                say(f"time budget of {cfg.max_seconds:.0f}s reached at step {step}/{cfg.steps}")
                break
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    final = save(step)
    model = full_model(model)  # the trained model, gathered when it is sharded
    if dist.is_main and evaluate is not None:
        eval_result = evaluate(model, tokenizer)
        _append_json(metrics_path, {"step": step, "eval": eval_result})
        reporters.log({"step": step, "eval": eval_result})
    reporters.close()
    if cfg.data.streaming:
        stream_stats = sum_stream_stats(dist.all_gather_object(loader.stats.as_dict()))  # every rank's stream
        if dist.is_main:
            _append_json(metrics_path, {"step": step, "data_stream": stream_stats.as_dict()})
            if cfg.progress:
                logger.info(stream_stats.summary())
    if skipped_total:
        cut = ", with the readable ones cut to keep the ranks' slices equal" if dist.enabled else ""
        say(f"note: {skipped_total} unreadable samples were skipped{cut} (see metrics.jsonl)")
    return TrainResult(step=step, losses=losses, samples_seen=samples_seen, train_seconds=train_time,
                       samples_per_second=samples_this_run / max(train_time, 1e-9), skipped=skipped_total,
                       eval=eval_result, out_dir=str(out_dir), checkpoint=str(final or ""), model=model)
