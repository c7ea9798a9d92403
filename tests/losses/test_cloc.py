"""CLOC (Chen et al., 2024): RoIAlign over the patch grid, the region head, the region-text and
grounding loss against naive references written here, and a few training steps from the command line."""
import json
import math

import pytest
import torch

import clipforge
from clipforge.losses import LossInputs, build, cloc_loss, generalized_iou
from clipforge.models.region_head import roi_align


def _naive_roi(tokens, boxes, s):
    """Per box, per bin: the bilinear value of the g x g grid at the bin center (patch k at (k+0.5)/g,
    coordinates clamped to the outer patch centers)."""
    b, n, c = tokens.shape
    g = int(n ** 0.5)
    grid = tokens.reshape(b, g, g, c)
    out = torch.zeros(b, boxes.shape[1], s * s, c, dtype=tokens.dtype)
    for i in range(b):
        for r in range(boxes.shape[1]):
            x0, y0, x1, y1 = boxes[i, r].tolist()
            for by in range(s):
                for bx in range(s):
                    px, py = x0 + (bx + 0.5) * (x1 - x0) / s, y0 + (by + 0.5) * (y1 - y0) / s
                    u, v = min(max(px * g - 0.5, 0), g - 1), min(max(py * g - 0.5, 0), g - 1)
                    u0, v0 = int(math.floor(u)), int(math.floor(v))
                    u1, v1 = min(u0 + 1, g - 1), min(v0 + 1, g - 1)
                    fu, fv = u - u0, v - v0
                    val = ((1 - fu) * (1 - fv) * grid[i, v0, u0] + fu * (1 - fv) * grid[i, v0, u1]
                           + (1 - fu) * fv * grid[i, v1, u0] + fu * fv * grid[i, v1, u1])
                    out[i, r, by * s + bx] = val
    return out


def _boxes(b, r, seed):
    g = torch.Generator().manual_seed(seed)
    a, c = torch.rand(b, r, 2, generator=g, dtype=torch.float64), torch.rand(b, r, 2, generator=g, dtype=torch.float64)
    lo, hi = torch.minimum(a, c), torch.maximum(a, c) + 0.01
    return torch.cat([lo, hi.clamp(max=1.0)], -1)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_roi_align_matches_a_per_box_loop(s):
    tokens = torch.randn(2, 16, 5, dtype=torch.float64)
    boxes = _boxes(2, 3, seed=s)
    boxes[0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)  # the whole image, border clamping
    assert torch.allclose(roi_align(tokens, boxes, s), _naive_roi(tokens, boxes, s), atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, boxes, s), tokens.clone().requires_grad_())


def test_generalized_iou_hand_case():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[0.5, 0.5, 1.5, 1.5], [0.0, 0.0, 1.0, 1.0]])
    # inter 0.25, union 1.75, hull 2.25 -> 1/7 - 0.5/2.25; identical boxes -> 1
    assert torch.allclose(generalized_iou(a, b), torch.tensor([1 / 7 - 0.5 / 2.25, 1.0]), atol=1e-6)


def _naive_cloc(r, u, mask, pred, true, t, region_w, ground_w):
    rs = [r[i, j] for i in range(r.shape[0]) for j in range(r.shape[1]) if mask[i, j]]
    us = [u[i, j] for i in range(r.shape[0]) for j in range(r.shape[1]) if mask[i, j]]
    n = len(rs)
    total = 0.0
    for j in range(n):
        lr = [t * float(rs[j] @ us[k]) for k in range(n)]
        lu = [t * float(us[j] @ rs[k]) for k in range(n)]
        total += 0.5 * (-lr[j] + math.log(sum(math.exp(v) for v in lr)))
        total += 0.5 * (-lu[j] + math.log(sum(math.exp(v) for v in lu)))
    ground = 0.0
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            if not mask[i, j]:
                continue
            a, b = pred[i, j].tolist(), true[i, j].tolist()
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
            giou = inter / union - (hull - union) / hull
            ground += sum(abs(x - y) for x, y in zip(a, b)) + 1 - giou
    return region_w * total / n + ground_w * ground / n


def _features(seed, b=3, r=2, d=6):
    g = torch.Generator().manual_seed(seed)
    f = lambda: torch.nn.functional.normalize(torch.randn(b, r, d, generator=g, dtype=torch.float64), dim=-1)  # noqa
    return f(), f(), torch.tensor([[True, True], [True, False], [False, True]])


def test_cloc_loss_matches_the_naive_equation():
    r, u, mask = _features(0)
    pred, true = _boxes(3, 2, seed=4), _boxes(3, 2, seed=5)
    for region_w, ground_w in [(1.0, 1.0), (0.5, 2.0)]:
        got = cloc_loss(r, u, mask, pred, true, torch.tensor(7.0, dtype=torch.float64), region_w, ground_w)["loss"]
        want = _naive_cloc(r, u, mask, pred, true, 7.0, region_w, ground_w)
        assert abs(float(got) - want) < 1e-6  # GIoU divides with eps = 1e-7


