"""The data side of the loss-input table (clipforge.train.inputs) and the inputs wired through it:
CLIP-IN's negative images, HQ-CLIP's negative descriptions, Symile's third view (a caption in another
language) and MLCD's labels from an offline clustering. Each: what the data delivers, checked against
the dataset item, and a short training run in which the term receives it."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train_inputs import spy_inputs

import clipforge.train.loop as loop
import clipforge.train.setup as setup
from clipforge.cli.main import main
from clipforge.data import build_dataset
from clipforge.data.captions import SourcedCaptions
from clipforge.data.formats import encode_png
from clipforge.data.shapes import negative_images
from clipforge.data.shards import ShardDataset, ShardSample, ShardSetWriter
from clipforge.losses import LOSSES
from clipforge.losses.hard_negative import hard_negative_loss
from clipforge.losses.hqclip import hqclip_loss
from clipforge.models import create_model
from clipforge.tokenizer import get_tokenizer
from clipforge.train import inputs, train
from clipforge.train.data import TrainItems, make_collate
from clipforge.transforms import normalize_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def short(cfg, steps=3, **data):
    data = dataclasses.replace(cfg.data, train_size=64, **data)
    return dataclasses.replace(cfg, steps=steps, save_every=0, data=data)


def init_model(cfg):
    """The model a run starts from (build_model: create_model with the run's seed)."""
    return create_model(cfg.model, seed=cfg.seed, **cfg.model_overrides).eval()


# ------------------------------------------------------------------ the table's data side


def test_every_data_input_is_reached_from_the_table_and_its_options_are_train_items_keywords():
    assert inputs.DATA_INPUTS == tuple(dict.fromkeys(i.data for i in inputs.INPUTS if i.data is not None))
    names = [d.name for d in inputs.DATA_INPUTS]
    assert len(set(names)) == len(names)
    ds = build_dataset("shapes", size=4, seed=0, image_size=32)
    options = {name for d in inputs.DATA_INPUTS for name in d.options}
    items = TrainItems(ds, 0, 32)
    assert items.inputs == [] and all(hasattr(items, name) for name in options)  # every input off by default
    with pytest.raises(TypeError, match=r"no option\(s\) \['bogus'\]"):
        TrainItems(ds, 0, 32, bogus=1)
    # the keys a term reads decide the data inputs, in table order
    negatives = {"negative_text_features", "ema_negative_text_features"}
    assert [d.name for d in inputs.needed_data(negatives)] == ["negatives"]
    assert [d.name for d in inputs.needed_data({"short_tag_features", "image_features_view2"})] == \
        ["view2", "second_captions"]


def test_a_new_input_is_one_entry(tiny_cfg, monkeypatch):
    """A made-up input (each image flipped left-right, encoded by the image tower) added as one table entry
    reaches a loss term through the dataset item, the collate and the loop, with nothing else changed."""
    flipped = inputs.DataInput(
        "flipped", ("pixels_flipped",), {"flipped": False}, lambda ctx: {"flipped": True},
        lambda s, items: {"pixels_flipped": items.prepare(s.item["image"], s.pixel_seed).flip(-1)},
        lambda rows, tok, slots: {"images_flipped": normalize_batch(torch.stack([r["pixels_flipped"] for r in rows]))})
    entry = inputs.ExtraInput(("flipped_features",), "model", "images_flipped", True,
                              lambda m, b: {"flipped_features": m.encode_image(b["images_flipped"]).float()}, flipped)
    table = (*inputs.INPUTS, entry)
    for module, name, value in ((inputs, "INPUTS", table), (inputs, "DATA_INPUTS", (*inputs.DATA_INPUTS, flipped)),
                                (loop, "PRODUCED", inputs.PRODUCED | {"flipped_features"})):
        monkeypatch.setattr(module, name, value)
    import clipforge.train.data as data

    monkeypatch.setattr(data, "DATA_INPUTS", inputs.DATA_INPUTS)

    monkeypatch.setattr(LOSSES, "_items", dict(LOSSES._items))  # the made-up term leaves the registry afterwards

    @LOSSES.register("flip-test", overwrite=True)
    class FlipTerm(torch.nn.Module):
        extra_keys = ("flipped_features",)

        def forward(self, li):
            return {"loss": (li.image_features - li.extra["flipped_features"]).pow(2).sum(-1).mean()}

    seen = spy_inputs(monkeypatch)
    cfg = short(dataclasses.replace(tiny_cfg, loss={"clip": 1.0, "flip-test": 1.0}), steps=1)
    train(cfg)
    li, batch = seen[0]
    torch.testing.assert_close(batch["images_flipped"], batch["images"].flip(-1))
    with torch.no_grad():
        expected = init_model(cfg).encode_image(batch["images"].flip(-1))
    torch.testing.assert_close(li.extra["flipped_features"], expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ CLIP-IN: negative images


def test_negative_images_are_the_re_rendered_edits_of_each_scene():
    ds = build_dataset("shapes", split="train", size=16, seed=0, image_size=32)
    items = TrainItems(ds, seed=5, image_size=32, negative_images=2)
    rows = [items[(1, i)] for i in range(16)]
    for i, row in enumerate(rows):
        item = ds[i]
        expected = negative_images(item["objects"], item["background"], 32, 2, np.random.default_rng([5, 1, i, 4]))
        assert [e for _, e in expected] == row["negative_edits"]
        for (image, _), pixels in zip(expected, row["negative_pixels"]):
            assert torch.equal(pixels, torch.from_numpy(image).permute(2, 0, 1))  # uint8 at the model's size
            assert not torch.equal(pixels, item["image"])
        assert torch.equal(row["pixels"], item["image"])  # the sample's own image stays as it was
    batch = make_collate(get_tokenizer(16), negative_images=2)(rows)
    assert batch["negative_images"].shape == (16, 2, 3, 32, 32) and batch["negative_image_mask"].all()
    torch.testing.assert_close(batch["negative_images"][3, 1], normalize_batch(rows[3]["negative_pixels"][1][None])[0])
    # with augmentation the edited copies get the same crop, flip and jitter as their image
    aug = TrainItems(ds, seed=5, image_size=24, augment=True, negative_images=1)
    row = aug[(0, 2)]
    edited = torch.from_numpy(negative_images(ds[2]["objects"], ds[2]["background"], 32, 1,
                                              np.random.default_rng([5, 0, 2, 4]))[0][0]).permute(2, 0, 1)
    seed = int(np.random.default_rng([5, 0, 2, 1]).integers(2**62))
    assert torch.equal(row["negative_pixels"][0], aug.prepare(edited, seed))


def test_clip_in_trains_on_negative_images_and_the_term_receives_them(tiny_cfg, monkeypatch):
    seen = spy_inputs(monkeypatch)
    loss = {"clip": 1.0, "hard_negative": {"weight": 1.0, "negative_images": True}}
    cfg = short(dataclasses.replace(tiny_cfg, loss=loss), negative_images=2)
    result = train(cfg)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    li, batch = seen[0]
    feats = li.extra["negative_image_features"]
    assert feats.shape == (32, 2, 32) and feats.requires_grad and li.extra["negative_image_mask"].all()
    with torch.no_grad():  # the first step's features: the initial image tower on the edited images
        expected = init_model(cfg).encode_image(batch["negative_images"].flatten(0, 1)).view(32, 2, -1)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)
    # the term's value is the CLIP-IN loss with the negative images, not the text-only one
    term = loss_fn_term(li, "hard_negative", loss)
    nt, mask = li.extra["negative_text_features"], li.extra["negative_text_mask"]
    with_images = hard_negative_loss(li.image_features, li.text_features, li.logit_scale, nt, mask, feats,
                                     li.extra["negative_image_mask"])
    text_only = hard_negative_loss(li.image_features, li.text_features, li.logit_scale, nt, mask)
    torch.testing.assert_close(term, with_images)
    assert (with_images - text_only).abs() > 1e-4
    # a dataset without scenes cannot give negative images: one clear error at start-up
    real = setup.build_dataset
    monkeypatch.setattr(setup, "build_dataset", lambda *a, **kw: [
        {k: v for k, v in item.items() if k != "objects"} for item in real(*a, **kw)])
    with pytest.raises(ValueError, match="re-rendered from a scene's object list.*data.dataset=shapes"):
        train(dataclasses.replace(cfg, out_dir=cfg.out_dir + "_flat"))


def loss_fn_term(li, name, loss):
    from clipforge.losses import build_composite

    return build_composite(loss).terms[name](li)["loss"].detach()


# ------------------------------------------------------------------ shards with languages and caption sources

LANGS = ("en", "es", "de")
WORDS = {"en": ("red", "green", "blue", "yellow"), "es": ("rojo", "verde", "azul", "amarillo"),
         "de": ("rot", "grün", "blau", "gelb")}
RGB = ((220, 40, 40), (40, 180, 60), (50, 90, 230), (235, 215, 40))


def color_shards(root, n=64):
    """A shard directory of n flat-colored 32 px images named in three languages, with HQ-CLIP negative
    descriptions (the other colors) as a stored caption source."""
    def produce(keys):
        for key in keys:
            i = int(key[1:])
            c = i % 4
            image = np.full((32, 32, 3), RGB[c], dtype=np.uint8)
            image[: 4 + i % 20] = 0  # the samples differ beyond their color
            names = [f"a {WORDS['en'][c]} square", f"un cuadrado {WORDS['es'][c]}", f"ein {WORDS['de'][c]}es Quadrat"]
            yield ShardSample(key, encode_png(image), names, {"color": c},
                              extra={"caption_langs": list(LANGS), "caption_sources": {
                                  "negative_descriptions": [f"there is nothing {WORDS['en'][o]} in it"
                                                            for o in range(4) if o != c]}})

    writer = ShardSetWriter(root)
    writer.write_split("train", [f"s{i:03d}" for i in range(n)], produce)
    writer.finish("colors", {"color": {"classes": list(WORDS["en"]), "templates": ["a {} square."]}})
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return color_shards(tmp_path_factory.mktemp("colors"))


def test_shard_items_keep_caption_languages_and_sources(shards):
    ds = ShardDataset(shards)
    item = ds[1]
    assert item["caption_langs"] == list(LANGS) and item["captions"][1] == "un cuadrado verde"
    assert item["caption_sources"]["negative_descriptions"][0] == "there is nothing red in it"
    two = ShardDataset(shards, languages=["en", "de"])[1]
    assert two["caption_langs"] == ["en", "de"] and two["captions"] == [item["captions"][0], item["captions"][2]]


def test_symile_third_view_is_a_caption_in_another_language_tagged():
    rng = np.random.default_rng(0)
    caps, langs = ["a red square", "un cuadrado rojo", "ein rotes Quadrat"], ["en", "es", "de"]
    drawn = {inputs.language_tagged(caps, langs, "a red square", rng) for _ in range(40)}
    assert drawn == {"[es] un cuadrado rojo", "[de] ein rotes Quadrat"}
    assert inputs.language_tagged(caps[:1], langs[:1], caps[0], rng) == "[en] a red square"  # one language: itself
    assert inputs.language_tagged(["a", "b"], ["en", "en"], "a", rng) == "[en] b"


def test_symile_trains_on_three_views(tiny_cfg, shards, monkeypatch):
    seen = spy_inputs(monkeypatch)
    cfg = short(dataclasses.replace(tiny_cfg, loss={"symile": 1.0}), dataset="shards", root=str(shards))
    result = train(cfg)
    assert all(math.isfinite(v) for v in result.losses)
    li, batch = seen[0]
    ds = ShardDataset(shards, size=64, seed=0, image_size=32)
    tok = get_tokenizer(16)
    views = []
    for row, index in enumerate(batch["indices"].tolist()):
        item = ds[index]
        caption = next(c for c in item["captions"] if torch.equal(tok([c])[0], batch["texts"][row]))
        third = inputs.language_tagged(item["captions"], item["caption_langs"], caption,
                                       np.random.default_rng([cfg.seed, 0, index, 5]))
        own = item["caption_langs"][item["captions"].index(caption)]
        assert not third.startswith(f"[{own}]") and third[5:] in item["captions"]
        views.append(third)
    assert torch.equal(batch["third_view_texts"], tok(views))
    (third_features,) = li.extra["modality_features"]
    assert third_features.shape == (32, 32) and third_features.requires_grad
    with torch.no_grad():
        expected = init_model(cfg).encode_text(tok(views))
    torch.testing.assert_close(third_features, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="third modality.*data.dataset=emoji"):
        train(dataclasses.replace(short(tiny_cfg), loss={"symile": 1.0}, out_dir=cfg.out_dir + "_shapes"))


# ------------------------------------------------------------------ HQ-CLIP: negative descriptions


def test_hqclip_receives_the_negative_descriptions(tiny_cfg, shards, monkeypatch):
    seen = spy_inputs(monkeypatch)
    cfg = short(dataclasses.replace(tiny_cfg, loss={"hqclip": {"negatives": True}}), dataset="shards",
                root=str(shards), hard_negatives=2, negative_types=["description"])
    assert all(math.isfinite(v) for v in train(cfg).losses)
    li, batch = seen[0]
    ds = ShardDataset(shards, size=64, seed=0, image_size=32)
    tok = get_tokenizer(16)
    for row, index in enumerate(batch["indices"].tolist()):
        allowed = ds[index]["caption_sources"]["negative_descriptions"]
        got = [t for t in allowed if any(torch.equal(tok([t])[0], ids) for ids in batch["negative_texts"][row])]
        assert len(got) == 2  # two of the sample's own negative descriptions
    negs = li.extra["negative_text_features"]
    assert negs.shape == (32, 2, 32) and negs.requires_grad
    term = loss_fn_term(li, "hqclip", {"hqclip": {"negatives": True}})
    tags = li.extra["short_tag_features"]
    torch.testing.assert_close(term, hqclip_loss(li.image_features, li.text_features, tags, li.logit_scale, negs,
                                                 li.extra["negative_text_mask"]).detach())
    assert (term - hqclip_loss(li.image_features, li.text_features, tags, li.logit_scale).detach()).abs() > 1e-4
    # the shapes items carry no descriptions: their typed hard negatives are all there is
    wrapped = SourcedCaptions(build_dataset("shapes", size=4, seed=0, image_size=32),
                              extra={"negative_descriptions": [["no star here"]] * 4})
    row = TrainItems(wrapped, 0, 32, negatives=1, negative_types=("description",))[(0, 2)]
    assert row["negatives"] == ["no star here"]


# ------------------------------------------------------------------ MLCD: offline clusters


def test_kmeans_matches_sklearn_and_labels_match_a_naive_top_k():
    from sklearn.cluster import KMeans

    from clipforge.losses.mlcd import cluster_centers, nearest_centers

    g = torch.Generator().manual_seed(0)
    means = F.normalize(torch.randn(5, 8, generator=g), dim=-1) * 3
    points = torch.cat([m + 0.3 * torch.randn(40, 8, generator=g) for m in means]).double()
    z = F.normalize(points, dim=-1)
    start = torch.randperm(len(z), generator=torch.Generator().manual_seed(4))[:5]
    ref = KMeans(5, init=z[start].numpy(), n_init=1, max_iter=20, tol=0.0, algorithm="lloyd").fit(z.numpy())
    ours = cluster_centers(points, 5, iters=20, seed=4)
    expected = F.normalize(torch.from_numpy(ref.cluster_centers_), dim=-1).float()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    labels = nearest_centers(z.float(), ours, 2)
    for n in range(len(z)):  # the 2 centers of highest cosine, highest first
        scores = [float(z[n].float() @ c) for c in ours]
        assert labels[n].tolist() == sorted(range(5), key=lambda k: -scores[k])[:2]


def test_cluster_command_and_mlcd_training_on_offline_labels(tiny_cfg, tmp_path, monkeypatch, capsys):
    teacher = dataclasses.replace(short(tiny_cfg, steps=2), out_dir=str(tmp_path / "teacher"))
    train(teacher)
    out = tmp_path / "clusters.pt"
    assert main(["data", "cluster", teacher.out_dir, "--k", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 centers of 64 shapes training images" in printed
    assert "computed on: data.dataset=shapes data.train_size=64 data.seed=0\n" in printed  # what to train with
    record = torch.load(out, weights_only=True)
    assert record["data"] == {"dataset": "shapes", "size": 64, "seed": 0, "root": None, "samples": 64}
    assert len(record["model"]["sha256"]) == 64 and record["model"]["source"] == teacher.out_dir
    assert record["centers"].shape == (6, 32) and record["features"].shape == (64, 32)
    seen = spy_inputs(monkeypatch)
    loss = {"clip": 1.0, "mlcd": {"weight": 1.0, "clusters": str(out), "num_labels": 2}}
    cfg = short(dataclasses.replace(tiny_cfg, loss=loss), steps=4)
    assert all(math.isfinite(v) for v in train(cfg).losses)
    centers, features = record["centers"], record["features"]
    for li, batch in seen:  # every step: the stored features' two nearest centers, whatever the model learned
        for row, index in enumerate(batch["indices"].tolist()):
            scores = (features[index] @ centers.t()).tolist()
            assert li.extra["cluster_labels"][row].tolist() == sorted(range(6), key=lambda k: -scores[k])[:2]
    with pytest.raises(ValueError, match="computed for other training data"):
        train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_size=96), out_dir=cfg.out_dir + "_x"))
    assert main(["data", "cluster", teacher.out_dir, "--k", "6"]) == 2  # shapes has no directory: --out is needed
    assert "--out FILE" in capsys.readouterr().err
    metrics = [json.loads(line) for line in open(Path(cfg.out_dir) / "metrics.jsonl")]
    assert all(math.isfinite(r["mlcd"]) for r in metrics if "mlcd" in r)


