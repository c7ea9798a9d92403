"""clipforge.models.onednn_linear: fp32 linear layers and their gradients as oneDNN kernels, checked against
``F.linear`` in float64 (values and the three gradients), the switch's reach, and training with it on."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from clipforge.models import onednn_linear
from clipforge.models.onednn_linear import OneDNNLinear, onednn_fp32_linears, onednn_is_faster, onednn_linears_active

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _reference(x, w, b, grad):
    """Output and gradients of F.linear in float64 on copies of the inputs."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = F.linear(*leaves)
    out.backward(grad.double())
    return out, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("shape, k, n, bias", [
    ((37, 24), 24, 40, True),  # K <= N: the weight gradient as (x^T dy)^T
    ((5, 9, 48), 48, 16, True),  # K > N, a 3-d input: dy^T x
    ((4, 6, 32), 32, 32, False),  # square, no bias
])
def test_values_and_gradients_match_f_linear_in_float64(shape, k, n, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=gen).requires_grad_()
    w = torch.randn(n, k, generator=gen).requires_grad_()
    b = torch.randn(n, generator=gen).requires_grad_() if bias else None
    grad = torch.randn(*shape[:-1], n, generator=gen)
    out = OneDNNLinear.apply(x, w, b)
    out.backward(grad)
    ref, ref_grads = _reference(x, w, b, grad)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip((x.grad, w.grad, b.grad if bias else None), ref_grads):
        if theirs is None:
            continue
        assert mine.shape == theirs.shape and mine.is_contiguous()
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-4)


def test_a_transposed_input_and_a_frozen_weight():
    """A non-contiguous input (a transposed view) is read correctly; a weight without requires_grad gets no
    gradient while the input and bias still do."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 10, generator=gen).t().requires_grad_()  # [10, 24], not contiguous
    w = torch.randn(12, 24, generator=gen)
    b = torch.randn(12, generator=gen).requires_grad_()
    grad = torch.randn(10, 12, generator=gen)
    out = OneDNNLinear.apply(x, w, b)
    out.backward(grad)
    ref, (gx, _, gb) = _reference(x, w, b, grad)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), gb, rtol=1e-5, atol=1e-5)
    assert w.grad is None


def _kind(fn) -> str:
    out = fn()
    return type(out.grad_fn).__name__ if out.grad_fn is not None else "none"


def test_the_switch_takes_fp32_cpu_linears_only():
    """Inside ``onednn_fp32_linears()`` an fp32 nn.Linear runs OneDNNLinear; float64, bf16 and autocast keep
    torch's path (autocast's bf16 output included), and so do inputs of fewer than MIN_ROWS rows (a token decoded
    at a time), however they are shaped; ``enabled=False`` changes nothing."""
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(onednn_linear.MIN_ROWS, 16)
    with onednn_fp32_linears():
        assert _kind(lambda: lin(x)) == "OneDNNLinearBackward"
        assert _kind(lambda: lin(x.view(2, -1, 16))) == "OneDNNLinearBackward"  # rows counted over leading dims
        assert "OneDNN" not in _kind(lambda: lin(x[:-1]))
        assert "OneDNN" not in _kind(lambda: lin(x[:1].view(1, 1, 16)))
        assert _kind(lambda: F.linear(x, weight=lin.weight)) == "OneDNNLinearBackward"  # keyword arguments
        assert "OneDNN" not in _kind(lambda: lin.double()(x.double()))
        lin.float()
        assert "OneDNN" not in _kind(lambda: lin.to(torch.bfloat16)(x.to(torch.bfloat16)))
        lin.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lin(x)
        assert out.dtype == torch.bfloat16 and "OneDNN" not in type(out.grad_fn).__name__
    with onednn_fp32_linears(enabled=False):
        assert "OneDNN" not in _kind(lambda: lin(x))
    assert "OneDNN" not in _kind(lambda: lin(x))  # off again outside


def test_the_speed_check_decides_by_its_threshold(monkeypatch):
    """``onednn_is_faster`` times both paths and compares with MIN_SPEEDUP: impossible with a threshold of 1e9,
    certain with 0 (the uncached function, so that each call measures)."""
    measure = onednn_is_faster.__wrapped__
    monkeypatch.setattr(onednn_linear, "MIN_SPEEDUP", 1e9)
    assert measure(rows=256, width=32, repeats=1) is False
    monkeypatch.setattr(onednn_linear, "MIN_SPEEDUP", 0.0)
    assert measure(rows=256, width=32, repeats=1) is True


def test_training_with_onednn_linears_follows_torchs_run(tiny_cfg, tmp_path):
    """Four fp32 steps with the switch on land on the same losses and weights as without it (fp32 rounding in
    another summation order only)."""
    from clipforge.train import train

    cfg = dataclasses.replace(tiny_cfg, steps=4, save_every=0)
    plain = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "plain")))
    with onednn_fp32_linears():
        fast = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "fast")))
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4, abs=1e-5)
    theirs = dict(plain.model.named_parameters())
    for name, p in fast.model.named_parameters():
        torch.testing.assert_close(p, theirs[name], rtol=1e-3, atol=1e-4, msg=name)


def test_clipforge_train_chooses_the_path(tiny_cfg, monkeypatch):
    """``--fp32-linear``: 'torch' never, 'onednn' for fp32 CPU runs in this process, 'auto' as the speed check
    says, also for a run whose processes distributed.nproc starts; never for bf16 or compiled towers."""
    from clipforge.cli.train_fp32_linear import use_onednn_linears
    from clipforge.train import DistributedConfig

    monkeypatch.setattr(onednn_linear, "onednn_is_faster", lambda: True)
    assert use_onednn_linears(tiny_cfg, "onednn") and use_onednn_linears(tiny_cfg, "auto")
    assert not use_onednn_linears(tiny_cfg, "torch")
    monkeypatch.setattr(onednn_linear, "onednn_is_faster", lambda: False)
    assert not use_onednn_linears(tiny_cfg, "auto") and use_onednn_linears(tiny_cfg, "onednn")
    assert not use_onednn_linears(dataclasses.replace(tiny_cfg, precision="bf16"), "onednn")
    compiled = dataclasses.replace(tiny_cfg, model_overrides={**tiny_cfg.model_overrides, "compile": True})
    assert not use_onednn_linears(compiled, "onednn")
    assert use_onednn_linears(dataclasses.replace(tiny_cfg, distributed=DistributedConfig(nproc=2)), "onednn")


def test_the_switch_knows_when_it_is_on():
    assert not onednn_linears_active()
    with onednn_fp32_linears():
        with onednn_fp32_linears(False):
            assert onednn_linears_active()  # a disabled inner switch leaves the outer one on
        with onednn_fp32_linears():
            pass
        assert onednn_linears_active()
    assert not onednn_linears_active()


def _how_a_linear_runs() -> tuple[bool, str]:
    """In a started rank: whether the switch is on, and which autograd node an fp32 linear's output comes from."""
    x = torch.randn(16, 8, requires_grad=True)
    return onednn_linears_active(), type(F.linear(x, torch.randn(4, 8)).grad_fn).__name__


