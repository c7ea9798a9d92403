"""CoOp: the prompt learner against the ordinary text path, the frozen tower, and a case it must learn."""
import pytest
import torch
import torch.nn.functional as F

from clipforge.adapt import CoOpConfig, PromptLearner, fit_coop

NAMES = ["circle", "square", "triangle", "star", "hexagon"]


def test_context_initialized_from_the_template_equals_encode_text(small_model, tokenizer):
    learner = PromptLearner(small_model, tokenizer, NAMES, CoOpConfig(ctx_init="a picture of a"))
    assert learner.n_ctx == 4 and list(learner.parameters()) == [learner.ctx]
    with torch.no_grad():
        ref = small_model.encode_text(tokenizer([f"a picture of a {n}." for n in NAMES]))
        assert torch.allclose(learner.text_features(), ref, atol=1e-6)
        csc = PromptLearner(small_model, tokenizer, NAMES, CoOpConfig(ctx_init="a picture of a", class_specific=True))
        assert csc.ctx.shape == (5, 4, 32)
        assert torch.allclose(csc.text_features(), ref, atol=1e-6)
        # random context: M placeholder positions, then the class name
        rnd = PromptLearner(small_model, tokenizer, NAMES, CoOpConfig(ctx_init=None, n_ctx=6))
        assert rnd.ctx.shape == (6, 32) and rnd.embeddings().shape == (5, 16, 32)
        assert torch.equal(rnd.embeddings()[:, 7:], small_model.text.token_embedding(rnd.ids)[:, 7:])  # class . EOT pad


def test_a_prompt_that_does_not_fit_the_context_is_refused(small_model, tokenizer):
    with pytest.raises(ValueError, match="does not fit"):
        PromptLearner(small_model, tokenizer, NAMES, CoOpConfig(ctx_init=None, n_ctx=14))


def test_training_moves_only_the_context(small_model, tokenizer, clusters):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    flags = [p.requires_grad for p in small_model.parameters()]
    feats, y = clusters(F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(0)), dim=-1), 4, 0.3, 1)
    small_model.train()
    learner, hist = fit_coop(small_model, tokenizer, NAMES, feats, y, CoOpConfig(epochs=5, lr=0.05))
    after = small_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in small_model.parameters())
    assert [p.requires_grad for p in small_model.parameters()] == flags and small_model.training  # restored
    init = PromptLearner(small_model, tokenizer, NAMES, CoOpConfig()).ctx
    assert not torch.allclose(learner.ctx, init)  # the context did move
    # the gradient reaches the context through the frozen tower: it matches a finite difference, taken in
    # float64 (in float32 the loss's rounding, ~1e-7, is already ~1e-4 of a central difference over 2e-3)
    small_model.double()
    learner.double()
    learner.ctx.grad = None
    x, t = feats[:8].double(), y[:8]
    F.cross_entropy(learner(x), t).backward()
    d = torch.zeros_like(learner.ctx)
    d[1, 3] = 1e-3
    with torch.no_grad():
        base = learner.ctx.clone()
        learner.ctx.copy_(base + d)
        up = F.cross_entropy(learner(x), t)
        learner.ctx.copy_(base - d)
        down = F.cross_entropy(learner(x), t)
        learner.ctx.copy_(base)
    assert float(learner.ctx.grad[1, 3]) == pytest.approx(float(up - down) / 2e-3, rel=1e-4, abs=1e-9)


def test_learned_prompts_beat_the_hand_written_template(make_model, tokenizer, clusters):
    """Images whose features sit at the text embeddings of *other* prompts ('Q R S T CLASS.' of a
    second text context): 'a picture of a CLASS.' classifies them poorly, a learned context can
    reach them. Class-specific context can place every class anywhere the tower reaches."""
    model = make_model(seed=3)
    with torch.no_grad():
        centers = model.encode_text(tokenizer([f"zebra quartz violin nebula {n}." for n in NAMES]))
    spread = float(torch.cdist(centers, centers).mean())  # the five centers are close: noise on their scale
    train_x, train_y = clusters(centers, 8, 0.03 * spread, 0)
    test_x, test_y = clusters(centers, 60, 0.03 * spread, 1)
    with torch.no_grad():
        template = model.encode_text(tokenizer([f"a picture of a {n}." for n in NAMES]))
    zero_shot = float(((test_x @ template.t()).argmax(1) == test_y).float().mean())
    shared, _ = fit_coop(model, tokenizer, NAMES, train_x, train_y, CoOpConfig(epochs=30, lr=0.05, batch_size=40))
    csc, _ = fit_coop(model, tokenizer, NAMES, train_x, train_y, CoOpConfig(epochs=30, lr=0.05, batch_size=40,
                                                                                   class_specific=True))
    with torch.no_grad():
        acc_shared = float((shared(test_x).argmax(1) == test_y).float().mean())
        acc_csc = float((csc(test_x).argmax(1) == test_y).float().mean())
    assert acc_shared > zero_shot + 0.1, (zero_shot, acc_shared)
    assert acc_csc > zero_shot + 0.1, (zero_shot, acc_csc)
