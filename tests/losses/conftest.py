"""Loss tests run on tiny tensors: intra-op threads only add synchronization cost there (large
on a shared, loaded machine), so every test module here runs with one thread."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
