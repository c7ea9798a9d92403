"""GA-DMS: the gradient-attention score against autograd, the dual masks on a hand case, the loss against a naive
reference written from the equations here, the training inputs, and a few training steps on noisy captions."""
import copy
import json
import math

import pytest
import torch

from clipforge.losses import LossInputs, build, dual_masks, ga_dms_loss, ga_scores
from clipforge.losses.ga_dms import ATTENTION_TAU, IGNORE


def test_ga_scores_are_attention_times_the_autograd_gradient_of_the_similarity():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 5, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, generator=g, dtype=torch.float64)
    tokens = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    content = torch.tensor([[False, True, True, True, False, False], [False, True, True, True, True, True]])
    got = ga_scores(image, text, tokens, content)
    for i in range(2):
        cols = content[i].nonzero().reshape(-1)
        h = torch.nn.functional.normalize(tokens[i, cols], dim=-1)
        y, v = torch.nn.functional.normalize(text[i], dim=0), torch.nn.functional.normalize(image[i], dim=0)
        a = torch.softmax(h @ y / ATTENTION_TAU, 0).detach().requires_grad_()
        sim = v @ (a[:, None] * h).sum(0)  # s_i as a function of the attention weights
        (grad,) = torch.autograd.grad(sim, a)
        assert torch.allclose(got[i, cols], a.detach() * grad, atol=1e-12)
        assert torch.isinf(got[i, ~content[i]]).all()


def test_dual_masks_drop_the_lowest_and_mask_the_highest_scoring_tokens():
    # ids: SOT=9, five content tokens 11..15, EOT=8, pad=0; scores ordered by hand through the token features
    ids = torch.tensor([[9, 11, 12, 13, 14, 15, 8, 0]])
    mask = torch.tensor([[False, True, True, True, True, True, True, False]])
    # h_j = (cos th_j, sin th_j, 1): one norm, so y = e3 attends to every token equally and the score follows
    # v . h_j with v = e1, i.e. cos th_j: token 11 (th 0) highest, then 14 (0.3), 12, 15, and 13 (th 3) lowest
    image, text = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    theta = torch.tensor([0.0, 0.0, 1.0, 3.0, 0.3, 2.0, 0.0, 0.0])
    tokens = torch.stack([torch.cos(theta), torch.sin(theta), torch.ones(8)], -1)[None]
    denoised, masked, targets = dual_masks(ids, image, text, tokens, mask, pad_id=0, eot_id=8, noise_ratio=0.2,
                                           mask_ratio=0.4)
    assert denoised.tolist() == [[9, 11, 12, 14, 15, 8, 0, 0]]  # floor(0.2 * 5) = 1 dropped: token 13
    assert masked.tolist() == [[9, 0, 12, 13, 0, 15, 8, 0]]  # round(0.4 * 5) = 2 masked: tokens 11 and 14
    assert targets.tolist() == [[IGNORE, 11, IGNORE, IGNORE, 14, IGNORE, IGNORE, IGNORE]]


def _naive(img, txt, logits, targets, t, mtp):
    b = img.shape[0]
    align = 0.0
    for i in range(b):
        row = [t * float(img[i] @ txt[k]) for k in range(b)]
        col = [t * float(txt[i] @ img[k]) for k in range(b)]
        align += 0.5 * (math.log(sum(math.exp(v) for v in row)) - row[i]) / b
        align += 0.5 * (math.log(sum(math.exp(v) for v in col)) - col[i]) / b
    picked = [(i, j) for i in range(b) for j in range(targets.shape[1]) if targets[i, j] != IGNORE]
    pred = sum(math.log(sum(math.exp(float(v)) for v in logits[i, j])) - float(logits[i, j, targets[i, j]])
               for i, j in picked) / len(picked)
    return align + mtp * pred


