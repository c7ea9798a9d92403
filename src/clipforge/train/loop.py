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
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..losses import EMATeacher, LossInputs, build_composite
from ..models import load_model
from .checkpoint import load_state, load_weights, resolve_checkpoint, save_checkpoint
from .config import TrainConfig, to_yaml
from .data import sum_stream_stats
from .distributed import Dist, check_batch_split, launch, launched, process_group
from .optim import build_optimizer, build_scheduler
from .inputs import EMA_KEYS, PRODUCED, encode_ema, encode_extras
from .setup import build_loader, build_model, token_outputs

FEATURES = ("image_features", "text_features")
TOKENS = ("image_tokens", "text_tokens", "text_mask")  # model outputs with return_tokens, LossInputs fields


class TrainingDiverged(RuntimeError):
    """Raised when the loss becomes NaN or infinite; the last good checkpoint is kept."""


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


def autocast_context(precision: str):
    if precision == "bf16":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
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


def train(cfg: TrainConfig, evaluate: Callable | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns losses, throughput and final evaluation.

    ``evaluate(model, tokenizer) -> dict`` is called (on rank 0) every ``eval_every`` steps and
    at the end. Under a launcher (torchrun) this process is one rank of the run; with
    ``distributed.nproc > 1`` and no launcher, the processes are started here and rank 0's
    result is returned, its model loaded from the final checkpoint.
    """
    cfg.validate()
    if cfg.distributed.nproc > 1 and not launched():
        check_batch_split(cfg.batch_size, cfg.accum_steps, cfg.distributed.nproc)
        result = launch(_train_in_started_process, cfg.distributed.nproc, cfg, evaluate)
        result.model = load_model(result.checkpoint).train()
        return result
    with process_group(cfg.distributed.nproc, cfg.distributed.timeout_minutes) as dist:
        return _train(cfg, evaluate, dist)


def _train_in_started_process(cfg: TrainConfig, evaluate: Callable | None) -> TrainResult:
    result = train(cfg, evaluate)
    result.model = None  # the weights reach the caller through the final checkpoint, not the pipe
    return result


def _train(cfg: TrainConfig, evaluate: Callable | None, dist: Dist) -> TrainResult:
    check_batch_split(cfg.batch_size, cfg.accum_steps, dist.world_size)
    say = print if dist.is_main else _quiet
    out_dir = Path(cfg.out_dir)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    model, tokenizer = build_model(cfg, say)
    dist.broadcast_model(model)  # every rank starts from rank 0's weights
    loss_fn = build_composite(cfg.loss)
    needs_bias = sorted(name for name, term in loss_fn.terms.items() if getattr(term, "needs_logit_bias", False))
    if needs_bias and model.logit_bias is None:
        raise ValueError(f"the loss terms {needs_bias} need a logit bias: add model_overrides.init_logit_bias=-10 "
                         "(and model_overrides.init_logit_scale=2.3026 as in SigLIP)")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    # loss terms with their own trainable heads (BYOL's predictors, SwAV's prototypes) train with the model
    head_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if head_params:
        dist.broadcast_model(loss_fn)
        optimizer.add_param_group({"params": head_params, "weight_decay": 0.0})
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)

    start_step, samples_seen, skipped_total = 0, 0, 0
    needs = loss_fn.extra_keys()
    from_model = needs & set(getattr(model, "extra_outputs", ()))
    unsupported = needs - PRODUCED - from_model
    if unsupported:
        lacking = sorted(name for name, term in loss_fn.terms.items() if unsupported & set(getattr(term, "extra_keys", ())))
        coca = " (a CoCa model such as model=coca-tiny returns caption_logits and caption_targets)" \
            if unsupported & {"caption_logits", "caption_targets"} else ""
        raise ValueError(f"the loss terms {lacking} need inputs {sorted(unsupported)} that the training program does "
                         f"not produce{coca}; docs/losses.md lists what it feeds, and from which data. Use those "
                         "terms from your own loop with clipforge.losses")
    if from_model and cfg.accum_steps > 1:
        raise ValueError(f"the model's outputs {sorted(from_model)} are per micro-batch: train them with accum_steps=1")
    forward = {"return_tokens": True} if token_outputs(model, needs) else {}  # only when a term reads tokens
    ema = EMATeacher(model, cfg.ema_momentum) if needs & set(EMA_KEYS) else None

    stream_state = None
    if cfg.resume:
        ckpt = resolve_checkpoint(out_dir, cfg.resume)
        load_weights(model, ckpt)
        state = load_state(ckpt)
        if head_params:
            if "loss_terms" not in state:
                raise ValueError(f"{ckpt} holds no weights for the loss terms' heads {sorted(cfg.loss)}: resume it "
                                 "with the loss it was trained with, or start a new run with init_from")
            loss_fn.load_state_dict(state["loss_terms"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_step, samples_seen, skipped_total = int(state["step"]), int(state["samples_seen"]), int(state["skipped"])
        stream_state = dist.this_rank(state.get("data_stream"))
        if ema is not None:
            if "ema" in state:
                ema.load_state_dict(state["ema"])
            else:
                ema = EMATeacher(model, cfg.ema_momentum)
                say(f"note: {ckpt} holds no EMA teacher; it starts from the resumed weights")

    with dist.main_first():  # rank 0 stores rewrites / teacher embeddings on the way; the others read them
        loader = build_loader(cfg, model, tokenizer, needs, out_dir, start_step, stream_state, dist.rank, dist.world_size)
    metrics_file = open(out_dir / "metrics.jsonl", "a") if dist.is_main else None
    if dist.is_main:
        (out_dir / "config.yaml").write_text(to_yaml(cfg))

    def save(step: int) -> Path | None:
        """Every rank calls it (the stream positions are gathered); rank 0 writes and returns the checkpoint."""
        streams = dist.all_gather_object(loader.state_dict()) if cfg.data.streaming else None
        if not dist.is_main:
            return None
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "step": step, "samples_seen": samples_seen, "skipped": skipped_total}
        if ema is not None:
            state["ema"] = ema.state_dict()
        if head_params:
            state["loss_terms"] = loss_fn.state_dict()
        if streams is not None:  # where each rank's stream stands after the batches of `step`
            state["data_stream"] = streams[0] if dist.world_size == 1 else streams
        return save_checkpoint(out_dir, step, model, state, to_yaml(cfg), keep=cfg.keep_checkpoints)

    def log(record: dict):
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def loss_of(inputs: LossInputs) -> dict:
        inputs.rank, inputs.world_size = dist.rank, dist.world_size  # the terms gather the global batch
        return loss_fn(inputs)

    losses: list[float] = []
    step = start_step
    batches = iter(loader)
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (cfg.progress and dist.is_main), desc="train", unit="step", dynamic_ncols=True)
    train_time, t_window, n_window, samples_this_run = 0.0, time.perf_counter(), 0, 0
    eval_result: dict = {}
    model.train()
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            micro_batches, skipped = dist.even_shares([next(batches) for _ in range(cfg.accum_steps)])
            skipped_total += skipped
            if not micro_batches:
                step += 1  # every sample of this step was unreadable: the step still counts as consumed
                scheduler.step()
                continue
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(cfg.precision):
                ema_extra = [encode_ema(ema, b) for b in micro_batches]
            if len(micro_batches) == 1:
                with autocast_context(cfg.precision):
                    out = model(micro_batches[0]["images"], micro_batches[0]["texts"], **forward)
                    extra = {**encode_extras(model, micro_batches[0]), **ema_extra[0]}
                logs = loss_of(_loss_inputs(out, micro_batches[0], extra))
                logs["loss"].backward()
            else:
                with torch.no_grad(), autocast_context(cfg.precision):
                    cached = [model(b["images"], b["texts"], **forward) for b in micro_batches]
                    cached_extra = [encode_extras(model, b) for b in micro_batches]
                for k, b in enumerate(micro_batches):
                    with autocast_context(cfg.precision):
                        out = model(b["images"], b["texts"], **forward)
                        own_extra = encode_extras(model, b)
                    joined = dict(out)
                    for key in (*FEATURES, *(t for t in TOKENS if t in out)):  # this micro-batch's rows with gradients
                        joined[key] = torch.cat([c[key] if j != k else out[key] for j, c in enumerate(cached)])
                    if k > 0:  # the full-batch loss is recomputed per micro-batch: its scale and bias get gradient once
                        for key in ("logit_scale", "logit_bias"):
                            joined[key] = None if out[key] is None else out[key].detach()
                    extra = _join([{**(own_extra if j == k else c), **e} for j, (c, e) in enumerate(zip(cached_extra, ema_extra))])
                    logs = loss_of(_loss_inputs(joined, b, extra))
                    logs["loss"].backward()
                for p in head_params:  # every micro-batch's backward gave the heads the full-batch gradient once
                    if p.grad is not None:
                        p.grad /= len(micro_batches)
            logs = dist.mean_over_ranks(logs)  # each rank holds its share: the mean is the global-batch value
            loss_value = logs["loss"]
            if not math.isfinite(loss_value):  # the same mean on every rank: all of them stop here
                last = sorted((out_dir / "checkpoints").glob("step_*"))
                where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"loss became {loss_value} at step {step}; {where}. Lower lr (now {cfg.lr}), keep grad_clip on, "
                    "or train in precision=fp32, then resume from that checkpoint."
                )
            dist.average_gradients(model)
            if head_params:
                dist.average_gradients(loss_fn)
            grad_norm = None
            if cfg.grad_clip:
                params = [*model.parameters(), *head_params]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
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
                record = {"step": step, "lr": scheduler.get_last_lr()[0], "samples_per_second": sps, "skipped": skipped_total,
                          "logit_scale": model.scale().detach().item(), **logs}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log(record)
                bar.set_postfix(loss=f"{loss_value:.3f}", sps=f"{sps:.0f}")
            bar.update(1)
            if dist.is_main and evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                eval_result = evaluate(model, tokenizer)
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
    if dist.is_main and evaluate is not None:
        eval_result = evaluate(model, tokenizer)
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "eval": eval_result}) + "\n")
    if cfg.data.streaming:
        stream_stats = sum_stream_stats(dist.all_gather_object(loader.stats.as_dict()))  # every rank's stream
        if dist.is_main:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "data_stream": stream_stats.as_dict()}) + "\n")
            if cfg.progress:
                print(stream_stats.summary())
    if skipped_total:
        cut = ", with the readable ones cut to keep the ranks' slices equal" if dist.enabled else ""
        say(f"note: {skipped_total} unreadable samples were skipped{cut} (see metrics.jsonl)")
    return TrainResult(step=step, losses=losses, samples_seen=samples_seen, train_seconds=train_time,
                       samples_per_second=samples_this_run / max(train_time, 1e-9), skipped=skipped_total,
                       eval=eval_result, out_dir=str(out_dir), checkpoint=str(final or ""), model=model)
