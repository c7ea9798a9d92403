"""Norton (optimal transport with an alignable prompt bucket, soft-maximum token similarity,
targets rectified for faulty negatives) against naive loop references; the log-domain
Sinkhorn against the plain (multiplicative) Sinkhorn-Knopp iteration."""
import math

import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, NortonConfig, clip_loss, norton_loss, sinkhorn_log
from clipforge.losses.norton import matched_quantile, norton_scores, ot_scores, rectified_targets, soft_maximum_scores

F64 = torch.float64



def naive_sinkhorn(scores, a, b, eps, iters):
    """Sinkhorn-Knopp on K = exp(scores / eps): u = a / K v, v = b / K^T u; plan u_i K_ij v_j (floats)."""
    n, m = len(a), len(b)
    k = [[math.exp(float(torch.as_tensor(scores[i][j]).detach()) / eps) for j in range(m)] for i in range(n)]
    u, v = [1.0] * n, [1.0] * m
    for _ in range(iters):
        u = [a[i] / sum(k[i][j] * v[j] for j in range(m)) for i in range(n)]
        v = [b[j] / sum(k[i][j] * u[i] for i in range(n)) for j in range(m)]
    return [[u[i] * k[i][j] * v[j] for j in range(m)] for i in range(n)]


def test_sinkhorn_matches_naive_and_marginals():
    s = torch.rand(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    a, b = torch.tensor([0.2, 0.3, 0.5], dtype=F64), torch.full((4,), 0.25, dtype=F64)
    q = sinkhorn_log(s, a.log(), b.log(), 0.2, 200)
    assert torch.allclose(q, torch.tensor(naive_sinkhorn(s.tolist(), a.tolist(), b.tolist(), 0.2, 200), dtype=F64))
    assert torch.allclose(q.sum(1), a) and torch.allclose(q.sum(0), b, atol=1e-8)


def naive_pair_score(u, w, mask, cfg):
    """Score of one (sample, text) pair from the module docstring's equations; the plans are float constants."""
    words = [w[l] for l in range(len(w)) if mask[l]]
    n, m = len(u), len(words)
    sim = [[dot(u[p], words[q]) for q in range(m)] for p in range(n)]
    score = 0.0
    if cfg.lse_weight < 1:
        if cfg.bucket is None:
            plan = naive_sinkhorn(sim, [1 / n] * n, [1 / m] * m, cfg.eps, cfg.iters)
        else:
            ext = [row + [cfg.bucket] for row in sim] + [[cfg.bucket] * (m + 1)]
            a = [1 / (n + m)] * n + [m / (n + m)]
            b = [1 / (n + m)] * m + [n / (n + m)]
            plan = naive_sinkhorn(ext, a, b, cfg.eps, cfg.iters)
        mass = sum(plan[p][q] for p in range(n) for q in range(m))
        score = (1 - cfg.lse_weight) * sum(plan[p][q] * sim[p][q] for p in range(n) for q in range(m)) / mass
    if cfg.lse_weight > 0:
        al = cfg.alpha
        per_word = sum(al * torch.log(sum(torch.exp(sim[p][q] / al) for p in range(n))) for q in range(m)) / m
        per_unit = sum(al * torch.log(sum(torch.exp(sim[p][q] / al) for q in range(m))) for p in range(n)) / n
        score = score + cfg.lse_weight * 0.5 * (per_word + per_unit)
    return score


def naive_norton(units, words, mask, t, cfg):
    b = len(units)
    s = [[t * naive_pair_score(units[i], words[j], mask[j], cfg) for j in range(b)] for i in range(b)]
    if cfg.beta == 0:
        target = [[float(i == j) for j in range(b)] for i in range(b)]
    else:
        logits = [[float(v.detach()) / cfg.target_eps for v in row] for row in s]
        plan = naive_sinkhorn(logits, [1 / b] * b, [1 / b] * b, 1.0, cfg.iters)
        target = [[(1 - cfg.beta) * (i == j) + cfg.beta * plan[i][j] / sum(plan[i]) for j in range(b)]
                  for i in range(b)]

    def lse(vals):
        mx = max(float(v.detach()) for v in vals)
        return mx + torch.log(sum(torch.exp(v - mx) for v in vals))

    rows = sum(-target[i][j] * (s[i][j] - lse(s[i])) for i in range(b) for j in range(b)) / b
    cols = sum(-target[i][j] * (s[i][j] - lse([s[k][j] for k in range(b)])) for i in range(b) for j in range(b)) / b
    return 0.5 * (rows + cols)


def data(seed=0):
    units, words = unit(9, 3, seed).reshape(3, 3, 3), unit(9, 3, seed + 1).reshape(3, 3, 3)
    mask = torch.tensor([[True, True, True], [True, False, True], [True, True, False]])
    return units, words, mask


@pytest.mark.parametrize("cfg", [
    NortonConfig(bucket=0.1, eps=0.5, iters=60, lse_weight=0.3, alpha=0.2, beta=0.3),
    NortonConfig(bucket=None, eps=0.4, iters=60, lse_weight=0.0, beta=0.5, target_eps=0.5),
    NortonConfig(bucket=-0.2, eps=0.5, iters=60, lse_weight=1.0, alpha=0.3, beta=0.0),
])
def test_matches_naive_values_and_stop_gradient_grads(cfg):
    units, words, mask = data()
    fast_in = [units.clone().requires_grad_(), words.clone().requires_grad_()]
    slow_in = [units.clone().requires_grad_(), words.clone().requires_grad_()]
    fast = norton_loss(*fast_in, 2.0, mask, cfg)
    slow = naive_norton(*slow_in, mask, 2.0, cfg)
    assert torch.allclose(fast, slow, atol=1e-10)
    fast.backward(), slow.backward()  # transport plans and rectified targets are constants in both (as in Norton)
    for a, b in zip(fast_in, slow_in):
        assert torch.allclose(a.grad, b.grad, atol=1e-9)


def test_gradcheck_through_sinkhorn():
    units, words, mask = data(2)
    cfg = NortonConfig(bucket=0.0, eps=0.5, iters=15, lse_weight=0.4, alpha=0.3, beta=0.0, plan_grad=True)
    leaves = (units[:2, :2].clone().requires_grad_(), words[:2, :2].clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda u, w: norton_loss(u, w, 2.0, mask[:2, :2], cfg), leaves)


def test_limits_and_properties():
    # one unit per side, no bucket, no soft maximum, no rectification: the CLIP loss
    x, y = unit(4, 3, 4), unit(4, 3, 5)
    plain = NortonConfig(bucket=None, lse_weight=0.0, beta=0.0)
    assert torch.allclose(norton_loss(x[:, None], y[:, None], 3.0, None, plain), clip_loss(x, y, 3.0))
    # the soft maximum tends to the hard maximum as alpha -> 0
    units, words, mask = data(6)
    sim = torch.einsum("ind,jld->ijnl", units, words)
    full = torch.ones_like(mask)
    hard = 0.5 * (sim.max(2).values.mean(-1) + sim.max(3).values.mean(-1))
    assert torch.allclose(soft_maximum_scores(units, words, full, 1e-4), hard, atol=1e-3)
    # permuting the batch, and the tokens inside each sequence, leaves the loss unchanged
    cfg = NortonConfig(bucket=0.1, eps=0.3, iters=40, beta=0.3)
    base = norton_loss(units, words, 2.0, mask, cfg)
    perm = torch.tensor([2, 0, 1])
    assert torch.allclose(norton_loss(units[perm], words[perm], 2.0, mask[perm], cfg), base)
    tok = torch.tensor([1, 2, 0])
    assert torch.allclose(norton_loss(units[:, tok], words[:, tok], 2.0, mask[:, tok], cfg), base)
    # rectified targets are distributions that keep most mass on the diagonal
    t = rectified_targets(2.0 * norton_scores(units, words, mask, cfg), 0.3)
    assert torch.allclose(t.sum(-1), torch.ones(3, dtype=F64)) and (t.diagonal() >= 0.7).all()


def test_bucket_absorbs_unalignable_items():
    e = torch.eye(4, dtype=F64)
    units = torch.stack([e[0], e[1], e[2]])[None]  # two described patches and one background patch
    words = torch.stack([e[0], e[1]])[None]
    junk = -(e[0] + e[1] + e[2]) / math.sqrt(3)  # a word that matches no patch
    with_junk = torch.cat([words, junk[None, None]], dim=1)

    def score(w, bucket):
        bucket = None if bucket is None else torch.tensor(bucket, dtype=F64)
        return float(ot_scores(units, w, torch.ones(w.shape[:2], dtype=torch.bool), bucket, 0.05, 300))

    # without the bucket all mass must be transported: the background patch and the junk word drag the
    # score down; with the bucket they go there and the two true matches (similarity 1) remain
    assert score(words, None) < 0.67 and score(words, None) - score(with_junk, None) > 0.15
    assert score(words, 0.0) > 0.99 and score(with_junk, 0.0) > 0.99


def test_bucket_quantile_and_module():
    units, words, mask = data(9)
    q = matched_quantile(units, words, mask, 0.25)
    vals = sorted(float(dot(units[i, n], words[i, l]))
                  for i in range(3) for n in range(3) for l in range(3) if mask[i, l])
    pos = 0.25 * (len(vals) - 1)
    lo = math.floor(pos)
    assert math.isclose(float(q), vals[lo] + (pos - lo) * (vals[lo + 1] - vals[lo]), rel_tol=1e-12)
    cfg = NortonConfig(bucket=float(q), eps=0.3, iters=30)
    li = LossInputs(unit(3, 3, 10), unit(3, 3, 11), torch.tensor(2.0, dtype=F64), image_tokens=3 * units,
                    text_tokens=words, text_mask=mask)
    out = losses.build("norton", bucket_quantile=0.25, eps=0.3, iters=30)(li)["loss"]
    assert torch.allclose(out, norton_loss(units, words, 2.0, mask, cfg))  # tokens are normalized by the term
    assert set(losses.build("norton").extra_keys) == {"image_tokens", "text_tokens"}  # checked at start-up
    with pytest.raises(KeyError, match="image_tokens"):
        losses.build("norton")(LossInputs(unit(3, 3, 10), unit(3, 3, 11), torch.tensor(2.0)))
    with pytest.raises(ValueError, match="no valid token"):
        norton_loss(units, words, 2.0, torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, N, d\]"):
        norton_loss(units[0], words, 2.0)
    with pytest.raises(ValueError, match="lse_weight"):
        losses.build("norton", lse_weight=1.5)
