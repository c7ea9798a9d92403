"""GA-DMS: the gradient-attention score against a naive reference built from the text tower's weights (the paper's
w . v . g form), the dual masks on a hand case, the ratios as options, the loss against a naive reference written
from the equations here, the training inputs, and a few training steps on noisy captions."""
import copy
import json
import math

import pytest
import torch

from clipforge.losses import LossInputs, build, dual_masks, ga_dms_loss, ga_scores
from clipforge.losses.ga_dms import IGNORE, content_mask, similarity_gradient


def _tiny(layers=2):
    import clipforge

    return clipforge.create_model("tiny", seed=0, embed_dim=16, vision={"image_size": 32, "patch_size": 8,
                                  "width": 16, "layers": 1, "heads": 2},
                                  text={"context_length": 16, "width": 16, "layers": layers, "heads": 2})


def _naive_gass(model, ids, image):
    """S_ij per caption with loops: the last block by hand from its weights; g_h = dSIM/d(head h's output at the end
    token), taken by autograd at that node (not at the attention maps); S_g,j = sum_h A^h_ej (v^h_j . g_h), the
    paper's w . v . g; S_a,j = mean_h A^h_ej normalized over the content tokens; S = S_a S_g."""
    tower, block = model.text, model.text.transformer.blocks[-1]
    c, heads = tower.cfg.width, block.attn.heads
    d = c // heads
    out = torch.full(ids.shape, -math.inf, dtype=torch.float64)
    for i in range(ids.shape[0]):
        row = ids[i:i + 1]
        eot = int(tower.eot_index(row)[0])
        x = tower.token_embedding(row) + tower.positional_embedding[:row.shape[1]]
        for b in tower.transformer.blocks[:-1]:
            x = b(x, is_causal=True)
        h = block.ln_1(x)[0]
        q, k, v = (h @ block.attn.in_proj.weight[m * c:(m + 1) * c].t() + block.attn.in_proj.bias[m * c:(m + 1) * c]
                   for m in range(3))
        n = row.shape[1]
        a = torch.zeros(heads, n, n, dtype=torch.float64)
        for hd in range(heads):
            sl = slice(hd * d, (hd + 1) * d)
            scores = q[:, sl] @ k[:, sl].t() / d**0.5 + torch.full((n, n), -math.inf).triu(1)
            a[hd] = torch.softmax(scores, -1)
        o = torch.cat([a[hd] @ v[:, hd * d:(hd + 1) * d] for hd in range(heads)], -1).detach().requires_grad_()
        a, v = a.detach(), v.detach()
        y = x[0] + block.attn.out_proj(o)
        y = y + block.mlp(block.ln_2(y))
        text = torch.nn.functional.normalize(tower.project(tower.ln_final(y)[eot]), dim=0)
        (g,) = torch.autograd.grad(image[i] @ text, o)
        cols = [j for j in range(1, eot) if int(row[0, j]) != tower.cfg.pad_token_id]
        s_g = [sum(float(a[hd, eot, j]) * float(v[j, hd * d:(hd + 1) * d] @ g[eot, hd * d:(hd + 1) * d])
                   for hd in range(heads)) for j in cols]
        s_a = [float(a[:, eot, j].mean()) for j in cols]
        total = sum(s_a)
        for j, sa, sg in zip(cols, s_a, s_g):
            out[i, j] = sa / total * sg
    return out


def test_ga_scores_match_a_naive_gradient_attention_reference_from_the_text_towers_weights():
    from clipforge.tokenizer import get_tokenizer

    model = _tiny().double()
    ids = get_tokenizer(16)(["a small red circle photo vintage.", "two blue squares left of a star."])
    image = torch.nn.functional.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(3),
                                                      dtype=torch.float64), dim=-1)
    text, attention = model.encode_text_attention(ids)
    grad = similarity_gradient(image, text, attention)
    eot = model.text.eot_index(ids)
    got = ga_scores(attention.detach(), grad, eot, content_mask(ids, eot, model.text.cfg.pad_token_id))
    want = _naive_gass(model, ids, image)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert finite.sum() >= 10 and torch.allclose(got[finite], want[finite], atol=1e-12)
    assert len(set(got[finite].tolist())) == int(finite.sum())  # a ranking, not ties


def test_dual_masks_drop_the_lowest_and_mask_the_highest_scoring_tokens():
    # ids: SOT=9, five content tokens 11..15, EOT=8, pad=0; the scores rank 11 > 14 > 12 > 15 > 13
    ids = torch.tensor([[9, 11, 12, 13, 14, 15, 8, 0]])
    eot = torch.tensor([6])
    content = content_mask(ids, eot, 0)
    assert content.tolist() == [[False, True, True, True, True, True, False, False]]
    scores = torch.tensor([[5.0, 1.0, 0.5, -0.9, 0.95, -0.4, 7.0, 7.0]])  # non-content values are ignored
    denoised, masked, targets = dual_masks(ids, scores, content, pad_id=0, noise_ratio=0.2, mask_ratio=0.4)
    assert denoised.tolist() == [[9, 11, 12, 14, 15, 8, 0, 0]]  # floor(0.2 * 5) = 1 dropped: token 13
    assert masked.tolist() == [[9, 0, 12, 13, 0, 15, 8, 0]]  # round(0.4 * 5) = 2 masked: tokens 11 and 14
    assert targets.tolist() == [[IGNORE, 11, IGNORE, IGNORE, 14, IGNORE, IGNORE, IGNORE]]
    denoised, masked, _ = dual_masks(ids, scores, content, pad_id=0, noise_ratio=0.4, mask_ratio=0.6)
    assert denoised.tolist() == [[9, 11, 12, 14, 8, 0, 0, 0]]  # floor(0.4 * 5) = 2 dropped: 13 and 15
    assert masked.tolist() == [[9, 0, 0, 13, 0, 15, 8, 0]]  # round(0.6 * 5) = 3 of the kept masked: 11, 14, 12


