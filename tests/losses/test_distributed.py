"""Loss terms under torch.distributed with 2 CPU processes (gloo): the mean of the per-rank
losses equals the single-process loss on the whole batch, and each rank's feature gradients
(divided by the world size, as DDP's gradient averaging does) equal the single-process ones."""

import torch
from reference.distributed import check_terms_across_processes

from clipforge.losses import LossInputs

TERMS = [("clip", {}), ("clip", {"chunk_size": 3}), ("siglip", {}), ("siglip", {"chunk_size": 2}), ("cwcl", {}),
         ("uniformity", {}), ("cloob", {}), ("symile", {}), ("hard_negative", {}), ("simclr", {}), ("m2mix", {}),
         ("tic", {}), ("multi_positive", {}), ("hqclip", {}), ("alip", {}), ("norton", {"iters": 10}),
         ("multi_positive", {"mode": "per_slot"}), ("norton", {"iters": 10, "bucket_quantile": 0.3, "lse_weight": 0.0}),
         ("dreamlip_grouping", {}), ("distill_kl", {"teacher_scale": 10.0}), ("hycd", {"teacher_scale": 10.0}),
         ("counting", {}), ("alignment", {}), ("rafa", {}), ("protoclip", {"num_prototypes": 4}), ("degla_igc", {}),
         ("degla_tgc", {}), ("dclip", {}), ("hard_negative", {"scope": "batch"}), ("ema_distill", {"negatives": True}),
         ("distill_kl", {"teacher": "ema", "teacher_scale": 5.0}),
         ("cloc", {}), ("cloc", {"region": 0.5, "grounding": 2.0}),
         ("mlcd", {"centers": torch.randn(5, 6, generator=torch.Generator().manual_seed(9)), "num_labels": 2}),
         ("clip", {"image_view2": True, "label_smoothing": 0.1}), ("barlow_twins", {}),
         ("barlow_twins", {"image_view2": True}), ("swav", {"embed_dim": 6, "num_prototypes": 4}),
         ("byol", {"embed_dim": 6, "hidden_dim": 5})]  # byol: per sample, local to each rank by design
WORLD, LOCAL, DIM = 2, 4, 6


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    f = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return {"img": f(WORLD * LOCAL, DIM), "txt": f(WORLD * LOCAL, DIM), "third": f(WORLD * LOCAL, DIM),
            "neg": f(WORLD * LOCAL, 2, DIM), "view2": f(WORLD * LOCAL, DIM), "pos": f(WORLD * LOCAL, 2, DIM),
            "pos_mask": torch.arange(WORLD * LOCAL * 2).reshape(-1, 2) % 3 != 1, "syn": f(WORLD * LOCAL, DIM),
            "tokens": f(WORLD * LOCAL, 3, DIM), "words": f(WORLD * LOCAL, 2, DIM), "teacher": f(2, WORLD * LOCAL, DIM),
            "count_mask": torch.tensor([True, False, True, True, False, False, True, False]),  # 3 vs 1 per rank
            "neg_mask": torch.arange(WORLD * LOCAL * 2).reshape(-1, 2) % 5 != 2,
            "boxes": torch.cat([torch.rand(WORLD * LOCAL, 2, 2, generator=g, dtype=torch.float64) * 0.5,
                                0.5 + torch.rand(WORLD * LOCAL, 2, 2, generator=g, dtype=torch.float64) * 0.5], -1)}


def inputs_for(data, sl, rank, world):
    img, txt = data["img"][sl].clone().requires_grad_(), data["txt"][sl].clone().requires_grad_()
    tokens, words = data["tokens"][sl].clone().requires_grad_(), data["words"][sl].clone().requires_grad_()
    extra = {"modality_features": [data["third"][sl]], "negative_text_features": data["neg"][sl],
             "image_features_view2": data["view2"][sl], "m2mix_lambda": 0.3, "similar_text_features": data["syn"][sl],
             "text_negative_features": data["neg"][sl], "positive_text_features": data["pos"][sl],
             "positive_text_mask": data["pos_mask"][sl], "short_tag_features": data["syn"][sl],
             "synthetic_text_features": data["syn"][sl]}
    extra.update(
        {
            "teacher_image_features": data["teacher"][:, sl],
            "teacher_text_features": data["teacher"].flip(0)[:, sl],
            "count_negative_text_features": data["syn"][sl],
            "rafa_reference": data["view2"][sl],
            "count_mask": data["count_mask"][sl],
            "negative_text_mask": data["neg_mask"][sl],
            "ema_image_features": data["view2"][sl],
            "ema_text_features": data["third"][sl],
            "ema_negative_text_features": data["neg"].flip(0)[sl],
            # CLOC: region embeddings from the token leaf, region captions from the word leaf
            "region_features": tokens[:, :2],
            "region_text_features": words,
            "region_mask": data["pos_mask"][sl],
            "grounded_boxes": data["boxes"][sl],
            "region_boxes": data["boxes"].flip(0)[sl],
        }
    )
    li = LossInputs(img, txt, torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64),
                    image_tokens=tokens, text_tokens=words, extra=extra, rank=rank,
                    world_size=world)
    return li, [img, txt, tokens, words]


def test_terms_across_two_processes():
    check_terms_across_processes(__name__)
