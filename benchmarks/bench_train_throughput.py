"""Training throughput of clipforge vs OpenCLIP on an identical architecture, side by side.

Both sides train the same dual encoder (the ``tiny`` config unless --model says otherwise:
ViT 64 px / patch 8 / width 128 / 4 layers / 4 heads; text 32 tokens / width 128 /
4 layers / 4 heads; embed 128) with the same batch, AdamW and symmetric CLIP loss, in
fp32 and in bf16 autocast, on the same threads. OpenCLIP runs in its own venv
(``bash ../shared/anchors/openclip-venv.sh``), launched as a subprocess of this script.

    python benchmarks/bench_train_throughput.py [--batch 128] [--steps 20] [--threads 2] [--repeats 3]
        [--compile] [--overrides '{"vision": {"width": 512, "heads": 8}}'] [--peak]
        [--texts random|random-stream|shapes] [--dense-adamw] [--onednn-linear]

Prints a markdown table of samples/s (median over --repeats runs, min..max beside it; the
runs of the two libraries alternate, each repeat starting with the next implementation, so that
the load of a shared machine hits both alike)
and the clipforge/OpenCLIP ratio. Every run is a fresh process of its own, clipforge's as well
as OpenCLIP's, so both start each run alike (nothing cached from an earlier repeat). The
development VMs' speed drifts by up to ~30% from one few-second window to the next
(``bench_speed_modes.py``), so short alternating runs and the per-repeat ratios' spread are
what to read, not a single run. ``--compile`` adds a clipforge row with the towers under
torch.compile (``CLIPConfig.compile``) and an OpenCLIP row with its whole model under torch.compile (what
``open_clip_train --torchcompile`` does), reports their compilation times (the first step of each one's first
process) and the ratio of the two compiled rows.
The "vs OpenCLIP" column is the median of the per-repeat ratios (repeat i of clipforge over repeat i of
OpenCLIP), min..max beside it.

The texts decide how much of the 49,408-row token table a step touches, and so the cost of
clipforge's row-wise AdamW update of that table (``TouchedRowsAdamW``): ``--texts random`` (default)
reuses one batch of tokens drawn uniformly from the vocabulary every step (~2,500 rows touched);
``random-stream`` draws fresh uniform tokens every step, the worst case (within ~20 steps most rows have
been touched and the table takes the dense step); ``shapes`` tokenizes a fresh batch of captions of the
``shapes`` dataset every step, what ``tiny`` trains on (a few dozen distinct tokens). ``--dense-adamw``
adds a clipforge row with torch's plain fused AdamW, the update the row-wise one replaces. ``--onednn-linear``
adds a clipforge row whose fp32 linear layers and their gradients run as oneDNN kernels
(``clipforge.models.onednn_linear``, what ``clipforge train --fp32-linear onednn`` does); ``--peak`` counts
oneDNN's fp32 linear in the fp32 peak too, whichever of the two is faster on the CPU.

Model FLOPs per sample are counted with ``torch.utils.flop_counter.FlopCounterMode`` over
one forward + backward of the clipforge model (GEMMs, the patch projection and attention
matmuls; elementwise work is not counted, as usual for MFU). OpenCLIP trains the same
architecture, so the same count applies to it. ``--peak`` measures the machine's achieved
GEMM peak (benchmarks/bench_peak.py) in the same run and prints MFU = achieved FLOP/s /
peak FLOP/s against the bf16 peak for bf16 rows and the fp32 peak for fp32 rows.

Memory allocator: clipforge trains with the glibc malloc settings every ``clipforge`` command applies
(``clipforge.allocator.configure``: freed blocks kept for the next step); ``--system-malloc`` trains it with
glibc's defaults instead. OpenCLIP runs with glibc's defaults, as ``open_clip_train`` does, unless
``--openclip-tuned-malloc`` gives its process the same settings. ``benchmarks/bench_allocator.py`` measures
the settings alone, alternating processes with and without them.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR_SCRIPT = ROOT.parent / "shared" / "anchors" / "openclip-venv.sh"


def model_spec(name: str, overrides: dict | None = None) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from clipforge.models import get_model_config

    spec = get_model_config(name).to_dict()
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return spec


def train_flops_per_sample(spec: dict, batch: int = 8) -> float:
    """FLOPs of one forward + backward per sample, counted by FlopCounterMode (fp32, eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    from clipforge.losses import clip_loss
    from clipforge.models import CLIP, CLIPConfig

    model = CLIP(CLIPConfig.from_dict({**spec, "compile": False})).train()
    images, texts = make_images(spec, batch), make_texts(spec, batch, "random", 1)[0]
    with FlopCounterMode(display=False) as counter:
        out = model(images, texts)
        clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    return counter.get_total_flops() / batch


def train_step(model, loss_fn, opt, images, texts, precision: str) -> None:
    """One optimizer step as every training benchmark here takes it: the forward under bf16 autocast for "bf16"
    (``model`` returns (image features, text features, logit scale), or clipforge's output dict), the loss in
    fp32, backward, the optimizer's step, gradients set to None."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(images, texts)
    if isinstance(out, dict):
        out = out["image_features"], out["text_features"], out["logit_scale"]
    img, txt, scale = out
    loss_fn(img.float(), txt.float(), scale.float()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(
    model, loss_fn, images, text_batches, steps: int, precision: str, make_opt, warmup: int = 3
) -> tuple[float, float]:
    """(samples/s of the median step, seconds of the first step: the compilation when compiled); step i trains on
    ``text_batches[i % len(text_batches)]``."""
    opt = make_opt(model)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        train_step(model, loss_fn, opt, images, text_batches[i % len(text_batches)], precision)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if i == 0:
            first = time.perf_counter() - t0
    times.sort()
    return images.shape[0] / times[len(times) // 2], first  # median step


def clipforge_optimizer(model, dense_adamw: bool = False):
    """The optimizer ``clipforge train`` builds (``build_optimizer``: no weight decay on norms, biases, embeddings
    and the logit scale; the token table updated only in the rows its tokens reached), at the fixed values every
    training benchmark here uses (lr 1e-4, weight decay 0.1, betas 0.9/0.98, eps 1e-6; the values do not change
    the time of a step). ``dense_adamw``: the same parameter groups in torch's own fused AdamW, which updates every
    row of the token table every step."""
    import torch

    from clipforge.train.optim import build_optimizer

    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.98), 1e-6)
    return torch.optim.AdamW(opt.param_groups, fused=True) if dense_adamw else opt


def run_clipforge(spec: dict, texts: list, precision: str, steps: int, compile: bool = False,
                  dense_adamw: bool = False, onednn_linear: bool = False) -> tuple[float, float]:
    from clipforge.losses import clip_loss
    from clipforge.models import CLIP, CLIPConfig
    from clipforge.models.onednn_linear import onednn_fp32_linears

    model = CLIP(CLIPConfig.from_dict({**spec, "compile": compile}))

    images = make_images(spec, texts[0].shape[0])
    make_opt = lambda m: clipforge_optimizer(m, dense_adamw)
    with onednn_fp32_linears(onednn_linear and precision == "fp32"):  # what clipforge train --fp32-linear onednn does
        return time_steps(model.train(), clip_loss, images, texts, steps, precision, make_opt)


def openclip_env(tuned_malloc: bool) -> dict:
    """The environment of OpenCLIP's process: this one's without any malloc setting (glibc's defaults, what
    ``open_clip_train`` runs with), or with clipforge's (``clipforge.allocator.GLIBC_ENV``, which glibc reads at
    start-up)."""
    from clipforge.allocator import ENV_SWITCH, GLIBC_ENV

    env = {k: v for k, v in os.environ.items() if k not in GLIBC_ENV and k != ENV_SWITCH}
    if tuned_malloc:
        env.update({k: str(v) for k, v in GLIBC_ENV.items()})
    return env


def with_page_faults(run, steps: int) -> dict:
    """``run()`` (a ``run_*`` call) with the process's minor page faults per step (warm-up steps included) and
    its peak resident memory so far, and the seconds of its first step (the compilation, when compiled)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    samples_per_s, first = run()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"samples_per_s": samples_per_s, "first_step_s": first,
            "minor_faults_per_step": (usage.ru_minflt - before) / (steps + 3), "peak_rss_mb": usage.ru_maxrss / 1024}


