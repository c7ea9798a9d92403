"""FG-CLIP 2 region terms: RoI region features, region contrast, region hard negatives and the long-caption
branch against naive references written from the equations here, the input pipeline, and a few training steps
from the command line."""
import json
import math

import numpy as np
import pytest
import torch

from clipforge.losses import LossInputs, build, fgclip_region_loss, roi_region_features
from clipforge.models.region_head import roi_align


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _boxes(b, r, seed):
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(b, r, 2, generator=g, dtype=torch.float64) * 0.5
    return torch.cat([lo, lo + 0.1 + torch.rand(b, r, 2, generator=g, dtype=torch.float64) * 0.4], -1)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_roi_region_features_are_the_normalized_mean_of_the_region_heads_roi_align(s):
    tokens = torch.randn(2, 16, 5, dtype=torch.float64)
    boxes = _boxes(2, 3, seed=s)
    want = torch.nn.functional.normalize(roi_align(tokens, boxes, s).mean(2), dim=-1)
    assert torch.allclose(roi_region_features(tokens, boxes, s), want, atol=1e-12)
    # one hand case: a box covering exactly patch (1, 2) of a 4x4 grid samples that patch's feature only
    one = torch.tensor([[[0.5, 0.25, 0.75, 0.5]]], dtype=torch.float64)
    got = roi_region_features(tokens[:1], one, 1)[0, 0]
    assert torch.allclose(got, torch.nn.functional.normalize(tokens[0, 1 * 4 + 2], dim=-1), atol=1e-12)
    with pytest.raises(ValueError, match="outside the image or is empty"):
        roi_region_features(tokens, boxes * 3, s)
    with pytest.raises(ValueError, match="outside the image or is empty"):
        roi_region_features(tokens, boxes[..., [2, 1, 0, 3]], s)


def _naive(r, u, mask, t, negs, neg_mask, img, long, w_region, w_hard, w_long):
    valid = [(i, j) for i in range(r.shape[0]) for j in range(r.shape[1]) if mask[i, j]]
    n = len(valid)
    region = 0.0
    for a in valid:
        row = [t * float(r[a] @ u[b]) for b in valid]
        col = [t * float(u[a] @ r[b]) for b in valid]
        k = valid.index(a)
        region += 0.5 * (math.log(sum(math.exp(v) for v in row)) - row[k])
        region += 0.5 * (math.log(sum(math.exp(v) for v in col)) - col[k])
    hard = 0.0
    for i, j in valid:
        pos = t * float(r[i, j] @ u[i, j])
        terms = [pos] + [t * float(r[i, j] @ negs[i, j, k]) for k in range(negs.shape[2]) if neg_mask[i, j, k]]
        hard += math.log(sum(math.exp(v) for v in terms)) - pos
    b = img.shape[0]
    long_loss = 0.0
    for i in range(b):
        row = [t * float(img[i] @ long[k]) for k in range(b)]
        col = [t * float(long[i] @ img[k]) for k in range(b)]
        long_loss += 0.5 * (math.log(sum(math.exp(v) for v in row)) - row[i]) / b
        long_loss += 0.5 * (math.log(sum(math.exp(v) for v in col)) - col[i]) / b
    return w_region * region / n + w_hard * hard / n + w_long * long_loss


def _batch(seed=0, b=3, r=2, k=2, d=6):
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    neg_mask = torch.tensor([[[True, True], [True, False]], [[False, True], [True, True]],
                             [[True, True], [False, False]]])
    return (_unit(b, r, d, seed=seed), _unit(b, r, d, seed=seed + 1), mask, _unit(b, r, k, d, seed=seed + 2), neg_mask,
            _unit(b, d, seed=seed + 3), _unit(b, d, seed=seed + 4))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, 2.0, 0.0), (0.0, 1.0, 0.3)])
def test_fgclip_region_loss_matches_the_naive_equations(weights):
    r, u, mask, negs, neg_mask, img, long = _batch()
    t = torch.tensor(4.0, dtype=torch.float64)
    got = fgclip_region_loss(r, u, mask, t, negs, neg_mask, img, long, *weights)["loss"]
    want = _naive(r, u, mask, 4.0, negs, neg_mask, img, long, *weights)
    assert abs(float(got) - want) < 1e-9


