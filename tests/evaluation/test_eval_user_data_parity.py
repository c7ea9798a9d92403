"""``clipforge eval`` on user data gives CLIP_benchmark's numbers: its own zero-shot classifier
and classification loop (``zero_shot_classifier``, ``run_classification``) and its retrieval
``evaluate`` run on the same images with the same model, against ``--dataset imagefolder:`` and
``csv:``. CLIP_benchmark's ``accuracy`` calls ``float()`` on a 1-element array, which NumPy 2
rejects, so top-k comes from scikit-learn's ``top_k_accuracy_score`` on its logits; mean
per-class recall is ``balanced_accuracy_score`` on its argmax, as its ``evaluate`` computes it.
Installed without dependencies (``pip install --no-deps clip-benchmark``); skipped where absent."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.cli.main import main
from clipforge.transforms import EvalTransform

cb_cls = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
cb_ret = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
sk = pytest.importorskip("sklearn.metrics")

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "art of a {c}."]


def test_zero_shot_matches_clip_benchmark(make_image_folder, small_model, small_tokenizer, small_model_dir, tmp_path):
    root = make_image_folder(tmp_path / "f", CLASSES, 4, seed=5)
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    out = tmp_path / "rep"
    assert main(["eval", str(small_model_dir), "--dataset", f"imagefolder:{root}", "--tasks", "zero_shot", "--no-cache",
                 "--quiet", "--workers", "0", "--out", str(out)]) == 0
    record = json.loads(next((out / "clip_benchmark").glob("*.json")).read_text())
    # CLIP_benchmark on the same files, in sorted-folder order, with the model's eval transform
    transform = EvalTransform(small_model.image_size)
    items = [(transform(Image.open(p).convert("RGB")), c) for c, name in enumerate(CLASSES)
             for p in sorted((root / name).glob("*.png"))]
    loader = torch.utils.data.DataLoader(items, batch_size=5)
    classifier = cb_cls.zero_shot_classifier(small_model, small_tokenizer, CLASSES, TEMPLATES, "cpu", amp=False)
    logits, target = cb_cls.run_classification(small_model, classifier, loader, "cpu", amp=False)
    pred = logits.argmax(1)
    labels = list(range(len(CLASSES)))
    assert pred.unique().numel() > 2  # not a degenerate classifier: a wrong logit or order would show
    assert record["task"] == "zeroshot_classification"
    assert record["metrics"]["acc1"] == pytest.approx(
        sk.top_k_accuracy_score(target, logits, k=1, labels=labels), abs=1e-6
    )
    assert record["metrics"]["acc5"] == pytest.approx(
        sk.top_k_accuracy_score(target, logits, k=5, labels=labels), abs=1e-6
    )
    assert record["metrics"]["mean_per_class_recall"] == pytest.approx(
        sk.balanced_accuracy_score(target, pred), abs=1e-6
    )


def test_retrieval_matches_clip_benchmark(make_image_folder, small_model, small_tokenizer, small_model_dir, tmp_path):
    make_image_folder(tmp_path / "img", ["x"], 12, seed=6)
    rng = np.random.default_rng(0)
    words = ["red", "blue", "small", "large", "dog", "cat", "tree", "car"]
    captions = [[" ".join(rng.choice(words, 4)) for _ in range(int(rng.integers(1, 4)))] for _ in range(12)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": f"img/x/{i}.png", "captions": c}) + "\n"
                                              for i, c in enumerate(captions)))
    out = tmp_path / "rep"
    assert main(["eval", str(small_model_dir), "--dataset", f"jsonl:{tmp_path / 'm.jsonl'}", "--tasks", "retrieval",
                 "--no-cache", "--quiet", "--workers", "0", "--out", str(out)]) == 0
    record = json.loads(next((out / "clip_benchmark").glob("*.json")).read_text())
    transform = EvalTransform(small_model.image_size)
    items = [
        (transform(Image.open(tmp_path / "img" / "x" / f"{i}.png").convert("RGB")), captions[i]) for i in range(12)
    ]

    def collate(batch):
        return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

    loader = torch.utils.data.DataLoader(items, batch_size=5, collate_fn=collate)
    theirs = cb_ret.evaluate(small_model, loader, small_tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert record["task"] == "zeroshot_retrieval"
    assert set(theirs) <= set(record["metrics"])
    assert 0 < theirs["image_retrieval_recall@1"] < 1 and 0 < theirs["text_retrieval_recall@5"] < 1
    for key, value in theirs.items():
        assert record["metrics"][key] == pytest.approx(value, abs=1e-6), key
