"""The DDPM pieces of clipforge.models.diffusion against a naive implementation written from Ho et al. (2020):
the linear schedule, the forward process q(x_t | x_0) (Eq. 4) and L_simple (Eq. 14)."""
from __future__ import annotations

import math

import pytest
import torch

from clipforge.errors import ConfigError
from clipforge.models.diffusion import (
    ConditionalUNet,
    DiffusionConfig,
    ddpm_loss,
    linear_betas,
    load_diffusion,
    q_sample,
    save_diffusion,
)


def _naive_alpha_bar(t: int, T: int, b0: float, b1: float) -> float:
    """prod_{s=0..t} (1 - beta_s) with beta_s = b0 + (b1 - b0) s / (T - 1), one factor at a time."""
    prod = 1.0
    for s in range(t + 1):
        prod *= 1 - (b0 + (b1 - b0) * s / (T - 1))
    return prod


def _model(**kw) -> ConditionalUNet:
    torch.manual_seed(0)
    return ConditionalUNet(DiffusionConfig(image_size=16, cond_dim=8, channels=8, timesteps=50, **kw)).eval()


def test_schedule_and_forward_process_match_the_equations():
    T, b0, b1 = 50, 1e-4, 0.02
    betas = linear_betas(T, b0, b1)
    assert betas[0] == pytest.approx(b0) and betas[-1] == pytest.approx(b1)
    model = _model()
    for t in (0, 1, 17, 49):
        assert float(model.alphas_cumprod[t]) == pytest.approx(_naive_alpha_bar(t, T, b0, b1), rel=1e-9)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1, torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0, 25, 49])
    got = q_sample(x0, t, noise, model.alphas_cumprod)
    for i in range(3):
        a = _naive_alpha_bar(int(t[i]), T, b0, b1)
        want = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]
        assert torch.allclose(got[i], want, atol=1e-6)
    # the first step is almost the image; later steps hold more of the noise
    assert torch.corrcoef(torch.stack([got[0].flatten(), x0[0].flatten()]))[0, 1] > 0.99
    corr = [float(torch.corrcoef(torch.stack([got[i].flatten(), noise[i].flatten()]))[0, 1]) for i in range(3)]
    assert corr[0] < corr[1] < corr[2]


def test_loss_is_the_mean_squared_noise_error():
    model = _model()
    g = torch.Generator().manual_seed(2)
    x0, noise, cond = torch.rand(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 8)
    t = torch.tensor([3, 10, 30, 49])
    with torch.no_grad():
        got = float(ddpm_loss(model, x0, cond, t, noise))
        total = 0.0
        for i in range(4):  # one sample at a time, the network called on the naive x_t
            a = _naive_alpha_bar(int(t[i]), 50, 1e-4, 0.02)
            xt = math.sqrt(a) * x0[i:i + 1] + math.sqrt(1 - a) * noise[i:i + 1]
            total += float(((noise[i:i + 1] - model(xt, t[i:i + 1], cond[i:i + 1])) ** 2).sum())
    assert got == pytest.approx(total / noise.numel(), rel=1e-5)


def test_condition_changes_the_prediction_and_a_wrong_width_is_an_error():
    model = _model()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 5])
    with torch.no_grad():
        a, b = model(x, t, torch.zeros(2, 8)), model(x, t, torch.ones(2, 8))
    assert a.shape == x.shape and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="trained on 8"):
        model(x, t, torch.zeros(2, 5))


def test_sampling_and_save_load_round_trip(tmp_path):
    model = _model()
    out = model.sample(torch.zeros(2, 8), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    save_diffusion(model, tmp_path / "d", {"clip": "x"})
    again, meta = load_diffusion(tmp_path / "d")
    assert meta == {"clip": "x"} and again.cfg == model.cfg
    x, t, c = torch.randn(1, 3, 16, 16), torch.tensor([7]), torch.randn(1, 8)
    with torch.no_grad():
        assert torch.equal(model(x, t, c), again(x, t, c))


@pytest.mark.parametrize("kw, message", [
    ({"image_size": 30}, "multiple of 4"),
    ({"timesteps": 1}, "at least 2"),
    ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start < beta_end"),
    ({"condition": "audio"}, "'image' or 'text'"),
])
def test_bad_config_is_a_clear_error(kw, message):
    with pytest.raises(ConfigError, match=message):
        DiffusionConfig(**kw).validate()


def test_loading_a_directory_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="clipforge train-diffusion"):
        load_diffusion(tmp_path)
