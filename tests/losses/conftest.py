"""Loss tests run on tiny tensors: every test module here runs with one thread (tests/conftest.py)."""
import pytest


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    yield
