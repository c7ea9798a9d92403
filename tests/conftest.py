import os

import pytest
import torch

# Keep the suite's thread count predictable on small CI machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


_config = []  # pytest's config, once pytest_configure has run


def pytest_configure(config):
    _config.append(config)


def pytest_runtest_logreport(report):
    """Under CI (CI=true) a failure's traceback is printed as soon as the test fails, not only in the summary at
    the end: a run that CI stops at its time limit never reaches that summary, and a failure that later tests
    trip over (a hang, a machine out of memory) would otherwise leave nothing but an F in the progress line."""
    if not report.failed or os.environ.get("CI") != "true" or not _config:
        return
    terminal = _config[-1].pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.write_line("")
        terminal.write_sep("_", f"FAILED {report.nodeid} (in {report.when}, after {report.duration:.1f} s)")
        terminal.write_line(report.longreprtext[-8000:])


@pytest.fixture
def tiny_cfg(tmp_path):
    """A very small training config: seconds per run, not minutes."""
    from clipforge.train import DataConfig, TrainConfig

    return TrainConfig(
        model="tiny",
        model_overrides={
            "embed_dim": 32,
            "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
            "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2},
        },
        data=DataConfig(train_size=256, eval_size=32),
        batch_size=32,
        steps=12,
        lr=2e-3,
        warmup_steps=2,
        save_every=4,
        log_every=1,
        out_dir=str(tmp_path / "run"),
        progress=False,
        precision="fp32",
    )


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tests on tiny tensors, where threads only add
    synchronization cost (large on a shared, loaded machine). Folders opt in with an autouse
    fixture that requests this one (tests/losses, tests/models)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
