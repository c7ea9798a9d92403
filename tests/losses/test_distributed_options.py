"""CLIP, SigLIP and contrastive-variant terms with non-default options on 2 gloo CPU processes: the mean of the per-rank
losses equals the single-process loss on the whole batch, and each rank's feature gradients
divided by the world size (DDP averages) equal the single-process ones. (The default options
of every term are covered by test_distributed.py.)"""

import torch
from reference.distributed import check_terms_across_processes

from clipforge.losses import LossInputs

TERMS = [("clip", {"label_smoothing": 0.1}), ("clip", {"label_smoothing": 0.1, "chunk_size": 3}),
         ("cwcl", {"reference": "text", "symmetric": False}), ("cwcl", {"weights_key": "teacher"}),
         ("symile", {"negatives": "n_squared"}), ("m2mix", {"mix_scale": 5.0}), ("uniformity", {"t": 1.0}),
         ("alignment", {"alpha": 1.0}), ("cloob", {"tau": 0.2, "beta": 3.0}), ("simclr", {"temperature": 0.5})]
WORLD, LOCAL, DIM = 2, 3, 5


def batch():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.functional.normalize(torch.randn(WORLD * LOCAL, DIM, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(5)]


def inputs_for(data, sl, rank, world):
    img, txt = data[0][sl].clone().requires_grad_(), data[1][sl].clone().requires_grad_()
    extra = {"modality_features": [data[2][sl]], "teacher": data[3][sl], "image_features_view2": data[4][sl],
             "m2mix_lambda": 0.4}
    scale = torch.tensor(3.0, dtype=torch.float64)
    return LossInputs(img, txt, scale, extra=extra, rank=rank, world_size=world), (img, txt)


def test_options_across_two_processes():
    check_terms_across_processes(__name__)
