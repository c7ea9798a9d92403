"""The training program feeds loss terms their extra inputs: hard-negative and count
counterfactual captions, the EMA teacher's embeddings; exactly under gradient accumulation
and across a resume, and not at all for a plain CLIP run."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import clipforge.train.loop as loop
from clipforge.losses import LOSSES
from clipforge.train import train
from clipforge.train.data import TrainItems, same_wording


def records(cfg, key):
    return [r for r in map(json.loads, open(Path(cfg.out_dir) / "metrics.jsonl")) if key in r]


def first_step_gradients(cfg, monkeypatch):
    """Train and return the result plus a copy of the gradients of the first optimizer step."""
    captured, clip = [], torch.nn.utils.clip_grad_norm_

    def spy(params, *args, **kwargs):
        params = list(params)
        if not captured:
            captured.append([p.grad.clone() for p in params])
        return clip(params, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", spy)
        result = train(cfg)
    return result, captured[0]


def test_accumulation_with_extra_captions_matches_full_batch(tiny_cfg, monkeypatch):
    cfg = dataclasses.replace(tiny_cfg, steps=3, save_every=0,
                              loss={"clip": 1.0, "hard_negative": 1.0, "counting": 0.5, "degla_igc": 0.5})
    full, g_full = first_step_gradients(cfg, monkeypatch)
    acc, g_acc = first_step_gradients(
        dataclasses.replace(cfg, accum_steps=4, out_dir=cfg.out_dir + "_acc"), monkeypatch
    )
    # the extra captions of all micro-batches join the loss: the full-batch gradient, up to float error
    for a, b in zip(g_full, g_acc):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert acc.losses[0] == pytest.approx(full.losses[0], abs=1e-6)
    assert acc.losses == pytest.approx(full.losses, abs=1e-3)  # Adam amplifies float noise a little


def test_ema_teacher_feeds_terms_and_resumes_exactly(tiny_cfg, tmp_path):
    loss = {"clip": 1.0, "ema_distill": {"weight": 1.0, "negatives": True}, "degla_tgc": 0.5}
    cfg = dataclasses.replace(tiny_cfg, steps=6, save_every=0, loss=loss, ema_momentum=0.5)
    full = train(cfg)
    logged = [r["ema_distill"] for r in records(cfg, "ema_distill")]
    assert logged[0] < 1e-10 < logged[1]  # the teacher starts as a copy, then lags behind
    split = dataclasses.replace(cfg, out_dir=str(tmp_path / "split"))
    first = train(dataclasses.replace(split, stop_at=2))
    resumed = train(dataclasses.replace(split, resume="latest"))
    assert first.losses + resumed.losses == pytest.approx(full.losses, abs=1e-6)
    state = torch.load(Path(split.out_dir) / "checkpoints" / "step_0000006" / "state.pt", weights_only=True)
    assert any(k.startswith("model.") for k in state["ema"])  # the teacher's weights are checkpointed


def test_ema_update_follows_the_momentum(tiny_cfg, monkeypatch):
    seen = []
    original = loop.EMATeacher.update

    def spy(self, model):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        original(self, model)
        seen.append((before, {k: v.clone() for k, v in model.state_dict().items()}, self.model.state_dict()))

    monkeypatch.setattr(loop.EMATeacher, "update", spy)
    train(
        dataclasses.replace(tiny_cfg, steps=2, save_every=0, loss={"clip": 1.0, "ema_distill": 1.0}, ema_momentum=0.75)
    )
    before, student, after = seen[-1]
    name = "visual.transformer.blocks.0.attn.in_proj.weight"
    assert torch.allclose(after[name], 0.75 * before[name] + 0.25 * student[name])


def test_plain_clip_prepares_nothing_extra(tiny_cfg, monkeypatch):
    batches, teachers = [], []
    encode, encode_ema = loop.encode_extras, loop.encode_ema
    monkeypatch.setattr(loop, "encode_extras", lambda model, b: batches.append(set(b)) or encode(model, b))
    monkeypatch.setattr(loop, "encode_ema", lambda ema, b: teachers.append(ema) or encode_ema(ema, b))
    train(dataclasses.replace(tiny_cfg, steps=2, save_every=0))
    assert batches and all(not {"negative_texts", "count_negative_texts"} & keys for keys in batches)
    assert teachers and all(t is None for t in teachers)


def test_unsupported_inputs_and_negative_types(tiny_cfg):
    @LOSSES.register("needs-bogus-test", overwrite=True)
    class NeedsBogus(torch.nn.Module):
        extra_keys = ("bogus_features",)

        def forward(self, inputs):
            return {"loss": inputs.require("bogus_features")}

    with pytest.raises(ValueError, match="bogus_features.*does not produce"):
        train(dataclasses.replace(tiny_cfg, loss={"clip": 1.0, "needs-bogus-test": 1.0}))
    from clipforge.data import build_dataset

    ds = build_dataset("shapes", split="train", size=64, seed=0, image_size=32)
    items = TrainItems(ds, seed=0, image_size=32, negatives=3, negative_types=("count",))
    for i in range(64):
        allowed = set(ds[i]["negatives"].get("count", []))
        got = items[(0, i)]["negatives"]
        assert set(got) <= allowed and len(got) == min(3, len(allowed))
    # the counting loss gets the true caption worded like its counterfactual (only the number differs)
    counted = TrainItems(ds, seed=0, image_size=32, count_negatives=True)
    pairs = [(counted[(0, i)]["count_positive"], counted[(0, i)]["count_negative"]) for i in range(64)]
    pairs = [(p, n) for p, n in pairs if n is not None]
    assert pairs
    for pos, neg in pairs:
        a, b = pos.split(), neg.split()
        assert len(a) == len(b) and 1 <= sum(u != v for u, v in zip(a, b)) <= 2, (pos, neg)
    assert same_wording(["a picture of two red stars.", "two red stars."], "three red stars.") == "two red stars."
    with pytest.raises(ValueError, match="ema_momentum"):
        train(dataclasses.replace(tiny_cfg, ema_momentum=1.0))


def test_stored_teacher_embeddings_feed_distillation(tiny_cfg, tmp_path, monkeypatch):
    from clipforge.data import build_dataset
    from clipforge.models import load_model
    from clipforge.tokenizer import get_tokenizer
    from clipforge.train import teachers as store_mod

    teacher_dir = str(tmp_path / "teacher")
    train(dataclasses.replace(tiny_cfg, steps=2, save_every=0, out_dir=teacher_dir))
    data = dataclasses.replace(
        tiny_cfg.data, teachers=[teacher_dir, teacher_dir], teacher_cache=str(tmp_path / "cache")
    )
    loss = {"clip": 0.5, "distill_kl": {"weight": 0.5, "teacher_scale": 20.0}, "hycd": 0.2, "dclip": 0.2}
    cfg = dataclasses.replace(tiny_cfg, steps=3, save_every=0, loss=loss, data=data)
    full = train(cfg)
    assert all(r["distill_kl"] >= 0 for r in records(cfg, "distill_kl"))
    # a second run re-uses the stored embeddings; accumulation joins them per teacher: same losses
    monkeypatch.setattr(
        store_mod, "embed_training_set", lambda *a, **k: pytest.fail("recomputed the teacher embeddings")
    )
    acc = train(dataclasses.replace(cfg, accum_steps=2, out_dir=cfg.out_dir + "_acc"))
    assert acc.losses == pytest.approx(full.losses, abs=1e-3)

    # the store holds the teacher's embeddings of each image and of each of its captions
    store = store_mod.load_teacher_store(data.teachers, "shapes", data.train_size, data.seed, data.teacher_cache)
    teacher = load_model(teacher_dir)
    ds = build_dataset("shapes", split="train", size=data.train_size, seed=data.seed, image_size=teacher.image_size)
    with torch.no_grad():
        for i in (0, 7):
            img = teacher.encode_image(store_mod._pixels([ds[i]["image"]], teacher.image_size))[0]
            txt = teacher.encode_text(get_tokenizer(teacher.context_length)(ds[i]["captions"]))
            assert torch.allclose(store.image[0][i], img, atol=1e-5)
            assert torch.allclose(store.text[1][i, :len(txt)], txt, atol=1e-5)
    # a training sample carries the embedding of the caption it drew
    items = TrainItems(ds, seed=0, image_size=teacher.image_size, teachers=store)
    for i in range(8):
        it = items[(3, i)]
        which = ds[i]["captions"].index(it["caption"])
        assert torch.equal(it["teacher_text"][0], store.text[0][i, which])
    with pytest.raises(ValueError, match="data.teachers"):
        train(dataclasses.replace(cfg, data=tiny_cfg.data))


def test_caption_policy_pairs_negatives_with_their_source_caption():
    """Hard negatives are written from a sample's first caption; with them, the step's positive
    is that caption (policy "first", chosen by "auto"), otherwise any caption may be drawn."""
    from clipforge.data import build_dataset
    from clipforge.train.setup import resolve_caption_policy

    ds = build_dataset("shapes", split="train", size=40, seed=0, image_size=32)
    first = TrainItems(ds, seed=0, image_size=32, negatives=2, caption_policy="first")
    assert all(first[(e, i)]["caption"] == ds[i]["captions"][0] for e in range(3) for i in range(40))
    drawn = {TrainItems(ds, seed=0, image_size=32)[(e, i)]["caption"] for e in range(6) for i in range(40)}
    assert drawn - {ds[i]["captions"][0] for i in range(40)}, "random policy never drew another caption"
    assert resolve_caption_policy("auto", {"negative_text_features"}) == "first"
    assert resolve_caption_policy("auto", set()) == "random"
    assert resolve_caption_policy("random", {"negative_text_features"}) == "random"
    with pytest.raises(ValueError, match="caption_policy"):
        TrainItems(ds, seed=0, image_size=32, caption_policy="shortest")


def test_projection_only_training_from_pretrained_weights(tiny_cfg, tmp_path):
    """uCLIP-style alignment: start from a trained model (init_from), train only the projections
    (trainable); every encoder weight stays exactly as it was loaded."""
    from clipforge.models import load_model

    source = train(dataclasses.replace(tiny_cfg, steps=3, out_dir=str(tmp_path / "src")))
    before = {k: v.clone() for k, v in source.model.state_dict().items()}
    cfg = dataclasses.replace(tiny_cfg, steps=4, out_dir=str(tmp_path / "aligned"), init_from=str(tmp_path / "src"),
                              trainable=["visual.proj", "text.proj", "logit_scale"], model="no-such-model")
    after = train(cfg).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"visual.proj", "text.proj", "logit_scale"}
    saved = load_model(tmp_path / "aligned").state_dict()
    assert all(torch.equal(saved[k], after[k]) for k in after)


def test_freeze_locks_a_tower_and_bad_patterns_are_named(tiny_cfg, tmp_path):
    base = train(dataclasses.replace(tiny_cfg, steps=1, lr=0.0, out_dir=str(tmp_path / "a"))).model.state_dict()
    locked = train(
        dataclasses.replace(tiny_cfg, steps=3, freeze=["text.*"], out_dir=str(tmp_path / "b"))
    ).model.state_dict()
    text_keys = [k for k in base if k.startswith("text.")]
    assert text_keys and all(torch.equal(base[k], locked[k]) for k in text_keys)
    assert any(not torch.equal(base[k], locked[k]) for k in base if k.startswith("visual."))
    with pytest.raises(ValueError, match="'txt.\\*' matches no parameter"):
        train(dataclasses.replace(tiny_cfg, freeze=["txt.*"], out_dir=str(tmp_path / "c")))


def test_caption_sources_with_stored_rule_rewrites(tiny_cfg, tmp_path):
    """data.caption_sources + data.rewrites=rule: rewrites are computed once, stored, read back on
    the next run, and the steps draw from the original captions and the rewrites."""
    from clipforge.data.captions import CaptionPolicy
    from clipforge.train.setup import with_caption_sources

    cfg = dataclasses.replace(
        tiny_cfg,
        steps=2,
        out_dir=str(tmp_path / "run"),
        data=dataclasses.replace(
            tiny_cfg.data, train_size=48, caption_sources="original=1,rewrites=1", rewrites="rule"
        ),
    )
    train(cfg)
    sidecar = list((tmp_path / "run").glob("rewrites.rule.*.parquet"))
    assert len(sidecar) == 1
    stamp = sidecar[0].stat().st_mtime_ns
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "run"), resume="latest", steps=3))
    assert sidecar[0].stat().st_mtime_ns == stamp, "the rewrites were recomputed"
    from clipforge.data import build_dataset

    ds = build_dataset("shapes", split="train", size=48, seed=0, image_size=32)
    wrapped, policy = with_caption_sources(cfg, ds, tmp_path / "run", set())
    items = TrainItems(wrapped, seed=0, image_size=32, sources=policy)
    drawn = [items[(e, i)]["caption"] for e in range(4) for i in range(48)]
    originals = {c for i in range(48) for c in ds[i]["captions"]}
    rewritten = [c for c in drawn if c not in originals]
    assert 0.3 < len(rewritten) / len(drawn) < 0.7  # about half the steps use a rewrite
    with pytest.raises(ValueError, match="data.rewrites is empty"):
        with_caption_sources(
            dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, rewrites="")), ds, tmp_path, set()
        )
    with pytest.raises(ValueError, match="unknown caption source"):
        CaptionPolicy.parse("original=1,captionz=1")


def test_multi_positive_training_gets_captions_or_dreamlip_subcaptions(tiny_cfg, tmp_path, monkeypatch):
    """multi_positive reads P positive texts per sample: the sample's captions (LaCLIP-style) or the
    sentences of its longest caption (DreamLIP); the training program encodes them with gradients."""
    from clipforge.data import build_dataset
    from clipforge.losses.multi_positive import MultiPositiveLoss
    from clipforge.tokenizer import get_tokenizer
    from clipforge.train.data import make_collate

    encoded, seen = [], []
    encode_extras, forward = loop.encode_extras, MultiPositiveLoss.forward

    def spy_extras(model, batch):
        extra = encode_extras(model, batch)
        with torch.no_grad():  # the positives' own token ids through the text tower, at the same weights
            ids = batch["positive_texts"]
            again = model.encode_text(ids.reshape(-1, ids.shape[-1])).float().view(*ids.shape[:2], -1)
        encoded.append((extra["positive_text_features"], again, batch["positive_mask"]))
        return extra

    def spy_forward(self, inputs):
        pos = inputs.require("positive_text_features")
        grads = []
        if pos.requires_grad:
            pos.register_hook(lambda g: grads.append(g.clone()))
        out = forward(self, inputs)
        seen.append((pos, grads, out["loss"].item()))
        return out

    monkeypatch.setattr(loop, "encode_extras", spy_extras)
    monkeypatch.setattr(MultiPositiveLoss, "forward", spy_forward)
    cfg = dataclasses.replace(tiny_cfg, steps=3, save_every=0, loss={"clip": 1.0, "multi_positive": 0.5},
                              out_dir=str(tmp_path / "mp"))
    result = train(cfg)
    assert len(result.losses) == 3 and len(seen) == len(encoded) == 3
    for (features, again, mask), (pos, grads, _) in zip(encoded, seen):
        assert pos is features and features.shape == (tiny_cfg.batch_size, 2, 32) and mask.all()
        assert torch.allclose(features, again, atol=1e-5)  # the positive captions' features, not other texts'
        assert pos.requires_grad and len(grads) == 1 and grads[0].abs().sum(-1).gt(0).all()  # every slot gets gradient
    logged = records(cfg, "multi_positive")
    assert [r["step"] for r in logged] == [1, 2, 3]
    for r, (_, _, value) in zip(logged, seen):
        assert r["multi_positive"] == pytest.approx(value, rel=1e-6)
        assert r["loss"] == pytest.approx(r["clip"] + 0.5 * r["multi_positive"], rel=1e-5)
    ds = build_dataset("shapes", split="train", size=16, seed=0, image_size=32)
    items = TrainItems(ds, seed=0, image_size=32, positives=2)
    for i in range(16):
        got = items[(0, i)]["positives"]
        assert 1 <= len(got) <= 2 and len(set(got)) == len(got) and set(got) <= set(ds[i]["captions"])

    class LongCaptions(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {
                "image": ds[i]["image"],
                "captions": ["short.", "A red circle. It is small. It sits left of a square."],
            }

    sub = TrainItems(LongCaptions(), seed=0, image_size=32, positives=2, positive_source="subcaptions")
    sentences = {"A red circle.", "It is small.", "It sits left of a square."}
    for i in range(4):
        got = sub[(1, i)]["positives"]
        assert len(got) == 2 and set(got) <= sentences
    batch = make_collate(get_tokenizer(16), positives=3)([sub[(0, i)] for i in range(4)])
    assert batch["positive_texts"].shape[:2] == (4, 3) and batch["positive_mask"].sum(1).tolist() == [2, 2, 2, 2]
