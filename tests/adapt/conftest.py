import pytest
import torch
import torch.nn.functional as F

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


@pytest.fixture
def make_model():
    """A small random CLIP (16-token context); ``text`` updates the text config."""
    from clipforge.models import create_model

    def make(seed: int = 0, **text):
        return create_model("tiny", seed=seed, **(SMALL | {"text": SMALL["text"] | text})).eval()

    return make


@pytest.fixture
def small_model(make_model):
    return make_model()


@pytest.fixture
def tokenizer():
    from clipforge.tokenizer import get_tokenizer

    return get_tokenizer(16)


def _clusters(centers: torch.Tensor, per_class: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(centers)).repeat_interleave(per_class)
    return F.normalize(centers[y] + noise * torch.randn(len(y), centers.shape[1], generator=g), dim=-1), y


@pytest.fixture
def clusters():
    """``clusters(centers, per_class, noise, seed)``: normalized features around each center, and labels."""
    return _clusters
