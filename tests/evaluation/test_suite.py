"""The evaluation suite end to end: cache hits and invalidation, a degenerate model gets chance,
the report has every plot, ties in retrieval are ordered at random in expectation."""
from __future__ import annotations

import math

import pytest
import torch

from clipforge.evaluation.cache import EmbeddingCache, model_fingerprint
from clipforge.evaluation.retrieval import retrieval_metrics
from clipforge.evaluation.suite import SUITES, run_suite
from clipforge.models import CLIP, CLIPConfig
from clipforge.tokenizer import get_tokenizer

SMALL = {"embed_dim": 16, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


def small_model(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(CLIPConfig.from_dict(SMALL)).eval()


def test_cache_hits_and_invalidates_when_the_weights_change(tmp_path):
    model = small_model()
    calls = []

    def compute():
        calls.append(1)
        return torch.randn(3, 16)

    first = EmbeddingCache(model, tmp_path).get("images:x", compute)
    again = EmbeddingCache(model, tmp_path).get("images:x", compute)
    assert len(calls) == 1 and torch.equal(first, again)
    assert not list(tmp_path.rglob("*.tmp*")), "a temporary file was left behind"
    with torch.no_grad():
        model.logit_scale.add_(1e-3)  # the smallest change of any weight is another model
    changed = EmbeddingCache(model, tmp_path)
    changed.get("images:x", compute)
    assert len(calls) == 2 and changed.misses == 1
    assert model_fingerprint(model) != model_fingerprint(small_model())
    # a damaged entry is recomputed, not trusted
    for f in tmp_path.rglob("*.safetensors"):
        f.write_bytes(b"garbage")
    EmbeddingCache(model, tmp_path).get("images:x", compute)
    assert len(calls) == 3


def test_suite_reuses_embeddings_on_the_second_run(tmp_path):
    model = small_model()
    tok = get_tokenizer(model.context_length)
    first = run_suite(model, tok, "quick", size=24, cache_dir=tmp_path, progress=False)
    second = run_suite(model, tok, "quick", size=24, cache_dir=tmp_path, progress=False)
    assert first.results["cache"]["misses"] > 0 and second.results["cache"]["misses"] == 0
    assert second.results["zero_shot"] == first.results["zero_shot"]


def test_ties_are_broken_at_random_in_expectation():
    same = torch.ones(2, 4)
    r = retrieval_metrics(same, same, torch.tensor([0, 1]))
    assert r["t2i_R@1"] == pytest.approx(0.5) and r["i2t_R@1"] == pytest.approx(0.5)
    # 3 images, 6 captions (2 each), all tied: P(an own caption is first) = 2/6
    r = retrieval_metrics(torch.ones(3, 4), torch.ones(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert r["i2t_R@1"] == pytest.approx(2 / 6) and r["t2i_R@1"] == pytest.approx(1 / 3)
    # top-2 for i2t: 1 - C(4,2)/C(6,2) = 1 - 6/15
    assert r["i2t_R@5"] == pytest.approx(1.0) and retrieval_metrics(
        torch.ones(3, 4), torch.ones(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]), ks=(2,)
    )["i2t_R@2"] == pytest.approx(1 - 6 / 15)


def test_degenerate_embedding_gets_chance_not_a_crash_or_a_perfect_score(tmp_path):
    model = small_model()
    constant = torch.nn.functional.normalize(torch.ones(16), dim=0)
    model.encode_image = lambda pixels: constant.expand(pixels.shape[0], -1).clone()
    model.encode_text = lambda ids: constant.expand(ids.shape[0], -1).clone()
    res = run_suite(model, get_tokenizer(model.context_length), "full", size=40, cache_dir=None, progress=False).results
    for task, r in res["zero_shot"].items():
        assert r["balanced_accuracy"] == pytest.approx(1 / r["num_classes"]), task
    rt = res["retrieval"]["val"]
    assert rt["t2i_R@1"] == pytest.approx(rt["t2i_R@1_chance"], rel=1e-4)
    assert rt["i2t_R@1"] == pytest.approx(rt["i2t_R@1_chance"], rel=0.05)
    assert res["ood"]["mcm"]["auroc"] == pytest.approx(0.5)
    assert res["diagnostics"]["modality_gap"] == pytest.approx(0.0, abs=1e-6)
    assert res["diagnostics"]["modality_classifier_accuracy"] <= 0.6
    assert res["counting"]["accuracy"] <= 0.5
    for kind, v in res["compositionality"]["per_type"].items():
        assert v["accuracy"] == 0.0, kind  # a tie is not a win: the positive must score strictly higher
    shape_chance = 1 / 5
    assert res["robustness"]["clean"] == pytest.approx(shape_chance)
    for v in res["robustness"]["corruptions"].values():
        assert all(a == pytest.approx(shape_chance) for a in v.values())
    assert res["few_shot"]["zero_shot"] == pytest.approx(shape_chance)
    assert all(math.isfinite(v) for v in (res["calibration"]["ece"], res["calibration"]["ece_scaled"]))


def test_full_suite_writes_json_and_a_report_with_every_plot(tmp_path):
    from clipforge.evaluation.report import write_report

    model = small_model()
    res = run_suite(
        model, get_tokenizer(model.context_length), "full", size=24, cache_dir=tmp_path / "c", progress=False
    )
    assert set(SUITES["full"]) <= set(res.results)
    json_path, html_path = write_report(res.results, res.artifacts, tmp_path / "rep")
    page = html_path.read_text()
    # confusion x4, retrieval grid, projection, few-shot, compositionality, OOD, reliability, robustness
    assert page.count("data:image/png;base64,") == 11
    for heading in ("Zero-shot", "Retrieval", "Linear probe", "Few-shot", "Compositionality", "Counting",
                    "Out-of-distribution", "Calibration", "Robustness", "Embedding space"):
        assert heading in page
    assert json_path.exists()


def test_unknown_suite_and_task_are_named():
    model = small_model()
    with pytest.raises(ValueError, match="unknown suite 'huge'.*full"):
        run_suite(model, get_tokenizer(16), "huge", cache_dir=None, progress=False)
    with pytest.raises(ValueError, match="unknown tasks"):
        run_suite(model, get_tokenizer(16), tasks=["zero_shot", "vibes"], cache_dir=None, progress=False)


def test_report_renders_in_headless_chromium(tmp_path):
    """The report opens in a real browser and its plots are drawn (skipped without chromium)."""
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    from clipforge.evaluation.report import write_report

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium: apt-get install chromium")
    model = small_model()
    res = run_suite(model, get_tokenizer(model.context_length), "quick", size=24, cache_dir=None, progress=False)
    _, page = write_report(res.results, res.artifacts, tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1100,2400", page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[0] >= 2000
    # plots (confusion matrices in blue, scatter points in red/blue) cover a real part of the page
    colored = (np.abs(pixels - pixels.mean(-1, keepdims=True)).max(-1) > 40).mean()
    assert colored > 0.02, f"only {colored:.3%} of the page has color: plots missing?"
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img") >= 6 and "Zero-shot classification" in dom


def _toy_corpus(root, name: str, colors: dict[str, tuple[int, int, int]], per_split: dict[str, int]):
    """A shard corpus of solid-color images labelled by color (the builders' on-disk format)."""
    import numpy as np

    from clipforge.data.formats import encode_png
    from clipforge.data.shards import ShardSample, ShardSetWriter

    names = list(colors)
    writer = ShardSetWriter(root / name)
    for split, n in per_split.items():
        keys = [f"{split}{i:03d}" for i in range(n)]

        def produce(ks, split=split):
            for k in ks:
                c = int(k[len(split):]) % len(names)
                img = np.broadcast_to(np.array(colors[names[c]], dtype=np.uint8), (16, 16, 3)).copy()
                yield ShardSample(
                    k,
                    encode_png(torch.from_numpy(img).permute(2, 0, 1)),
                    [f"a {names[c]} thing", f"{names[c]}"],
                    {"color": c},
                )

        writer.write_split(split, keys, produce)
    writer.finish(name, {"color": {"classes": names, "templates": ["a {} thing.", "{}."]}})


def test_suite_on_built_corpora_with_ood_against_the_partner(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_DATA", str(tmp_path))
    _toy_corpus(tmp_path, "openclipart", {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)},
                {"train": 30, "val": 12, "test": 12})
    model = small_model()
    tok = get_tokenizer(model.context_length)
    res = run_suite(model, tok, "full", dataset="openclipart", size=12, cache_dir=None, progress=False).results
    assert res["zero_shot"]["color"]["n"] == 12 and res["retrieval"]["test"]["num_texts"] == 24
    assert "typed hard-negative" in res["compositionality"]["skipped"] and "count" in res["counting"]["skipped"]
    assert "not built" in res["ood"]["skipped"]  # emoji is missing: OOD says so instead of failing
    from clipforge.evaluation.report import render_report

    assert "skipped: openclipart has no typed hard-negative captions" in render_report(res, {}, "t")
    _toy_corpus(tmp_path, "emoji", {"white": (250, 250, 250), "black": (5, 5, 5)}, {"train": 4, "test": 8})
    res = run_suite(model, tok, "quick", dataset="openclipart", size=12, cache_dir=None, progress=False,
                    tasks=["ood", "linear_probe"]).results
    assert res["ood"]["mcm"]["n_in"] == 12 and res["ood"]["mcm"]["n_out"] == 8
    assert 0 <= res["linear_probe"]["color"]["top1"] <= 1 and "top1_heldout_pairs" not in res["linear_probe"]["color"]
