"""ProtoCLIP (prototype-level discrimination with Prototypical Back Translation) and the seeded
k-means behind it, against naive loop references written from the paper's description."""
import math

import pytest
import torch
from reference.naive_losses import dot, unit

from clipforge import losses
from clipforge.losses import LossInputs, kmeans, protoclip_loss
from clipforge.losses.protoclip import Prototypes, build_prototypes

F64 = torch.float64



def sqdist(a, b):
    return sum((float(a[k]) - float(b[k])) ** 2 for k in range(len(a)))


def naive_kmeans(points, k, iters, seed):
    n = len(points)
    start = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]  # the documented seeded start
    cents = [[float(v) for v in points[int(i)]] for i in start]
    for _ in range(iters + 1):
        labels = [min(range(k), key=lambda c: sqdist(points[j], cents[c])) for j in range(n)]
        if _ == iters:
            break
        for c in range(k):
            members = [j for j in range(n) if labels[j] == c]
            if members:
                cents[c] = [sum(float(points[j][q]) for j in members) / len(members) for q in range(len(points[0]))]
    return torch.tensor(cents, dtype=F64), torch.tensor(labels)


def test_kmeans_matches_naive_lloyd():
    pts = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    cents, labels = kmeans(pts, 3, iters=6, seed=4)
    ref_c, ref_l = naive_kmeans(pts, 3, 6, 4)
    assert torch.allclose(cents, ref_c) and torch.equal(labels, ref_l)
    with pytest.raises(ValueError, match="k <= number of points"):
        kmeans(pts, 13)


def naive_protoclip(x, y, mem_x, mem_y, tau, tau_t, pbt):
    """Loops over clusters and samples, straight from the ProtoCLIP description."""
    k = 3
    c_img, a_img = kmeans(mem_x, k, 20, 0)  # the clustering itself is checked in test_kmeans_matches_naive_lloyd
    c_txt, a_txt = kmeans(mem_y, k, 20, 1)
    total = 0.0
    for feats, teacher, student_mem, _teacher_mem, c_teacher, a_teacher in (
            (x, y, mem_x, mem_y, c_txt, a_txt), (y, x, mem_y, mem_x, c_img, a_img)):
        present = [c for c in range(k) if any(int(a_teacher[j]) == c for j in range(len(student_mem)))]
        if pbt:  # back translation: the mean student-modality feature of each teacher cluster's members
            protos = {c: sum(student_mem[j] for j in range(len(student_mem)) if int(a_teacher[j]) == c)
                      / sum(1 for j in range(len(student_mem)) if int(a_teacher[j]) == c) for c in present}
        else:
            protos = {c: c_teacher[c] for c in present}
        for i in range(len(feats)):
            label = min(present, key=lambda c: sqdist(teacher[i], c_teacher[c]))
            logits = {c: dot(feats[i], protos[c]) / tau for c in present}
            m = max(float(v.detach()) for v in logits.values())
            log_z = m + torch.log(sum(torch.exp(v - m) for v in logits.values()))
            if tau_t <= 0:
                target = {c: float(c == label) for c in present}
            else:
                s = {c: float(dot(c_teacher[label], c_teacher[c])) / tau_t for c in present}
                z = sum(math.exp(v) for v in s.values())
                target = {c: math.exp(v) / z for c, v in s.items()}
            total = total - sum(target[c] * (logits[c] - log_z) for c in present)
    return total / (2 * len(x))


@pytest.mark.parametrize("tau_t,pbt", [(0.0, True), (0.5, True), (0.0, False)])
def test_matches_naive(tau_t, pbt):
    mem_x, mem_y = unit(10, 3, 0), unit(10, 3, 1)
    x, y = unit(5, 3, 2), unit(5, 3, 3)
    protos = build_prototypes(mem_x, mem_y, 3, 20, seed=0)
    fast = protoclip_loss(x, y, protos, 0.3, tau_t, pbt)
    assert torch.allclose(fast, naive_protoclip(x, y, mem_x, mem_y, 0.3, tau_t, pbt))


