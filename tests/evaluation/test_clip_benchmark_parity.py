"""Retrieval recall agrees with the clip-benchmark package's metric code
(``recall_at_k``, imported as it is; the package's models and datasets are
not used). Installed without its dependencies: ``pip install --no-deps clip-benchmark``; the
test is skipped where it is absent."""
from __future__ import annotations

import pytest
import torch

from clipforge.evaluation.retrieval import retrieval_metrics

cb_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_recall_matches_clip_benchmark(seed):
    g = torch.Generator().manual_seed(seed)
    n_img, caps = 40, 3
    img = torch.nn.functional.normalize(torch.randn(n_img, 16, generator=g), dim=-1)
    owner = torch.arange(n_img).repeat_interleave(caps)
    txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(n_img * caps, 16, generator=g), dim=-1)
    ours = retrieval_metrics(img, txt, owner, ks=(1, 5, 10))
    scores = txt @ img.t()  # clip-benchmark's layout: [texts, images]
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    for k in (1, 5, 10):
        # clip-benchmark's "image retrieval" is text -> image, "text retrieval" is image -> text
        t2i = (cb_retrieval.recall_at_k(scores, positive, k) > 0).float().mean().item()
        i2t = (cb_retrieval.recall_at_k(scores.t(), positive.t(), k) > 0).float().mean().item()
        assert ours[f"t2i_R@{k}"] == pytest.approx(t2i, abs=1e-6)
        assert ours[f"i2t_R@{k}"] == pytest.approx(i2t, abs=1e-6)


# clip-benchmark's ``accuracy`` (zeroshot_classification) calls float() on a 1-element array,
# which NumPy 2 rejects, so zero-shot top-k is checked against scikit-learn's
# top_k_accuracy_score instead (tests/evaluation/test_metrics.py).
