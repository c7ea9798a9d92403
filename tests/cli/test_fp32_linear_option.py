"""``--fp32-linear`` of ``clipforge eval``, ``index`` and ``adapt`` (clipforge/cli/fp32_linear_option.py): with
``onednn`` the fp32 linear layers really run as oneDNN kernels (counted), and the command's results equal those
of torch's own kernels up to float rounding; the choice obeys the device and the precision."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import fp32_linear_option
from clipforge.cli.main import main
from clipforge.models import onednn_linear

SMALL = {"embed_dim": 32, "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
         "text": {"context_length": 16, "width": 32, "layers": 1, "heads": 2}}

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from clipforge.models import save_model

    return save_model(clipforge.create_model("tiny", seed=0, **SMALL), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many oneDNN linear products ran (forward and gradient products of OneDNNLinear)."""
    calls = [0]
    real = onednn_linear.onednn_linear_kernel

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(onednn_linear, "onednn_linear_kernel", counting)
    return calls


def test_the_choice_follows_device_precision_and_the_timing(monkeypatch):
    monkeypatch.setattr(onednn_linear, "onednn_is_faster", lambda: True)
    assert fp32_linear_option.use_onednn("auto") and fp32_linear_option.use_onednn("onednn")
    assert not fp32_linear_option.use_onednn("torch")
    assert not fp32_linear_option.use_onednn("onednn", device="cuda")  # GPU: nothing changes
    assert not fp32_linear_option.use_onednn("auto", precision="bf16")  # autocast: bf16 kernels already
    monkeypatch.setattr(onednn_linear, "onednn_is_faster", lambda: False)
    assert not fp32_linear_option.use_onednn("auto") and fp32_linear_option.use_onednn("onednn")
    with pytest.raises(ValueError, match="auto, onednn, torch"):
        fp32_linear_option.use_onednn("mkl")


def test_eval_with_onednn_linears_gives_torchs_results(model_dir, tmp_path, capsys, kernel_calls):
    results = {}
    for choice in ("torch", "onednn"):
        before = kernel_calls[0]
        assert main(["eval", str(model_dir), "--size", "24", "--json", "--quiet", "--no-cache", "--no-report",
                     "--tasks", "zero_shot,retrieval", "--fp32-linear", choice, "--out", str(tmp_path / choice)]) == 0
        results[choice] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        ran = kernel_calls[0] - before
        assert (ran > 0) == (choice == "onednn"), (choice, ran)

    def numbers(tree, path=""):
        if isinstance(tree, dict):
            for k, v in tree.items():
                yield from numbers(v, f"{path}/{k}")
        elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
            yield path, float(tree)

    a, b = dict(numbers(results["torch"])), dict(numbers(results["onednn"]))
    timings = {k for k in a if k.endswith("_s") or "seconds" in k}
    assert a.keys() == b.keys() and len(a) > 10
    for k in a.keys() - timings:
        assert b[k] == pytest.approx(a[k], abs=1e-5), k


def test_index_with_onednn_linears_stores_torchs_embeddings(model_dir, tmp_path, kernel_calls):
    from PIL import Image

    from clipforge.serve.index import open_index

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    stored = {}
    for choice in ("torch", "onednn"):
        before = kernel_calls[0]
        out = tmp_path / f"index-{choice}"
        assert main(["index", str(model_dir), "--images", str(images), "--out", str(out), "--quiet",
                     "--dtype", "float32", "--fp32-linear", choice]) == 0
        assert (kernel_calls[0] > before) == (choice == "onednn")
        idx = open_index(out)
        stored[choice] = {k: idx.embeddings[i].copy() for i, k in enumerate(idx.meta["key"])}
    assert stored["torch"].keys() == stored["onednn"].keys() and len(stored["torch"]) == 6
    for k, v in stored["torch"].items():
        np.testing.assert_allclose(stored["onednn"][k], v, atol=1e-5)


def test_adapt_with_onednn_linears_fits_torchs_adapters(model_dir, tmp_path, capsys, kernel_calls):
    """CoOp backpropagates through the frozen text tower: the gradient products run as oneDNN kernels too, and
    the fitted context vectors match torch's."""
    adapters = {}
    for choice in ("torch", "onednn"):
        out = tmp_path / f"adapt-{choice}"
        before = kernel_calls[0]
        assert main(["adapt", str(model_dir), "--method", "tip", "coop", "--shots", "2", "--size", "40",
                     "--coop-epochs", "2", "--fp32-linear", choice, "--out", str(out), "--quiet"]) == 0
        capsys.readouterr()
        ran = kernel_calls[0] - before
        assert (ran > 0) == (choice == "onednn")
        adapters[choice] = torch.load(out / "adapters.pt", weights_only=True)
        res = json.loads((out / "adapt.json").read_text())
        adapters[choice]["tip_test"] = res["shots"]["2"]["tip"]["test"]
    a, b = adapters["torch"], adapters["onednn"]
    torch.testing.assert_close(b["coop"]["ctx"], a["coop"]["ctx"], atol=1e-4, rtol=1e-4)
    assert (a["coop"]["ctx"] != 0).any()
    assert b["tip_test"] == a["tip_test"]
