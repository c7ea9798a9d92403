"""Caption metrics against naive implementations and hand-computed cases written here."""
import math

import pytest
import torch

from clipforge.captioning import bleu, cider_d, clip_s, ref_clip_s


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_clip_s_and_ref_clip_s_match_naive_loops():
    g = torch.Generator().manual_seed(0)
    c, v = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    refs = [torch.randn(int(k), 5, generator=g) for k in (1, 2, 3, 1, 4, 2)]
    got_s, got_ref = clip_s(c, v), ref_clip_s(c, v, refs)
    for i in range(6):
        ci, vi = c[i].tolist(), v[i].tolist()
        s = 2.5 * max(_cos(ci, vi), 0.0)
        r = max(max(_cos(ci, row.tolist()) for row in refs[i]), 0.0)
        h = 2 * s * r / (s + r) if s + r > 0 else 0.0
        assert got_s[i].item() == pytest.approx(s, abs=1e-5)
        assert got_ref[i].item() == pytest.approx(h, abs=1e-5)


def test_clip_s_hand_case_and_clamp():
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    v = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [3.0, 4.0]])
    assert clip_s(c, v).tolist() == pytest.approx([2.5 / math.sqrt(2), 0.0, 2.5])
    # negative cosine everywhere: both parts 0, harmonic mean 0 (not NaN)
    assert ref_clip_s(c[1:2], v[1:2], [torch.tensor([[-1.0, 0.0]])]).tolist() == [0.0]
    with pytest.raises(ValueError, match="no reference captions"):
        ref_clip_s(c[:1], v[:1], [torch.zeros(0, 2)])


def test_bleu_hand_computed():
    # candidate "the cat sat on the mat" vs reference "the cat is on the mat":
    # p1 = 5/6, p2 = 3/5 (the cat, on the, the mat), p3 = 1/4 (on the mat), p4 = 0 -> BLEU-4 = 0
    assert bleu(["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0
    # BLEU-2 of the same: sqrt(5/6 * 3/5), equal lengths so BP = 1
    assert bleu(["the cat sat on the mat"], [["the cat is on the mat"]], max_n=2) == pytest.approx(math.sqrt(0.5))
    # clipping: "the the the" vs "the cat": p1 = 1/3; c = 3 > r = 2, BP = 1
    assert bleu(["the the the"], [["the cat"]], max_n=1) == pytest.approx(1 / 3)
    # brevity penalty with the closest reference length (2 words vs references of 3 and 6): exp(1 - 3/2)
    assert bleu(["a b"], [["a b c", "a b c d e f"]], max_n=1) == pytest.approx(math.exp(1 - 1.5))
    # identical captions score 1; punctuation and case are ignored
    assert bleu(["A red circle."], [["a red circle"]], max_n=3) == pytest.approx(1.0)


def _cider_naive(cands, refs, n_max=4, sigma=6.0):
    """CIDEr-D written out from Vedantam et al. Eq. (2)-(5) with the D changes (clipping, length penalty)."""
    toks = lambda s: s.lower().replace(".", "").split()
    grams = lambda t, n: [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
    N = len(refs)
    out = []
    for cand, rs in zip(cands, refs):
        c = toks(cand)
        total = 0.0
        for n in range(1, n_max + 1):
            def g(t):
                vec = {}
                for k in set(grams(t, n)):
                    df = sum(1 for rs2 in refs if any(k in grams(toks(r), n) for r in rs2))
                    vec[k] = grams(t, n).count(k) * math.log(N / max(1, df))
                return vec
            gc = g(c)
            for r in rs:
                gr = g(toks(r))
                num = sum(min(gc[k], gr.get(k, 0.0)) * gr.get(k, 0.0) for k in gc)
                nc, nr = math.sqrt(sum(x * x for x in gc.values())), math.sqrt(sum(x * x for x in gr.values()))
                sim = num / (nc * nr) if nc and nr else num
                total += sim * math.exp(-((len(c) - len(toks(r))) ** 2) / (2 * sigma**2)) / len(rs)
        out.append(10 * total / n_max)
    return out


def test_cider_d_matches_naive_equation():
    cands = ["a red circle.", "two blue squares.", "a green star above a red circle.", "a red circle"]
    refs = [["a red circle.", "a picture of a red circle."], ["two blue squares.", "there are two blue squares."],
            ["a green star above a red circle.", "a red circle below a green star."], ["three yellow stars."]]
    corpus, per = cider_d(cands, refs)
    want = _cider_naive(cands, refs)
    assert per == pytest.approx(want, rel=1e-9)
    assert corpus == pytest.approx(sum(want) / 4)
    assert per[3] == 0.0 and per[0] > 0


def test_cider_d_hand_case():
    # two images, one reference each, candidates equal to their references: every n-gram of image 1's
    # reference appears only in image 1 (df = 1), idf = log 2, so vectors are identical -> sim_n = 1 for n = 1..3
    # ("a b c" has no 4-gram: sim_4 = 0) -> CIDEr-D = 10 * (1 + 1 + 1 + 0) / 4 = 7.5
    _, per = cider_d(["a b c", "d e f"], [["a b c"], ["d e f"]])
    assert per == pytest.approx([7.5, 7.5])
    with pytest.raises(ValueError, match="one non-empty set"):
        cider_d(["a"], [])


def test_repetition_hand_cases():
    from clipforge.captioning import is_repetitive, repetition_rate

    assert not is_repetitive("a red circle to the left of a blue square.")  # "a" twice, not back to back
    assert not is_repetitive("an orange hexagon left of an orange circle.")  # a bigram twice, not back to back
    assert is_repetitive("a red red circle.")  # a word repeated back to back
    assert is_repetitive("Red circle, red circle.")  # a 2-word span back to back (case and punctuation ignored)
    assert not is_repetitive("a yellow star, a yellow star")  # 3-word spans are not counted
    assert not is_repetitive("circle")
    assert repetition_rate(["two blue squares.", "blue blue", "a b a b", "a b c"]) == 0.5
    with pytest.raises(ValueError, match="at least one caption"):
        repetition_rate([])


def test_shapes_ground_truth_captions_are_not_repetitive():
    from clipforge.captioning import repetition_rate
    from clipforge.data import build_dataset

    ds = build_dataset("shapes", split="val", size=200, seed=12345, image_size=32)
    assert repetition_rate([c for i in range(200) for c in ds.generator.sample(i).captions]) == 0.0
