"""grad_checkpointing=true (issue 12): each transformer block of both towers and each layer of the CoCa decoder
recomputes its activations in backward (torch.utils.checkpoint, non-reentrant). Reference: the same model without
checkpointing, in float64, where the loss and every gradient must agree to rounding; the blocks must really run
twice (a flag that did nothing would pass the equality alone)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.models import create_model
from clipforge.models.coca import CrossBlock
from clipforge.models.transformer import Block

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 2, "heads": 2}}


def _loss_and_grads(name: str, checkpointing: bool, calls: list):
    model = create_model(name, seed=0, **SMALL).double().train()
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    texts = clipforge.tokenize(["a red square", "two blue circles left of a cat", "x"], context_length=16)
    calls.clear()
    out = model(images, texts)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].t()
    labels = torch.arange(3)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    if "caption_logits" in out:  # CoCa's captioning loss reaches every decoder layer
        loss = loss + F.cross_entropy(out["caption_logits"].reshape(-1, out["caption_logits"].shape[-1]),
                                      out["caption_targets"].reshape(-1), ignore_index=0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("name", ["tiny", "coca-tiny"])
def test_grad_checkpointing_gives_the_float64_loss_and_gradients(name, monkeypatch):
    calls: list = []
    for cls in (Block, CrossBlock):
        def counting(self, *args, _forward=cls.forward, **kwargs):
            calls.append(1)
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counting)
    loss, grads, n_plain = _loss_and_grads(name, False, calls)
    loss_ck, grads_ck, n_ck = _loss_and_grads(name, True, calls)
    assert n_ck == 2 * n_plain  # every block (towers and, for CoCa, decoder) ran again in backward
    if name == "coca-tiny":
        assert n_plain == 2 + 2 + 2 * 2  # vision and text blocks, the decoder's self-attention and cross blocks
    assert torch.allclose(loss, loss_ck, rtol=0, atol=1e-12)
    assert set(grads) == set(grads_ck) and len(grads) > 20
    for n in grads:
        assert grads[n].abs().max() > 0 or n == "logit_bias", n
        assert torch.allclose(grads[n], grads_ck[n], rtol=1e-10, atol=1e-12), n
    if name == "coca-tiny":
        assert any(n.startswith("decoder.") for n in grads)


def test_training_config_turns_it_on_everywhere(tiny_cfg):
    import dataclasses

    from clipforge.train.setup import build_model

    cfg = dataclasses.replace(tiny_cfg, model="coca-tiny", grad_checkpointing=True)
    model, _ = build_model(cfg)
    assert model.visual.transformer.grad_checkpointing and model.text.transformer.grad_checkpointing
    assert model.decoder.grad_checkpointing
