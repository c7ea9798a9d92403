"""TCA (token condensation as adaptation): identity at keep 1, pruning against a hand-written
class-token attention, mass-preserving merges, the reservoir's eviction rule, shrinking token
counts, the reservoir logits formula and ``clipforge adapt --method tca``."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.adapt.tca import (
    TCA,
    TCAConfig,
    TokenReservoir,
    condense,
    kcenter_assign,
    plan_condensation,
    reservoir_logits,
    run_stream,
    tca_flops,
    token_schedule,
)

# 4 blocks, 8x8 = 64 patch tokens: enough tokens and depth for three condensation blocks
VIS = {"image_size": 32, "patch_size": 4, "width": 32, "layers": 4, "heads": 4}


@pytest.fixture
def model():
    from clipforge.models import create_model

    return create_model("tiny", seed=3, embed_dim=32, vision=VIS,
                        text={"context_length": 16, "width": 32, "layers": 1, "heads": 2}).eval()


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _classifier(c: int = 5, seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(c, 32, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _spread_classifier(model, c: int) -> torch.Tensor:
    """Class vectors at the (centered) features of the first ``c`` images of ``_images(·, 0)``, so a
    random model's predictions cover every class (a random direction gets them all in one class)."""
    with torch.no_grad():
        f = model.encode_image(_images(8, 0))
    return F.normalize(f[:c] - f.mean(0), dim=-1)


@pytest.mark.parametrize("mode", ["merge", "prune"])
def test_keep_one_without_correction_is_plain_zero_shot(model, mode):
    w = _spread_classifier(model, 3)
    tca = TCA(model, w, TCAConfig(keep_ratio=1.0, correction_weight=0.0, mode=mode, anchor_min_samples=1))
    for seed in range(4):  # a stream: the reservoir fills and anchors become available; nothing may change
        x = _images(8, seed)
        out = tca.step(x)
        with torch.no_grad():
            plain = model.scale().detach() * model.encode_image(x) @ w.t()
        assert torch.equal(out.logits, plain) and torch.equal(out.base_logits, plain)
        assert out.kept == {}
    assert len(tca.reservoir) > 0 and out.anchored


def test_correction_moves_logits_but_not_the_base(model):
    w = _classifier()
    tca = TCA(model, w, TCAConfig(keep_ratio=1.0, correction_weight=3.0))
    first = tca.step(_images(6, 0))
    assert torch.equal(first.logits, first.base_logits)  # empty reservoir: nothing to correct with
    x = _images(6, 1)
    out = tca.step(x)
    with torch.no_grad():
        plain = model.scale().detach() * model.encode_image(x) @ w.t()
    assert torch.equal(out.base_logits, plain)
    assert (out.logits - out.base_logits).min() >= 0 and (out.logits - out.base_logits).max() > 0.1


