"""The LLaVA-style LVLM (clipforge/models/lvlm.py) on a tiny random Llama written to disk: embeddings, caption
loss, soft prompts and LoRA against hand-built references, saving and loading, and its bad inputs."""
import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.errors import ConfigError, MissingInputError
from clipforge.interop.text_tokenizers import CausalLMTokenizer
from clipforge.models import create_model, load_model, save_model
from clipforge.models.lvlm import LVLM
from tests.reference.tiny_lm import make_tiny_lm

CAPTIONS = ["a red circle .", "two small blue squares on the left", "a picture of a star", "one hexagon"]
VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def _model(lm_dir, **section):
    return create_model("lvlm-tiny", seed=0, vision=VISION, lvlm={"path": str(lm_dir), "context_length": 12,
                                                                 **section})


def _images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _prompt(tok, text):
    return tok._tok(text, add_special_tokens=False)["input_ids"]


def _naive_image_tokens(model, image):
    """ViT patch tokens (after ln_post, class token dropped), then W2 GELU(W1 v)."""
    v = model.visual.forward_tokens(image[None])[0, 1:]
    fc1, fc2 = model.projector.net[0], model.projector.net[2]
    return F.gelu(v @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias


def _lm_last_state(model, embeds):
    """The LM's last hidden state of the last position of one unpadded sequence of input embeddings [L, h]."""
    return model.lm.get_decoder()(inputs_embeds=embeds[None]).last_hidden_state[0, -1]


def test_config_builds_the_lvlm_and_embed_dim_is_the_lm_width(lm_dir):
    model = _model(lm_dir)
    assert isinstance(model, LVLM) and model.cfg.embed_dim == model.lm.config.hidden_size == 32
    assert clipforge.models.get_model_config("lvlm-tiny").lvlm.pool == "last"


@pytest.mark.parametrize("soft", [0, 3])
def test_embeddings_equal_each_sequence_run_alone(lm_dir, soft):
    """Batching and padding change nothing: [Z ; S_img ; prompt] and [caption ; S_txt ; prompt] run alone,
    unpadded, through the LM give the batched last-token embeddings."""
    model = _model(lm_dir, soft_prompt_tokens=soft).eval()
    tok = CausalLMTokenizer(lm_dir, 12)
    emb = model.lm.get_input_embeddings()
    images, ids = _images(), tok(CAPTIONS)
    with torch.no_grad():
        got_i, got_t = model.encode_image(images, normalize=False), model.encode_text(ids, normalize=False)
        for b in range(4):
            parts = [_naive_image_tokens(model, images[b])]
            parts += [model.soft_prompt_image] if soft else []
            parts += [emb(torch.tensor(_prompt(tok, model.cfg.lvlm.image_prompt)))]
            assert torch.allclose(got_i[b], _lm_last_state(model, torch.cat(parts)), atol=1e-5)
            parts = [emb(torch.tensor(_prompt(tok, CAPTIONS[b])))]
            parts += [model.soft_prompt_text] if soft else []
            parts += [emb(torch.tensor(_prompt(tok, model.cfg.lvlm.text_prompt)))]
            assert torch.allclose(got_t[b], _lm_last_state(model, torch.cat(parts)), atol=1e-5)


def test_mean_pool_averages_the_whole_sequence(lm_dir):
    model = _model(lm_dir, pool="mean").eval()
    tok = CausalLMTokenizer(lm_dir, 12)
    emb = model.lm.get_input_embeddings()
    with torch.no_grad():
        got = model.encode_text(tok(CAPTIONS[:2]), normalize=False)
        for b in range(2):
            x = emb(torch.tensor(_prompt(tok, CAPTIONS[b]) + _prompt(tok, model.cfg.lvlm.text_prompt)))
            h = model.lm.get_decoder()(inputs_embeds=x[None]).last_hidden_state[0]
            assert torch.allclose(got[b], h.mean(0), atol=1e-5)


def test_caption_loss_is_the_mean_next_token_nll_over_caption_tokens(lm_dir):
    model = _model(lm_dir).eval()
    tok = CausalLMTokenizer(lm_dir, 12)
    images, ids = _images(3), tok(CAPTIONS[:3])
    with torch.no_grad():
        got = model.caption_loss(images, ids)
        total, count = 0.0, 0
        for b in range(3):
            z = _naive_image_tokens(model, images[b])
            caption = _prompt(tok, CAPTIONS[b]) + [tok.eos_token_id]
            x = torch.cat([z, model.lm.get_input_embeddings()(torch.tensor(caption))])
            logp = model.lm(inputs_embeds=x[None]).logits[0].log_softmax(-1)  # full LM with its head
            for t, token in enumerate(caption):  # position N - 1 + t predicts caption token t
                total -= float(logp[len(z) - 1 + t, token])
                count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_soft_prompts_have_their_shape_and_receive_gradients(lm_dir):
    model = _model(lm_dir, soft_prompt_tokens=4)
    assert model.soft_prompt_image.shape == model.soft_prompt_text.shape == (4, 32)
    tok = CausalLMTokenizer(lm_dir, 12)
    model.encode_image(_images(2)).sum().backward()
    assert model.soft_prompt_image.grad.abs().sum() > 0 and model.soft_prompt_text.grad is None
    model.zero_grad()
    model.encode_text(tok(CAPTIONS[:2])).sum().backward()
    assert model.soft_prompt_text.grad.abs().sum() > 0 and model.soft_prompt_image.grad is None
    assert "soft_prompt_image" in model.state_dict() and _model(lm_dir).soft_prompt_image is None


def test_lora_equals_the_merged_weight_form(lm_dir):
    """LoRA (peft) on q_proj/v_proj with non-zero B: the embeddings equal those of a copy whose weights are
    W + (alpha / r) B A, built here by hand, and those after merge_lora."""
    model = _model(lm_dir)
    base = copy.deepcopy(model)
    model.add_lora(4, 8.0, ("q_proj", "v_proj"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for layer, adapted in zip(base.lm.model.layers, model.lm.base_model.model.model.layers):
            for proj in ("q_proj", "v_proj"):
                lora = getattr(adapted.self_attn, proj)
                a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
                getattr(layer.self_attn, proj).weight += (8.0 / 4) * b @ a
    trainable = {n for n, p in model.lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    tok = CausalLMTokenizer(lm_dir, 12)
    images, ids = _images(2), tok(CAPTIONS[:2])
    model.eval(), base.eval()
    with torch.no_grad():
        lora_i, lora_t = model.encode_image(images), model.encode_text(ids)
        assert torch.allclose(lora_i, base.encode_image(images), atol=1e-5)
        assert torch.allclose(lora_t, base.encode_text(ids), atol=1e-5)
        assert not torch.allclose(lora_t, _model(lm_dir).eval().encode_text(ids), atol=1e-3)  # LoRA changed it
        model.merge_lora()
        assert model.cfg.lvlm.lora_rank == 0 and torch.allclose(model.encode_text(ids), lora_t, atol=1e-5)


def test_save_load_roundtrip_with_lora_soft_prompts_and_tied_head(lm_dir, tmp_path):
    model = _model(lm_dir, soft_prompt_tokens=2, lora_rank=2)
    assert model.tied_keys()  # the tiny Llama ties its head to the input embedding
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    save_model(model, tmp_path / "m")
    loaded, tokenizer, _ = clipforge.load(str(tmp_path / "m"))
    assert isinstance(loaded, LVLM) and isinstance(tokenizer, CausalLMTokenizer)
    model.eval()
    images, ids = _images(2), tokenizer(CAPTIONS[:2])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))
    assert loaded.lm.get_input_embeddings().weight is loaded.lm.get_output_embeddings().weight


def test_cli_export_embed_and_eval(lm_dir, tmp_path, capsys):
    import numpy as np

    from clipforge.cli.main import main

    save_model(_model(lm_dir), tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--to", "clipforge", "--out", str(tmp_path / "x")]) == 0
    assert main(["embed", str(tmp_path / "x"), "--texts", "a red circle", "one star", "--out",
                 str(tmp_path / "t.npy")]) == 0
    got = np.load(tmp_path / "t.npy")
    model = load_model(tmp_path / "m")
    with torch.no_grad():
        want = model.encode_text(CausalLMTokenizer(lm_dir, 12)(["a red circle", "one star"]))
    assert got.shape == (2, 32) and np.allclose(got, want.numpy(), atol=1e-5)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "x"), "--size", "12", "--no-cache", "--no-report", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["zero_shot"]["object"]["n"] == 12 and 0.0 <= res["retrieval"]["val"]["i2t_R@1"] <= 1.0


def test_bad_inputs_are_named(lm_dir, tmp_path):
    with pytest.raises(ConfigError, match="lvlm.path is empty"):
        create_model("lvlm-tiny")
    with pytest.raises(ConfigError, match=r"LoRA target module\(s\) \['nope'\] do not exist"):
        _model(lm_dir, lora_rank=2, lora_targets=["q_proj", "nope"])
    with pytest.raises(ConfigError, match=r"'nope'\] do not exist"):
        _model(lm_dir).add_lora(2, 4.0, ("nope",))
    bare = tmp_path / "bare"
    shutil.copytree(lm_dir, bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    with pytest.raises(MissingInputError, match="has no tokenizer files"):
        _model(bare)
    with pytest.raises(ConfigError, match="lvlm.pool"):
        _model(lm_dir, pool="max")
