"""The region-level and compositional terms (grain, fgclip_region, ga_dms, sycoca_tgmim) under torch.distributed
with 2 CPU processes (gloo), through the harness of tests/reference/distributed.py: the mean of the per-rank losses
equals the one-process loss on the whole batch, and each rank's gradients (divided by the world size) equal the
one-process ones. The heads of grain and ga_dms start from their seed, the same on every process."""

import torch
from reference.distributed import check_terms_across_processes

from clipforge.losses import LossInputs

TERMS = [("fgclip_region", {}), ("fgclip_region", {"region": 0.5, "hard": 2.0, "long": 0.0}),
         ("grain", {"embed_dim": 6, "heads": 2, "queries": 3}), ("grain", {"embed_dim": 6, "heads": 2, "box": 0.0}),
         ("ga_dms", {"embed_dim": 6, "vocab_size": 11, "heads": 2}), ("sycoca_tgmim", {})]
WORLD, LOCAL, DIM, R, K, L = 2, 3, 6, 3, 2, 5


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = WORLD * LOCAL
    f = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    lo = torch.rand(n, R, 2, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, 11, (n, L), generator=g)
    targets[torch.rand(n, L, generator=g) < 0.5] = -100
    targets[:, 0] = 3  # every sample predicts one token at least
    return {"img": f(n, DIM), "txt": f(n, DIM), "patches": f(n, 16, DIM), "regions": f(n, R, DIM),
            "negs": f(n, R, K, DIM), "long": f(n, DIM), "states": f(n, L, DIM), "targets": targets,
            "boxes": torch.cat([lo, lo + 0.1 + torch.rand(n, R, 2, generator=g, dtype=torch.float64) * 0.4], -1),
            # rank 0 has 5 regions, rank 1 has 4: unequal counts across processes
            "mask": torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]]).bool(),
            "neg_mask": torch.rand(n, R, K, generator=g) < 0.7,
            "pred": torch.randn(n, 4, 7, generator=g, dtype=torch.float64),
            "target": torch.randn(n, 4, 7, generator=g, dtype=torch.float64)}


def inputs_for(data, sl, rank, world):
    leaves = [data[k][sl].clone().requires_grad_() for k in ("img", "patches", "regions", "negs", "long", "states",
                                                              "txt", "pred")]
    img, patches, regions, negs, long, states, txt, pred = leaves
    extra = {"region_text_features": regions, "region_boxes": data["boxes"][sl], "region_mask": data["mask"][sl],
             "region_negative_text_features": negs, "region_negative_mask": data["neg_mask"][sl],
             "long_text_features": long, "ga_dms_text_features": txt, "ga_dms_mtp_tokens": states,
             "ga_dms_mtp_targets": data["targets"][sl], "tgmim_pred": pred, "tgmim_target": data["target"][sl]}
    li = LossInputs(img, data["txt"][sl], torch.tensor(3.0, dtype=torch.float64), image_tokens=patches, extra=extra,
                    rank=rank, world_size=world)
    return li, leaves


def test_region_terms_across_two_processes():
    check_terms_across_processes(__name__)
