"""The declaration of what a loss term can receive from the training program (clipforge.train.inputs):
what it covers, and the batch-to-features code of each entry against per-sample loops written here."""
import torch

from clipforge import losses
from clipforge.train import inputs

# read by a default-option term but not produced by the training program (docs/losses.md says why):
# MLCD's centers unless given as its option (centers, or a cluster file: clusters), and the outputs that a model
# variant itself returns from its forward (its extra_outputs): CoCa's decoder outputs, CLIP-MoE's balance loss
NOT_FED = {"mlcd": {"cluster_centers"}, "caption": {"caption_logits", "caption_targets"},
           "moe_balance": {"moe_balance_loss"},
           "sycoca_tgmim": {"tgmim_pred", "tgmim_target"},  # a CoCa with its TG-MIM branch returns them
           "cosmo_generation": {"cosmo_logits", "cosmo_targets"}}  # a COSMO model's forward returns them


def test_every_input_a_term_reads_is_declared_or_known_not_fed():
    for name in losses.available():
        wanted = set(getattr(losses.build(name), "extra_keys", ()))
        assert wanted - inputs.PRODUCED == NOT_FED.get(name, set()), name


def test_the_derived_sets_follow_the_table():
    assert set(inputs.EMA_KEYS) == {"ema_image_features", "ema_text_features", "ema_negative_text_features"}
    assert inputs.FROM_DATASET == inputs.PRODUCED - {"image_tokens", "text_tokens", "ema_image_features",
                                                      "ema_text_features"}


class Towers(torch.nn.Module):
    """Stand-in towers with a simple, known map: text ids [N, L] -> [N, 2], images [N, C] -> [N, 2]."""

    def encode_text(self, ids):
        return torch.stack([ids.float().sum(-1), ids.float()[:, 0]], dim=-1)

    def encode_image(self, images):
        return torch.stack([images.sum(-1), -images[:, 0]], dim=-1)

    def forward(self, images, texts):
        return {"image_features": self.encode_image(images), "text_features": self.encode_text(texts),
                "logit_scale": torch.tensor(1.0), "logit_bias": None}


def test_encoders_match_per_sample_loops():
    g = torch.Generator().manual_seed(0)
    b, k, length = 3, 2, 4
    ids = lambda *s: torch.randint(1, 50, s, generator=g)  # noqa: E731
    batch = {"images": torch.randn(b, 5, generator=g), "texts": ids(b, length),
             "images_view2": torch.randn(b, 5, generator=g), "synthetic_texts": ids(b, length),
             "short_tags_texts": ids(b, length), "negative_texts": ids(b, k, length),
             "negative_mask": torch.tensor([[True, False]] * b), "positive_texts": ids(b, k, length),
             "positive_mask": torch.ones(b, k, dtype=torch.bool), "count_negative_texts": ids(b, length),
             "count_positive_texts": ids(b, length), "count_mask": torch.tensor([True, False, True]),
             "teacher_image": [torch.randn(b, 4, generator=g)], "teacher_text": [torch.randn(b, 4, generator=g)]}
    m = Towers()
    text = lambda t: torch.tensor([[float(sum(t.tolist())), float(t[0])] for t in t])  # noqa: E731
    extra = inputs.encode_extras(m, batch)
    assert torch.equal(extra["image_features_view2"],
                       torch.tensor([[float(r.sum()), -float(r[0])] for r in batch["images_view2"]]))
    assert torch.equal(extra["synthetic_text_features"], text(batch["synthetic_texts"]))
    assert torch.equal(extra["short_tag_features"], text(batch["short_tags_texts"]))
    for key, field in (("negative_text_features", "negative_texts"), ("positive_text_features", "positive_texts")):
        assert extra[key].shape == (b, k, 2)
        for i in range(b):  # sample i's own captions, in order
            assert torch.equal(extra[key][i], text(batch[field][i])), key
    assert torch.equal(extra["negative_text_mask"], batch["negative_mask"])
    assert torch.equal(extra["count_negative_text_features"], text(batch["count_negative_texts"]))
    assert torch.equal(extra["count_positive_text_features"], text(batch["count_positive_texts"]))
    assert extra["teacher_image_features"] is batch["teacher_image"]
    assert not any(key.startswith("ema_") for key in extra)
    ema = inputs.encode_ema(type("EMA", (), {"model": m})(), batch)
    assert torch.equal(ema["ema_text_features"], text(batch["texts"]))
    assert torch.equal(ema["ema_negative_text_features"][1], text(batch["negative_texts"][1]))
    assert inputs.encode_ema(None, batch) == {}
    plain = inputs.encode_extras(m, {"images": batch["images"], "texts": batch["texts"]})
    assert plain == {}  # a plain CLIP batch asks for nothing extra


