"""CoCa's captioning cross-entropy against a naive loop over captions and tokens."""
import math

import pytest
import torch

from clipforge import losses
from clipforge.losses import LossInputs, caption_loss

F64 = torch.float64



PAD = 0


def naive(logits, targets, eps):
    """mean over non-pad tokens of -(1 - eps) log p[target] - eps/V sum_v log p[v]."""
    total, count = 0.0, 0
    b, length, vocab = logits.shape
    for i in range(b):
        for t in range(length):
            if int(targets[i, t]) == PAD:
                continue
            row = logits[i, t]
            m = float(row.detach().max())
            log_z = m + torch.log(sum(torch.exp(row[v] - m) for v in range(vocab)))
            logp = [row[v] - log_z for v in range(vocab)]
            total = total - (1 - eps) * logp[int(targets[i, t])] - eps / vocab * sum(logp)
            count += 1
    return total / count


def batch():
    logits = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    targets = torch.tensor([[3, 5, 1, PAD], [2, PAD, PAD, PAD]])
    return logits, targets


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_naive_and_gradcheck(eps):
    logits, targets = batch()
    assert torch.allclose(caption_loss(logits, targets, PAD, eps), naive(logits, targets, eps))
    assert torch.autograd.gradcheck(lambda z: caption_loss(z, targets, PAD, eps), (logits.clone().requires_grad_(),))


def test_properties():
    logits, targets = batch()
    # uniform predictions cost log V whatever the targets and the smoothing
    flat = torch.zeros_like(logits)
    for eps in (0.0, 0.3):
        assert math.isclose(float(caption_loss(flat, targets, PAD, eps)), math.log(6), rel_tol=1e-12)
    # logits at pad positions do not matter
    noisy = logits.clone()
    noisy[targets == PAD] = 100.0
    assert torch.allclose(caption_loss(noisy, targets), caption_loss(logits, targets))
    # bf16 logits are upcast for the softmax
    assert caption_loss(logits.bfloat16(), targets).dtype == torch.float32


def test_registry_and_bad_input():
    logits, targets = batch()
    li = LossInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor(1.0),
                    extra={"caption_logits": logits, "caption_targets": targets})
    term = losses.build("caption", label_smoothing=0.1)
    assert set(term.extra_keys) == {"caption_logits", "caption_targets"}
    assert torch.allclose(term(li)["loss"], naive(logits, targets, 0.1))
    with pytest.raises(KeyError, match="caption_logits"):
        term(LossInputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor(1.0)))
    with pytest.raises(ValueError, match=r"\[B, L, V\]"):
        caption_loss(logits[:, :3], targets)
    with pytest.raises(ValueError, match="integer token ids"):
        caption_loss(logits, targets.double())
    with pytest.raises(ValueError, match="pad id"):
        caption_loss(logits, torch.zeros_like(targets))
    with pytest.raises(ValueError, match="label_smoothing"):
        caption_loss(logits, targets, label_smoothing=1.0)
