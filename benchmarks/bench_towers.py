"""Parameters, GFLOPs and CPU inference throughput of the efficient and sparse towers (docs/models.md).

For each model: parameters of the image tower, of the text tower and in all; forward GFLOPs per image and
per text (``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add of matmuls, convolutions
and attention; elementwise work is not counted); images/s and texts/s at batch 32 and the latency of one image
and of one text (batch 1, milliseconds) in evaluation mode without gradients (median of ``--reps`` timed batches
after one warm-up; ``4 x --reps`` single-item calls for the latencies), on ``--threads`` threads.

Models: ``tiny`` (the ViT CLIP), ``mobileclip-tiny`` in its training form and reparameterized, a CLIP-MoE
upcycled from ``tiny`` (4 experts, top-2, every FFN of both towers; random weights: speed only), with
``--s0`` the ``mobileclip-s0`` shape at 256 px, and with ``--llm2clip DIR`` ``llm2clip-tiny`` whose frozen text
tower is the causal LM in DIR (all its layers, and its first ``--lm-layers``), measured without the tower's
caption cache (texts/s is then the LM's own rate), and with ``--cosmo DIR`` ``cosmo-tiny`` on the causal LM in DIR
(all its layers, split after the first ``--cosmo-split``; its text tower is the LM's text half, the LM's other
layers, the resampler and the gated cross-attention are counted in ``params_multimodal_m``).

    nice python benchmarks/bench_towers.py --threads 1 --reps 5 [--s0] [--llm2clip DIR --lm-layers 2] [--cosmo DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import clipforge
from clipforge.models import create_model
from clipforge.models.mobileclip import reparameterize
from clipforge.models.moe import upcycle


def gflops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def per_second(fn, n: int, reps: int) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def latency_ms(fn, reps: int) -> float:
    """Median milliseconds of one call of ``fn`` (after one warm-up call)."""
    return 1000.0 / per_second(fn, 1, reps)


def measure(name: str, model, reps: int, batch: int = 32, tokenizer=None) -> dict:
    model = model.eval()
    size = model.image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokenizer = tokenizer or (lambda texts: clipforge.tokenize(texts, model.context_length))
    ids = tokenizer(["two small red circles left of a large blue square"] * batch)
    image_params = sum(p.numel() for p in model.visual.parameters())
    text_params = sum(p.numel() for p in model.text.parameters())
    multimodal = {}
    if hasattr(model, "cross"):  # COSMO: the text tower is the LM's first layers; the rest is the multimodal half
        split, lm = model.cfg.cosmo.split, model.text.decoder
        upper = sum(p.numel() for layer in lm.layers[split:] for p in layer.parameters())
        own = sum(p.numel() for m in (model.resampler, model.cross) for p in m.parameters()) + model.media_token.numel()
        text_params -= upper
        multimodal = {"params_multimodal_m": (upper + own) / 1e6,
                      "trainable_fraction": model.trainable_fraction()}
    row = {"model": name, "image_size": size, "params_total_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "params_image_m": image_params / 1e6, "params_text_m": text_params / 1e6, **multimodal,
           "gflops_per_image": gflops(lambda: model.encode_image(images[:1])),
           "gflops_per_text": gflops(lambda: model.encode_text(ids[:1])),
           "images_per_s_b32": per_second(lambda: model.encode_image(images), batch, reps),
           "texts_per_s_b32": per_second(lambda: model.encode_text(ids), batch, reps),
           "image_ms_b1": latency_ms(lambda: model.encode_image(images[:1]), 4 * reps),
           "text_ms_b1": latency_ms(lambda: model.encode_text(ids[:1]), 4 * reps)}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--s0", action="store_true", help="also the mobileclip-s0 shape (256 px; slower)")
    p.add_argument("--llm2clip", help="also llm2clip-tiny with the causal LM directory DIR as its text tower")
    p.add_argument("--lm-layers", type=int, nargs="*", default=[], help="with --llm2clip: also the first N layers")
    p.add_argument("--only-llm2clip", action="store_true", help="with --llm2clip: skip the other models")
    p.add_argument("--cosmo", help="also cosmo-tiny with the causal LM directory DIR (split after --cosmo-split)")
    p.add_argument("--cosmo-split", type=int, default=1)
    p.add_argument("--only-cosmo", action="store_true", help="with --cosmo: skip the other models")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tiny = create_model("tiny", seed=0)
    mobile = create_model("mobileclip-tiny", seed=0).eval()
    models = [("tiny", tiny), ("mobileclip-tiny", mobile), ("mobileclip-tiny reparameterized", reparameterize(mobile)),
              ("tiny CLIP-MoE 4 experts top-2", upcycle(tiny.eval(), experts=4, top_k=2))]
    if args.s0:
        s0 = create_model("mobileclip-s0", seed=0).eval()
        models += [("mobileclip-s0", s0), ("mobileclip-s0 reparameterized", reparameterize(s0))]
    tokenizers = {}
    if args.llm2clip:
        from clipforge.interop.text_tokenizers import CausalLMTokenizer

        models = [] if args.only_llm2clip else models
        for layers in [None, *args.lm_layers]:
            name = f"llm2clip-tiny, LM {'all layers' if layers is None else f'first {layers} layers'}"
            models.append((name, create_model("llm2clip-tiny", seed=0,
                                              lm={"path": args.llm2clip, "cache": False, "layers": layers})))
            tokenizers[name] = CausalLMTokenizer(args.llm2clip, models[-1][1].context_length)
    if args.cosmo:
        from clipforge.interop.text_tokenizers import CausalLMTokenizer

        models = [] if args.only_cosmo else models
        name = f"cosmo-tiny, split after layer {args.cosmo_split}"
        models.append((name, create_model("cosmo-tiny", seed=0,
                                          cosmo={"path": args.cosmo, "layers": None, "split": args.cosmo_split})))
        tokenizers[name] = CausalLMTokenizer(args.cosmo, models[-1][1].context_length)
    rows = []
    for name, model in models:
        rows.append(measure(name, model, args.reps, tokenizer=tokenizers.get(name)))
        print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