def test_fgclip_region_gradcheck_and_registered_term():
    r, u, mask, negs, neg_mask, img, long = _batch(seed=5)
    t = torch.tensor(3.0, dtype=torch.float64)
    leaves = (r.clone().requires_grad_(), u.clone().requires_grad_(), negs.clone().requires_grad_())
    assert torch.autograd.gradcheck(
        lambda a, b, c: fgclip_region_loss(a, b, mask, t, c, neg_mask, img, long)["loss"], leaves)
    tokens = torch.randn(3, 16, 6, dtype=torch.float64)
    boxes = _boxes(3, 2, seed=1)
    li = LossInputs(img, img, t, image_tokens=tokens, extra={
        "region_text_features": u, "region_boxes": boxes, "region_mask": mask, "region_negative_text_features": negs,
        "region_negative_mask": neg_mask, "long_text_features": long})
    term = build("fgclip_region", roi_size=2)
    want = fgclip_region_loss(roi_region_features(tokens, boxes, 2), u, mask, t, negs, neg_mask, img, long)["loss"]
    assert torch.allclose(term(li)["loss"], want)
    assert set(term.extra_keys) == {"image_tokens", "region_text_features", "region_negative_text_features",
                                    "long_text_features"}
    assert build("fgclip_region", hard=0.0, long=0.0).extra_keys == ("image_tokens", "region_text_features")
    with pytest.raises(ValueError, match="not all 0"):
        build("fgclip_region", region=0.0, hard=0.0, long=0.0)
    with pytest.raises(TypeError, match="no option"):
        build("fgclip_region", negatives=3)
    li.extra["region_mask"] = torch.zeros(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="without any region"):
        term(li)


def test_region_negative_captions_change_one_word_and_the_collate_pads_them():
    from clipforge.data.regions import region_negative_captions
    from clipforge.tokenizer import get_tokenizer
    from clipforge.train.data import make_collate

    negs = region_negative_captions(["a small red circle.", "a large blue star.", "hello."], 3,
                                    np.random.default_rng(0))
    for caption, found in zip(["a small red circle.", "a large blue star."], negs):
        assert 1 <= len(found) <= 3 and len(set(found)) == len(found) and caption not in found
        for neg in found:  # exactly one word differs, as written in FG-CLIP's attribute-changed negatives
            a, b = caption.split(), neg.split()
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) in (1, 2)  # 2: "a" -> "an" article fix
    assert negs[2] == []  # nothing to change
    tok = get_tokenizer(16)
    items = [{"pixels": torch.zeros(3, 8, 8), "caption": "x", "index": 0, "boxes": torch.tensor([[0, 0, .5, .5]]),
              "region_captions": ["a red circle."], "region_negatives": [["a blue circle."]], "long_caption": "y z."},
             {"pixels": torch.zeros(3, 8, 8), "caption": "x", "index": 1,
              "boxes": torch.tensor([[0, 0, .5, .5], [.5, .5, 1, 1]]), "region_captions": ["a red circle.", "b."],
              "region_negatives": [["a red star.", "a green circle."], []], "long_caption": "w."}]
    batch = make_collate(tok, regions=3, region_negatives=(3, 2))(items)
    assert batch["region_negative_texts"].shape == (2, 3, 2, 16)
    assert batch["region_negative_mask"].tolist() == [[[True, False], [False, False], [False, False]],
                                                      [[True, True], [False, False], [False, False]]]
    assert torch.equal(batch["region_negative_texts"][1, 0, 1], tok(["a green circle."])[0])
    assert torch.equal(batch["long_texts"], tok(["y z.", "w."]))


SMALL = ["model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
         "text: {context_length: 32, width: 32, layers: 1, heads: 2}}", "data.train_size=32", "data.eval_size=8",
         "batch_size=8", "steps=2", "warmup_steps=1", "progress=false", "precision=fp32", "log_every=1"]


def test_clipforge_train_clip_plus_fgclip_region_on_shapes(tmp_path):
    from clipforge.cli.main import main

    run = tmp_path / "run"
    assert main(["train", f"out_dir={run}", "loss={clip: 1, fgclip_region: 1}", *SMALL]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "fgclip_region/hard" in row]
    assert logged and all(math.isfinite(row[k]) for row in logged for k in
                          ("fgclip_region/region", "fgclip_region/hard", "fgclip_region/long"))