def test_ga_dms_loss_matches_the_naive_equations_and_the_term():
    g = torch.Generator().manual_seed(1)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa
    img, txt = unit(3, 4), unit(3, 4)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    targets = torch.tensor([[IGNORE, 2, IGNORE, 6, IGNORE], [IGNORE] * 5, [1, IGNORE, IGNORE, IGNORE, 0]])
    t = torch.tensor(6.0, dtype=torch.float64)
    for mtp in (1.0, 0.3):
        got = ga_dms_loss(img, txt, logits[targets != IGNORE], targets, t, mtp)["loss"]
        assert abs(float(got) - _naive(img, txt, logits, targets, 6.0, mtp)) < 1e-9
    term = build("ga_dms", embed_dim=4, vocab_size=7, heads=2)
    states, patches = unit(3, 5, 4), unit(3, 9, 4)
    li = LossInputs(img, img, t, image_tokens=patches, extra={"ga_dms_text_features": txt, "ga_dms_mtp_tokens": states,
                                                              "ga_dms_mtp_targets": targets})
    got = term(li)["loss"]
    full = copy.deepcopy(term.predictor).double()
    full.head = torch.nn.Identity()  # hidden states at every position, then the vocabulary map by hand
    hidden = full(states, patches, torch.ones(3, 5, dtype=torch.bool)).view(3, 5, 4)
    logits = hidden @ term.predictor.head.weight.double().t() + term.predictor.head.bias.double()
    assert torch.allclose(got, ga_dms_loss(img, txt, logits[targets != IGNORE], targets, t)["loss"])
    with pytest.raises(ValueError, match="embed_dim=4"):
        build("ga_dms", vocab_size=7)(li)
    li.extra["ga_dms_mtp_targets"] = torch.full_like(targets, 9)
    with pytest.raises(ValueError, match="vocab_size"):
        term(li)
    with pytest.raises(ValueError, match="no caption token"):
        ga_dms_loss(img, txt, logits[:0].reshape(0, 7), torch.full_like(targets, IGNORE), t)


def test_training_inputs_for_ga_dms_re_encode_the_two_masked_captions():
    import clipforge
    from clipforge.tokenizer import get_tokenizer
    from clipforge.train.inputs import encode_extras

    model = clipforge.create_model("tiny", seed=0, embed_dim=16, vision={"image_size": 32, "patch_size": 8, "width": 16,
                                   "layers": 1, "heads": 2}, text={"context_length": 16, "width": 16, "layers": 1,
                                                                   "heads": 2}).eval()
    ids = get_tokenizer(16)(["a small red circle photo vintage.", "two blue squares."])
    batch = {"images": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "mask_texts": ids}
    with torch.no_grad():
        extra = encode_extras(model, batch)
        image = model.encode_image(batch["images"])
        text, tokens, mask = model.encode_text_tokens(ids)
        denoised, masked, targets = dual_masks(ids, image, text, tokens, mask, 0, model.text.cfg.eot_token_id)
        assert torch.allclose(extra["ga_dms_text_features"], model.encode_text(denoised), atol=1e-5)
        assert torch.allclose(extra["ga_dms_mtp_tokens"], model.encode_text_tokens(masked)[1], atol=1e-5)
    assert torch.equal(extra["ga_dms_mtp_targets"], targets)
    assert ((targets != IGNORE).sum(1) >= 1).all()
    # the denoised caption is the original minus floor(0.2 n) content tokens, order kept
    n = (mask & (ids != model.text.cfg.eot_token_id)).sum(1)
    assert ((ids != 0).sum(1) - (denoised != 0).sum(1)).tolist() == torch.floor(0.2 * n.float()).long().tolist()


def test_clipforge_train_ga_dms_on_noisy_shapes_captions(tmp_path):
    from clipforge.cli.main import main

    small = ["model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
             "text: {context_length: 32, width: 32, layers: 1, heads: 2}}", "data.train_size=32", "data.eval_size=8",
             "batch_size=8", "steps=2", "warmup_steps=1", "progress=false", "precision=fp32", "log_every=1"]
    run = tmp_path / "run"
    assert main(["train", f"out_dir={run}", "loss={clip: 1, ga_dms: {weight: 1, embed_dim: 32}}",
                 "data.caption_noise=0.5", *small]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "ga_dms/mtp" in row]
    assert logged and all(math.isfinite(row["ga_dms/mtp"]) and math.isfinite(row["ga_dms/align"]) for row in logged)
    assert main(["train", f"out_dir={tmp_path / 'bad'}", "loss={clip: 1}", "data.caption_noise=1.5", *small]) == 2
