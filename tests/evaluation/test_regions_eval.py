"""The regions evaluation (clipforge.evaluation.regions): crop-and-encode and the region head, against
per-region loops written here."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.data.shapes import COLORS, ShapesGenerator
from clipforge.evaluation.regions import crop_boxes, evaluate_regions, region_features
from clipforge.models import create_model
from clipforge.tokenizer import get_tokenizer
from clipforge.transforms import normalize_batch

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


def test_crop_boxes_hand_case():
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(3, 8, 8)
    crop = crop_boxes(image, np.array([[0.25, 0.5, 0.75, 1.0]]), 4)  # pixels x 2..6, y 4..8: already 4 x 4
    assert torch.equal(crop[0], image[:, 4:8, 2:6].float())


@pytest.mark.parametrize("head", [False, True])
def test_evaluate_regions_matches_a_naive_loop(head):
    model = create_model("tiny", seed=0, region_head=head, **SMALL).eval()
    tok = get_tokenizer(16)
    res = evaluate_regions(model, tok, size=6, seed=1)
    assert res["method"] == ("region_head" if head else "crop")
    gen = ShapesGenerator("val", seed=1, image_size=32)
    feats, colors = [], []
    with torch.no_grad():
        for i in range(6):
            s = gen.sample(i)
            image = torch.from_numpy(s.image).permute(2, 0, 1)
            for box, obj in zip(s.boxes, s.objects):
                if head:
                    f = model.encode_regions(normalize_batch(image[None]), torch.tensor(box)[None, None])[0, 0]
                else:
                    f = model.encode_image(normalize_batch(crop_boxes(image, box[None], 32).round().to(torch.uint8)))[0]
                feats.append(F.normalize(f, dim=-1))
                colors.append(list(COLORS).index(obj.color))
        cls = []
        for c in COLORS:
            prompts = [t.format(c) for t in ["a {} shape.", "something {}.", "a {} object."]]
            e = F.normalize(model.encode_text(tok(prompts)), dim=-1)
            cls.append(F.normalize(e.mean(0), dim=-1))
        pred = (torch.stack(feats) @ torch.stack(cls).t()).argmax(1)
    assert res["n_regions"] == len(feats)
    assert abs(res["color_top1"] - float((pred == torch.tensor(colors)).float().mean())) < 1e-6
    for key in ("shape_top1", "object_top1", "r2t_R@1", "t2r_R@1"):
        assert 0.0 <= res[key] <= 1.0
    if not head:
        with pytest.raises(ValueError, match="needs a model with a region head"):
            region_features(model, torch.zeros(3, 32, 32, dtype=torch.uint8), np.array([[0, 0, 1, 1.0]]), "region_head")


def test_suite_task_regions_reports_crop_and_region_head():
    from clipforge.evaluation.suite import run_suite

    tok = get_tokenizer(16)
    plain = create_model("tiny", seed=0, **SMALL)
    res = run_suite(plain, tok, tasks=["regions"], size=4, cache_dir=None, progress=False).results["regions"]
    assert res["crop"]["method"] == "crop" and "no region head" in res["region_head"]
    head = create_model("tiny", seed=0, region_head=True, **SMALL)
    res = run_suite(head, tok, tasks=["regions"], size=4, cache_dir=None, progress=False).results["regions"]
    assert res["region_head"] == evaluate_regions(head, tok, size=4, seed=12345, method="region_head")
