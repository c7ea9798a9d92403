"""Evaluation metrics against independent implementations: scikit-learn, naive loops,
hand-computed cases; and degenerate inputs get chance, not a crash or a perfect score."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.evaluation.calibration import expected_calibration_error, fit_temperature, reliability
from clipforge.evaluation.compositionality import count_choice_accuracy, negative_preference
from clipforge.evaluation.diagnostics import effective_rank, embedding_diagnostics, modality_gap
from clipforge.evaluation.few_shot import caps_adapter_logits, gda_logits, tip_adapter_logits
from clipforge.evaluation.linear_probe import k_shot_indices, linear_probe
from clipforge.evaluation.robustness import CORRUPTIONS, corrupt
from clipforge.metrics import auroc, clipn_scores, fpr_at_tpr, mcm_score


def blobs(n_per=30, c=3, d=5, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 3
    x = torch.cat([centers[k] + spread * torch.randn(n_per, d, generator=g) for k in range(c)])
    y = torch.arange(c).repeat_interleave(n_per)
    return x, y


def test_ood_metrics_match_sklearn():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    ins, outs = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    outs[:10] = ins[:10]  # ties
    y = np.r_[np.ones(200), np.zeros(150)]
    s = np.r_[ins, outs]
    assert auroc(ins, outs) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s)
    assert fpr_at_tpr(ins, outs) == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-12)
    assert fpr_at_tpr([0.9, 0.8], [0.1, 0.2]) == 0.0 and auroc([1.0], [1.0]) == 0.5  # hand-computed


def test_mcm_and_clipn_scores():
    x = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    w = torch.eye(2)
    p = torch.softmax(x @ w.t() / 0.5, -1).max(-1).values
    assert torch.allclose(mcm_score(x, w, 0.5), p)
    # a "no" prompt that matches the image as well as the class prompt halves the acceptance
    s = clipn_scores(x[:1], w, w, temperature=0.5)
    p0 = torch.softmax(x[:1] @ w.t() / 0.5, -1)
    assert torch.allclose(s["ctw"], p0.max(-1).values * 0.5)
    assert torch.allclose(s["atd"], torch.tensor([0.5]))


def test_calibration_hand_case_and_sklearn_bins():
    from sklearn.calibration import calibration_curve

    # 4 samples, confidence 0.9 (3 right, 1 wrong): one bin, |0.75 - 0.9| = 0.15
    probs = torch.tensor([[0.9, 0.1]] * 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.15)
    # per-bin accuracy and mean confidence equal sklearn's calibration_curve on (correct, confidence)
    rng = np.random.default_rng(1)
    p1 = rng.uniform(0.5, 1.0, 500)
    y = (rng.uniform(size=500) < p1).astype(int)
    probs = torch.tensor(np.stack([1 - p1, p1], 1))
    conf, pred = probs.max(-1)
    correct = (pred == torch.tensor(y)).double()
    frac, mean_conf = calibration_curve(correct.numpy(), conf.numpy(), n_bins=10, strategy="uniform")
    rel = reliability(probs, torch.tensor(y), bins=10)
    ours = [(a, c) for a, c, n in zip(rel["accuracy"], rel["confidence"], rel["count"]) if n]
    assert np.allclose([a for a, _ in ours], frac) and np.allclose([c for _, c in ours], mean_conf)


def test_temperature_scaling_recovers_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=g).squeeze(1)
    assert fit_temperature(true_logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)


def test_linear_probe_matches_sklearn_and_kshot():
    from sklearn.linear_model import LogisticRegression

    x, y = blobs(40, seed=1, spread=2.5)
    idx = np.random.default_rng(0).permutation(len(y))
    tr, va, te = idx[:60], idx[60:90], idx[90:]
    r = linear_probe(x[tr], y[tr], x[va], y[va], x[te], y[te], cs=(0.01, 1.0))
    ref = LogisticRegression(C=r["C"], max_iter=1000).fit(np.r_[x[tr], x[va]], np.r_[y[tr], y[va]])
    assert r["top1"] == pytest.approx((ref.predict(x[te].numpy()) == y[te].numpy()).mean())
    assert r["val_top1"][r["C"]] == max(r["val_top1"].values())
    ks = k_shot_indices(y.numpy(), 4, seed=0)
    assert np.bincount(y.numpy()[ks]).tolist() == [4, 4, 4]


def test_gda_matches_gaussian_likelihood():
    x, y = blobs(25, seed=2)
    logits = gda_logits(x, x, y, 3, shrinkage=0.0)
    # independent reference: class-conditional Gaussians with the pooled covariance,
    # argmax of log-likelihood + log prior
    mus = torch.stack([x[y == c].double().mean(0) for c in range(3)])
    cov = sum(((x[y == c].double() - mus[c]).t() @ (x[y == c].double() - mus[c])) for c in range(3)) / (len(y) - 3)
    ll = torch.stack([torch.distributions.MultivariateNormal(mus[c], cov).log_prob(x.double()) for c in range(3)], 1)
    assert torch.equal(logits.argmax(-1), ll.argmax(-1))
    # the difference between two classes' GDA logits equals the log-likelihood difference (the quadratic term cancels)
    assert torch.allclose((logits[:, 0] - logits[:, 1]).double(), ll[:, 0] - ll[:, 1], atol=1e-4)
    with pytest.raises(ValueError, match="every class"):
        gda_logits(x, x[y < 2], y[y < 2], 3)


def test_tip_and_caps_adapter_naive():
    f, keys = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(6, 3), dim=-1)
    lab = torch.tensor([0, 1, 2, 0, 1, 2])
    out = tip_adapter_logits(f, keys, lab, 3, beta=2.0)
    for i in range(4):
        for c in range(3):
            expect = sum(float(torch.exp(-2.0 * (1 - f[i] @ keys[j]))) for j in range(6) if lab[j] == c)
            assert float(out[i, c]) == pytest.approx(expect, rel=1e-5)
    assert torch.allclose(caps_adapter_logits(f, keys * 3, lab, 3, 2.0), out, atol=1e-6)  # keys are normalized


def test_negative_preference_and_counting():
    img = torch.eye(3)
    pos = torch.eye(3)
    negs = [{"color": torch.tensor([[0.0, 1.0, 0.0]]), "swap": torch.tensor([[1.0, 0.0, 0.0]])},
            {"color": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])},
            {"color": torch.empty(0, 3)}]
    r = negative_preference(img, pos, negs)
    assert r["per_type"]["color"] == {"accuracy": 1.0, "n": 2, "chance": (1 / 2 + 1 / 3) / 2}
    assert r["per_type"]["swap"]["accuracy"] == 0.0  # a tie is not a win
    cc = torch.stack([torch.eye(3)[[0, 1, 2]], torch.eye(3)[[2, 1, 0]]])  # [2 images, 3 counts, d]
    acc = count_choice_accuracy(torch.eye(3)[:2], cc, torch.tensor([0, 1]))
    assert acc == {"accuracy": 1.0, "chance": 1 / 3, "n": 2}


def test_diagnostics():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    s = np.linalg.svd((x - x.mean(0)).numpy(), compute_uv=False)
    p = s / s.sum()
    assert effective_rank(x) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert modality_gap(x, x) == 0.0
    shifted = F.normalize(x, dim=-1) + 3
    d = embedding_diagnostics(x, shifted)
    assert d["modality_classifier_accuracy"] > 0.95 and d["modality_gap"] > 0.5
    other = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))  # same distribution, other draws
    same = embedding_diagnostics(x, other)
    assert same["modality_gap"] < 0.3 and 0.3 < same["modality_classifier_accuracy"] < 0.7  # indistinguishable


def test_modality_classifier_on_a_handful_of_samples_uses_fewer_folds_or_none():
    """3 image-text pairs: 3 stratified folds, the same number sklearn's cross_val_score gives on the same order
    (what ``clipforge eval`` on a small val split used to die on: 5 folds > 3 samples); one pair: None."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g) + 2
    x = np.concatenate([F.normalize(img.double(), dim=-1).numpy(), F.normalize(txt.double(), dim=-1).numpy()])
    y = np.array([0.0] * 3 + [1.0] * 3)
    order = np.random.default_rng(0).permutation(6)
    want = cross_val_score(LogisticRegression(max_iter=1000), x[order], y[order], cv=3).mean()
    assert embedding_diagnostics(img, txt)["modality_classifier_accuracy"] == pytest.approx(want)
    one = embedding_diagnostics(img[:1], txt[:1])
    assert one["modality_classifier_accuracy"] is None and one["uniformity_image"] is None and one["modality_gap"] > 0


def test_degenerate_embeddings_get_chance_not_a_crash():
    """All image embeddings equal: OOD AUROC 0.5, count choice at chance, no perfect scores."""
    img = F.normalize(torch.ones(20, 4), dim=-1)
    w = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    s = mcm_score(img, w)
    assert auroc(s[:10], s[10:]) == 0.5
    cc = torch.stack([w[:4]] * 20)
    acc = count_choice_accuracy(img, cc, torch.arange(20) % 4)
    assert acc["accuracy"] == pytest.approx(0.25)


def test_corruptions_deterministic_and_monotone():
    from PIL import Image

    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for name in CORRUPTIONS:
        a, b = corrupt(base, name, 3, seed=1), corrupt(base, name, 3, seed=1)
        assert np.array_equal(np.asarray(a), np.asarray(b)) and a.size == base.size
        diffs = [
            np.abs(np.asarray(corrupt(base, name, s), dtype=float) - np.asarray(base, dtype=float)).mean()
            for s in (1, 5)
        ]
        assert diffs[1] > diffs[0], name
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(base, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(base, "jpeg", 9)