# ------------------------------------------------------------------ accumulation and two processes


def test_negative_images_and_third_views_under_accumulation_and_two_processes(tiny_cfg, shards, tmp_path, monkeypatch):
    from test_train_extras import first_step_gradients

    from clipforge.train import DistributedConfig

    cases = [(dataclasses.replace(tiny_cfg, loss={"clip": 1.0, "hard_negative": {
        "weight": 1.0, "negative_images": True, "scope": "batch"}}), {}),
        (dataclasses.replace(tiny_cfg, loss={"clip": 1.0, "symile": 1.0}), {"dataset": "shards", "root": str(shards)})]
    for k, (base, data) in enumerate(cases):
        cfg = dataclasses.replace(short(base, steps=2, **data), out_dir=str(tmp_path / f"one{k}"))
        full, g_full = first_step_gradients(cfg, monkeypatch)
        acc, g_acc = first_step_gradients(dataclasses.replace(cfg, accum_steps=4, out_dir=str(tmp_path / f"acc{k}")),
                                          monkeypatch)
        for a, b in zip(g_full, g_acc):  # the edited images and third views of every micro-batch join the loss
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()
        two = train(dataclasses.replace(cfg, out_dir=str(tmp_path / f"two{k}"), distributed=DistributedConfig(nproc=2)))
        assert two.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-5)
