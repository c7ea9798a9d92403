"""GRAIN: the exact matching against scipy's Hungarian solver, the region terms against a naive reference
written from the equations here, the region-token head, and a few training steps from the command line."""
import copy
import json
import math

import pytest
import torch

from clipforge.losses import LossInputs, build, grain_loss
from clipforge.losses.grain import box_cost, match


def _boxes(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * 0.5
    return torch.cat([lo, lo + 0.1 + torch.rand(*shape, 2, generator=g, dtype=torch.float64) * 0.4], -1)


def _giou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _cost(a, b):
    return sum(abs(x - y) for x, y in zip(a, b)) + 1 - _giou(a, b)


@pytest.mark.parametrize("q,r,seed", [(4, 4, 0), (4, 2, 1), (6, 3, 2), (3, 1, 3)])
def test_exact_matching_equals_scipys_hungarian_assignment(q, r, seed):
    optimize = pytest.importorskip("scipy.optimize")
    pred, true = _boxes(q, seed=seed), _boxes(r, seed=seed + 10)
    cost = box_cost(pred, true)
    naive = torch.tensor([[_cost(pred[i].tolist(), true[j].tolist()) for j in range(r)] for i in range(q)],
                         dtype=torch.float64)
    assert torch.allclose(cost, naive, atol=1e-6)
    rows, cols = optimize.linear_sum_assignment(naive.numpy())
    want = float(naive[rows, cols].sum())
    got = match(cost)
    assert len(set(got.tolist())) == r
    assert abs(float(naive[got, torch.arange(r)].sum()) - want) < 1e-9


def _naive_grain(e, pb, u, tb, mask, t, w_desc, w_box):
    """Match each image's regions to its region tokens (best of all assignments), then the two sums."""
    import itertools

    valid = [(i, j) for i in range(u.shape[0]) for j in range(u.shape[1]) if mask[i, j]]
    n = len(valid)
    desc = box = 0.0
    for i in range(u.shape[0]):
        cols = [j for j in range(u.shape[1]) if mask[i, j]]
        if not cols:
            continue
        best = min(itertools.permutations(range(e.shape[1]), len(cols)),
                   key=lambda p: sum(_cost(pb[i, q].tolist(), tb[i, j].tolist()) for q, j in zip(p, cols)))
        for q, j in zip(best, cols):
            logits = [t * float(e[i, q] @ u[a, b]) for a, b in valid]
            desc += math.log(sum(math.exp(v) for v in logits)) - logits[valid.index((i, j))]
            box += _cost(pb[i, q].tolist(), tb[i, j].tolist())
    return w_desc * desc / n + w_box * box / n


def _inputs(seed=0, b=3, q=4, r=3, d=6):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    return unit(b, q, d), _boxes(b, q, seed=seed + 1), unit(b, r, d), _boxes(b, r, seed=seed + 2), mask


@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5), (0.0, 1.0)])
def test_grain_loss_matches_the_naive_equations(weights):
    e, pb, u, tb, mask = _inputs()
    got = grain_loss(e, pb, u, tb, mask, torch.tensor(5.0, dtype=torch.float64), *weights)["loss"]
    assert abs(float(got) - _naive_grain(e, pb, u, tb, mask, 5.0, *weights)) < 1e-6  # GIoU eps 1e-7


def test_grain_gradcheck_term_head_and_errors():
    e, pb, u, tb, mask = _inputs(seed=3)
    t = torch.tensor(4.0, dtype=torch.float64)
    leaves = (e.clone().requires_grad_(), pb.clone().requires_grad_(), u.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda a, p, c: grain_loss(a, p, c, tb, mask, t)["loss"], leaves)
    term = build("grain", embed_dim=6, queries=4, heads=2)
    tokens = torch.randn(3, 16, 6, dtype=torch.float64, requires_grad=True)
    li = LossInputs(torch.zeros(3, 6, dtype=torch.float64), torch.zeros(3, 6, dtype=torch.float64), t,
                    image_tokens=tokens, extra={"region_text_features": u, "region_boxes": tb, "region_mask": mask})
    out = term(li)
    emb, boxes = copy.deepcopy(term.tokens).double()(tokens)
    assert torch.allclose(out["loss"], grain_loss(emb, boxes, u, tb, mask, t)["loss"])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3, 4, dtype=torch.float64))
    assert ((boxes[..., 2:] >= boxes[..., :2]).all() and boxes.shape == (3, 4, 4))
    out["loss"].backward()  # the head and the patch tokens both receive gradient
    assert tokens.grad.abs().sum() > 0 and term.tokens.queries.grad.abs().sum() > 0
    # the same head on every process: a fixed seed, the global RNG left as it was
    state = torch.get_rng_state()
    assert torch.equal(build("grain", embed_dim=6, heads=2).tokens.queries, build("grain", embed_dim=6,
                                                                                  heads=2).tokens.queries)
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="embed_dim=6"):
        build("grain")(li)
    with pytest.raises(ValueError, match="region tokens but a sample has 3 regions"):
        grain_loss(e[:, :2], pb[:, :2], u, tb, mask, t)
    with pytest.raises(ValueError, match="without any region"):
        grain_loss(e, pb, u, tb, torch.zeros_like(mask), t)
    with pytest.raises(ValueError, match="queries must be in"):
        build("grain", queries=9)


SMALL = ["model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
         "text: {context_length: 32, width: 32, layers: 1, heads: 2}}", "data.train_size=32", "data.eval_size=8",
         "batch_size=8", "steps=2", "warmup_steps=1", "progress=false", "precision=fp32", "log_every=1"]


def test_clipforge_train_clip_plus_grain_on_shapes(tmp_path):
    from clipforge.cli.main import main

    run = tmp_path / "run"
    assert main(["train", f"out_dir={run}", "loss={clip: 1, grain: {weight: 1, embed_dim: 32}}", *SMALL]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "grain/desc" in row]
    assert logged and all(math.isfinite(row["grain/desc"]) and math.isfinite(row["grain/box"]) for row in logged)
