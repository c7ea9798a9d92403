"""SyCoCa's TG-MIM branch of CoCa: attentive masking picks the patches the caption attends to, the visible pass
never sees the masked pixels, targets are the per-patch normalized pixels, the loss against its equation, the
config round trip, and a few training steps from the command line."""
import json
import math

import pytest
import torch

import clipforge
from clipforge.losses import LossInputs, build, tgmim_loss
from clipforge.models.coca import CoCaConfig, TgmimConfig, patch_pixels


def _coca(**tgmim):
    return clipforge.create_model(
        "coca-tiny", seed=0, embed_dim=16, vision={"image_size": 16, "patch_size": 4, "width": 16, "layers": 1,
                                                   "heads": 2},
        text={"context_length": 12, "width": 16, "layers": 1, "heads": 2},
        multimodal={"layers": 1, "heads": 2, "n_queries": 4, "pool_heads": 2}, tgmim=tgmim or True).eval()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 16, 16, generator=g), torch.randint(1, 400, (2, 12), generator=g)


def test_tgmim_loss_is_the_mean_squared_error():
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    want = sum(float(p[i, m, k] - t[i, m, k]) ** 2 for i in range(2) for m in range(3) for k in range(5)) / 30
    assert abs(float(tgmim_loss(p, t)) - want) < 1e-6
    term = build("sycoca_tgmim")
    li = LossInputs(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor(1.0), extra={"tgmim_pred": p, "tgmim_target": t})
    assert torch.allclose(term(li)["loss"], tgmim_loss(p, t))
    with pytest.raises(ValueError, match="one shape"):
        tgmim_loss(p, t[:, :2])
    with pytest.raises(TypeError, match="no option"):
        build("sycoca_tgmim", mask_ratio=0.3)


def test_attentive_masking_selects_the_patches_most_similar_to_the_caption():
    model = _coca(mask_ratio=0.25)
    images, texts = _batch()
    with torch.no_grad():
        out = model(images, texts)
        tokens = model.visual.forward_tokens(images)
        patches = torch.nn.functional.normalize(model.visual.project(tokens[:, model.visual.num_prefix:]), dim=-1)
        states = model.text.forward_tokens(texts)
        y = torch.nn.functional.normalize(model.text.project(model.text.pool(states, texts)), dim=-1)
    scores = (patches @ y[:, :, None])[..., 0]  # [B, 16]
    for i in range(2):  # the 4 masked patches (0.25 of 16) are the 4 of highest text-patch similarity
        top = set(scores[i].topk(4).indices.tolist())
        assert set(out["tgmim_masked"][i].tolist()) == top
    # targets: the masked patches' pixels, normalized per patch
    pix = patch_pixels(images, 4)
    m = out["tgmim_masked"]
    raw = pix.gather(1, m[..., None].expand(-1, -1, 48))
    want = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(out["tgmim_target"], want, atol=1e-5)
    assert out["tgmim_pred"].shape == (2, 4, 48)
    assert torch.equal(pix[0, 5], images[0, :, 4:8, 4:8].reshape(-1))  # patch 5 = row 1, column 1


def test_the_reconstruction_never_sees_the_masked_pixels():
    model = _coca(mask_ratio=0.5, attentive=False)
    images, texts = _batch(1)
    with torch.no_grad():
        tokens = model.visual.forward_tokens(images)
        states = model.text.forward_tokens(texts)
        text = model.text.project(model.text.pool(states, texts))
        gen = torch.Generator().manual_seed(3)
        out = model.tgmim_outputs(images, tokens, text, states, generator=gen)
        masked = out["tgmim_masked"]
        changed = images.clone()
        pix = patch_pixels(changed, 4)
        for i in range(2):  # overwrite every masked patch with noise; keep the choice of patches fixed
            for k in masked[i].tolist():
                r, c = divmod(k, 4)
                changed[i, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = torch.randn(3, 4, 4)
        again = model.tgmim_outputs(changed, tokens, text, states, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again["tgmim_masked"], masked)
    assert torch.allclose(again["tgmim_pred"], out["tgmim_pred"], atol=1e-6)
    assert not torch.allclose(again["tgmim_target"], out["tgmim_target"])
    assert pix.shape == (2, 16, 48)


def test_tgmim_runs_under_bf16_autocast():
    model = _coca().train()
    images, texts = _batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, texts)
    loss = tgmim_loss(out["tgmim_pred"], out["tgmim_target"])
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert model.tgmim.mask_token.grad is not None and model.visual.patch_embed.weight.grad is not None


def test_tgmim_config_round_trip_and_errors():
    model = _coca(mask_ratio=0.3, layers=2)
    cfg = CoCaConfig.from_dict(model.cfg.to_dict())
    assert cfg.tgmim == TgmimConfig(mask_ratio=0.3, layers=2)
    assert "tgmim_pred" in model.extra_outputs and "tgmim_pred" not in clipforge.models.coca.CoCa.extra_outputs
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        TgmimConfig(mask_ratio=1.0)
    plain = clipforge.create_model("coca-tiny", seed=0)
    assert plain.tgmim is None
    with pytest.raises(ValueError, match="no TG-MIM branch"):
        plain.tgmim_outputs(*([None] * 4))


def test_clipforge_train_sycoca_on_shapes_adds_the_branch_to_coca(tmp_path):
    from clipforge.cli.main import main

    small = ["model=coca-tiny", "model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, "
             "layers: 1, heads: 2}, text: {context_length: 16, width: 32, layers: 1, heads: 2}, multimodal: "
             "{layers: 1, heads: 2, n_queries: 4, pool_heads: 2}}", "data.train_size=32", "data.eval_size=8",
             "batch_size=8", "steps=2", "warmup_steps=1", "progress=false", "precision=fp32", "log_every=1"]
    run = tmp_path / "run"
    assert main(["train", f"out_dir={run}", "loss={clip: 1, caption: 2, sycoca_tgmim: 1}", *small]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "sycoca_tgmim" in row]
    assert logged and all(math.isfinite(row["sycoca_tgmim"]) for row in logged)
    assert clipforge.load_model(run).tgmim is not None
