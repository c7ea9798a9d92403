"""UniME's terms (unime_kd, unime_hardneg) under torch.distributed with 2 CPU processes (gloo), through the harness
of tests/reference/distributed.py: the mean of the per-rank losses equals the one-process loss on the whole batch,
and each rank's gradients (divided by the world size) equal the one-process ones."""

import torch
from reference.distributed import check_terms_across_processes

from clipforge.losses import LossInputs

TERMS = [("unime_kd", {}), ("unime_kd", {"temperature": 0.3}), ("unime_hardneg", {"k": 2, "beta": 0.05}),
         ("unime_hardneg", {"k": 8, "beta": 0.3, "symmetric": False})]
WORLD, LOCAL, DIM = 2, 3, 5


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = WORLD * LOCAL
    f = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return {"img": f(n, DIM), "txt": f(n, DIM), "teacher": f(n, 7)}


def inputs_for(data, sl, rank, world):
    leaves = [data[k][sl].clone().requires_grad_() for k in ("img", "txt")]
    li = LossInputs(leaves[0], leaves[1], torch.tensor(1.0, dtype=torch.float64),
                    extra={"teacher_text_features": data["teacher"][sl]}, rank=rank, world_size=world)
    return li, leaves


def test_unime_terms_across_two_processes():
    check_terms_across_processes(__name__)
