"""benchmarks/bench_step_gemms.py: what it records of a step's GEMMs, the layouts it replays, the products it times."""
from __future__ import annotations

import torch
from benchhelpers import load_benchmark, tiny_clip_training_step
from torch.utils.flop_counter import FlopCounterMode


def test_the_recorded_gemms_of_a_training_step_hold_the_flops_flop_counter_counts():
    """Every GEMM call of one forward + backward of a small CLIP is recorded once, with shapes whose FLOPs add up
    to torch's own FlopCounterMode count for the same step; the strides are the operands' own (some transposed)."""
    bench = load_benchmark("bench_step_gemms.py")
    step = tiny_clip_training_step()

    with FlopCounterMode(display=False) as counter:
        step()
    recorder = bench.GemmRecorder()
    with recorder:
        step()  # not recording: nothing kept
        assert recorder.calls == {}
        recorder.recording = True
        step()
    flops = sum(bench.gemm_flops(name, [list(s) for s, _, _ in ops]) * calls
                for (name, ops), (calls, _) in recorder.calls.items())
    assert flops == counter.get_total_flops() > 0
    assert all(seconds > 0 for _, seconds in recorder.calls.values())
    strides = [stride for _, ops in recorder.calls for _, stride, _ in ops if len(stride) == 2]
    assert any(st[0] == 1 and st[1] > 1 for st in strides)  # a transposed operand (dy^T or W^T) among them


def test_replayed_operands_have_the_recorded_layout_and_both_layouts_compute_the_same_product():
    bench = load_benchmark("bench_step_gemms.py")
    gen = torch.Generator().manual_seed(0)
    t = bench.strided_like((5, 7), (1, 5), torch.float32, gen)  # a transposed [7, 5] buffer
    assert t.shape == (5, 7) and t.stride() == (1, 5) and t.untyped_storage().nbytes() == 35 * 4
    heads = bench.strided_like((4, 3, 2), (6, 1, 3), torch.bfloat16, gen)
    assert heads.stride() == (6, 1, 3) and heads.dtype == torch.bfloat16
    b = torch.randn(7, 3, generator=gen)
    torch.testing.assert_close(torch.mm(t, b), t.double().contiguous().mm(b.double()).float())
    same, contiguous = bench.replay(torch.ops.aten.mm.default, (((5, 7), (1, 5), torch.float32),
                                                               ((7, 3), (3, 1), torch.float32)), {}, repeats=3)
    assert same > 0 and contiguous > 0


def test_every_weight_gradient_product_equals_dy_transposed_times_x():
    """The five ways --weight-gradients times compute dW = dy^T x, against the naive product in float64."""
    bench = load_benchmark("bench_step_gemms.py")
    gen = torch.Generator().manual_seed(1)
    dy, x = torch.randn(96, 24, generator=gen), torch.randn(96, 40, generator=gen)
    expected = dy.double().t() @ x.double()
    products = bench.weight_gradient_products(dy, x)
    assert len(products) == 5
    for label, fn in products.items():
        got = fn()
        assert got.shape == (24, 40), label
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4, msg=label)
