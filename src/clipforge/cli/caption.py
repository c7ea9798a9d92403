"""``clipforge caption``: caption images with a model that has a decoder (CoCa) or a MacCap decoder directory.

    clipforge caption runs/coca --images photos/ --out captions.jsonl                 # CoCa, greedy
    clipforge caption runs/coca --dataset shapes:val --size 200 --method beam --out c.jsonl
    clipforge caption runs/maccap --images photos/ --out captions.jsonl               # MacCap (text-only trained)

One JSON record per image: ``id`` (file path or dataset:split:index), ``caption``, ``clip_s`` (CLIP-S of the
caption under the model's own CLIP), and for datasets ``references``; MacCap records add the re-ranked
``candidates``. With a dataset, a summary (BLEU-4, CIDEr-D, CLIP-S, RefCLIP-S, and attribute accuracy on
shapes) is printed and written next to the output as ``*.summary.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_load_arguments, load_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a CoCa run/checkpoint/model directory, or a MacCap decoder directory (maccap.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files or directories (searched recursively)")
    src.add_argument("--dataset", metavar="NAME[:SPLIT]", help="a registered dataset with reference captions, e.g. "
                                                               "shapes:val (its captions become the references)")
    p.add_argument("--method", choices=["greedy", "beam", "maccap"], default=None,
                   help="greedy or beam search with a CoCa decoder; maccap for a MacCap directory "
                        "(the default for one)")
    p.add_argument("--num-beams", type=int, default=4, help="hypotheses kept by --method beam (default 4)")
    p.add_argument("--max-len", type=int, default=32, help="tokens per caption, start and end included (default 32)")
    p.add_argument("--size", type=int, default=500, help="images taken from --dataset (default 500)")
    p.add_argument("--seed", type=int, default=12345, help="--dataset seed, and MacCap's noise seed (default 12345)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--out", required=True, help="output .jsonl file, one record per image")
    add_load_arguments(p)


def _batches(args, transform, image_size: int):
    """Yield (ids, pixels [B, 3, H, W], references or None, scenes or None); second value: the total count."""
    import torch

    if args.images:
        from ..data.image_files import IMAGE_SUFFIXES
        from ..images import load_image
        from ..serve.embed import image_paths

        files = image_paths(args.images)
        if not files:
            raise ValueError(f"no images found in {' '.join(args.images)} "
                             f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                             "give a folder that holds images, or image files")
        def gen():
            for i in range(0, len(files), args.batch_size):
                chunk = files[i : i + args.batch_size]
                yield [str(f) for f in chunk], torch.stack([transform(load_image(f)) for f in chunk]), None, None
        return gen(), len(files)
    from ..data import build_dataset
    from ..transforms import normalize_batch

    name, _, split = args.dataset.partition(":")
    ds = build_dataset(name, split=split or "val", size=args.size, seed=args.seed, image_size=image_size)
    if len(ds) == 0:
        raise ValueError(f"--dataset {args.dataset} has no images")

    def gen():
        for i in range(0, len(ds), args.batch_size):
            items = [ds[j] for j in range(i, min(i + args.batch_size, len(ds)))]
            pixels = normalize_batch(torch.stack([it["image"] for it in items]))
            ids = [f"{name}:{split or 'val'}:{j}" for j in range(i, i + len(items))]
            yield ids, pixels, [list(it["captions"]) for it in items], items
    return gen(), len(ds)


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..captioning import attribute_accuracy, bleu, cider_d, clip_s, ref_clip_s
    from ..tokenizer import get_tokenizer

    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise ValueError(f"--out must end in .jsonl, got '{out.name}'")
    if args.num_beams < 1 or args.max_len < 2 or args.batch_size < 1:
        raise ValueError("--num-beams and --batch-size must be >= 1 and --max-len >= 2")
    from ..captioning.loading import load_captioner

    kind, model, transform = load_captioner(args.model, args.method, load_options(args))
    clip = model.clip if kind == "maccap" else model
    tok = get_tokenizer(clip.context_length)
    batches, total = _batches(args, transform, clip.image_size)
    gen = torch.Generator().manual_seed(args.seed)
    records, refs_all, scenes_all, img_feats, cap_feats = [], [], [], [], []
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f, tqdm(total=total, desc="caption", unit="img") as bar:
        for ids, pixels, refs, scenes in batches:
            with torch.no_grad():
                if kind == "maccap":
                    recs = model.caption(pixels, gen, args.max_len)
                else:
                    beams = args.num_beams if args.method == "beam" else 1
                    caps = model.generate(pixels, max_len=args.max_len, num_beams=beams)
                    recs = [{"caption": tok.decode(c.tolist())} for c in caps]
                v = clip.encode_image(pixels).float()
                t = clip.encode_text(tok([r["caption"] for r in recs])).float()
            scores = clip_s(t, v)
            for i, r in enumerate(recs):
                rec = {"id": ids[i], "caption": r["caption"], "clip_s": round(float(scores[i]), 4)}
                if refs is not None:
                    rec["references"] = refs[i]
                if "candidates" in r:
                    rec["candidates"] = r["candidates"]
                f.write(json.dumps(rec) + "\n")
                records.append(rec)
            if refs is not None:
                refs_all += refs
                scenes_all += scenes
                img_feats.append(v)
                cap_feats.append(t)
            bar.update(len(ids))
    print(f"wrote {len(records)} captions to {out} (method {kind if kind == 'maccap' else args.method or 'greedy'}); "
          f"mean CLIP-S {sum(r['clip_s'] for r in records) / len(records):.4f}")
    if refs_all:
        caps = [r["caption"] for r in records]
        with torch.no_grad():
            ref_feats = [clip.encode_text(tok(r)).float() for r in refs_all]
        summary = {"n": len(caps), "bleu4": bleu(caps, refs_all), "cider_d": cider_d(caps, refs_all)[0],
                   "clip_s": float(clip_s(torch.cat(cap_feats), torch.cat(img_feats)).mean()),
                   "ref_clip_s": float(ref_clip_s(torch.cat(cap_feats), torch.cat(img_feats), ref_feats).mean())}
        if args.dataset.partition(":")[0] == "shapes":
            summary["attributes"] = attribute_accuracy(caps, scenes_all)
        out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    return 0