def test_gradcheck():
    protos = build_prototypes(unit(10, 3, 0), unit(10, 3, 1), 3, 20, seed=0)
    x, y = unit(4, 3, 4).requires_grad_(), unit(4, 3, 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: protoclip_loss(a, b, protos, 0.5, 0.7), (x, y))


def test_properties():
    mem_x, mem_y = unit(10, 3, 0), unit(10, 3, 1)
    x, y = unit(6, 3, 6), unit(6, 3, 7)
    protos = build_prototypes(mem_x, mem_y, 3, 20, seed=0)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.allclose(protoclip_loss(x[perm], y[perm], protos), protoclip_loss(x, y, protos))
    # one prototype: nothing to discriminate, the loss is exactly 0
    assert protoclip_loss(x, y, build_prototypes(mem_x, mem_y, 1, 5)).abs() < 1e-12
    # PBT's point: shifting the whole text space (a modality gap) leaves the text clusters and the
    # image-space prototypes that the image side is trained against unchanged
    gap = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    shifted = build_prototypes(mem_x, mem_y + gap, 3, 20, seed=0)
    assert torch.allclose(shifted.image_from_text, protos.image_from_text)
    assert torch.allclose(shifted.text_centroids, protos.text_centroids + gap)


def inputs(x, y):
    return LossInputs(x, y, torch.tensor(1.0, dtype=F64))


def test_module_episodes_checkpoint_and_warmup():
    term = losses.build("protoclip", num_prototypes=2, memory_size=8, temperature=0.5)
    out = term(inputs(unit(4, 3, 8), unit(4, 3, 9)))
    assert out["ready"] == 1 and torch.isfinite(out["loss"])  # clustered as soon as K samples were seen
    first = term.image_centroids.clone()
    assert term.counters.tolist() == [4, 4, 0, 1]  # filled, write position, since clustering, clusterings
    term(inputs(unit(4, 3, 10), unit(4, 3, 11)))
    term(inputs(unit(4, 3, 12), unit(4, 3, 13)))  # 8 new samples since the first clustering: a new episode
    assert term.counters.tolist() == [8, 4, 0, 2] and not torch.allclose(term.image_centroids, first)
    # prototypes are buffers: a fresh term restored from the state dict gives the same loss
    fresh = losses.build("protoclip", num_prototypes=2, memory_size=8, temperature=0.5)
    fresh.load_state_dict(term.state_dict())
    fresh.eval(), term.eval()
    x, y = unit(3, 3, 14), unit(3, 3, 15)
    assert torch.allclose(fresh(inputs(x, y))["loss"], term(inputs(x, y))["loss"])
    assert fresh.counters.tolist() == [8, 4, 0, 2]  # eval mode: no memory update
    # warm-up: fewer than K samples seen -> zero loss, zero gradient, ready = 0
    warm = losses.build("protoclip", num_prototypes=6, memory_size=8)
    a = unit(4, 3, 16).requires_grad_()
    out = warm(inputs(a, unit(4, 3, 17)))
    out["loss"].backward()
    assert out["ready"] == 0 and out["loss"] == 0 and torch.equal(a.grad, torch.zeros_like(a))


def test_registry_and_bad_input():
    term = losses.build("protoclip", num_prototypes=3, memory_size=16, image_key="proto_image")
    x, y = unit(6, 3, 18), unit(6, 3, 19)
    with pytest.raises(KeyError, match="proto_image"):
        term(inputs(x, y))
    li = LossInputs(x, y, torch.tensor(1.0, dtype=F64), extra={"proto_image": unit(6, 3, 20)})
    assert torch.isfinite(term(li)["loss"])
    with pytest.raises(ValueError, match="memory_size"):
        losses.build("protoclip", num_prototypes=10, memory_size=4)
    with pytest.raises(TypeError):
        losses.build("protoclip", num_protos=3)
    assert isinstance(Prototypes(*build_prototypes(x, y, 2)).text_present, torch.Tensor)
