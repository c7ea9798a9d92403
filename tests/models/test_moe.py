"""CLIP-MoE (Zhang et al., 2024): identical experts equal the dense model; router, top-k dispatch and the
balance loss against per-token loops written here; the balance loss reaching training; the multiplet
stages (clusters, FFN-only fine-tuning, assembly); save/load; clipforge upcycle; the errors."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import clipforge
from clipforge.models import create_model, load_model, save_model
from clipforge.models.moe import MoECLIP, MoECLIPConfig, MoEFFN, balance_loss, upcycle

SMALL = dict(embed_dim=16, vision={"image_size": 16, "patch_size": 8, "width": 16, "layers": 2, "heads": 2},
             text={"context_length": 12, "width": 16, "layers": 2, "heads": 2})


def dense(seed=0, dtype=torch.float64):
    return create_model("tiny", seed=seed, **SMALL).to(dtype).eval()


def inputs(n=3, dtype=torch.float64):
    images = torch.randn(n, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return images, clipforge.tokenize(["a red circle", "two blue squares left of a star", "a"][:n], 12)


def test_identical_experts_equal_the_dense_model():
    model = dense()
    moe = upcycle(model, experts=4, top_k=2)
    assert isinstance(moe, MoECLIP) and moe.moe_blocks == {"vision": [0, 1], "text": [0, 1]}
    with torch.no_grad():  # routers are random: tokens do go to different experts
        for ffn in moe.moe_ffns("vision"):
            ffn.router.weight.normal_(0, 1.0)
        images, ids = inputs()
        a, b = model(images, ids), moe(images, ids)
    chosen = moe.moe_ffns("vision")[0].last_logits.topk(2, dim=-1).indices
    assert len(torch.unique(chosen)) > 2  # several experts in use
    for key in ("image_features", "text_features"):
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-12), key
    # only the last block of the text tower
    one = upcycle(model, experts=3, top_k=1, towers=("text",), layers=1)
    assert one.moe_blocks == {"text": [1]}
    with torch.no_grad():
        assert torch.allclose(one.encode_text(ids), model.encode_text(ids), atol=1e-12)


def naive_moe(ffn: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Per token: p = softmax(W x); the k largest p (by a sort); gates p_e / sum of the chosen; sum of gated experts."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = [float((ffn.router.weight[e] * x[t]).sum()) for e in range(len(ffn.experts))]
        m = max(logits)
        exps = [math.exp(v - m) for v in logits]
        probs = [v / sum(exps) for v in exps]
        chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[: ffn.top_k]
        norm = sum(probs[e] for e in chosen)
        for e in chosen:
            out[t] += probs[e] / norm * ffn.experts[e](x[t:t + 1])[0]
    return out


def test_router_and_top_k_dispatch_against_a_loop():
    torch.manual_seed(0)
    experts = [torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.GELU(), torch.nn.Linear(12, 6)) for _ in range(5)]
    ffn = MoEFFN(6, experts, top_k=2).double()
    with torch.no_grad():
        ffn.router.weight.normal_(0, 1.0)
        x = torch.randn(2, 7, 6, dtype=torch.float64)
        got = ffn(x)
        expected = naive_moe(ffn, x.reshape(-1, 6)).view(2, 7, 6)
    assert torch.allclose(got, expected, atol=1e-12)
    assert ffn.last_logits.shape == (14, 5)
    for k in (1, 5):  # top-1 and all experts
        ffn.top_k = k
        with torch.no_grad():
            assert torch.allclose(ffn(x), naive_moe(ffn, x.reshape(-1, 6)).view(2, 7, 6), atol=1e-12)


def test_balance_loss_against_a_loop():
    """L = E * sum_e f_e P_e: f_e the share of tokens with e among their top k, P_e the mean probability."""
    torch.manual_seed(0)
    logits = torch.randn(40, 4, dtype=torch.float64) * 2
    for k in (1, 2):
        t_count, e_count = logits.shape
        f = [0.0] * e_count
        p = [0.0] * e_count
        for t in range(t_count):
            row = [math.exp(v) for v in logits[t].tolist()]
            probs = [v / sum(row) for v in row]
            for e in sorted(range(e_count), key=lambda e: -probs[e])[:k]:
                f[e] += 1 / t_count
            for e in range(e_count):
                p[e] += probs[e] / t_count
        expected = e_count * sum(fe * pe for fe, pe in zip(f, p))
        assert abs(float(balance_loss(logits, k)) - expected) < 1e-12
    # uniform probabilities give exactly k; every token sure of the same expert gives E (the maximum for k=1)
    assert abs(float(balance_loss(torch.zeros(8, 4), 2)) - 2.0) < 1e-6
    skewed = torch.tensor([[5.0, 0, 0, 0]]).repeat(8, 1)
    assert float(balance_loss(skewed, 1)) > 3.0


def test_model_returns_the_balance_loss_with_gradients_to_the_routers():
    moe = upcycle(dense(dtype=torch.float32), experts=4, top_k=2).train()
    images, ids = inputs(dtype=torch.float32)
    out = moe(images, ids)
    logits = [f.last_logits for t in ("vision", "text") for f in moe.moe_ffns(t)]
    expected = balance_loss(torch.cat(logits[:2]), 2) + balance_loss(torch.cat(logits[2:]), 2)
    assert torch.allclose(out["moe_balance_loss"], expected)
    out["moe_balance_loss"].backward()
    assert moe.moe_ffns("vision")[0].router.weight.grad.abs().sum() > 0
    import copy

    twin = copy.deepcopy(moe)  # an EMA teacher copies the model after forward passes
    assert twin.moe_ffns("vision")[0].last_logits is None and moe.moe_ffns("vision")[0].last_logits is not None


def test_balance_loss_reaches_training(tiny_cfg, tmp_path):
    """clipforge train init_from=<upcycled> trainable=[routers] loss={clip, moe_balance}: the term is logged,
    only the routers change."""
    from clipforge.train import train

    base = create_model("tiny", seed=0, **SMALL)
    save_model(upcycle(base, experts=4, top_k=2), tmp_path / "moe")
    cfg = dataclasses.replace(tiny_cfg, init_from=str(tmp_path / "moe"), model_overrides={}, steps=4, save_every=0,
                              log_every=1, loss={"clip": 1.0, "moe_balance": 0.5}, trainable=["*.mlp.router.weight"])
    result = train(cfg)
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    balance = [r["moe_balance"] for r in records if "moe_balance" in r]
    assert len(balance) == 4 and all(0 < v < 2 * 4 for v in balance)  # two towers, each at most E
    start, end = load_model(tmp_path / "moe").state_dict(), result.model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all(k.endswith("mlp.router.weight") for k in changed), sorted(changed)[:5]
    with pytest.raises(ValueError, match="moe_balance_loss"):  # a dense model cannot feed the term
        train(dataclasses.replace(tiny_cfg, loss={"clip": 1.0, "moe_balance": 0.5}, steps=1))


def test_save_and_load(tmp_path):
    moe = upcycle(dense(dtype=torch.float32), experts=3, top_k=2, towers=("vision",))
    assert moe.cfg.to_dict()["moe"] == {"experts": 3, "top_k": 2, "towers": ("vision",), "layers": None}
    save_model(moe, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, MoECLIP) and isinstance(loaded.cfg, MoECLIPConfig) and loaded.cfg.moe.experts == 3
    images, ids = inputs(dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(images, ids)["image_features"], moe.eval()(images, ids)["image_features"])


def test_upcycling_errors():
    mobile = create_model("mobileclip-tiny", seed=0)
    with pytest.raises(ValueError, match="FFN layers"):
        upcycle(mobile)
    with pytest.raises(ValueError, match="top_k"):
        upcycle(dense(), experts=2, top_k=3)
    with pytest.raises(ValueError, match="exceeds the 2 blocks"):
        upcycle(dense(), layers=3)
    with pytest.raises(ValueError, match="dense clipforge CLIP"):
        upcycle(upcycle(dense()))


def test_multiplet_stages(monkeypatch):
    """Refined labels split the earlier ones; a stage changes only the upcycled FFNs; the assembled experts
    are the stages' FFNs (expert 0 the dense one)."""
    from clipforge.train.upcycle import MultipletConfig, diversified_multiplet, refine_labels, train_stage

    old = torch.tensor([0, 0, 0, 1, 1, 1])
    new = refine_labels(old, torch.tensor([0, 1, 0, 1, 1, 0]), 2)
    pairs = {(int(o), int(a)) for o, a in zip(old, [0, 1, 0, 1, 1, 0])}
    assert int(new.max()) + 1 == len(pairs)
    for i in range(6):
        for j in range(6):
            same = (int(old[i]), [0, 1, 0, 1, 1, 0][i]) == (int(old[j]), [0, 1, 0, 1, 1, 0][j])
            assert (new[i] == new[j]) == same

    base = create_model("tiny", seed=0, **SMALL).eval()
    cfg = MultipletConfig(experts=3, top_k=2, towers=("vision",), layers=1, stage_steps=3, clusters=2, batch_size=8,
                          train_size=32, lr=1e-2)
    moe, history = diversified_multiplet(base, cfg)
    assert len(history) == 2 and all(len(h) == 32 for h in history)
    assert int(history[1].max()) >= int(history[0].max())  # refined, never coarser
    experts = moe.moe_ffns("vision")[0].experts
    dense_ffn = base.visual.transformer.blocks[1].mlp
    assert all(torch.equal(a, b) for a, b in zip(experts[0].state_dict().values(), dense_ffn.state_dict().values()))
    for e in (1, 2):
        assert not torch.equal(experts[e][0].weight, dense_ffn[0].weight)
    assert not torch.equal(experts[1][0].weight, experts[2][0].weight)
    # every weight outside the MoE FFNs is the dense model's
    own = moe.state_dict()
    for k, v in base.state_dict().items():
        if ".mlp." not in k or not k.startswith("visual.transformer.blocks.1."):
            assert torch.equal(own[k], v), k
    images = torch.randn(4, 3, 16, 16)
    ids = clipforge.tokenize(["a"] * 4, 12)
    labels = torch.tensor([0, 0, 1, 1])
    stage = train_stage(base, images, ids, labels, dataclasses.replace(cfg, stage_steps=1), stage=1)
    for (k, v), (_, w) in zip(base.state_dict().items(), stage.state_dict().items()):
        assert torch.equal(v, w) == (not k.startswith("visual.transformer.blocks.1.mlp.")), k


