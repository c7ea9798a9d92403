"""The declaration of what a loss term can receive from the training program (clipforge.train.inputs):
what it covers, and the batch-to-features code of each entry against per-sample loops written here."""
import torch

from clipforge import losses
from clipforge.train import inputs

# read by a default-option term but not produced by the training program (docs/losses.md says why):
# MLCD's centers unless given as its option (centers, or a cluster file: clusters), and the outputs that a model
# variant itself returns from its forward (its extra_outputs): CoCa's decoder outputs, CLIP-MoE's balance loss
NOT_FED = {"mlcd": {"cluster_centers"}, "caption": {"caption_logits", "caption_targets"},
           "moe_balance": {"moe_balance_loss"}}


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