def test_cloc_gradcheck_and_registered_term():
    r, u, mask = _features(1)
    pred, true = _boxes(3, 2, seed=6), _boxes(3, 2, seed=7)
    t = torch.tensor(5.0, dtype=torch.float64)
    leaves = (r.clone().requires_grad_(), u.clone().requires_grad_(), pred.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, b, p: cloc_loss(a, b, mask, p, true, t)["loss"], leaves)
    term = build("cloc", grounding=0.0)
    img = torch.zeros(3, 6, dtype=torch.float64)
    li = LossInputs(img, img, t, extra={"region_features": r, "region_text_features": u, "region_mask": mask,
                                        "grounded_boxes": pred, "region_boxes": true})
    assert torch.allclose(term(li)["loss"], cloc_loss(r, u, mask, pred, true, t, 1.0, 0.0)["loss"])
    with pytest.raises(KeyError, match="region_features"):
        term(LossInputs(img, img, t))
    with pytest.raises(ValueError, match="not both 0"):
        build("cloc", region=0.0, grounding=0.0)


def _tiny(**kw):
    return clipforge.create_model("tiny", seed=0, embed_dim=32, vision={"image_size": 32, "patch_size": 8, "width": 32,
                                  "layers": 1, "heads": 2}, text={"context_length": 16, "width": 32, "layers": 1,
                                                                   "heads": 2}, **kw)


def test_encode_regions_public_api_and_clear_errors():
    model = _tiny(region_head=True).eval()
    images = torch.randn(2, 3, 32, 32)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.2, 0.3, 0.9, 1.0]]] * 2)
    with torch.no_grad():
        emb = model.encode_regions(images, boxes)
        # batched equals one image at a time (no leakage between images or boxes)
        one = model.encode_regions(images[1:], boxes[1:, 1:])
    assert emb.shape == (2, 2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2, 2), atol=1e-5)
    assert torch.allclose(emb[1, 1], one[0, 0], atol=1e-5)
    with pytest.raises(ValueError, match="no region head.*region_head=True"):
        _tiny().encode_regions(images, boxes)
    with pytest.raises(ValueError, match="outside the image"):
        model.encode_regions(images, boxes * 2)
    with pytest.raises(ValueError, match="is empty"):
        model.encode_regions(images, boxes[..., [2, 1, 0, 3]])
    with pytest.raises(ValueError, match=r"\[B, R, 4\]"):
        model.encode_regions(images, boxes[0])


def test_clipforge_train_clip_plus_cloc_on_shapes(tmp_path, capsys):
    from clipforge.cli.main import main

    small = ["model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
             "text: {context_length: 16, width: 32, layers: 1, heads: 2}}", "data.train_size=64", "data.eval_size=16",
             "batch_size=16", "steps=3", "warmup_steps=1", "progress=false", "precision=fp32"]
    run = tmp_path / "run"
    assert main(["train", f"out_dir={run}", "loss={clip: 1, cloc: 1}", *small]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "cloc/region" in row]
    assert len(logged) >= 1 and all(math.isfinite(row["cloc/region"]) for row in logged)
    model = clipforge.load_model(run)
    assert model.region_head is not None
    with torch.no_grad():
        emb = model.encode_regions(torch.zeros(1, 3, 32, 32), torch.tensor([[[0.1, 0.1, 0.6, 0.6]]]))
    assert emb.shape == (1, 1, 32)


def test_training_inputs_for_cloc_match_per_sample_calls():
    """train.inputs' region entry: region embeddings = encode_regions of the batch's boxes, region caption features
    = encode_text of each sample's region captions, grounded boxes = the head's grounding of those features."""
    from clipforge.train.inputs import encode_extras

    model = _tiny(region_head=True).eval()
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]], [[0.3, 0.2, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]]])
    batch = {"images": torch.randn(2, 3, 32, 32, generator=g), "region_boxes": boxes,
             "region_texts": torch.randint(1, 400, (2, 2, 16), generator=g),
             "region_mask": torch.tensor([[True, False], [True, False]])}
    with torch.no_grad():
        extra = encode_extras(model, batch)
        assert torch.allclose(extra["region_features"], model.encode_regions(batch["images"], boxes), atol=1e-5)
        for i in range(2):
            text = model.encode_text(batch["region_texts"][i])
            assert torch.allclose(extra["region_text_features"][i], text, atol=1e-5)
            _, tokens = model.encode_image_tokens(batch["images"][i:i + 1])
            grounded = model.region_head.ground(tokens, text[None])[0]
            assert torch.allclose(extra["grounded_boxes"][i], grounded, atol=1e-5)
    assert torch.equal(extra["region_mask"], batch["region_mask"])
    # a model without a region head gets the region captions only (grain, fgclip_region read no head) ...
    with torch.no_grad():
        plain = encode_extras(_tiny(), batch)
    assert "region_features" not in plain and plain["region_text_features"].shape == (2, 2, 32)


def test_a_region_term_on_a_model_without_a_region_head_stops_at_start_up(tiny_cfg):
    """... and a term that trains the head (cloc) on such a model (e.g. from init_from) is refused by name."""
    from clipforge.errors import ConfigError
    from clipforge.train.setup import check_model_parts

    tiny_cfg.loss = {"clip": 1.0, "cloc": 1.0}
    with pytest.raises(ConfigError, match="train a region head, which this model has none of"):
        check_model_parts(tiny_cfg, _tiny())
    check_model_parts(tiny_cfg, _tiny(region_head=True))
    tiny_cfg.loss = {"clip": 1.0, "sycoca_tgmim": 1.0}
    with pytest.raises(ConfigError, match="TG-MIM branch of a CoCa model, which this CLIP lacks"):
        check_model_parts(tiny_cfg, _tiny())