def _naive_class_attention(block, x: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q_cls . k_j / sqrt(d_h)) per head, written out from the fused in_proj weights: [B, H, N]."""
    h = block.ln_1(x)
    width = x.shape[-1]
    d = width // heads
    wq, wk = block.attn.in_proj.weight[:width], block.attn.in_proj.weight[width : 2 * width]
    bq, bk = block.attn.in_proj.bias[:width], block.attn.in_proj.bias[width : 2 * width]
    rows = []
    for b in range(x.shape[0]):
        per_head = []
        for hd in range(heads):
            sl = slice(hd * d, (hd + 1) * d)
            q = h[b, 0] @ wq[sl].t() + bq[sl]
            k = h[b] @ wk[sl].t() + bk[sl]
            s = torch.tensor([float(q @ k[j]) / math.sqrt(d) for j in range(x.shape[1])])
            per_head.append(torch.exp(s - s.max()) / torch.exp(s - s.max()).sum())
        rows.append(torch.stack(per_head))
    return torch.stack(rows)


@pytest.mark.parametrize("score", ["attention", "rank"])
def test_pruning_keeps_the_tokens_a_naive_reference_selects(model, score):
    x = _images(3, 7)
    cfg = TCAConfig(layers=(2,), keep_ratio=0.5, mode="prune", score=score, anchors=False, correction_weight=0.0)
    tca = TCA(model, _classifier(), cfg)
    feats, _, kept = tca.encode(x)
    v = model.visual
    with torch.no_grad():
        seq = tca._embed(x)
        for blk in v.transformer.blocks[:2]:
            seq = blk(seq)
        att = _naive_class_attention(v.transformer.blocks[2], seq, VIS["heads"])[:, :, 1:]  # [B, H, 64]
        n, keep = att.shape[-1], 32
        ref_kept = []
        for b in range(x.shape[0]):
            if score == "attention":
                s = att[b].mean(0).tolist()
            else:  # rank of each token within each head (0 = least attended), averaged over heads
                s = [0.0] * n
                for hd in range(VIS["heads"]):
                    for r, j in enumerate(sorted(range(n), key=lambda j: float(att[b, hd, j]))):
                        s[j] += r / VIS["heads"]
            ref_kept.append(sorted(sorted(range(n), key=lambda j: -s[j])[:keep]))
        assert kept[2].tolist() == ref_kept
        # and the rest of the forward is the plain blocks on exactly those tokens
        blk = v.transformer.blocks[2]
        seq = seq + blk.attn(blk.ln_1(seq))
        idx = torch.tensor(ref_kept)
        seq = torch.cat([seq[:, :1], torch.gather(seq[:, 1:], 1, idx[..., None].expand(-1, -1, seq.shape[-1]))], 1)
        seq = seq + blk.mlp(blk.ln_2(seq))
        seq = v.transformer.blocks[3](seq)
        ref = F.normalize(v.ln_post(seq)[:, 0] @ v.proj, dim=-1)
    assert torch.allclose(feats, ref, atol=1e-5)


def test_plan_counts_follow_keep_ratio():
    p = plan_condensation(64, TCAConfig(keep_ratio=0.5))
    assert (p.out, p.centers, p.as_is, p.ambiguous, p.fused) == (32, 4, 27, 25, 12)
    assert p.as_is + p.centers + 1 == p.out and p.as_is + p.ambiguous + p.fused == p.n
    assert plan_condensation(64, TCAConfig(keep_ratio=0.5, mode="prune")).out == 32
    assert plan_condensation(64, TCAConfig(keep_ratio=1.0)).out == 64
    tiny = plan_condensation(5, TCAConfig(keep_ratio=0.1))  # one token left: everything fused into it
    assert (tiny.out, tiny.as_is, tiny.centers, tiny.fused) == (1, 0, 0, 5)


def test_merging_preserves_token_mass():
    g = torch.Generator().manual_seed(0)
    b, n, w = 2, 40, 8
    x = torch.randn(b, 1 + n, w, generator=g)
    scores = torch.rand(b, n, generator=g)
    attn = torch.rand(b, n, generator=g)
    sizes = torch.randint(1, 4, (b, n), generator=g).float()  # as after an earlier merge
    plan = plan_condensation(n, TCAConfig(keep_ratio=0.6, merge_centers=3))
    out, new_sizes, kept = condense(x, scores, attn, sizes, plan, "merge")
    assert out.shape == (b, 1 + plan.out, w) and new_sizes.shape == (b, plan.out)
    assert torch.equal(out[:, 0], x[:, 0])  # the class token is untouched
    assert torch.allclose(new_sizes.sum(1), sizes.sum(1))  # every patch is still accounted for
    for i in range(b):
        order = sorted(range(n), key=lambda j: -float(scores[i, j]))
        top, amb, low = (
            order[: plan.as_is],
            order[plan.as_is : plan.as_is + plan.ambiguous],
            order[plan.as_is + plan.ambiguous :],
        )
        assert kept[i].tolist() == sorted(top)
        assert torch.equal(out[i, 1 : 1 + plan.as_is], x[i, 1:][sorted(top)])
        centers = out[i, 1 + plan.as_is : 1 + plan.as_is + plan.centers]
        c_sizes = new_sizes[i, plan.as_is : plan.as_is + plan.centers]
        xa, sa = x[i, 1:][amb], sizes[i, amb]
        # sum_j s_j x_j over the merged tokens equals sum_c s_c x_c over the centers, and each center
        # is its cluster's size-weighted mean
        assert torch.allclose((c_sizes[:, None] * centers).sum(0), (sa[:, None] * xa).sum(0), atol=1e-5)
        assign = kcenter_assign(xa[None], plan.centers)[0]
        for c in range(plan.centers):
            m = assign == c
            assert torch.allclose(centers[c], (sa[m, None] * xa[m]).sum(0) / sa[m].sum(), atol=1e-6)
            assert torch.isclose(c_sizes[c], sa[m].sum())
        # the fused token: sum_i a_i x_i / sum_i a_i over the lowest-ranked tokens
        a = attn[i, low]
        assert torch.allclose(out[i, -1], (a[:, None] * x[i, 1:][low]).sum(0) / a.sum(), atol=1e-6)
        assert new_sizes[i, -1] == sizes[i, low].sum()


def test_kcenter_picks_far_apart_centers():
    pts = torch.tensor([[0.0, 0], [0.1, 0], [10, 0], [10.1, 0], [0, 10], [0.1, 10]])
    assign = kcenter_assign(pts[None], 3)[0].tolist()
    assert assign[0] == assign[1] and assign[2] == assign[3] and assign[4] == assign[5] and len(set(assign)) == 3


def test_reservoir_keeps_the_most_confident_per_class():
    res = TokenReservoir(num_classes=2, size=2, diversity_weight=0.0)
    g = torch.Generator().manual_seed(0)
    for label, ent in [(0, 0.5), (1, 0.7), (0, 0.1), (0, 0.9), (1, 0.2), (0, 0.05), (1, 0.3)]:
        res.add(label, ent, torch.randn(3, 4, generator=g))
    assert sorted(e.entropy for e in res.entries[0]) == [0.05, 0.1]
    assert sorted(e.entropy for e in res.entries[1]) == [0.2, 0.3]


def test_reservoir_diversity_evicts_a_near_duplicate():
    # entries 0 and 1 are confident but point the same way; 2 is less confident but different
    a, b, c = torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0.01, 0]), torch.tensor([0.0, 1, 0])
    ents = [0.10, 0.12, 0.30]
    for weight, survivors in [(0.0, [0.10, 0.12]), (1.0, [0.10, 0.30])]:
        res = TokenReservoir(num_classes=1, size=2, diversity_weight=weight)
        for e, t in zip(ents, (a, b, c)):
            res.add(0, e, t.expand(2, 3))  # two layers, same token
        assert sorted(e.entropy for e in res.entries[0]) == survivors
    # the score by hand for weight 1: entropy + mean cosine to the others; entry 1 scores highest
    cos = lambda u, v: float(F.cosine_similarity(u, v, dim=0))  # noqa: E731
    s = [0.10 + (cos(a, b) + cos(a, c)) / 2, 0.12 + (cos(b, a) + cos(b, c)) / 2, 0.30 + (cos(c, a) + cos(c, b)) / 2]
    assert max(range(3), key=lambda i: s[i]) == 1


def test_stream_reservoir_holds_lowest_entropy_images_per_predicted_class(model):
    w = _spread_classifier(model, 3)
    cfg = TCAConfig(keep_ratio=1.0, correction_weight=0.0, reservoir_size=2, diversity_weight=0.0)
    tca = TCA(model, w, cfg)
    x = _images(20, 5)
    logits = torch.cat([tca.step(x[i : i + 4]).base_logits for i in range(0, 20, 4)])
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    pred = logits.argmax(-1)
    for c in range(3):
        expect = sorted(ent[pred == c].tolist())[:2]
        assert sorted(e.entropy for e in tca.reservoir.entries[c]) == pytest.approx(expect)


def test_token_count_shrinks_at_each_condensation_block(model):
    cfg = TCAConfig(keep_ratio=0.6, anchor_min_samples=1)  # blocks 1, 2, 3
    tca = TCA(model, _spread_classifier(model, 2), cfg)
    blocks = model.visual.transformer.blocks
    seen = {"attention": [], "mlp": []}
    hooks = [b.ln_1.register_forward_hook(lambda m, i, o: seen["attention"].append(i[0].shape[1])) for b in blocks]
    hooks += [b.mlp.register_forward_hook(lambda m, i, o: seen["mlp"].append(i[0].shape[1])) for b in blocks]
    try:
        first = tca.step(_images(8, 0))
        assert not first.anchored
        counts = dict(seen)
        seen.update(attention=[], mlp=[])
        second = tca.step(_images(8, 1))
        assert second.anchored  # both classes were predicted in the first batch: anchors join the attention
    finally:
        for h in hooks:
            h.remove()
    assert counts["mlp"] == [65, 40, 25, 16]  # ceil(0.6 * 64) = 39 patches, then 24, then 15
    assert counts["attention"] == [65, 65, 40, 25]
    assert counts == {k: [r[k] for r in token_schedule(model.cfg.vision, cfg)] for k in ("attention", "mlp")}
    assert seen["attention"] == [65, 66, 41, 26]  # + the anchor token at each condensation block
    assert seen == {
        k: [r[k] for r in token_schedule(model.cfg.vision, cfg, anchored=True)] for k in ("attention", "mlp")
    }
    f = tca_flops(model.cfg.vision, cfg)
    assert f["token_blocks_tca"] == 65 + 40 + 25 + 16 and f["token_blocks_plain"] == 4 * 65
    assert 0.3 < f["saved"] < 0.5 and f["gflops_tca"] < f["gflops_plain"]
    assert tca_flops(model.cfg.vision, TCAConfig(keep_ratio=1.0))["saved"] == 0.0


def test_anchors_change_the_condensed_forward(model):
    w = _spread_classifier(model, 2)
    x = _images(4, 9)
    anchored = TCA(model, w, TCAConfig(keep_ratio=0.6, anchor_min_samples=1, correction_weight=0.0))
    plain = TCA(model, w, TCAConfig(keep_ratio=0.6, anchors=False, correction_weight=0.0))
    for s in range(3):
        anchored.step(_images(8, s))
        plain.step(_images(8, s))
    a, p = anchored.step(x), plain.step(x)
    assert a.anchored and not p.anchored
    assert not torch.allclose(a.features, p.features, atol=1e-4)
    # anchors are the per-class means of the reservoir's class-token trajectories
    anchors = anchored.reservoir.anchors(1)
    for c, bucket in enumerate(anchored.reservoir.entries):
        assert torch.allclose(anchors[c], torch.stack([e.tokens for e in bucket]).mean(0))
    assert anchored.reservoir.anchors(anchored.cfg.reservoir_size + 1) is None


def test_reservoir_logits_formula():
    cfg = TCAConfig(correction_weight=2.0, beta=4.0, layer_temperature=0.5)
    res = TokenReservoir(num_classes=3, size=2)
    g = torch.Generator().manual_seed(0)
    r1, r2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    res.add(2, 0.1, r1)
    res.add(0, 0.2, r2)
    q = torch.randn(1, 3, 5, generator=g)
    wl = torch.exp(torch.tensor([0.0, 0.5, 1.0]) / 0.5)
    wl = wl / wl.sum()
    aff = lambda r: sum(float(wl[l] * F.cosine_similarity(q[0, l], r[l], dim=0)) for l in range(3))  # noqa: E731
    expect = torch.tensor([[2.0 * math.exp(-4.0 * (1 - aff(r2))), 0.0, 2.0 * math.exp(-4.0 * (1 - aff(r1)))]])
    assert torch.allclose(reservoir_logits(q, res, cfg), expect, atol=1e-5)
    assert reservoir_logits(q, TokenReservoir(num_classes=3), cfg) is None


def test_run_stream_returns_logits_in_image_order(model):
    w = _classifier()
    imgs = [
        torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        for i in range(6)
    ]
    cfg = TCAConfig(keep_ratio=1.0, correction_weight=0.0)
    a = run_stream(model, w, imgs, cfg, batch_size=2)
    b = run_stream(model, w, imgs, cfg, batch_size=4, order=torch.tensor([5, 3, 1, 0, 2, 4]))
    assert torch.allclose(a["logits"], b["logits"], atol=1e-5) and 1 <= a["reservoir"] <= 6
    assert a["images_per_second"] > 0 and a["flops"]["saved"] == 0.0


def test_bad_configs_and_towers_are_refused(model):
    with pytest.raises(ValueError, match="keep_ratio"):
        TCAConfig(keep_ratio=0.0)
    with pytest.raises(ValueError, match="mode"):
        TCAConfig(mode="drop")
    with pytest.raises(ValueError, match="outside"):
        TCA(model, _classifier(), TCAConfig(layers=(4,)))
    from clipforge.models import create_model

    siglip_like = create_model(
        "tiny",
        seed=0,
        embed_dim=32,
        text={"context_length": 16, "width": 32, "layers": 1, "heads": 2},
        vision=VIS | {"class_token": False, "pool": "mean"},
    )
    with pytest.raises(ValueError, match="class token"):
        TCA(siglip_like, _classifier(), TCAConfig())


def test_clipforge_adapt_method_tca(model, tmp_path, capsys):
    from clipforge.cli.main import main
    from clipforge.models.io import save_model

    save_model(model, tmp_path / "m")
    out = tmp_path / "adapt"
    rc = main(["adapt", str(tmp_path / "m"), "--method", "tca", "--size", "40", "--tca-keep-ratio", "0.5",
               "--seeds", "0", "1", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "tca (test-time" in capsys.readouterr().out
    res = json.loads((out / "adapt.json").read_text())
    r = res["test_time"]["tca"]
    assert 0.0 <= r["test"] <= 1.0 and 0.0 <= r["heldout"] <= 1.0 and 0.3 < r["gflops_saved"] < 0.7
    assert len(r["runs"]) == 2 and res["n"]["test"] > 0
    assert res["shots"] == {}  # no support set, no per-shot runs
    assert res["config"]["tca"]["keep_ratio"] == 0.5
    # without condensation and correction, the stream reproduces the zero-shot numbers
    rc = main(["adapt", str(tmp_path / "m"), "--method", "tca", "--size", "40", "--tca-keep-ratio", "1",
               "--tca-correction-weight", "0", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["test_time"]["tca"]["test"] == res["zero_shot"]["test"]
    assert res["test_time"]["tca"]["heldout"] == res["zero_shot"]["heldout"]
    assert res["test_time"]["tca"]["gflops_saved"] == 0.0
