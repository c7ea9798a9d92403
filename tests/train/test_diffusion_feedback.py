"""DIVA and un^2CLIP (clipforge.train.diffusion_feedback): only the image tower (and DIVA's projection) learns, the
conditions are what each paper feeds its frozen generator, and the commands reject bad input with one line."""
from __future__ import annotations

import pytest
import torch

from clipforge.cli.main import main
from clipforge.errors import ConfigError
from clipforge.models.diffusion import ConditionalUNet, DiffusionConfig, save_diffusion
from clipforge.train.diffusion_feedback import (
    DiffusionTrainConfig,
    FeedbackCondition,
    FeedbackConfig,
    diffusion_feedback,
    train_diffusion,
)

SMALL = {"embed_dim": 16, "vision": {"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "heads": 2},
         "text": {"context_length": 16, "width": 16, "layers": 1, "heads": 2}}


def _clip():
    import clipforge

    torch.manual_seed(0)
    return clipforge.create_model("tiny", **SMALL)


def _generator(condition: str, cond_dim: int = 16) -> ConditionalUNet:
    torch.manual_seed(1)
    return ConditionalUNet(DiffusionConfig(image_size=16, cond_dim=cond_dim, channels=8, timesteps=20,
                                           condition=condition))


@pytest.mark.parametrize("method, condition", [("un2clip", "image"), ("diva", "text")])
def test_gradient_reaches_only_the_image_tower(method, condition):
    clip, gen = _clip(), _generator(condition)
    before = {n: p.detach().clone() for n, p in clip.named_parameters()}
    gen_before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    seen = []

    def on_step(step, loss):  # called after backward and the optimizer step, before the next zero_grad
        seen.append({n for n, p in clip.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0})
        assert all(p.grad is None for p in gen.parameters())

    cfg = FeedbackConfig(method=method, steps=2, batch_size=4, lr=1e-3, train_size=8)
    diffusion_feedback(clip, gen, cfg, on_step)
    visual = {n for n, _ in clip.named_parameters() if n.startswith("visual.")}
    assert seen[0] and seen[0] <= visual and len(seen[0]) > len(visual) // 2
    for n, p in clip.named_parameters():
        assert n in visual or torch.equal(p, before[n]), n  # text tower, logit scale: untouched
        assert p.requires_grad  # the flags are restored
    assert all(not torch.equal(p, before[n]) for n, p in clip.named_parameters() if n in seen[0])
    assert all(torch.equal(p, gen_before[n]) for n, p in gen.named_parameters())


def test_conditions_are_the_papers():
    gen = _generator("text")
    with torch.no_grad():
        gen.null_condition.copy_(torch.randn(16))
    f = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    un2 = FeedbackCondition("un2clip", 16, gen)
    assert un2.projection is None and torch.equal(un2(f), f)  # unCLIP's condition is the image embedding itself
    diva = FeedbackCondition("diva", 16, gen)
    want = gen.null_condition + f @ diva.projection.weight.t() + diva.projection.bias  # c_null + W f + b
    assert torch.allclose(diva(f), want, atol=1e-6)


def test_un2clip_needs_an_image_conditioned_generator_of_the_clips_width():
    with pytest.raises(ConfigError, match="--condition image"):
        diffusion_feedback(_clip(), _generator("text"), FeedbackConfig(method="un2clip", steps=1, train_size=4))
    with pytest.raises(ConfigError, match="16 dimensions"):
        diffusion_feedback(_clip(), _generator("image", cond_dim=8), FeedbackConfig(method="un2clip", steps=1,
                                                                                    train_size=4))


def test_train_diffusion_lowers_its_loss_on_a_fixed_clip():
    clip = _clip().eval()
    cfg = DiffusionTrainConfig(steps=30, batch_size=16, lr=3e-3, train_size=32, image_size=16, channels=8,
                               timesteps=20, condition="image")
    gen, hist = train_diffusion(clip, cfg)
    assert hist["loss_last_10pct"] < 0.7 * hist["loss_first"]
    assert gen.cfg.cond_dim == 16 and not gen.training


# ------------------------------------------------------------------------------ the commands
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from clipforge.models import save_model

    return save_model(_clip(), tmp_path_factory.mktemp("m") / "clip")


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_commands_end_to_end(model_dir, tmp_path):
    import clipforge

    assert main(["train-diffusion", str(model_dir), "--out", str(tmp_path / "gen"), "--steps", "2", "--batch-size",
                 "4", "--train-size", "8", "--channels", "8", "--timesteps", "10", "--quiet"]) == 0
    assert main(["diffusion-feedback", str(model_dir), "--diffusion", str(tmp_path / "gen"), "--method", "un2clip",
                 "--out", str(tmp_path / "post"), "--steps", "2", "--batch-size", "4", "--train-size", "8",
                 "--lr", "1e-3", "--quiet"]) == 0
    a, b = clipforge.load(str(model_dir))[0], clipforge.load(str(tmp_path / "post"))[0]
    changed = {n for (n, p), q in zip(a.named_parameters(), b.parameters()) if not torch.equal(p, q)}
    assert changed and all(n.startswith("visual.") for n in changed)


@pytest.mark.parametrize("args, message", [
    (["--condition", "audio"], "--condition must be one of"),
    (["--steps", "0"], "steps must be positive"),
    (["--image-size", "30"], "multiple of 4"),
    (["--cond-drop", "1.5"], "--cond-drop must be in [0, 1)"),
])
def test_train_diffusion_bad_input(model_dir, tmp_path, capsys, args, message):
    assert message in _error(capsys, ["train-diffusion", str(model_dir), "--out", str(tmp_path / "g"), *args])


def test_diffusion_feedback_bad_input(model_dir, tmp_path, capsys):
    base = ["diffusion-feedback", str(model_dir), "--out", str(tmp_path / "o")]
    assert "--method must be one of" in _error(capsys, [*base, "--diffusion", str(tmp_path), "--method", "dreamsim"])
    assert "not a diffusion model directory" in _error(capsys, [*base, "--diffusion", str(tmp_path), "--method",
                                                                "diva"])
    save_diffusion(_generator("text"), tmp_path / "text-gen")
    assert "--condition image" in _error(capsys, [*base, "--diffusion", str(tmp_path / "text-gen"), "--method",
                                                  "un2clip"])
    assert "lr must be positive" in _error(capsys, [*base, "--diffusion", str(tmp_path / "text-gen"), "--method",
                                                    "diva", "--lr", "0"])