def test_cli_upcycle(tmp_path, capsys):
    from clipforge.cli.main import main

    save_model(create_model("tiny", seed=0, **SMALL), tmp_path / "dense")
    assert main(["upcycle", str(tmp_path / "dense"), "--experts", "4", "--top-k", "2", "--out", str(tmp_path / "moe"),
                 "--quiet"]) == 0
    assert "4 experts, top-2" in capsys.readouterr().out
    moe = load_model(tmp_path / "moe")
    assert isinstance(moe, MoECLIP) and moe.cfg.moe.experts == 4
    save_model(create_model("mobileclip-tiny", seed=0), tmp_path / "mobile")
    assert main(["upcycle", str(tmp_path / "mobile"), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "FFN layers" in capsys.readouterr().err


def test_cli_upcycle_logs_each_progress_line_once_and_quiet_silences_them(tmp_path, capsys):
    """The progress lines go through clipforge's console handler alone: a separate process (where pytest's own
    root handlers do not hide a second handler) prints each once; ``--quiet`` leaves only the result line."""
    import subprocess
    import sys

    from clipforge.cli.main import main

    save_model(create_model("tiny", seed=0, **SMALL), tmp_path / "dense")
    args = ["upcycle", str(tmp_path / "dense"), "--experts", "2", "--top-k", "1", "--stage-steps", "1",
            "--train-size", "32", "--batch-size", "8", "--clusters", "2"]
    done = subprocess.run([sys.executable, "-m", "clipforge.cli.main", *args, "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    progress = [line for line in lines if line.startswith("multiplet stage 1 step 1/1")]
    assert len(progress) == 1, lines
    assert main([*args, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "multiplet stage 1" not in out + err and "2 experts, top-1" in out