def run_openclip(spec: dict, texts: list, precision: str, steps: int, compile: bool = False) -> tuple[float, float]:
    """OpenCLIP's ``CLIP`` with ``ClipLoss`` and torch's AdamW, as ``open_clip_train`` sets them up; ``compile``:
    the whole model under ``torch.compile``, as its ``--torchcompile`` does."""
    import open_clip
    import torch

    v, t = spec["vision"], spec["text"]
    cfg = {
        "embed_dim": spec["embed_dim"],
        "vision_cfg": {
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "width": v["width"],
            "layers": v["layers"],
            "head_width": v["width"] // v["heads"],
            "mlp_ratio": v["mlp_ratio"],
        },
        "text_cfg": {
            "context_length": t["context_length"],
            "vocab_size": t["vocab_size"],
            "width": t["width"],
            "heads": t["heads"],
            "layers": t["layers"],
            "mlp_ratio": t["mlp_ratio"],
        },
    }
    model = open_clip.CLIP(**cfg)
    loss = open_clip.ClipLoss()
    if compile:
        model = torch.compile(model)  # open_clip_train --torchcompile: torch.compile(original_model)

    images = make_images(spec, texts[0].shape[0])
    make_opt = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4)  # what open_clip_train uses (default foreach)
    # open_clip.CLIP returns (image features, text features, logit scale), which train_step takes as it is
    return time_steps(model.train(), loss, images, texts, steps, precision, make_opt)


