"""TMM: class-aware prompts and text-guided feature tuning against a naive per-image, per-class loop."""
import pytest
import torch
import torch.nn.functional as F

from clipforge.adapt.coop import CoOpConfig, PromptLearner
from clipforge.adapt.tmm import TMMConfig, TMMLearner, fit_tmm, tmm_loss

NAMES = ["circle", "square", "triangle", "star"]


def _perturbed(learner: TMMLearner, seed: int = 0) -> TMMLearner:
    """Non-zero meta-net output layer and TFT map (both start at zero), so every term counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (learner.meta[2].weight, learner.meta[2].bias, learner.tft.weight):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return learner


def test_tmm_starts_as_coop(small_model, tokenizer):
    """Zero-initialized last layers: the class-aware prompts are CoOp's prompts and f~ = f."""
    learner = TMMLearner(small_model, tokenizer, NAMES)
    coop = PromptLearner(small_model, tokenizer, NAMES, CoOpConfig())
    x = F.normalize(torch.randn(6, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        assert torch.allclose(learner(x), coop(x), atol=1e-5)


def test_prompts_and_loss_match_a_naive_loop(small_model, tokenizer):
    """Each prompt t_c(x) built token by token from the paper's definition, encoded one at a time;
    f~ and the loss computed image by image: the batched learner gives the same numbers."""
    learner = _perturbed(TMMLearner(small_model, tokenizer, NAMES))
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(5, 32, generator=g), dim=-1)
    y = torch.tensor([0, 3, 1, 2, 3])
    text = small_model.text
    ids = tokenizer([f"a picture of a {n}." for n in NAMES])
    with torch.no_grad():
        w = F.normalize(small_model.encode_text(ids), dim=-1)  # the initial prompts' class embeddings
        ctx0 = text.token_embedding(ids)[0, 1:5]
        scale = float(small_model.scale())
        losses, all_logits = [], []
        for n in range(len(x)):
            feats = []
            for c in range(len(NAMES)):
                shift = learner.meta((x[n] * w[c]) * 32 ** 0.5)  # pi_c(x) = h(sqrt(d) f ⊙ w_c)
                emb = text.token_embedding(ids[c : c + 1]).clone()
                emb[0, 1:5] = learner.ctx + shift  # every context token shifted by pi_c(x)
                assert torch.allclose(learner.ctx, ctx0)  # context still at its 'a picture of a' init
                feats.append(F.normalize(small_model.encode_text(ids[c : c + 1], embeddings=emb)[0], dim=0))
            gx = torch.stack(feats)  # [C, d]
            a = torch.softmax(scale * (gx @ x[n]), dim=0)
            f_t = F.normalize(x[n] + learner.tft.weight @ (a @ gx), dim=0)
            logits = scale * gx @ f_t
            all_logits.append(logits)
            losses.append(-torch.log_softmax(logits, dim=0)[y[n]])
        ref_logits = torch.stack(all_logits)
        ref_loss = torch.stack(losses).mean()
        assert torch.allclose(learner(x), ref_logits, atol=1e-4)
        assert float(tmm_loss(learner, x, y)) == pytest.approx(float(ref_loss), abs=1e-5)
        assert torch.allclose(learner.logits(x), ref_logits, atol=1e-4)


def test_prompts_are_class_aware_not_shared(small_model, tokenizer):
    """Unlike CoCoOp's one image token for every class, pi_c(x) differs across classes for one image."""
    learner = _perturbed(TMMLearner(small_model, tokenizer, NAMES))
    x = F.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(3)), dim=-1)
    with torch.no_grad():
        shift = learner.prompt_shift(x)
    assert shift.shape == (2, len(NAMES), 32)
    assert not torch.allclose(shift[0, 0], shift[0, 1])


def test_training_moves_the_tmm_parameters_and_not_the_model(small_model, tokenizer, clusters):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    feats, y = clusters(F.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)), dim=-1), 4, 0.3, 1)
    learner, hist = fit_tmm(small_model, tokenizer, NAMES, feats, y, TMMConfig(prompt=CoOpConfig(epochs=5, lr=0.05)))
    assert all(torch.equal(before[k], v) for k, v in small_model.state_dict().items())
    assert learner.meta[2].weight.abs().sum() > 0 and learner.tft.weight.abs().sum() > 0  # left their zero init
    assert len(hist["loss"]) == 6 and 0.0 <= hist["train_top1"] <= 1.0


def test_class_specific_context_is_refused():
    with pytest.raises(ValueError, match="shared context"):
        TMMConfig(prompt=CoOpConfig(class_specific=True))
