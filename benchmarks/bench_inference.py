"""Inference speed of clipforge, transformers' ``CLIPModel`` and OpenCLIP with the same weights, side by side.

    nice -n 10 python benchmarks/bench_inference.py [--models ViT-B-32] [--dtypes fp32 bf16]
        [--image-batches 1 32] [--text-batches 1 256] [--repeats 3] [--threads 1] [--json out.json]

One randomly initialized clipforge model per architecture (speed does not depend on what the
weights learned) is exported to the other two libraries: to a transformers ``CLIPModel`` directory
with clipforge's Hugging Face export (``clipforge.interop.export_hf``) and to an OpenCLIP state dict
with clipforge's OpenCLIP key map, which OpenCLIP loads into ``open_clip.create_model(NAME)`` in its
own venv (``bash ../shared/anchors/openclip-venv.sh``; ``--openclip-python``), in a worker
subprocess that stays up for the whole run. Before timing each dtype, the script checks that the
three give the same normalized embeddings (max |difference| printed; it stops above 1e-3 in fp32,
5e-2 in bf16).

Each library runs in the way its users call it, with weights cast once to the dtype (no autocast):

- clipforge: ``model.to_inference(dtype)``, then ``encode_image(pixels)`` and ``encode_text(ids)`` with
  ids as ``clipforge.tokenize`` returns them (padded to 77); the text tower runs each text only up to its
  end-of-text token, a batch of texts packed (see clipforge/models/text.py and packed_text.py);
- transformers: ``CLIPModel.from_pretrained(dir, torch_dtype=dtype)`` (SDPA attention), then
  ``get_image_features`` and ``get_text_features(input_ids, attention_mask)`` with the ids padded to the
  longest text of the batch, as ``CLIPTokenizer(..., padding=True)`` returns them;
- OpenCLIP: ``create_model(NAME)`` + ``load_state_dict`` + ``.to(dtype)``, then ``encode_image`` and
  ``encode_text`` with its tokenizer's 77-token ids, normalized as clipforge's and transformers' are.

Texts are 32 hand-written captions of realistic lengths (2 to 28 words: 5 to 37 tokens with the
start and end tokens, median 19), cycled to fill a batch. Tokenization and image decoding are
outside the timed calls.

``--compile`` adds a fourth column for images: clipforge's image tower through
``clipforge.models.compiled_encoder.CompiledImageEncoder`` (``torch.compile``, inductor, frozen weights; what
``clipforge embed --compile`` runs), compiled once per image batch size before that cell is timed (the compile
time and its max |embedding difference| to the eager model are printed), with its ratios to transformers, OpenCLIP
and eager clipforge.

``--unfused`` adds a column for every cell: the same clipforge model with the fused inference layers undone
(``clipforge.models.fused_inference.unfuse``: ``F.linear``, a separate GELU and SDPA attention, what ``to_inference``
ran before the fused layers), with the ratio of the fused model to it.

``--unpacked`` adds a column for text cells: the same clipforge model with packed text inference undone
(``clipforge.models.packed_text.unpack_text_towers``: the batch sorted by length and cut per bucket of 32
texts at the bucket's longest, what ``to_inference`` ran before packing), with the ratio of the packed model to it.

Timing: within each repeat, every (dtype, input, batch) cell runs the three libraries one after
the other, in an order that rotates between repeats, so that a shared machine's load hits all
alike; each library makes one warm-up call on the first 8 rows of the batch and then
``--calls`` timed calls, whose median is that repeat's time. Reported per cell: items/s as the
median over repeats (min..max) and the
ratios clipforge / transformers and clipforge / OpenCLIP, each the median of the per-repeat
ratios of calls taken side by side. Runs on ``--threads`` intra-op threads in every library.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the anchor venv the tests use (CLIPFORGE_OPENCLIP_PYTHON, as .ci/run sets it), else where the docs build it
OPENCLIP_PYTHON = os.environ.get("CLIPFORGE_OPENCLIP_PYTHON", "/work/.anchor-openclip/bin/python")
WARM_ROWS = 8  # the warm-up call runs this many rows of the batch (a full extra call costs minutes when loaded)

CAPTIONS = [
    "A dog.",
    "Two cats asleep on a sofa.",
    "A red bicycle leaning against a brick wall.",
    "A man in a blue jacket walking his dog along a snowy path.",
    "Close-up of a bowl of ramen with a soft-boiled egg and green onions.",
    "A small child in a yellow raincoat jumping into a puddle on a grey afternoon.",
    "Aerial view of a coastal town with white houses, a harbour full of fishing boats and hills behind it.",
    "A vintage typewriter on a wooden desk next to a cup of coffee and a stack of old letters.",
    "Sunset over the mountains.",
    "A group of friends laughing around a campfire at night, with a tent and a guitar in the background.",
    "Stock photo: businesswoman using a laptop in a modern office with large windows and plants.",
    "A plate of pancakes with blueberries and maple syrup.",
    "The interior of a cathedral with stained glass windows casting coloured light on the stone floor.",
    "A green tractor ploughing a field while birds follow it looking for worms in the fresh soil.",
    "Black and white portrait of an elderly fisherman with a weathered face and a knitted cap.",
    "Three ripe tomatoes on a cutting board.",
    "A train crossing a stone viaduct in autumn.",
    "Product shot of white running shoes on a plain grey background, side view, studio lighting.",
    "A street market in the evening, stalls lit by strings of bulbs, people buying fruit, spices and fish.",
    "An orange cat sitting in a cardboard box.",
    "Diagram of the water cycle showing evaporation, condensation, precipitation and collection, with arrows "
    "and labels for each stage, drawn in a flat illustration style for a school textbook.",
    "A lighthouse on a rocky cliff during a storm, waves crashing below and dark clouds overhead.",
    "Hand-drawn sketch of a house.",
    "A woman reading a book in a hammock between two palm trees on a quiet beach.",
    "Kitchen with wooden cabinets, a marble countertop and copper pans hanging above the stove.",
    "A skateboarder performing a trick on a ramp in an urban skate park, graffiti on the walls.",
    "Macro photograph of a bee collecting pollen from a purple flower.",
    "A city skyline at night reflected in the river.",
    "Screenshot of a spreadsheet.",
    "Two horses grazing in a misty meadow at dawn, a wooden fence in the foreground and forest behind.",
    "A birthday cake with lit candles on a table surrounded by balloons, presents and smiling children "
    "wearing paper party hats, photographed from above in warm indoor light.",
    "Snow-covered pine trees.",
]


def captions(n: int) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]


# ---------------------------------------------------------------- OpenCLIP worker (its own venv)

def openclip_worker(threads: int) -> None:
    """Read JSON commands from stdin, answer one JSON line each; imports only torch and open_clip."""
    import open_clip
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    model = inputs = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "load":
            model = open_clip.create_model(cmd["name"])
            model.load_state_dict(torch.load(cmd["weights"], weights_only=True))
            dtype = getattr(torch, cmd["dtype"])
            model = model.to(dtype).eval().requires_grad_(False)
            inputs = torch.load(cmd["inputs"], weights_only=True)
            inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            answer = {"ok": True}
        elif cmd["op"] == "embed":
            with torch.inference_mode():
                img = F.normalize(model.encode_image(inputs["pixels"][: cmd["images"]]).float(), dim=-1)
                txt = F.normalize(model.encode_text(inputs["ids"][: cmd["texts"]]).float(), dim=-1)
            torch.save({"image": img, "text": txt}, cmd["out"])
            answer = {"ok": True}
        elif cmd["op"] == "time":
            kind, batch = cmd["kind"], cmd["batch"]
            x = inputs["pixels"][:batch] if kind == "image" else inputs["ids"][:batch]
            encode = model.encode_image if kind == "image" else model.encode_text
            answer = {"seconds": timed_calls(partial(_normalized, encode), x, cmd["calls"])}
        else:
            answer = {"error": f"unknown op {cmd['op']}"}
        print(json.dumps(answer), flush=True)


def _normalized(encode, x):
    import torch.nn.functional as F

    return F.normalize(encode(x), dim=-1)


class OpenCLIPWorker:
    def __init__(self, python: str, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([python, __file__, "--worker", "--threads", str(threads)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the OpenCLIP worker died; run it by hand to see why")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def timed_calls(fn, x, calls: int) -> list[float]:
    """One warm-up call ``fn(x[:WARM_ROWS])``, then ``calls`` timed calls ``fn(x)`` (seconds each)."""
    import torch

    with torch.inference_mode():
        fn(x[:WARM_ROWS])
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn(x)
            out.append(time.perf_counter() - t0)
    return out


def print_ab_table(results: list, other: str, this: str, ratio: str, unit: dict) -> None:
    """The rows timed with the ``other`` clipforge column (``--unfused``, ``--unpacked``): both rates and the ratio."""
    rows = [r for r in results if other in r]
    if not rows:
        return
    print(f"\n| model | dtype | input | batch | clipforge ({this}) | {other} | {this} vs {other.split()[-1]} |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        rates = [f"{r[k]['median']:.1f} ({r[k]['min']:.1f}..{r[k]['max']:.1f})" for k in ("clipforge", other)]
        print(f"| {r['model']} | {r['dtype']} | {unit[r['input']]} | {r['batch']} | " + " | ".join(rates)
              + f" | {r[ratio]:.2f}x |")


COMPILED = "clipforge compiled"
UNFUSED = "clipforge unfused"
UNPACKED = "clipforge unpacked"


def compiled_encoder(cf, pixels, name: str, dtype: str):
    """clipforge's compiled image encoder for ``len(pixels)`` images, compiled now (outside the timing), with its
    compile time and its difference to the eager model printed."""
    import torch

    from clipforge.models.compiled_encoder import CompiledImageEncoder

    torch._dynamo.reset()  # the graphs of earlier cells are cached on the same code: start each cell with none
    enc = CompiledImageEncoder(cf, len(pixels))
    compiled = enc(pixels)
    with torch.inference_mode():
        diff = (compiled - cf.encode_image(pixels)).abs().max().item()
    took = "-" if enc.compile_seconds is None else f"{enc.compile_seconds:.0f}"
    print(f"{name} {dtype} compiled image encoder, batch {len(pixels)}: compiled in {took} s"
          f"{' (FAILED: ' + enc.failed + ')' if enc.failed else ''}, max |embedding difference| vs eager {diff:.1e}",
          flush=True)
    return enc


# ---------------------------------------------------------------- main process

def build(name: str, workdir: Path):
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    import clipforge
    from clipforge.interop import export_hf
    from clipforge.interop.keymap import export_state
    from clipforge.interop.openclip_layout import openclip_rules

    model = clipforge.create_model(name, seed=0).eval()
    hf_dir = export_hf(model, workdir / f"hf-{name}")
    oc_weights = workdir / f"openclip-{name}.pt"
    torch.save(export_state(openclip_rules(model.cfg), model.state_dict()), oc_weights)
    return model, hf_dir, oc_weights


def make_inputs(model, max_images: int, max_texts: int, path: Path):
    import torch

    import clipforge

    g = torch.Generator().manual_seed(0)
    size = model.image_size
    pixels = torch.randn(max_images, 3, size, size, generator=g)
    ids = clipforge.tokenize(captions(max_texts), context_length=model.context_length)
    torch.save({"pixels": pixels, "ids": ids}, path)
    return pixels, ids


def _pooled(out):
    """transformers 5 returns the projected features as ``pooler_output`` of an output object, 4 a tensor."""
    return out if hasattr(out, "float") else out.pooler_output


def hf_image(hf, x):
    import torch.nn.functional as F

    return F.normalize(_pooled(hf.get_image_features(pixel_values=x)).float(), dim=-1)


def hf_text(hf, x):
    import torch.nn.functional as F

    cut, mask = hf_text_inputs(x, hf.config.text_config.pad_token_id)
    return F.normalize(_pooled(hf.get_text_features(input_ids=cut, attention_mask=mask)).float(), dim=-1)


def hf_text_inputs(ids, pad_id: int):
    """transformers' padding=True: cut at the longest text of the batch, with the attention mask."""
    import torch

    eot = ids.argmax(dim=1)  # the end-of-text token has the largest id
    n = int(eot.max()) + 1
    cut = ids[:, :n].clone()
    mask = (torch.arange(n)[None, :] <= eot[:, None]).long()
    cut[mask == 0] = pad_id
    return cut, mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["ViT-B-32"])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16"])
    p.add_argument("--image-batches", nargs="*", type=int, default=[1, 32], help="none: no image cells")
    p.add_argument("--text-batches", nargs="*", type=int, default=[1, 256], help="none: no text cells")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=1, help="timed calls per library per cell and repeat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--openclip-python", default=OPENCLIP_PYTHON)
    p.add_argument("--skip-openclip", action="store_true")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--compile", action="store_true",
                   help="also time clipforge's compiled image encoder (clipforge embed --compile) on image cells")
    p.add_argument("--unfused", action="store_true",
                   help="also time clipforge's model with the fused inference layers undone (an A/B of the fusion)")
    p.add_argument("--unpacked", action="store_true",
                   help="also time clipforge's model with packed text inference undone on text cells (an A/B of "
                        "the packing)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return openclip_worker(a.threads)

    import torch

    torch.set_num_threads(a.threads)
    from transformers import CLIPModel

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results = []
    load = os.getloadavg()
    print(f"threads {a.threads}, load average at start {load[0]:.1f}, torch {torch.__version__}", flush=True)
    worker = None if a.skip_openclip else OpenCLIPWorker(a.openclip_python, a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in a.models:
            model, hf_dir, oc_weights = build(name, tmp)
            pixels, ids = make_inputs(model, max([4, *a.image_batches]), max([8, *a.text_batches]),  # parity: 4 and 8
                                      tmp / "inputs.pt")
            lengths = (ids.argmax(dim=1) + 1).tolist()
            print(f"{name}: text lengths in tokens min {min(lengths)} median {statistics.median(lengths)} "
                  f"max {max(lengths)}", flush=True)
            del model
            for dt in a.dtypes:
                import clipforge

                cf = clipforge.create_model(name, seed=0).to_inference(torch_dtype[dt])
                plain = None
                if a.unfused:
                    from clipforge.models.fused_inference import unfuse

                    plain = clipforge.create_model(name, seed=0).to_inference(torch_dtype[dt])
                    print(f"{name} {dt}: {unfuse(plain)} blocks unfused for the {UNFUSED} column", flush=True)
                bucketed = None
                if a.unpacked:
                    from clipforge.models.packed_text import unpack_text_towers

                    bucketed = clipforge.create_model(name, seed=0).to_inference(torch_dtype[dt])
                    print(f"{name} {dt}: {unpack_text_towers(bucketed)} text tower unpacked for the {UNPACKED} "
                          "column", flush=True)
                hf = CLIPModel.from_pretrained(hf_dir, dtype=torch_dtype[dt], attn_implementation="sdpa").eval()
                hf.requires_grad_(False)
                if worker:
                    worker.ask(op="load", name=name, weights=str(oc_weights), dtype={"fp32": "float32",
                               "bf16": "bfloat16"}[dt], inputs=str(tmp / "inputs.pt"))
                hp = pixels.to(torch_dtype[dt])
                # parity of the three on 4 images and 8 texts
                with torch.inference_mode():
                    ref_i, ref_t = cf.encode_image(pixels[:4]), cf.encode_text(ids[:8])
                    diffs = {"transformers": max((hf_image(hf, hp[:4]) - ref_i).abs().max().item(),
                                                 (hf_text(hf, ids[:8]) - ref_t).abs().max().item())}
                if worker:
                    worker.ask(op="embed", images=4, texts=8, out=str(tmp / "oc.pt"))
                    oc = torch.load(tmp / "oc.pt", weights_only=True)
                    diffs["OpenCLIP"] = max((oc["image"] - ref_i).abs().max().item(),
                                            (oc["text"] - ref_t).abs().max().item())
                print(f"{name} {dt} parity, max |embedding difference| vs clipforge: {diffs}", flush=True)
                if max(diffs.values()) > (1e-3 if dt == "fp32" else 5e-2):
                    raise SystemExit("the libraries disagree; the weights were not carried over")
                cells = [("image", b) for b in a.image_batches] + [("text", b) for b in a.text_batches]
                for kind, batch in cells:
                    libs = ["clipforge", "transformers", "OpenCLIP"] + ([UNFUSED] if plain is not None else [])
                    if bucketed is not None and kind == "text":
                        libs.append(UNPACKED)
                    if a.compile and kind == "image":
                        libs.append(COMPILED)
                        compiled = compiled_encoder(cf, pixels[:batch], name, dt)
                    per = {lib: [] for lib in libs}
                    for r in range(a.repeats):
                        order = libs[r % len(libs):] + libs[: r % len(libs)]
                        for lib in order:
                            if lib == COMPILED:
                                secs = timed_calls(compiled, pixels[:batch], a.calls)
                            elif lib in ("clipforge", UNFUSED, UNPACKED):
                                m = {"clipforge": cf, UNFUSED: plain, UNPACKED: bucketed}[lib]
                                x = pixels[:batch] if kind == "image" else ids[:batch]
                                fn = m.encode_image if kind == "image" else m.encode_text
                                secs = timed_calls(fn, x, a.calls)
                            elif lib == "transformers":
                                x = hp[:batch] if kind == "image" else ids[:batch]
                                fn = partial(hf_image if kind == "image" else hf_text, hf)
                                secs = timed_calls(fn, x, a.calls)
                            elif worker:
                                secs = worker.ask(op="time", kind=kind, batch=batch, calls=a.calls)["seconds"]
                            else:
                                continue
                            per[lib].append(batch / statistics.median(secs))
                    row = {"model": name, "dtype": dt, "input": kind, "batch": batch,
                           "load_average": os.getloadavg()[0]}
                    for lib, rates in per.items():
                        if rates:
                            row[lib] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                                        "per_repeat": rates}
                    for other in ("transformers", "OpenCLIP"):
                        if per[other]:
                            row[f"vs {other}"] = statistics.median(c / o for c, o in zip(per["clipforge"], per[other]))
                            if per.get(COMPILED):
                                row[f"compiled vs {other}"] = statistics.median(
                                    c / o for c, o in zip(per[COMPILED], per[other]))
                    if per.get(UNFUSED):
                        row["clipforge vs unfused"] = statistics.median(
                            c / o for c, o in zip(per["clipforge"], per[UNFUSED]))
                    if per.get(UNPACKED):
                        row["clipforge vs unpacked"] = statistics.median(
                            c / o for c, o in zip(per["clipforge"], per[UNPACKED]))
                    if per.get(COMPILED):
                        row["compiled vs clipforge"] = statistics.median(
                            c / o for c, o in zip(per[COMPILED], per["clipforge"]))
                    results.append(row)
                    print(json.dumps(row), flush=True)
                cf = hf = plain = bucketed = None  # free this dtype's models before the next are built
    if worker:
        worker.close()
    unit = {"image": "images/s", "text": "texts/s"}
    print("\n| model | dtype | input | batch | clipforge | transformers | OpenCLIP | vs transformers | vs OpenCLIP |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cols = []
        for lib in ("clipforge", "transformers", "OpenCLIP"):
            v = r.get(lib)
            cols.append(f"{v['median']:.1f} ({v['min']:.1f}..{v['max']:.1f})" if v else "-")
        ratios = [f"{r[k]:.2f}x" if k in r else "-" for k in ("vs transformers", "vs OpenCLIP")]
        head = f"| {r['model']} | {r['dtype']} | {unit[r['input']]} | {r['batch']} | "
        print(head + " | ".join(cols + ratios) + " |")
    compiled_rows = [r for r in results if COMPILED in r]
    if compiled_rows:
        print("\n| model | dtype | batch | clipforge compiled | vs clipforge (eager) | vs transformers | vs OpenCLIP |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in compiled_rows:
            v = r[COMPILED]
            ratios = [f"{r[k]:.2f}x" if k in r else "-" for k in
                      ("compiled vs clipforge", "compiled vs transformers", "compiled vs OpenCLIP")]
            rate = f"{v['median']:.1f} ({v['min']:.1f}..{v['max']:.1f})"
            print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {rate} | " + " | ".join(ratios) + " |")
    print_ab_table(results, UNFUSED, "fused", "clipforge vs unfused", unit)
    print_ab_table(results, UNPACKED, "packed", "clipforge vs unpacked", unit)
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": a.threads, "load_average_start": load[0], "rows": results},
                                           indent=1))


if __name__ == "__main__":
    main()
