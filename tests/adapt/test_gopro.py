"""GOPro: generated prompts, projectors and the three losses against a naive per-image loop."""
import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.adapt.coop import CoOpConfig, PromptLearner
from clipforge.adapt.gopro import GOProConfig, GOProLearner, encode_views, fit_gopro, gopro_losses

NAMES = ["circle", "square", "triangle"]


def _perturbed(learner: GOProLearner, seed: int = 0) -> GOProLearner:
    """Non-zero last layers (they start at zero), so the meta-net and both projectors count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in (learner.meta, learner.image_proj, learner.text_proj):
            for p in (net[2].weight, net[2].bias):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return learner


def test_gopro_starts_as_coop(small_model, tokenizer):
    learner = GOProLearner(small_model, tokenizer, NAMES)
    coop = PromptLearner(small_model, tokenizer, NAMES, CoOpConfig())
    x = F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        assert torch.allclose(learner(x), coop(x), atol=1e-5)


def test_losses_match_a_naive_loop(small_model, tokenizer):
    """Every prompt built from the definition and encoded alone; NT-Xent, CLIP and consistency
    terms summed image by image from the equations in the module docstring."""
    cfg = GOProConfig(view_weight=0.7, consistency_weight=1.3, temperature=0.2)
    learner = _perturbed(GOProLearner(small_model, tokenizer, NAMES, cfg))
    g = torch.Generator().manual_seed(4)
    views = F.normalize(torch.randn(4, 3, 32, generator=g), dim=-1)
    y = torch.tensor([2, 0, 1, 2])
    text = small_model.text
    ids = tokenizer([f"a picture of a {n}." for n in NAMES])
    scale = float(small_model.scale().detach())

    def proj(net, z):
        return F.normalize(z + net(z), dim=0)

    with torch.no_grad():
        def outputs(f):
            shift = learner.meta(f)
            ts = []
            for c in range(len(NAMES)):
                emb = text.token_embedding(ids[c : c + 1]).clone()
                emb[0, 1:5] = learner.ctx + shift
                ts.append(proj(learner.text_proj, small_model.encode_text(ids[c : c + 1], embeddings=emb)[0]))
            t = torch.stack(ts)
            v = proj(learner.image_proj, f)
            return scale * t @ v, v, t

        per = [[outputs(views[i, k]) for k in (2, 0)] for i in range(4)]  # the pair (2, 0)
        clip = sum(-0.5 * (torch.log_softmax(per[i][0][0], 0)[y[i]] + torch.log_softmax(per[i][1][0], 0)[y[i]])
                   for i in range(4)) / 4
        view = 0.0
        for i in range(4):
            row1 = [float(per[i][0][1] @ per[j][1][1]) / 0.2 for j in range(4)]
            row2 = [float(per[i][1][1] @ per[j][0][1]) / 0.2 for j in range(4)]
            view += 0.5 * (-row1[i] + math.log(sum(math.exp(r) for r in row1))
                           - row2[i] + math.log(sum(math.exp(r) for r in row2)))
        view /= 4
        consistency = sum(float(((per[i][0][2] - per[i][1][2]) ** 2).sum(-1).mean()) for i in range(4)) / 4
        got = gopro_losses(learner, views, y, (2, 0))
    assert float(got["clip"]) == pytest.approx(float(clip), abs=1e-5)
    assert float(got["view"]) == pytest.approx(view, abs=1e-5)
    assert float(got["consistency"]) == pytest.approx(consistency, abs=1e-5)
    assert float(got["total"]) == pytest.approx(float(clip) + 0.7 * view + 1.3 * consistency, abs=1e-5)
    assert consistency > 0  # the meta-net makes the two views' prompts differ


def test_encode_views_draws_distinct_seeded_views(small_model):
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
              for i in range(3)]
    cfg = GOProConfig(views=3)
    a, b = encode_views(small_model, images, cfg, seed=5), encode_views(small_model, images, cfg, seed=5)
    assert a.shape == (3, 3, 32) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(3, 3), atol=1e-5)
    assert not torch.allclose(a[:, 0], a[:, 1])  # the views differ


def test_training_moves_gopro_and_not_the_model(small_model, tokenizer, clusters):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    feats, y = clusters(F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1), 4, 0.3, 1)
    noise = torch.randn(len(y), 3, 32, generator=torch.Generator().manual_seed(2))
    views = F.normalize(feats.unsqueeze(1) + 0.05 * noise, dim=-1)
    learner, hist = fit_gopro(small_model, tokenizer, NAMES, views, y, GOProConfig(prompt=CoOpConfig(epochs=4, lr=0.05),
                                                                                  views=3))
    assert all(torch.equal(before[k], v) for k, v in small_model.state_dict().items())
    assert learner.image_proj[2].weight.abs().sum() > 0 and learner.meta[2].weight.abs().sum() > 0
    assert len(hist["loss"]) == 5 and hist["final_view"] > 0 and 0.0 <= hist["train_top1"] <= 1.0


def test_bad_options_are_refused(small_model, tokenizer):
    with pytest.raises(ValueError, match="at least 2 augmented views"):
        GOProConfig(views=1)
    with pytest.raises(ValueError, match="temperature"):
        GOProConfig(temperature=0)
    with pytest.raises(ValueError, match=r"\[N, V>=2, d\]"):
        fit_gopro(small_model, tokenizer, NAMES, torch.zeros(4, 32), torch.zeros(4, dtype=torch.long))
