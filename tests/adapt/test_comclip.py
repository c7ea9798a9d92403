"""ComCLIP (Jiang et al., 2023): the rule parser on hand cases, the component detector on rendered
scenes with known boxes, the score combination against a hand computation, and the adapt entry."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.adapt.comclip import ComCLIP, ComCLIPConfig, Triplet, combine, component_boxes, parse_caption
from clipforge.data.shapes import ShapeObject, ShapesGenerator, object_box, render


@pytest.mark.parametrize("caption,want", [
    ("a red circle left of a blue square.", Triplet("a red circle", "left of", "a blue square")),
    ("a green star below a purple hexagon.", Triplet("a green star", "below", "a purple hexagon")),
    ("A man is riding a horse", Triplet("a man", "riding", "a horse")),
    ("the cat sits on the mat.", Triplet("the cat", "sits on", "the mat")),
    ("a dog in front of the house", Triplet("a dog", "in front of", "the house")),
    ("three red circles.", Triplet("three red circles")),
    ("a small yellow star.", Triplet("a small yellow star")),
])
def test_parser_hand_cases(caption, want):
    assert parse_caption(caption) == want


def test_parser_components_and_bad_input():
    assert [k for k, _ in parse_caption("a red circle above a blue star").components()] == ["subject", "object",
                                                                                            "predicate"]
    assert parse_caption("a red circle").components() == [("subject", "a red circle")]
    with pytest.raises(ValueError, match="non-empty caption"):
        parse_caption("  ")


def test_component_detector_finds_the_known_boxes():
    objects = [ShapeObject("circle", "red", "small", 0.25, 0.3), ShapeObject("square", "blue", "large", 0.7, 0.65),
               ShapeObject("star", "yellow", "small", 0.2, 0.8)]
    image = render(objects, 64, (20, 10, 30))
    found = component_boxes(image)
    assert len(found) == 3
    for obj in objects:
        want = np.array(object_box(obj))
        err = np.abs(found - want).max(axis=1).min()  # the nearest detected box
        assert err * 64 <= 1.5, (obj, found, want)
    assert len(component_boxes(np.full((16, 16, 3), 7, np.uint8))) == 0
    with pytest.raises(ValueError, match="RGB image"):
        component_boxes(np.zeros((4, 4)))


def test_combine_against_a_hand_computation():
    v, t = torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8])
    subs = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    words = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # softmax over cosines (1, 1/sqrt2); v' = v + w1 subs1 + w2 subs2; score = cos(v', t)
    c = np.array([1.0, 1 / np.sqrt(2)])
    w = np.exp(c) / np.exp(c).sum()
    vp = np.array([1.0, 0.0]) + w[0] * np.array([0.0, 2.0]) + w[1] * np.array([1.0, 1.0])
    want = vp @ np.array([0.6, 0.8]) / np.linalg.norm(vp)
    assert abs(float(combine(v, t, subs, words, "softmax")) - want) < 1e-6
    # the released code's normalization: raw dot products over their sum: 2 and 1 -> 2/3, 1/3
    vp = np.array([1.0, 0.0]) + 2 / 3 * np.array([0.0, 2.0]) + 1 / 3 * np.array([1.0, 1.0])
    assert abs(float(combine(v, t, subs, words, "sum")) - vp @ np.array([0.6, 0.8]) / np.linalg.norm(vp)) < 1e-6
    assert abs(float(combine(v, t, subs[:0], words[:0])) - 0.6) < 1e-6  # no component: plain cosine
    with pytest.raises(ValueError, match="weighting"):
        ComCLIPConfig(weighting="max")


def test_comclip_scores_follow_the_combination(small_model, tokenizer):
    """ComCLIP.scores equals combine() over the embeddings computed here by hand (masked sub-images of the
    matched boxes), and the plain scores are the cosine of the whole image with each caption."""
    from clipforge.transforms import normalize_batch

    s = ShapesGenerator("relations", seed=0, image_size=32).sample(1)
    image = torch.from_numpy(s.image).permute(2, 0, 1).contiguous()
    com = ComCLIP(small_model, tokenizer)
    texts = [s.captions[0], *s.negatives["swap"]]
    got, plain = com.scores(image, texts, s.boxes)
    enc_i = lambda x: small_model.encode_image(normalize_batch(x), normalize=False)  # noqa: E731
    enc_t = lambda x: small_model.encode_text(tokenizer(x), normalize=False)  # noqa: E731
    with torch.no_grad():
        v, t = enc_i(image[None])[0], enc_t(texts)
        masks = []
        for x0, y0, x1, y1 in s.boxes:
            m = torch.zeros(32, 32, dtype=torch.bool)
            m[int(np.floor(y0 * 32)):int(np.ceil(y1 * 32)), int(np.floor(x0 * 32)):int(np.ceil(x1 * 32))] = True
            masks.append(m)
        boxes_emb = enc_i(torch.stack([image * m for m in masks]))
        for c, text in enumerate(texts):
            tri = parse_caption(text)
            words = enc_t([tri.subject, tri.object, tri.predicate])
            si = int(F.cosine_similarity(words[0][None], boxes_emb).argmax())
            oi = int(F.cosine_similarity(words[1][None], boxes_emb).argmax())
            pred = enc_i((image * (masks[si] | masks[oi]))[None])[0]
            want = combine(v, t[c], torch.stack([boxes_emb[si], boxes_emb[oi], pred]), words)
            assert abs(float(got[c]) - float(want)) < 1e-5
        assert torch.allclose(plain, F.cosine_similarity(v[None], t), atol=1e-5)
    with pytest.raises(ValueError, match="uint8 image tensor"):
        com.scores(image.float(), texts)
    with pytest.raises(ValueError, match="outside the image"):
        com.scores(image, texts, [[0.0, 0.0, 1.5, 1.0]])


def test_clipforge_adapt_method_comclip(small_model, tmp_path, capsys):
    from clipforge.cli.main import main
    from clipforge.models import save_model

    save_model(small_model, tmp_path / "m")
    assert main(["adapt", str(tmp_path / "m"), "--method", "comclip", "--comclip-size", "6", "--size", "40",
                 "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    com = res["compositional"]["comclip"]
    assert com["n"] == 6 and res["shots"] == {}
    for key in ("clip_relation", "comclip_relation", "comclip_detected_relation", "clip_swap", "comclip_swap"):
        assert 0.0 <= com[key] <= 1.0 and (com[key] * 6) % 1 < 1e-9, key  # a fraction of 6 scenes