def test_ga_dms_ratios_are_typed_options_that_reach_the_token_selection():
    from clipforge.train.inputs import DataContext, data_options

    term = build("ga_dms", embed_dim=4, vocab_size=7, noise_ratio=0.3, mask_ratio=0.25)
    assert term.masking_ratios == (0.3, 0.25)
    ctx = DataContext(cfg=None, needs=frozenset(term.extra_keys), image_size=32, out_dir=None, terms=(term,))
    assert data_options(ctx) == {"token_masking": True, "masking_ratios": (0.3, 0.25)}
    other = build("ga_dms", embed_dim=4, vocab_size=7, noise_ratio=0.1)
    with pytest.raises(ValueError, match="same noise_ratio and mask_ratio"):
        data_options(DataContext(cfg=None, needs=frozenset(term.extra_keys), image_size=32, out_dir=None,
                                 terms=(term, other)))
    for bad in ({"noise_ratio": 1.0}, {"mask_ratio": 0.0}, {"noise_ratio": 0.6, "mask_ratio": 0.5},
                {"noise_ratio": -0.1}):
        with pytest.raises(ValueError, match="noise_ratio"):
            build("ga_dms", embed_dim=4, vocab_size=7, **bad)


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
    from clipforge.tokenizer import get_tokenizer
    from clipforge.train.inputs import encode_extras

    model = _tiny(layers=1).eval()
    ids = get_tokenizer(16)(["a small red circle photo vintage.", "two blue squares."])
    batch = {"images": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "mask_texts": ids,
             "mask_ratios": torch.tensor([[0.4, 0.3]] * 2, dtype=torch.float64)}
    with torch.no_grad():  # the score's gradient is taken inside, whatever the caller's grad mode
        extra = encode_extras(model, batch)
    image = model.encode_image(batch["images"])
    text, attention = model.encode_text_attention(ids)
    eot = model.text.eot_index(ids)
    content = content_mask(ids, eot, 0)
    scores = ga_scores(attention.detach(), similarity_gradient(image, text, attention), eot, content)
    denoised, masked, targets = dual_masks(ids, scores, content, 0, 0.4, 0.3)
    with torch.no_grad():
        assert torch.allclose(extra["ga_dms_text_features"], model.encode_text(denoised), atol=1e-5)
        assert torch.allclose(extra["ga_dms_mtp_tokens"], model.encode_text_tokens(masked)[1], atol=1e-5)
    assert torch.equal(extra["ga_dms_mtp_targets"], targets)
    # the denoised caption is the original minus floor(0.4 n) content tokens, order kept; round(0.3 n) masked
    n = content.sum(1).float()
    assert ((ids != 0).sum(1) - (denoised != 0).sum(1)).tolist() == torch.floor(0.4 * n).long().tolist()
    assert (targets != IGNORE).sum(1).tolist() == torch.round(0.3 * n).long().tolist()
    kept = [[t for t in row.tolist() if t] for row in denoised]
    assert all(k == [t for t in row.tolist() if t and t in k] for k, row in zip(kept, ids))


def test_clipforge_train_ga_dms_on_noisy_shapes_captions(tmp_path):
    from clipforge.cli.main import main

    small = ["model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
             "text: {context_length: 32, width: 32, layers: 1, heads: 2}}", "data.train_size=32", "data.eval_size=8",
             "batch_size=8", "steps=2", "warmup_steps=1", "progress=false", "precision=fp32", "log_every=1"]
    run = tmp_path / "run"
    assert main(["train", f"out_dir={run}",
                 "loss={clip: 1, ga_dms: {weight: 1, embed_dim: 32, noise_ratio: 0.3, mask_ratio: 0.2}}",
                 "data.caption_noise=0.5", *small]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "ga_dms/mtp" in row]
    assert logged and all(math.isfinite(row["ga_dms/mtp"]) and math.isfinite(row["ga_dms/align"]) for row in logged)
    assert main(["train", f"out_dir={tmp_path / 'bad'}", "loss={clip: 1}", "data.caption_noise=1.5", *small]) == 2
    assert main(["train", f"out_dir={tmp_path / 'bad2'}", "loss={clip: 1, ga_dms: {embed_dim: 32, noise_ratio: 1.2}}",
                 *small]) == 2
