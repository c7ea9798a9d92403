"""Tip-Adapter and Tip-Adapter-F against hand computations and the training-free cache."""
import pytest
import torch
import torch.nn.functional as F

from clipforge.adapt import (
    FeatureSet,
    TipAdapterF,
    TipAdapterFConfig,
    TipSearch,
    fit_tip_adapter,
    fit_tip_adapter_f,
    search_alpha_beta,
    tip_adapter_logits,
)
from clipforge.evaluation import few_shot
from clipforge.metrics import top1


def _problem(clusters, seed=0, classes=4, dim=16, noise=0.9, zs_noise=1.2):
    """Gaussian clusters on the sphere and a zero-shot classifier that knows the centers only roughly."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    zs_w = F.normalize(centers + zs_noise * F.normalize(torch.randn(classes, dim, generator=g), dim=-1), dim=-1)
    sets = []
    for i, n in enumerate((16, 50, 200)):  # support, val, test
        x, y = clusters(centers, n, noise / dim**0.5 * 4, seed + 10 + i)
        sets.append(FeatureSet(x, 10.0 * x @ zs_w.t(), y))
    return sets


def test_evaluation_uses_the_adapt_implementation():
    """One implementation: the suite's few-shot task imports the adapters from clipforge.adapt."""
    import clipforge.adapt.gda as gda

    assert few_shot.tip_adapter_logits is tip_adapter_logits
    assert few_shot.gda_logits is gda.gda_logits


def test_tip_adapter_f_at_initialization_is_the_training_free_cache(clusters):
    sup, val, test = _problem(clusters)
    a = TipAdapterF(sup.features, sup.labels, 4, alpha=3.0, beta=5.5)
    with torch.no_grad():
        out = a(test.features, test.zero_shot_logits)
    ref = few_shot.ensemble(
        test.zero_shot_logits, tip_adapter_logits(test.features, sup.features, sup.labels, 4, 5.5), 3.0
    )
    assert torch.allclose(out, ref, atol=1e-5)
    # and a loop over the cache, written out
    i = 7
    naive = test.zero_shot_logits[i].clone()
    for j in range(len(sup)):
        naive[sup.labels[j]] += 3.0 * torch.exp(-5.5 * (1 - test.features[i] @ sup.features[j]))
    assert torch.allclose(out[i], naive, atol=1e-4)


def test_zero_epochs_of_tip_adapter_f_is_tip_adapter(clusters):
    sup, val, test = _problem(clusters)
    free = fit_tip_adapter(sup.features, sup.labels, 4, val)
    tuned, hist = fit_tip_adapter_f(sup.features, sup.labels, 4, sup, val, TipAdapterFConfig(epochs=0))
    assert (free.alpha, free.beta) == (tuned.alpha, tuned.beta) == (hist["init_alpha"], hist["init_beta"])
    assert torch.equal(tuned.keys, sup.features)
    with torch.no_grad():
        assert torch.allclose(free(test.features, test.zero_shot_logits), tuned(test.features, test.zero_shot_logits))


def test_tip_adapter_f_trains_only_the_keys_and_beats_zero_shot(clusters):
    sup, val, test = _problem(clusters)
    zs = top1(test.zero_shot_logits, test.labels)
    free = fit_tip_adapter(sup.features, sup.labels, 4, val)
    tuned, hist = fit_tip_adapter_f(sup.features, sup.labels, 4, sup, val)  # the paper's schedule, 20 epochs
    assert (hist["init_alpha"], hist["init_beta"]) == (
        free.alpha,
        free.beta,
    )  # starts where the search left Tip-Adapter
    assert hist["loss"][-1] < 0.9 * hist["loss"][0]
    assert not torch.allclose(tuned.keys, sup.features)  # the keys moved
    assert torch.equal(tuned.values, F.one_hot(sup.labels, 4).float())  # the values did not
    with torch.no_grad():
        acc_free = top1(free(test.features, test.zero_shot_logits), test.labels)
        acc_tuned = top1(tuned(test.features, test.zero_shot_logits), test.labels)
    assert acc_free > zs + 0.1, (zs, acc_free)
    assert acc_tuned > zs + 0.1, (zs, acc_tuned)


def test_alpha_beta_search_prefers_the_zero_shot_side_on_ties():
    x = torch.eye(3)
    y = torch.arange(3)
    perfect = FeatureSet(x, 5 * x, y)  # zero-shot already right: any alpha that keeps it right ties
    alpha, beta, acc = search_alpha_beta(lambda b: torch.zeros(3, 3), perfect, TipSearch((0.1, 1.0), (1.0, 2.0)))
    assert (alpha, beta, acc) == (0.1, 1.0, 1.0)
    wrong = FeatureSet(x, 5 * x.roll(1, 1), y)  # zero-shot always wrong, the cache right: alpha must outweigh it
    alpha, beta, acc = search_alpha_beta(lambda b: b * x, wrong, TipSearch((1.0, 3.0, 10.0), (1.0, 2.0)))
    assert acc == 1.0 and alpha * beta > 5 and alpha == 3.0  # 3*2 > 5 is the smallest winning alpha
    with pytest.raises(ValueError, match="labels"):
        TipAdapterF(x, y[:2], 3)


def test_caps_support_set_and_fit_by_hand():
    """CapS-Adapter's support set: every caption of the chosen images with its image's label (hand-written case);
    its fitted cache reads the caption embeddings like Tip-Adapter's cache reads image keys."""
    import torch.nn.functional as F

    from clipforge.adapt import FeatureSet, caption_support, fit_caps_adapter

    captions = [["a red circle", "a circle"], ["a blue square"], ["a green circle"], []]
    texts, y = caption_support(captions, torch.tensor([0, 1, 0, 1]), [2, 0, 3, 1])
    assert texts == ["a green circle", "a red circle", "a circle", "a blue square"] and y.tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="no captions"):
        caption_support(captions, torch.tensor([0, 1, 0, 1]), [3])
    with pytest.raises(ValueError, match="one list per image"):
        caption_support(captions, torch.tensor([0, 1]), [0])
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(4, 8, generator=g) * 3  # unnormalized caption embeddings
    val_x = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    val = FeatureSet(val_x, torch.randn(6, 2, generator=g), torch.tensor([0, 1, 0, 1, 1, 0]))
    a = fit_caps_adapter(keys, y, 2, val)
    affinity = torch.exp(-a.beta * (1 - val_x @ F.normalize(keys, dim=-1).t()))
    expect = val.zero_shot_logits + a.alpha * affinity @ F.one_hot(y, 2).float()
    assert torch.allclose(a(val_x, val.zero_shot_logits), expect, atol=1e-5)