def test_region_negative_and_long_caption_encoders_match_per_sample_loops():
    g = torch.Generator().manual_seed(1)
    b, r, k, length = 2, 3, 2, 4
    batch = {"images": torch.randn(b, 5, generator=g), "texts": torch.randint(1, 50, (b, length), generator=g),
             "region_negative_texts": torch.randint(1, 50, (b, r, k, length), generator=g),
             "region_negative_mask": torch.rand(b, r, k, generator=g) < 0.5,
             "long_texts": torch.randint(1, 50, (b, length), generator=g)}
    extra = inputs.encode_extras(Towers(), batch)
    text = lambda t: torch.tensor([float(sum(t.tolist())), float(t[0])])  # noqa: E731
    assert extra["region_negative_text_features"].shape == (b, r, k, 2)
    for i in range(b):
        for j in range(r):
            for n in range(k):  # sample i's region j's n-th negative, in place
                assert torch.equal(extra["region_negative_text_features"][i, j, n],
                                   text(batch["region_negative_texts"][i, j, n]))
        assert torch.equal(extra["long_text_features"][i], text(batch["long_texts"][i]))
    assert torch.equal(extra["region_negative_mask"], batch["region_negative_mask"])


def test_region_negatives_long_captions_and_mask_texts_from_the_items():
    """The data side of fgclip_region's and ga_dms's inputs: TrainItems with the options the table sets, against
    the dataset item and region_negative_captions called with the same stream."""
    import numpy as np

    from clipforge.data import build_dataset
    from clipforge.data.regions import region_negative_captions
    from clipforge.tokenizer import get_tokenizer
    from clipforge.train.data import TrainItems, make_collate

    ds = build_dataset("shapes", split="train", size=8, seed=0, image_size=32)
    items = TrainItems(ds, 3, 32, regions=True, region_negatives=2, long_caption=True, token_masking=True,
                       masking_ratios=(0.3, 0.25))
    rows = [items[(1, i)] for i in range(4)]
    for i, row in enumerate(rows):
        item = ds[i]
        want = region_negative_captions(item["region_captions"], 2, np.random.default_rng([3, 1, i, 7]))
        assert row["region_negatives"] == want and row["long_caption"] == max(item["captions"], key=len)
        assert row["mask_caption"] == row["caption"]
    tok = get_tokenizer(32)
    batch = make_collate(tok, regions=4, region_negatives=(4, 2))(rows)
    assert batch["region_negative_texts"].shape == (4, 4, 2, 32) and batch["region_mask"].shape == (4, 4)
    assert batch["mask_ratios"].tolist() == [[0.3, 0.25]] * 4  # ga_dms's (noise_ratio, mask_ratio), one row each
    assert torch.equal(batch["mask_texts"], batch["texts"]) and torch.equal(batch["long_texts"],
                                                                             tok([r["long_caption"] for r in rows]))
    for i, row in enumerate(rows):
        for j, negs in enumerate(row["region_negatives"]):
            assert batch["region_negative_mask"][i, j].tolist() == [n < len(negs) for n in range(2)]
            for n, neg in enumerate(negs):
                assert torch.equal(batch["region_negative_texts"][i, j, n], tok([neg])[0])
        assert not batch["region_negative_mask"][i, len(row["region_negatives"]):].any()  # padding regions
