"""GRAIN's test-time description scoring (evaluation/descriptions.py) against naive references written here: the
max-over-descriptions, mean-over-regions score with loops, the combined class scores per image from the model's own
calls, and the region tokens read back from a training checkpoint."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from clipforge.evaluation.descriptions import (
    description_scores,
    evaluate_grain_shapes,
    grain_class_scores,
    grain_scores,
    grain_zero_shot,
    load_region_tokens,
)
from clipforge.losses.grain import RegionTokens


def test_description_scores_are_the_mean_over_regions_of_the_best_description():
    g = torch.Generator().manual_seed(0)
    regions = F.normalize(torch.randn(3, 4, 5, generator=g, dtype=torch.float64), dim=-1)
    descriptions = [F.normalize(torch.randn(n, 5, generator=g, dtype=torch.float64), dim=-1) for n in (1, 3, 2)]
    got = description_scores(regions, descriptions)
    for i in range(3):
        for c, u in enumerate(descriptions):
            best = [max(float(regions[i, q] @ u[k]) for k in range(u.shape[0])) for q in range(4)]
            assert math.isclose(float(got[i, c]), sum(best) / 4, abs_tol=1e-12)
    glob = torch.randn(3, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(grain_scores(glob, got, 0.3), 0.3 * glob + 0.7 * got)
    with pytest.raises(ValueError, match="alpha"):
        grain_scores(glob, got, 1.5)
    with pytest.raises(ValueError, match="at least one description"):
        description_scores(regions, [descriptions[0], descriptions[0][:0]])


def _model():
    import clipforge

    torch.manual_seed(0)
    model = clipforge.create_model("tiny", embed_dim=16, vision={"image_size": 32, "patch_size": 8, "width": 16,
                                   "layers": 1, "heads": 2},
                                   text={"context_length": 16, "width": 16, "layers": 1, "heads": 2}).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # spread the embeddings out (at init every image lands on one class)
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def test_grain_class_scores_match_a_per_image_reference():
    from clipforge.data import build_dataset
    from clipforge.data.shapes import class_descriptions
    from clipforge.tokenizer import get_tokenizer
    from clipforge.transforms import normalize_batch

    model, tok = _model(), get_tokenizer(16)
    tokens = RegionTokens(16, 3, 2, seed=4).eval()
    ds = build_dataset("shapes", split="compositional", size=6, seed=5, image_size=32)
    images, labels = [ds[i]["image"] for i in range(6)], torch.tensor([ds[i]["labels"]["object"] for i in range(6)])
    classes = ["red triangle", "green star", "blue circle", "red circle"]
    templates = ["a {}.", "a picture of a {}."]
    descriptions = [class_descriptions("object")[k] for k in (2, 8, 10, 0)]  # those classes' descriptions
    assert descriptions[3] == ["a small red circle.", "a large red circle."]
    score, glob, desc = grain_class_scores(model, tokens, images, classes, templates, descriptions, tok, alpha=0.4)
    with torch.no_grad():
        for i, image in enumerate(images):
            pixels = normalize_batch(image[None])
            x = model.encode_image(pixels)[0]
            regions = tokens(model.encode_image_tokens(pixels)[1])[0][0]  # [Q, d]
            for c, name in enumerate(classes):
                w = F.normalize(torch.stack([model.encode_text(tok([t.format(name)]))[0] for t in templates]).mean(0),
                                dim=0)
                u = [model.encode_text(tok([d]))[0] for d in descriptions[c]]
                d_c = sum(max(float(regions[q] @ v) for v in u) for q in range(3)) / 3
                assert math.isclose(float(glob[i, c]), float(x @ w), abs_tol=1e-5)
                assert math.isclose(float(desc[i, c]), d_c, abs_tol=1e-5)
                assert math.isclose(float(score[i, c]), 0.4 * float(x @ w) + 0.6 * d_c, abs_tol=1e-5)
    assert desc.std() > 1e-3 and glob.std() > 1e-3  # the references compare numbers that differ
    labels = torch.tensor([[2, 8, 10, 0].index(int(y)) if int(y) in (2, 8, 10, 0) else 0 for y in labels])
    got = grain_zero_shot(model, tokens, images, labels, classes, templates, descriptions, tok, alpha=0.4)
    assert got["top1"] == pytest.approx(float((score.argmax(1) == labels).float().mean()))
    assert got["global_top1"] == pytest.approx(float((glob.argmax(1) == labels).float().mean()))
    assert got["description_top1"] == pytest.approx(float((desc.argmax(1) == labels).float().mean()))
    with pytest.raises(ValueError, match="one list per class"):
        grain_class_scores(model, tokens, images, classes, templates, descriptions[:2], tok)
    with pytest.raises(ValueError, match="same training run"):
        grain_class_scores(model, RegionTokens(8, 3, 2, seed=0), images, classes, templates, descriptions, tok)


def test_region_tokens_come_back_from_a_training_checkpoint_and_score_the_shapes_views(tmp_path):
    import yaml

    from clipforge.cli.main import main
    from clipforge.models.io import load_model
    from clipforge.tokenizer import get_tokenizer

    small = ["model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
             "text: {context_length: 32, width: 32, layers: 1, heads: 2}}", "data.train_size=32", "data.eval_size=8",
             "batch_size=8", "steps=2", "warmup_steps=1", "progress=false", "precision=fp32"]
    run = tmp_path / "run"
    assert main(["train", f"out_dir={run}", "loss={clip: 1, grain: {weight: 1, embed_dim: 32, queries: 5}}",
                 *small]) == 0
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    tokens = load_region_tokens(ckpt)
    state = torch.load(ckpt / "state.pt", weights_only=True)["loss_terms"]
    assert tokens.queries.shape == (5, 32) and torch.equal(tokens.queries, state["terms.grain.tokens.queries"])
    model = load_model(ckpt)
    res = evaluate_grain_shapes(model, tokens, get_tokenizer(32), size=20, alpha=0.5)
    assert set(res) == {"object", "shape", "color"}
    for r in res.values():
        assert all(0.0 <= r[k] <= 1.0 for k in ("top1", "global_top1", "description_top1"))
    # clipforge eval RUN --grain-alpha: the same numbers under grain_descriptions (the run's newest checkpoint)
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--grain-alpha", "0.5", "--size", "20", "--tasks", "zero_shot", "--no-report",
                 "--no-cache", "--quiet", "--out", str(out)]) == 0
    written = json.loads((out / "results.json").read_text())["grain_descriptions"]
    for view in res:
        assert written[view]["top1"] == pytest.approx(res[view]["top1"])
        assert written[view]["global_top1"] == pytest.approx(res[view]["global_top1"])
    assert main(["eval", str(run), "--grain-alpha", "1.5", "--size", "20", "--no-report", "--quiet"]) == 2
    # a run without grain, and a directory that is no checkpoint: one clear error each
    other = tmp_path / "clip_only"
    other.mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump({"loss": {"clip": 1.0}}))
    torch.save({"step": 1}, other / "state.pt")
    with pytest.raises(ValueError, match="did not train the grain term"):
        load_region_tokens(other)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_region_tokens(tmp_path)
    assert main(["eval", str(other), "--grain-alpha", "0.5", "--size", "20", "--no-report", "--quiet"]) == 2