def test_started_ranks_take_the_switch_of_the_thread_that_launched_them():
    """distributed.nproc's processes run their linears through oneDNN exactly when the launching thread did."""
    from clipforge.train.distributed import launch

    with onednn_fp32_linears():
        assert launch(_how_a_linear_runs, 2) == (True, "OneDNNLinearBackward")
    off, node = launch(_how_a_linear_runs, 2)
    assert not off and node != "OneDNNLinearBackward"


def test_two_started_ranks_with_onednn_linears_follow_torchs_two_rank_run(tiny_cfg, tmp_path):
    """distributed.nproc=2, fp32: the same losses with the switch on as without it (fp32 rounding only)."""
    from clipforge.train import DistributedConfig, train

    cfg = dataclasses.replace(tiny_cfg, steps=3, save_every=0, distributed=DistributedConfig(nproc=2))
    plain = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "plain")))
    with onednn_fp32_linears():
        fast = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "fast")))
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4, abs=1e-5)


def test_the_command_trains_through_onednn_when_asked(tmp_path, monkeypatch):
    """``clipforge train --fp32-linear onednn precision=fp32`` runs its linear layers through oneDNN's kernel
    (counted), and 'torch' does not."""
    from clipforge.cli.main import main

    calls = []
    kernel = onednn_linear.onednn_linear_kernel
    monkeypatch.setattr(onednn_linear, "onednn_linear_kernel", lambda *a: calls.append(1) or kernel(*a))
    small = ["model_overrides={embed_dim: 32, vision: {image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}, "
             "text: {context_length: 16, width: 32, layers: 1, heads: 2}}", "data.train_size=32", "batch_size=16",
             "steps=2", "warmup_steps=1", "progress=false", "precision=fp32", "save_every=0"]
    assert main(["train", "--no-eval", "--fp32-linear", "torch", f"out_dir={tmp_path / 'torch'}", *small]) == 0
    assert not calls
    assert main(["train", "--no-eval", "--fp32-linear", "onednn", f"out_dir={tmp_path / 'onednn'}", *small]) == 0
    assert len(calls) > 0
