import pytest
import torch
import torch.nn.functional as F

from clipforge.evaluation import classification_metrics, retrieval_metrics, zero_shot_classifier


def test_classification_metrics_match_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g)
    labels = torch.randint(0, 7, (200,), generator=g)
    labels[:3] = 6  # make sure every class is present
    r = classification_metrics(logits, labels, 7, topk=(1, 3, 5))
    assert r["top1"] == pytest.approx(sk.accuracy_score(labels, logits.argmax(1)))
    for k in (3, 5):
        assert r[f"top{k}"] == pytest.approx(sk.top_k_accuracy_score(labels, logits.numpy(), k=k, labels=range(7)))
    assert r["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(labels, logits.argmax(1)))
    assert r["confusion_matrix"] == sk.confusion_matrix(labels, logits.argmax(1), labels=range(7)).tolist()
    assert r["chance_top1"] == pytest.approx(1 / 7)
    # the majority baseline: sklearn's most-frequent dummy classifier
    from sklearn.dummy import DummyClassifier

    dummy = DummyClassifier(strategy="most_frequent").fit(logits.numpy(), labels.numpy())
    assert r["majority_top1"] == pytest.approx(dummy.score(logits.numpy(), labels.numpy()))


def test_classification_topk_larger_than_classes_and_missing_class():
    logits = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    r = classification_metrics(logits, torch.tensor([0, 0]), 2)
    assert r["top1"] == 0.5 and r["top5"] == 1.0
    assert r["per_class_accuracy"] == [0.5, None]  # class 1 has no samples: undefined, not 0
    assert r["balanced_accuracy"] == 0.5


def test_retrieval_hand_computed_with_several_captions():
    # 3 images, 5 captions: image 0 owns captions 0,1; image 1 owns 2; image 2 owns 3,4.
    img = torch.eye(3)
    txt = torch.tensor([[0.1, 1.0, 0.0],   # c0 (img0) looks like img1
                        [0.9, 0.2, 0.0],   # c1 (img0) correct
                        [0.0, 0.0, 1.0],   # c2 (img1) looks like img2
                        [0.0, 0.1, 0.9],   # c3 (img2) correct
                        [0.3, 0.0, 0.0]])  # c4 (img2) looks like img0
    owner = torch.tensor([0, 0, 1, 2, 2])
    r = retrieval_metrics(img, txt, owner, ks=(1, 2))
    # image->text after normalization: img0 ranks c4 (1.0), c1 (0.976), ...
    # img0 sims: c0 .0995, c1 .976, c2 0, c3 0, c4 1.0 -> own best rank index 1 -> R@1 miss, R@2 hit
    # img1 sims: c0 .995, c1 .217, c2 0, c3 .110, c4 0 -> own (c2) at index 3 (tie with c4 at 0 after c3) -> miss
    # img2 sims: c2 1.0, c3 .994 -> own best index 1 -> R@2 hit
    assert r["i2t_R@1"] == pytest.approx(0.0)
    assert r["i2t_R@2"] == pytest.approx(2 / 3)
    # text->image: c0->img1 (miss), c1->img0 hit, c2->img2 miss, c3->img2 hit, c4->img0 miss
    assert r["t2i_R@1"] == pytest.approx(2 / 5)
    assert r["t2i_R@1_chance"] == pytest.approx(1 / 3)


def test_retrieval_perfect_and_random():
    x = F.normalize(torch.randn(50, 16), dim=-1)
    owner = torch.arange(50).repeat_interleave(2)
    r = retrieval_metrics(x, x.repeat_interleave(2, dim=0), owner)
    assert r["i2t_R@1"] == 1.0 and r["t2i_R@1"] == 1.0 and r["t2i_median_rank"] == 1.0
    rnd = retrieval_metrics(x, F.normalize(torch.randn(100, 16), dim=-1), owner, ks=(1, 10))
    assert rnd["t2i_R@10"] < 0.5


def test_zero_shot_classifier_averages_normalized_template_embeddings():
    class Fake:
        cfg = type("C", (), {"embed_dim": 4})
        training = False

        def eval(self):
            return self

        def train(self, mode=True):
            return self

        def encode_text(self, ids):
            return ids[:, :4].float() + 1.0

    tok = lambda texts: torch.tensor([[len(t), len(t) % 3, 1, 2] for t in texts])
    clf = zero_shot_classifier(Fake(), ["ab", "abcd"], ["{}", "x {}"], tok)
    manual = []
    for c in ["ab", "abcd"]:
        e = F.normalize(torch.stack([Fake().encode_text(tok([t.format(c)]))[0] for t in ["{}", "x {}"]]), dim=-1)
        manual.append(F.normalize(e.mean(0), dim=-1))
    assert torch.allclose(clf, torch.stack(manual), atol=1e-6)
