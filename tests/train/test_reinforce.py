"""MobileCLIP's reinforced dataset (clipforge/train/reinforce.py, clipforge data reinforce) on tiny models."""
import dataclasses

import pytest
import torch

from clipforge import load
from clipforge.data import build_dataset
from clipforge.errors import ConfigError
from clipforge.models import create_model, save_model
from clipforge.train.data import TrainItems
from clipforge.train.reinforce import augmentation_generator, load_reinforced, reinforce
from clipforge.transforms import TrainTransform

TINY = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
        "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reinforced")
    save_model(create_model("tiny", seed=7, **TINY).eval(), root / "teacher")
    reinforce("shapes", [str(root / "teacher")], root / "data", augmentations=3, synthetic=2, size=12, seed=0,
              image_size=32, scale=(0.5, 1.0), hflip=True, jitter=0.3)
    return root


def test_draw_then_replay_is_the_random_transform():
    image = build_dataset("shapes", split="train", size=1, seed=0, image_size=48)[0]["image"]
    t = TrainTransform(32, scale=(0.4, 1.0), hflip=True, jitter=0.3)
    for seed in range(4):
        aug = t.draw(48, 48, torch.Generator().manual_seed(seed))
        assert torch.equal(t.replay(image, aug), t(image, generator=torch.Generator().manual_seed(seed)))


def test_stored_augmentations_replay_to_the_pixels_the_teacher_embedded(store_dir):
    store = load_reinforced(store_dir / "data")
    teacher, tokenizer, _ = load(store_dir / "teacher")
    ds = build_dataset("shapes", split="train", size=12, seed=0, image_size=32)
    t = TrainTransform(32, scale=(0.5, 1.0), hflip=True, jitter=0.3)
    assert store.k == 3 and store.image[0].shape == (12, 3, 32)
    for i in (0, 5, 11):
        image = ds[i]["image"]
        for k in range(3):
            # the stored draw is the one the seeded generator gives, and its replay the random transform's pixels
            pixels = t(image, generator=augmentation_generator(0, i, k))
            replayed = store.transform().replay(image, store.augmentation(i, k))
            assert torch.equal(replayed, pixels)
            with torch.no_grad():
                want = teacher.encode_image(pixels[None])[0]
            assert torch.allclose(store.image[0][i, k], want, atol=1e-5)
        captions = store.captions[i]
        assert captions[:len(ds[i]["captions"])] == list(ds[i]["captions"])  # own captions first, then synthetic
        assert len(captions) > len(ds[i]["captions"])
        with torch.no_grad():
            want = teacher.encode_text(tokenizer(captions))
        assert torch.allclose(store.text[0][i, :len(captions)], want, atol=1e-5)
        assert not store.text[0][i, len(captions):].any()  # zero rows past the last caption


def test_training_items_replay_a_stored_view_with_its_teacher_embeddings(store_dir):
    store = load_reinforced(store_dir / "data")
    ds = build_dataset("shapes", split="train", size=12, seed=0, image_size=32)
    items = TrainItems(ds, seed=3, image_size=32, teachers=store)
    seen = set()
    for epoch in range(4):
        for i in range(12):
            out = items[(epoch, i)]
            k = next(k for k in range(3) if torch.equal(out["teacher_image"][0], store.image[0][i, k]))
            assert torch.equal(out["pixels"], store.transform().replay(ds[i]["image"], store.augmentation(i, k)))
            c = store.captions[i].index(out["caption"])
            assert torch.equal(out["teacher_text"][0], store.text[0][i, c])
            seen.add(k)
    assert seen == {0, 1, 2}  # every stored view is used


def test_training_reads_the_reinforced_dataset(store_dir, tiny_cfg):
    from clipforge.train import DataConfig, train

    cfg = dataclasses.replace(tiny_cfg, model_overrides=TINY, steps=3, batch_size=6, save_every=0,
                              loss={"clip": 1.0, "distill_kl": 1.0},
                              data=DataConfig(train_size=12, eval_size=8, reinforced=str(store_dir / "data")))
    result = train(cfg)
    assert len(result.losses) == 3 and all(map(torch.isfinite, torch.tensor(result.losses)))
    with pytest.raises(ConfigError, match="written for"):
        train(dataclasses.replace(cfg, data=DataConfig(train_size=10, eval_size=8,
                                                       reinforced=str(store_dir / "data"))))
