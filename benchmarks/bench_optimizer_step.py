"""The token table's AdamW update: clipforge's row-wise ``TouchedRowsAdamW`` against torch's dense fused AdamW.

    python benchmarks/bench_optimizer_step.py [--model tiny] [--overrides JSON] [--batch 128] [--steps 30]
        [--texts shapes random-stream] [--precision bf16 fp32] [--threads 2]

For each precision and kind of texts, two copies of the same model (same initial weights) train side by side in one
process, the two alternating step by step (ABBA...), each with the optimizer ``clipforge train`` builds
(``build_optimizer``: row-wise update of the 49,408-row token table) or with torch's fused AdamW over the same
parameter groups (every row every step). Prints a markdown table: the median (min..max) time of ``optimizer.step``
and of the whole step (forward, backward, step) over the timed steps, how many table rows the row-wise update
touched, and whether the two copies' weights are bit-for-bit equal at the end (they must be: the row-wise update is
exact). ``--texts`` as in ``bench_train_throughput.py``: ``shapes`` captions (a few dozen distinct tokens) or
``random-stream`` (fresh uniform tokens every step: the table is soon past ``dense_fraction`` and takes the dense
step, the worst case).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _summary(values: list[float]) -> str:
    values = sorted(values)
    return f"{values[len(values) // 2] * 1e3:.2f} ({values[0] * 1e3:.2f}..{values[-1] * 1e3:.2f})"


def measure(spec: dict, batch: int, steps: int, precision: str, kind: str, warmup: int = 4) -> dict:
    import torch
    from bench_train_throughput import clipforge_optimizer, make_images, make_texts

    from clipforge.losses import clip_loss
    from clipforge.models import CLIP, CLIPConfig

    texts, images = make_texts(spec, batch, kind, warmup + steps), make_images(spec, batch)
    arms = {}
    for name in ("row-wise", "dense"):
        torch.manual_seed(0)
        model = CLIP(CLIPConfig.from_dict(spec)).train()
        opt = clipforge_optimizer(model, dense_adamw=name == "dense")
        arms[name] = (model, opt, [], [])
    for i in range(warmup + steps):
        for name in ("row-wise", "dense") if i % 2 == 0 else ("dense", "row-wise"):
            model, opt, step_times, opt_times = arms[name]
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(images, texts[i])
            clip_loss(out["image_features"].float(), out["text_features"].float(),
                      out["logit_scale"].float()).backward()
            t1 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if i >= warmup:
                step_times.append(t2 - t0)
                opt_times.append(t2 - t1)
    rows_model, rows_opt = arms["row-wise"][:2]
    table = rows_model.text.token_embedding.weight
    touched = rows_opt._touched.get(id(table))
    equal = all(torch.equal(a, b) for a, b in zip(rows_model.parameters(), arms["dense"][0].parameters()))
    return {
        "arms": {n: (a[2], a[3]) for n, a in arms.items()},
        "touched": "dense step" if id(table) in rows_opt._dense else f"{int(touched.sum())} of {table.shape[0]}",
        "equal": equal,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--overrides", default="{}", help="JSON merged into the model config")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per arm (after 4 warm-up steps)")
    ap.add_argument("--texts", nargs="+", default=["shapes", "random-stream"], choices=["shapes", "random-stream"])
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import torch
    from bench_train_throughput import model_spec

    torch.set_num_threads(args.threads)
    spec = model_spec(args.model, json.loads(args.overrides))
    t = spec["text"]
    print(f"model={args.model} overrides={args.overrides} (text width {t['width']}, token table {t['vocab_size']} x "
          f"{t['width']}) batch={args.batch} steps={args.steps} threads={args.threads} torch={torch.__version__}\n")
    print("| precision | texts | optimizer | optimizer.step ms median (min..max) | whole step ms median (min..max) "
          "| table rows updated | weights bit-equal |")
    print("|---|---|---|---|---|---|---|")
    for p in args.precision:
        for kind in args.texts:
            r = measure(spec, args.batch, args.steps, p, kind)
            for name, (step_times, opt_times) in r["arms"].items():
                rows = r["touched"] if name == "row-wise" else "all, every step"
                print(f"| {p} | {kind} | {name} | {_summary(opt_times)} | {_summary(step_times)} | {rows} "
                      f"| {'yes' if r['equal'] else 'NO'} |")


if __name__ == "__main__":
    main()