def make_images(spec: dict, batch: int):
    import torch

    s = spec["vision"]["image_size"]
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0))


def make_texts(spec: dict, batch: int, kind: str, n: int) -> list:
    """``n`` token batches (one for ``random``): see the module docstring for the kinds."""
    import torch

    context = spec["text"]["context_length"]
    g = torch.Generator().manual_seed(0)
    if kind in ("random", "random-stream"):
        out = []
        for _ in range(1 if kind == "random" else n):
            texts = torch.randint(1, 49000, (batch, context), generator=g)
            texts[:, 20] = 49407  # end-of-text token
            texts[:, 21:] = 0
            out.append(texts)
        return out
    if kind == "shapes":
        from clipforge.data.shapes import ShapesGenerator
        from clipforge.tokenizer import tokenize

        gen = ShapesGenerator("train")
        return [tokenize([gen.sample(i * batch + j).captions[0] for j in range(batch)], context_length=context)
                for i in range(n)]
    raise ValueError(f"unknown --texts '{kind}'; choose random, random-stream or shapes")


def run_child(python: str, impl: str, spec: dict, texts_file: str, batch: int, steps: int, threads: int,
              precisions: list[str], env: dict, flags: list[str] | tuple = ()) -> dict | None:
    """One training process of this script's child mode (``impl`` "clipforge" or "openclip", under ``python``, with
    ``env``; ``flags``: --compile, --dense-adamw, --system-malloc): its JSON, per precision what ``with_page_faults``
    returns; None, its stderr printed, when it failed."""
    cmd = [python, __file__, "--_impl", impl, *flags, "--_spec", json.dumps(spec), "--_texts", texts_file,
           "--batch", str(batch), "--steps", str(steps), "--threads", str(threads), "--precision", *precisions]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"{impl} ({' '.join(precisions)}) failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def anchor_python() -> Path | None:
    """The OpenCLIP venv's python: CLIPFORGE_OPENCLIP_PYTHON (as .ci/run sets it), else ../.anchor-openclip, built
    there with the anchor script when missing."""
    if os.environ.get("CLIPFORGE_OPENCLIP_PYTHON") and Path(os.environ["CLIPFORGE_OPENCLIP_PYTHON"]).exists():
        return Path(os.environ["CLIPFORGE_OPENCLIP_PYTHON"])
    venv = ROOT.parent / ".anchor-openclip"
    py = venv / "bin" / "python"
    if not py.exists() and ANCHOR_SCRIPT.exists():
        subprocess.run(["bash", str(ANCHOR_SCRIPT), str(venv)], check=False, stdout=subprocess.DEVNULL)
    return py if py.exists() else None


