"""Captioning tests run tiny models with one thread (tests/conftest.py)."""
import pytest

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def small_overrides():
    return SMALL


@pytest.fixture(scope="module")
def small_clip():
    from clipforge.models import create_model

    return create_model("tiny", seed=0, **SMALL).eval()
