"""LLM2CLIP's stages (clipforge/train/llm2clip.py, clipforge/models/llm_text.py) on a tiny random Llama."""
import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from clipforge.errors import ConfigError
from clipforge.interop.text_tokenizers import CausalLMTokenizer
from clipforge.models import create_model
from clipforge.models.llm_text import load_causal_lm
from clipforge.train.llm2clip import (
    CaptionContrastConfig,
    add_lora,
    caption_contrast,
    draw_batch,
    pair_loss,
)
from tests.reference.tiny_lm import make_tiny_lm


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def test_caption_contrast_loss_matches_the_equation(lm_dir):
    lm, tok = load_causal_lm(str(lm_dir)), CausalLMTokenizer(lm_dir, 12)
    a = ["a red circle", "two blue stars", "one square"]
    b = ["a circle colored red", "a picture of two stars", "a square"]
    got = pair_loss(lm, tok, a, b, tok.eos_token_id, "mean", 0.05)

    def embed(texts):  # each caption alone, unpadded, mean over its tokens and the end token
        rows = []
        for t in texts:
            ids = tok._tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            rows.append(lm(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0))
        return F.normalize(torch.stack(rows), dim=-1)

    fa, fb = embed(a), embed(b)
    total = 0.0
    for i in range(3):  # 1/2 [ -log softmax_j(a_i.b_j / tau)[i] - log softmax_j(b_i.a_j / tau)[i] ]
        row = torch.stack([fa[i] @ fb[j] for j in range(3)]) / 0.05
        col = torch.stack([fb[i] @ fa[j] for j in range(3)]) / 0.05
        total = total - 0.5 * (row.log_softmax(0)[i] + col.log_softmax(0)[i])
    assert torch.allclose(got, total / 3, atol=1e-5)


def test_batches_pair_two_captions_of_one_sample_and_skip_repeated_ones():
    caps = [["x", "x1", "x2"], ["y", "y1"], ["x", "x3"], ["z", "z1"]]
    a, b = draw_batch(caps, 8, random.Random(0))
    assert len(a) == 3 and len({c[0] for c in zip(a)}) == 3  # one of the two samples captioned "x"
    for x, y in zip(a, b):
        owner = next(c for c in caps if x in c and y in c)
        assert x != y and owner


def test_lora_merged_weights_equal_the_adapter_form(lm_dir):
    lm = load_causal_lm(str(lm_dir))
    ids = CausalLMTokenizer(lm_dir, 10)(["a red circle", "two blue stars"])
    peft_model = add_lora(lm, rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    q = peft_model.base_model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # lora_B starts at zero: give the adapters an effect
        want_weight = q.base_layer.weight + (8.0 / 4) * q.lora_B["default"].weight @ q.lora_A["default"].weight
        adapted = peft_model(input_ids=ids).last_hidden_state
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged.layers[0].self_attn.q_proj.weight, want_weight, atol=1e-6)  # W + (alpha/r) B A
        assert torch.allclose(merged(input_ids=ids).last_hidden_state, adapted, atol=1e-5)


def test_lora_on_a_module_name_that_does_not_exist_is_a_clear_error(lm_dir):
    with pytest.raises(ConfigError, match=r"\['query'\] do not exist.*q_proj"):
        add_lora(load_causal_lm(str(lm_dir)), 4, 8.0, ("q_proj", "query"))


def test_caption_contrast_writes_a_loadable_embedder(lm_dir, tmp_path):
    cfg = CaptionContrastConfig(lm=str(lm_dir), train_size=64, eval_size=32, steps=4, batch_size=8, lr=1e-2,
                                context_length=16)
    report = caption_contrast(cfg, tmp_path / "lm")
    assert len(report["losses"]) == 4 and all(map(torch.isfinite, torch.tensor(report["losses"])))
    assert 0.0 <= report["pair_accuracy_after"] <= 1.0
    before, after = load_causal_lm(str(lm_dir)), load_causal_lm(str(tmp_path / "lm"))
    sd0, sd1 = before.state_dict(), after.state_dict()
    assert set(sd0) == set(sd1)  # merged: a plain model, no adapter weights
    assert not torch.equal(sd0["layers.0.self_attn.q_proj.weight"], sd1["layers.0.self_attn.q_proj.weight"])
    assert torch.equal(sd0["layers.0.mlp.up_proj.weight"], sd1["layers.0.mlp.up_proj.weight"])  # not a LoRA target
    assert CausalLMTokenizer(tmp_path / "lm", 8)("a red circle").shape == (1, 8)
    with pytest.raises(ConfigError, match="lora_rank"):
        CaptionContrastConfig(lm=str(lm_dir), lora_rank=0)


def test_training_with_the_lm_tower_leaves_the_lm_unchanged(lm_dir, tiny_cfg):
    from clipforge import load
    from clipforge.train import train

    cfg = dataclasses.replace(tiny_cfg, model="llm2clip-tiny", steps=3, save_every=3, model_overrides={
        "embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        "lm": {"path": str(lm_dir), "context_length": 16}})
    result = train(cfg)
    assert len(result.losses) == 3 and all(map(torch.isfinite, torch.tensor(result.losses)))
    model, tokenizer, _ = load(cfg.out_dir)
    initial = create_model(cfg.model, seed=cfg.seed, **cfg.model_overrides)
    assert not torch.equal(model.text.proj, initial.text.proj)  # the adapter side trained
    assert not torch.equal(model.visual.patch_embed.weight, initial.visual.patch_embed.weight)
    fresh = load_causal_lm(str(lm_dir))
    for (name, p), q in zip(model.text.lm.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    assert isinstance(tokenizer, CausalLMTokenizer)
    assert torch.isfinite(model.encode_text(tokenizer(["a red circle"]))).all()