def _summary(values: list[float]) -> str:
    values = sorted(values)
    med = values[len(values) // 2]
    return f"{med:.1f} ({values[0]:.0f}..{values[-1]:.0f})" if len(values) > 1 else f"{med:.1f}"


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _paired_ratio(these: list, those: list) -> str:
    """The median of the per-repeat ratios (repeat i of ``these`` over repeat i of ``those``, where both ran; a
    failed run is None) with their min..max, or "" when no repeat has both."""
    ratios = sorted(a / b for a, b in zip(these, those) if a is not None and b is not None)
    if not ratios:
        return ""
    return f"{_median(ratios):.2f}x" + (f" ({ratios[0]:.2f}..{ratios[-1]:.2f})" if len(ratios) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument(
        "--overrides", default="{}", help='JSON merged into the model config, e.g. \'{"vision": {"width": 512}}\''
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true",
                    help="add rows with clipforge compile=true and OpenCLIP under torch.compile")
    ap.add_argument("--no-openclip", action="store_true")
    ap.add_argument("--texts", default="random", choices=["random", "random-stream", "shapes"],
                    help="token batches: one reused random batch, fresh random ones, or shapes captions")
    ap.add_argument("--dense-adamw", action="store_true",
                    help="add a clipforge row with torch's fused AdamW (the token table updated densely)")
    ap.add_argument("--onednn-linear", action="store_true",
                    help="add a clipforge row whose fp32 linear layers run as oneDNN kernels (clipforge train "
                         "--fp32-linear onednn; bf16 rows are unchanged by it)")
    ap.add_argument("--peak", action="store_true", help="measure the GEMM peak (bench_peak.py) and print MFU")
    ap.add_argument("--system-malloc", action="store_true",
                    help="train clipforge with glibc's malloc defaults, not the settings clipforge's commands apply")
    ap.add_argument("--openclip-tuned-malloc", action="store_true",
                    help="give OpenCLIP's process clipforge's malloc settings too (default: glibc's)")
    ap.add_argument("--_impl", choices=["clipforge", "openclip"], help=argparse.SUPPRESS)
    ap.add_argument("--_spec", help=argparse.SUPPRESS)
    ap.add_argument("--_texts", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._impl != "openclip":
        sys.path.insert(0, str(ROOT / "src"))
        if not args.system_malloc:
            from clipforge import allocator

            allocator.configure()  # what every clipforge command does first (CLIPFORGE_MALLOC=system: nothing)
    import torch

    torch.set_num_threads(args.threads)
    if args._impl:  # a child process (OpenCLIP's inside its venv): one library, JSON on the last line
        spec = json.loads(args._spec)
        texts = torch.load(args._texts)
        if args._impl == "openclip":
            run = functools.partial(run_openclip, compile=args.compile)
        else:  # --compile / --dense-adamw pick the clipforge variant this process trains
            run = functools.partial(run_clipforge, compile=args.compile, dense_adamw=args.dense_adamw,
                                    onednn_linear=args.onednn_linear)
        out = {p: with_page_faults(lambda p=p: run(spec, texts, p, args.steps), args.steps) for p in args.precision}
        print(json.dumps(out))
        return

    spec = model_spec(args.model, json.loads(args.overrides))
    flops = train_flops_per_sample(spec)
    peak = None
    if args.peak:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_peak import achieved_peak

        peak = achieved_peak(args.threads)
    anchor = None if args.no_openclip else anchor_python()
    # implementation -> (python, child flags, environment)
    impls = {"clipforge": (sys.executable, [], dict(os.environ))}
    if args.compile:
        impls["clipforge compile=true"] = (sys.executable, ["--compile"], dict(os.environ))
    if args.dense_adamw:
        impls["clipforge dense AdamW"] = (sys.executable, ["--dense-adamw"], dict(os.environ))
    if args.onednn_linear:
        impls["clipforge oneDNN fp32 linears"] = (sys.executable, ["--onednn-linear"], dict(os.environ))
    if anchor:
        impls["OpenCLIP"] = (str(anchor), [], openclip_env(args.openclip_tuned_malloc))
        if args.compile:
            impls["OpenCLIP torch.compile"] = (str(anchor), ["--compile"], openclip_env(args.openclip_tuned_malloc))
    texts = make_texts(spec, args.batch, args.texts, args.steps + 3)  # 3 warmup steps
    texts_file = tempfile.NamedTemporaryFile(suffix=".pt", delete=False)
    torch.save(texts, texts_file.name)  # the same token batches for every process
    results = {(p, impl): [] for p in args.precision for impl in impls}
    compile_seconds = {}
    for p in args.precision:
        for r in range(args.repeats):  # alternate the libraries so that a shared machine's load hits both alike
            names = list(impls)
            for impl in names[r % len(names):] + names[:r % len(names)]:  # each repeat starts with the next one
                python, flags, env = impls[impl]
                if args.system_malloc and not impl.startswith("OpenCLIP"):
                    flags = [*flags, "--system-malloc"]
                out = run_child(python, "openclip" if impl.startswith("OpenCLIP") else "clipforge", spec,
                                texts_file.name, args.batch, args.steps, args.threads, [p], env, flags)
                if out is None:
                    results[(p, impl)].append(None)  # keeps repeat i of every implementation at index i
                    continue
                out = out[p]
                results[(p, impl)].append(out["samples_per_s"])
                if "--compile" in flags:  # later processes may read inductor's disk cache
                    compile_seconds.setdefault((p, impl), out["first_step_s"])
    Path(texts_file.name).unlink()
    v, t = spec["vision"], spec["text"]
    print(
        f"\nmodel={args.model} (vision {v['image_size']}px/patch {v['patch_size']}/width {v['width']}/{v['layers']} "
        "layers; "
        f"text {t['context_length']} tokens/width {t['width']}/{t['layers']} layers) batch={args.batch} "
        f"steps={args.steps} texts={args.texts} "
        f"repeats={args.repeats} threads={args.threads} torch={torch.__version__}"
    )
    print(f"malloc: clipforge {'glibc defaults' if args.system_malloc else 'clipforge.allocator settings'}, "
          f"OpenCLIP {'clipforge.allocator settings' if args.openclip_tuned_malloc else 'glibc defaults'}")
    print(f"training FLOPs per sample (forward + backward, FlopCounterMode): {flops / 1e9:.3f} GFLOP")
    if peak:
        print(
            f"achieved GEMM peak: bf16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s, fp32 {peak['float32'] / 1e9:.0f} GFLOP/s"
        )
    for (p, impl), secs in compile_seconds.items():
        print(f"{impl}, {p}: first step (compilation) {secs:.1f} s")
    print()
    print("| precision | implementation | samples/s median (min..max) | vs OpenCLIP | achieved GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for p in args.precision:
        oc = results.get((p, "OpenCLIP"))
        for impl in impls:
            vals = [v for v in results[(p, impl)] if v is not None]
            if not vals:
                continue
            med = _median(vals)
            ratio = _paired_ratio(results[(p, impl)], oc or []) or "n/a"
            achieved = med * flops
            mfu = f"{100 * achieved / peak['bfloat16' if p == 'bf16' else 'float32']:.1f}%" if peak else "n/a"
            print(f"| {p} | {impl} | {_summary(vals)} | {ratio} | {achieved / 1e9:.1f} | {mfu} |")
    for p in args.precision:  # compiled against compiled
        ratio = _paired_ratio(results.get((p, "clipforge compile=true"), []),
                              results.get((p, "OpenCLIP torch.compile"), []))
        if ratio:
            print(f"\n{p}: clipforge compile=true vs OpenCLIP torch.compile: {ratio}")


if __name__ == "__main__":
    main()
