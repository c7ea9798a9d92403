"""The training program feeds the inputs of simclr (a second augmented view of each image),
norton and dreamlip_grouping (projected token features), alip (synthetic captions) and hqclip
(short tags): the inputs are what they claim, the terms train, gradient accumulation gives the
full-batch gradients and two processes train the same model as one."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train_extras import first_step_gradients

import clipforge.train.loop as loop
import clipforge.train.setup as setup
from clipforge.data import build_dataset
from clipforge.data.tags import keyword_tags
from clipforge.tokenizer import get_tokenizer
from clipforge.train import DistributedConfig, train
from clipforge.train.data import TrainItems, make_collate, view_transform
from clipforge.transforms import image_transform

pytestmark = pytest.mark.usefixtures(
    "one_thread"
)  # tiny tensors: a second thread only adds waiting on a loaded machine


def logged(cfg, key):
    return [r[key] for r in map(json.loads, open(Path(cfg.out_dir) / "metrics.jsonl")) if key in r]


def falls(values, chance=None, k=5):
    """The mean of the last k values lies clearly below the mean of the first k (and below
    ``chance``, the term's value when every score is equal, if given)."""
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    return last < first - 0.05 * abs(first) and (chance is None or last < chance - 0.05)


def one_batch(cfg, steps=30, **kw):
    """``cfg`` on one batch of 32 samples at lr 5e-3, which a few steps fit: the term's loss falls
    below chance, not only from its random-init value down to chance (where the tiny model sits
    for its first ~30 steps on 256 samples)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_size=32, **kw), steps=steps, lr=5e-3,
                               save_every=0)


def spy_inputs(monkeypatch):
    """Record the LossInputs of every loss call (and the batch it came from)."""
    seen, original = [], loop._loss_inputs

    def spy(out, batch, extra=None):
        inputs = original(out, batch, extra)
        seen.append((inputs, batch))
        return inputs

    monkeypatch.setattr(loop, "_loss_inputs", spy)
    return seen


NORTON = {"weight": 1.0, "iters": 10}  # fewer Sinkhorn iterations than the default 50: the test's time


@pytest.fixture(scope="module")
def shapes():
    return build_dataset("shapes", split="train", size=48, seed=0, image_size=32)


# ------------------------------------------------------------------ simclr: a second view


def test_second_view_is_another_augmentation_of_the_same_image(shapes):
    collate = make_collate(get_tokenizer(16))
    plain = TrainItems(shapes, seed=0, image_size=32)
    two = TrainItems(shapes, seed=0, image_size=32, second_view=view_transform(32))
    items = [two[(0, i)] for i in range(48)]
    batch = collate(items)
    v1, v2 = batch["images"], batch["images_view2"]
    # asking for a second view leaves the first view and the caption as they were
    for i, it in enumerate(items):
        assert torch.equal(it["pixels"], plain[(0, i)]["pixels"]) and it["caption"] == plain[(0, i)]["caption"]
    # every view differs from its image, is a pure function of (seed, epoch, index), new each epoch
    assert all((a - b).abs().mean() > 0.01 for a, b in zip(v1, v2))
    assert torch.equal(two[(0, 5)]["pixels_view2"], items[5]["pixels_view2"])
    assert not torch.equal(two[(1, 5)]["pixels_view2"], items[5]["pixels_view2"])
    # ... and shows the same image: matched pairs correlate far more than pairs of different images
    z1 = F.normalize((v1 - v1.mean((1, 2, 3), keepdim=True)).flatten(1), dim=1)
    z2 = F.normalize((v2 - v2.mean((1, 2, 3), keepdim=True)).flatten(1), dim=1)
    corr = z1 @ z2.t()
    off = corr[~torch.eye(48, dtype=torch.bool)]
    assert corr.diag().mean() > off.mean() + 0.3
    # with the augmentation off the second view is the first one, pixel for pixel
    same = TrainItems(shapes, seed=0, image_size=32, second_view=image_transform(32))
    flat = collate([same[(0, i)] for i in range(48)])
    assert torch.equal(flat["images"], flat["images_view2"])


def test_simclr_trains_and_its_views_go_through_the_image_tower(tiny_cfg, monkeypatch):
    cfg = dataclasses.replace(tiny_cfg, steps=12, save_every=0, loss={"clip": 1.0, "simclr": 1.0})
    seen = spy_inputs(monkeypatch)
    result = train(cfg)
    assert falls(logged(cfg, "simclr")) and falls(result.losses)
    inputs, batch = seen[0]
    view2 = inputs.extra["image_features_view2"]
    assert view2.shape == inputs.image_features.shape and view2.requires_grad  # encoded with gradients
    assert torch.allclose(view2.norm(dim=-1), torch.ones(len(view2)), atol=1e-5)
    assert (view2 - inputs.image_features).abs().max() > 1e-3
    # augmentation off: the second view's features are the first view's features
    seen.clear()
    monkeypatch.setattr(setup, "view_transform", lambda size, scale, jitter: image_transform(size))
    train(dataclasses.replace(cfg, steps=1, out_dir=cfg.out_dir + "_off"))
    inputs, _ = seen[0]
    torch.testing.assert_close(inputs.extra["image_features_view2"], inputs.image_features, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ norton, dreamlip_grouping: token features


def test_model_returns_projected_tokens_and_the_text_mask(tiny_cfg):
    from clipforge.models import create_model

    model = create_model(tiny_cfg.model, seed=0, **tiny_cfg.model_overrides).eval()
    tok = get_tokenizer(16)
    texts = ["a red circle.", "two blue squares left of a green star."]
    ids, images = tok(texts), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, plain = model(images, ids, return_tokens=True), model(images, ids)
        patches = model.visual.forward_tokens(images)[:, 1:] @ model.visual.proj  # the class token left out
    assert out["image_tokens"].shape == (2, 16, 32) and out["text_tokens"].shape == (2, 16, 32)
    torch.testing.assert_close(out["image_tokens"], patches)
    for key in ("image_features", "text_features"):  # the same features as without tokens
        torch.testing.assert_close(out[key], plain[key], rtol=0, atol=1e-6)
    # mask: the caption's BPE tokens and its end token; not the start token, not the padding
    n_bpe = [len(tok.encode(t)) for t in texts]
    assert out["text_mask"].sum(1).tolist() == [n + 1 for n in n_bpe]
    assert not out["text_mask"][:, 0].any() and out["text_mask"][0, 1:n_bpe[0] + 2].all()
    # the end token's projected state is the (unnormalized) text embedding
    eot = [n + 1 for n in n_bpe]
    at_eot = out["text_tokens"][torch.arange(2), eot]
    torch.testing.assert_close(F.normalize(at_eot, dim=-1), out["text_features"])


def test_token_terms_train_and_get_tokens_only_when_asked(tiny_cfg, monkeypatch):
    seen = spy_inputs(monkeypatch)
    cfg = one_batch(dataclasses.replace(tiny_cfg, loss={"norton": NORTON}))
    result = train(cfg)
    assert falls(result.losses, chance=math.log(32))
    inputs, batch = seen[0]
    assert inputs.image_tokens.shape == (32, 16, 32) and inputs.text_tokens.shape == (32, 16, 32)
    assert inputs.image_tokens.requires_grad and inputs.text_tokens.requires_grad
    assert torch.equal(inputs.text_mask.sum(1), (batch["texts"] != 0).sum(1) - 1)  # every token but the start token
    seen.clear()
    grouping = dataclasses.replace(cfg, steps=20, loss={"clip": 1.0, "dreamlip_grouping": 1.0},
                                   out_dir=cfg.out_dir + "_group")
    train(grouping)
    assert falls(logged(grouping, "dreamlip_grouping"))
    assert seen[0][0].image_tokens.shape == (32, 16, 32)
    seen.clear()
    train(dataclasses.replace(cfg, steps=1, loss={"clip": 1.0}, out_dir=cfg.out_dir + "_plain"))
    assert seen[0][0].image_tokens is None and seen[0][0].text_tokens is None  # a plain run asks for none
    with pytest.raises(ValueError, match="CoCa model does not return"):
        train(dataclasses.replace(cfg, model="coca-tiny", model_overrides={}, out_dir=cfg.out_dir + "_coca"))


# ------------------------------------------------------------------ alip, hqclip: second captions


def test_synthetic_captions_are_stored_rewrites_and_tags_are_keywords(tiny_cfg, tmp_path, shapes):
    from clipforge.data.captions import SourcedCaptions
    from clipforge.data.rewrites import RuleRewriter
    from clipforge.train.setup import SYNTHETIC, with_caption_sources

    cfg = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, rewrites="rule"))
    wrapped, policy = with_caption_sources(cfg, shapes, tmp_path, {SYNTHETIC})
    assert policy.weights == {"original": 1.0}  # the step's caption stays the raw one; rewrites are the synthetic ones
    items = TrainItems(wrapped, seed=0, image_size=32, sources=policy, synthetic=True, short_tags=True)
    for i in range(48):
        rewrites = RuleRewriter().rewrite(shapes[i]["captions"], 1, seed=0)
        drawn = [items[(e, i)] for e in range(4)]
        for it in drawn:
            assert it["caption"] in shapes[i]["captions"]
            assert it["synthetic"] in {r for per in rewrites for r in per} - {it["caption"]}
            assert it["short_tags"] == keyword_tags(it["caption"])
    # a known sample with one caption: its synthetic caption is that caption's stored rule rewrite
    class FirstCaption(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {**shapes[i], "captions": shapes[i]["captions"][:1]}

    wrapped, policy = with_caption_sources(cfg, FirstCaption(), tmp_path / "first", {SYNTHETIC})
    it = TrainItems(wrapped, seed=0, image_size=32, sources=policy, synthetic=True, short_tags=True)[(0, 2)]
    assert it["caption"] == "a yellow circle above a green square."
    assert it["synthetic"] == "a drawing of a yellow round disc above a green square."
    assert it["short_tags"] == "yellow circle, green square"
    assert keyword_tags("there are three red circles on top of a box.") == "red circles, box"
    assert keyword_tags("a picture of one blue triangle.") == "blue triangle"
    # a dataset's own synthetic captions and short tags come first
    own = SourcedCaptions(shapes, extra={"synthetic": [["a red disc."]] * 48, "short_tags": [["red, disc"]] * 48})
    it = TrainItems(own, seed=0, image_size=32, synthetic=True, short_tags=True)[(0, 0)]
    assert (it["synthetic"], it["short_tags"]) == ("a red disc.", "red, disc")


def test_alip_and_hqclip_train_on_their_second_captions(tiny_cfg, monkeypatch):
    seen = spy_inputs(monkeypatch)
    # momentum 0: the gates compare with this batch's means, so the loss values of the steps compare
    # (the default running averages start at 1 and drift for many steps, moving the gated loss with them)
    cfg = one_batch(dataclasses.replace(tiny_cfg, loss={"alip": {"weight": 1.0, "momentum": 0.0}}),
                    rewrites="rule", caption_policy="first")
    assert falls(train(cfg).losses, chance=2 * math.log(32))  # the raw-text and the synthetic-caption path
    inputs, _ = seen[0]
    assert (
        inputs.extra["synthetic_text_features"].shape == (32, 32)
        and inputs.extra["synthetic_text_features"].requires_grad
    )
    seen.clear()
    tags = dataclasses.replace(cfg, steps=40, loss={"hqclip": 1.0}, out_dir=cfg.out_dir + "_tags",
                               data=dataclasses.replace(cfg.data, rewrites=""))  # every caption an original one
    assert falls(train(tags).losses, chance=(math.log(64) + math.log(32)) / 2)  # 2B candidate texts per image
    inputs, batch = seen[0]
    ds = build_dataset("shapes", split="train", size=32, seed=0, image_size=32)
    expected = get_tokenizer(16)([keyword_tags(ds[int(i)]["captions"][0]) for i in batch["indices"]])
    assert torch.equal(batch["short_tags_texts"], expected)  # the tags of each sample's caption, tokenized
    assert inputs.extra["short_tag_features"].shape == (32, 32) and inputs.extra["short_tag_features"].requires_grad
    with pytest.raises(ValueError, match="data.rewrites=rule"):
        train(dataclasses.replace(cfg, data=tiny_cfg.data, out_dir=cfg.out_dir + "_none"))


# ------------------------------------------------------------------ all of them: accumulation, processes, refusals

ALL = {"clip": 1.0, "simclr": 0.5, "norton": {**NORTON, "weight": 0.5}, "dreamlip_grouping": 0.5,
       "alip": {"weight": 0.5, "momentum": 0.0}, "hqclip": 0.5}


def test_accumulation_with_every_new_input_matches_full_batch(tiny_cfg, monkeypatch):
    # alip with momentum 0: its running averages move once per loss call, i.e. once per micro-batch
    data = dataclasses.replace(tiny_cfg.data, rewrites="rule")
    cfg = dataclasses.replace(tiny_cfg, steps=2, save_every=0, loss=ALL, data=data)
    full, g_full = first_step_gradients(cfg, monkeypatch)
    acc, g_acc = first_step_gradients(
        dataclasses.replace(cfg, accum_steps=4, out_dir=cfg.out_dir + "_acc"), monkeypatch
    )
    for a, b in zip(g_full, g_acc):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert acc.losses[0] == pytest.approx(full.losses[0], abs=1e-6)


def test_two_processes_feed_the_new_inputs_like_one(tiny_cfg, tmp_path):
    data = dataclasses.replace(tiny_cfg.data, rewrites="rule")
    cfg = dataclasses.replace(tiny_cfg, steps=2, save_every=0, loss=ALL, data=data, out_dir=str(tmp_path / "one"))
    one = train(cfg)
    two = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "two"), distributed=DistributedConfig(nproc=2)))
    assert two.losses == pytest.approx(one.losses, rel=1e-5, abs=1e-5)


def test_what_cannot_be_fed_is_refused_at_start_up(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"\['mlcd'\] need inputs \['cluster_centers'\] that the training program"):
        train(dataclasses.replace(tiny_cfg, loss={"clip": 1.0, "mlcd": 1.0}))
    streamed = dataclasses.replace(tiny_cfg.data, streaming=True, dataset="shards", root=str(tmp_path))
    for loss, key in (({"simclr": 1.0}, "image_features_view2"), ({"hqclip": 1.0}, "short_tag_features")):
        with pytest.raises(ValueError, match=f"data.streaming delivers images and captions only.*{key}"):
            train(dataclasses.replace(tiny_cfg, loss=loss, data=streamed))
    with pytest.raises(ValueError, match="view_scale"):
        train(dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, view_scale=[0.0, 1.0])))
