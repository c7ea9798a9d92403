"""CLIPN-style "no" prompts: the loss against a loop, and training that makes them say no."""
import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.adapt.clipn import CLIPNConfig, clipn_loss, fit_clipn
from clipforge.adapt.coop import CoOpConfig, PromptLearner

NAMES = ["circle", "square", "triangle"]


def test_loss_matches_the_written_out_formula(small_model, tokenizer):
    learner = PromptLearner(small_model, tokenizer, NAMES, CoOpConfig(ctx_init="a picture of no"))
    g = torch.Generator().manual_seed(0)
    yes = F.normalize(torch.randn(3, 32, generator=g), dim=-1)
    x = F.normalize(torch.randn(4, 32, generator=g), dim=-1)
    y = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        got = clipn_loss(yes, 0.1, 0.5)(learner, x, y)
        no = learner.text_features()
        total = 0.0
        for i in range(4):
            p_no = [1 / (1 + math.exp(-(float(x[i] @ no[c]) - float(x[i] @ yes[c])) / 0.1)) for c in range(3)]
            others = [math.log(p_no[c]) for c in range(3) if c != int(y[i])]
            total += -math.log(1 - p_no[int(y[i])]) - sum(others) / len(others)
        tso = sum(abs(2 - float((no[c] - yes[c]).norm())) for c in range(3)) / 3
    assert float(got) == pytest.approx(total / 4 + 0.5 * tso, rel=1e-4)


def test_no_prompts_learn_to_reject_the_other_classes(small_model, tokenizer, clusters):
    with torch.no_grad():
        yes = small_model.encode_text(tokenizer([f"a picture of a {n}." for n in NAMES]))
    spread = float(torch.cdist(yes, yes).mean())
    x, y = clusters(yes, 10, 0.03 * spread, 0)
    untrained = CLIPNConfig(prompt=CoOpConfig(ctx_init="a picture of no", epochs=0, warmup_epochs=0))
    before, _ = fit_clipn(small_model, tokenizer, NAMES, yes, x, y, untrained)
    fitted, hist = fit_clipn(
        small_model,
        tokenizer,
        NAMES,
        yes,
        x,
        y,
        CLIPNConfig(prompt=CoOpConfig(ctx_init="a picture of no", epochs=40, lr=0.05, batch_size=30)),
    )
    assert hist["loss"][-1] < hist["loss"][0]
    p0, p1 = before.p_no(x), fitted.p_no(x)
    own = F.one_hot(y, 3).bool()
    gap_before = float(p0[~own].mean() - p0[own].mean())
    gap_after = float(p1[~own].mean() - p1[own].mean())
    assert gap_after > gap_before + 0.05 and gap_after > 0, (gap_before, gap_after)
    s = fitted.scores(x)
    assert set(s) == {"ctw", "atd"} and s["atd"].shape == (30,)
