"""Issue 12, devices: every device-dependent choice comes from ``train.device.device_plan`` (its decision table,
written out below and checked through injected availability flags), an absent device stops a run before any
data is read, loss scaling is wired into the loop, and SLURM's variables become the launcher's."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from clipforge.errors import ConfigError
from clipforge.train import load_config, train
from clipforge.train.device import DeviceUnavailable, device_plan, parse_device, resolve_device
from clipforge.train.distributed import first_host, slurm_environment

BF16, FP16 = torch.bfloat16, torch.float16
# cpu_bf16_fast: the CPU has oneDNN's bf16 kernels (AVX-512 and up); AVX2_ONLY below has not
NO_GPU = dict(cuda_available=False, cuda_count=0, mps_available=False, cpu_bf16_fast=True)
ONE_GPU = dict(cuda_available=True, cuda_count=1, bf16_supported=True, mps_available=False, cpu_bf16_fast=True)
OLD_GPUS = dict(cuda_available=True, cuda_count=2, bf16_supported=False, mps_available=False,  # e.g. V100: no bf16
                cpu_bf16_fast=True)
MAC = dict(cuda_available=False, cuda_count=0, mps_available=True, bf16_supported=True, cpu_bf16_fast=True)
AVX2_ONLY = dict(NO_GPU, cpu_bf16_fast=False)

# (device, precision, machine, local_rank) -> (torch device, autocast dtype, GradScaler, pinned memory + non_blocking,
#                                              TF32, backend, CPU short_attention path)
TABLE = [
    ("auto", "bf16", NO_GPU, None, ("cpu", BF16, False, False, False, "gloo", True)),
    ("auto", "fp32", NO_GPU, None, ("cpu", None, False, False, False, "gloo", True)),
    ("cpu", "bf16", ONE_GPU, None, ("cpu", BF16, False, False, False, "gloo", True)),  # cpu asked: cpu, GPU or not
    ("auto", "bf16", ONE_GPU, None, ("cuda:0", BF16, False, True, True, "nccl", False)),
    ("cuda", "fp32", ONE_GPU, None, ("cuda:0", None, False, True, True, "nccl", False)),
    ("cuda", "fp16", ONE_GPU, None, ("cuda:0", FP16, True, True, True, "nccl", False)),
    ("cuda", "bf16", OLD_GPUS, None, ("cuda:0", FP16, True, True, True, "nccl", False)),  # no bf16: fp16 + scaler
    ("cuda", "bf16", OLD_GPUS, 1, ("cuda:1", FP16, True, True, True, "nccl", False)),  # one GPU per local rank
    ("auto", "bf16", OLD_GPUS, 1, ("cuda:1", FP16, True, True, True, "nccl", False)),
    ("cuda:1", "fp32", OLD_GPUS, 0, ("cuda:1", None, False, True, True, "nccl", False)),  # explicit index wins
    ("mps", "bf16", MAC, None, ("mps", BF16, False, False, False, "gloo", False)),
    ("mps", "fp16", MAC, None, ("mps", FP16, True, False, False, "gloo", False)),
    ("auto", "bf16", MAC, None, ("cpu", BF16, False, False, False, "gloo", True)),  # auto never picks MPS
    ("CUDA:0", "bf16", ONE_GPU, None, ("cuda:0", BF16, False, True, True, "nccl", False)),  # case-insensitive
]


@pytest.mark.parametrize("device, precision, machine, local_rank, expected", TABLE)
def test_device_plan_decision_table(device, precision, machine, local_rank, expected):
    plan = device_plan(device, precision, local_rank=local_rank, **machine)
    got = (str(plan.device), plan.autocast_dtype, plan.grad_scaler, plan.pin_memory, plan.allow_tf32, plan.backend,
           plan.short_attention)
    assert got == expected
    assert plan.non_blocking == plan.pin_memory
    assert bool(plan.note) == (precision == "bf16" and machine is OLD_GPUS)  # the fallback is said
    if plan.device.type == "cpu":  # a CUDA GradScaler is only made (and warns) on a machine without CUDA
        assert plan.make_scaler() is None


# precision=auto -> (autocast dtype, GradScaler, effective precision, words of the note)
AUTO = [
    ("auto", NO_GPU, (BF16, False, "bf16", ["precision=auto: bf16", "bf16 kernels"])),
    ("auto", AVX2_ONLY, (None, False, "fp32", ["precision=auto: fp32", "no fast bf16"])),
    ("auto", ONE_GPU, (BF16, False, "bf16", ["precision=auto: bf16"])),
    ("auto", OLD_GPUS, (FP16, True, "fp16", ["precision=auto: bf16", "fp16 autocast with a GradScaler"])),
    ("mps", MAC, (None, False, "fp32", ["precision=auto: fp32", "MPS"])),
]


@pytest.mark.parametrize("device, machine, expected", AUTO)
def test_auto_precision_takes_bf16_only_where_it_is_fast(device, machine, expected):
    plan = device_plan(device, "auto", **machine)
    dtype, scaler, effective, words = expected
    assert (plan.autocast_dtype, plan.grad_scaler, plan.effective_precision) == (dtype, scaler, effective)
    assert plan.precision == "auto"  # what was asked for stays visible
    for word in words:
        assert word in plan.note, (word, plan.note)


def test_bf16_on_a_cpu_without_fast_kernels_trains_in_bf16_and_says_what_it_costs():
    plan = device_plan("cpu", "bf16", **AVX2_ONLY)
    assert plan.autocast_dtype == BF16 and plan.effective_precision == "bf16"  # never silently changed
    assert "precision=fp32" in plan.note and "precision=auto" in plan.note
    assert device_plan("cpu", "fp32", **AVX2_ONLY).note == ""


def test_fast_bf16_detection_agrees_with_the_cpu_flags():
    """oneDNN's fast bf16 path needs AVX-512 (BW/VL/DQ): on a CPU whose flags lack avx512bw the answer must be no."""
    from clipforge.train.device import cpu_has_fast_bf16

    fast = cpu_has_fast_bf16()
    assert isinstance(fast, bool)
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    if "avx512bw" not in flags:
        assert fast is False
    assert device_plan("cpu", "auto").effective_precision == ("bf16" if fast else "fp32")


@pytest.mark.parametrize("device, precision, machine, error, words", [
    ("cuda", "bf16", NO_GPU, DeviceUnavailable, ["device=cuda", "device=cpu"]),
    ("cuda:0", "fp32", NO_GPU, DeviceUnavailable, ["device=cuda:0", "device=cpu"]),
    ("cuda:2", "bf16", OLD_GPUS, DeviceUnavailable, ["GPU 2", "shows 2", "cuda:0..cuda:1"]),
    ("mps", "bf16", NO_GPU, DeviceUnavailable, ["MPS", "device=cpu"]),
    ("cpu", "fp16", NO_GPU, ConfigError, ["precision=fp16", "precision=bf16"]),
    ("auto", "fp16", NO_GPU, ConfigError, ["precision=fp16", "precision=bf16"]),  # auto fell back to the CPU
    ("tpu", "bf16", NO_GPU, ConfigError, ["auto, cpu, cuda, cuda:N or mps", "'tpu'"]),
    ("cpu:1", "bf16", NO_GPU, ConfigError, ["cuda:N", "'cpu:1'"]),
    ("cpu", "fp8", NO_GPU, ConfigError, ["precision must be one of"]),
])
def test_bad_or_absent_devices_are_named_with_the_fix(device, precision, machine, error, words):
    with pytest.raises(error) as e:
        device_plan(device, precision, **machine)
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_cuda_beyond_the_visible_gpus_names_the_local_rank():
    with pytest.raises(DeviceUnavailable, match="local rank 2"):
        device_plan("cuda", "bf16", local_rank=2, **OLD_GPUS)


def test_parse_and_resolve():
    assert parse_device(" cuda:3 ") == ("cuda", 3)
    assert parse_device("auto") == ("auto", None)
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(resolve_device("auto")) == expected


def test_plan_autocast_and_move_on_cpu():
    plan = device_plan("cpu", "bf16", **NO_GPU)
    with plan.autocast():
        assert torch.get_autocast_dtype("cpu") == BF16 and torch.is_autocast_enabled("cpu")
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == BF16
    with device_plan("cpu", "fp32", **NO_GPU).autocast():
        assert not torch.is_autocast_enabled("cpu")
    batch = {"images": torch.zeros(2, 3), "texts": [torch.ones(2)], "keys": ["a", "b"], "skipped": 0}
    moved = plan.move(batch)
    assert moved["images"] is batch["images"]  # already there: no copy
    assert moved["keys"] == ["a", "b"] and moved["skipped"] == 0 and torch.equal(moved["texts"][0], torch.ones(2))


def test_config_validates_device():
    assert load_config(overrides=["device=cuda:1"]).device == "cuda:1"
    assert load_config().device == "auto"
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda, cuda:N or mps"):
        load_config(overrides=["device=gpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_fails_before_any_data_is_read(tiny_cfg, monkeypatch):
    import clipforge.train.loop as loop
    import clipforge.train.setup as setup

    def no_data(*args, **kwargs):
        raise AssertionError("data was read")

    monkeypatch.setattr(setup, "build_dataset", no_data)
    monkeypatch.setattr(loop, "build_loader", no_data)
    monkeypatch.setattr(loop, "build_model", no_data)
    for nproc in (1, 2):  # also before distributed.nproc starts any process
        cfg = dataclasses.replace(tiny_cfg, device="cuda",
                                  distributed=dataclasses.replace(tiny_cfg.distributed, nproc=nproc))
        with pytest.raises(DeviceUnavailable, match="device=cpu"):
            train(cfg)
    from pathlib import Path

    assert not Path(tiny_cfg.out_dir).exists()  # nothing written either


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_one_line(capsys, tmp_path):
    from clipforge.cli.main import main

    for argv in (["train", "device=cuda", f"out_dir={tmp_path / 'run'}", "progress=false"],
                 ["embed", str(tmp_path / "missing-model"), "--texts", "a", "--out", str(tmp_path / "e.npy"),
                  "--device", "cuda"],
                 ["index", str(tmp_path / "missing-model"), "--images", str(tmp_path), "--out", str(tmp_path / "i"),
                  "--device", "cuda"],
                 ["adapt", str(tmp_path / "missing-model"), "--device", "cuda"],
                 ["eval", str(tmp_path / "missing-model"), "--device", "cuda"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "asks for a GPU" in err and "device=cpu" in err, (argv, err)
    assert not (tmp_path / "run").exists()


def test_embed_on_an_explicit_cpu_device(tmp_path, capsys):
    """--device cpu gives the embeddings of the model used directly."""
    import numpy as np

    from clipforge.cli.main import main
    from clipforge.models import create_model
    from clipforge.models.io import save_model
    from clipforge.tokenizer import get_tokenizer

    model = create_model("tiny", seed=0, embed_dim=32, vision={"image_size": 32, "patch_size": 8, "width": 32,
                                                               "layers": 1, "heads": 2},
                         text={"context_length": 16, "width": 32, "layers": 1, "heads": 2}).eval()
    save_model(model, tmp_path / "m")
    assert main(["embed", str(tmp_path / "m"), "--texts", "a red square", "two dogs", "--out", str(tmp_path / "e.npy"),
                 "--device", "cpu"]) == 0
    got = np.load(tmp_path / "e.npy")
    with torch.no_grad():
        ref = model.encode_text(get_tokenizer(16)(["a red square", "two dogs"])).numpy()
    assert np.allclose(got, ref, atol=1e-5)


# ---------------------------------------------------------------- loss scaling in the loop


def test_grad_scaler_is_wired_exactly(tiny_cfg, monkeypatch):
    """A plan asking for a GradScaler (without autocast: fp32, so that scaling by a power of two is exact) trains the
    same weights as no scaler: the loss is scaled, the gradients unscaled before clipping and the step taken through
    the scaler; the scaler's state goes into the checkpoint. A scaler that clipped the scaled gradients, or skipped
    steps, would give other weights."""
    import clipforge.train.loop as loop

    base = dataclasses.replace(tiny_cfg, steps=4, save_every=0, precision="fp32", device="cpu", grad_clip=0.5)
    plain = train(dataclasses.replace(base, out_dir=tiny_cfg.out_dir + "_plain"))
    real_plan, scalers = loop.device_plan, []

    def scaled_plan(*args, **kwargs):
        return dataclasses.replace(real_plan(*args, **kwargs), grad_scaler=True)

    real_make = loop.DevicePlan.make_scaler

    def spy_make(self):
        scaler = real_make(self)
        scalers.append(scaler)
        return scaler

    monkeypatch.setattr(loop, "device_plan", scaled_plan)
    monkeypatch.setattr(loop.DevicePlan, "make_scaler", spy_make)
    scaled = train(dataclasses.replace(base, out_dir=tiny_cfg.out_dir + "_scaled"))
    assert scalers and scalers[0] is not None and scalers[0].get_scale() >= 2.0**10  # it really scaled
    assert scaled.losses == pytest.approx(plain.losses, rel=1e-6, abs=1e-7)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), scaled.model.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    state = torch.load(f"{scaled.checkpoint}/state.pt", weights_only=False)
    assert state["grad_scaler"]["scale"] == scalers[0].get_scale()
    assert "grad_scaler" not in torch.load(f"{plain.checkpoint}/state.pt", weights_only=False)


# ---------------------------------------------------------------- SLURM


@pytest.mark.parametrize("nodelist, host", [
    ("gpu07", "gpu07"),
    ("node3,node4", "node3"),
    ("gpu[07-09,12],cpu1", "gpu07"),
    ("a1,gpu[1-2]", "a1"),
    ("n[003-004]", "n003"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_variables_become_the_launchers():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-10]"}
    assert slurm_environment(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                      "MASTER_PORT": "29500"}
    # MASTER_ADDR / MASTER_PORT exported by the sbatch script win; SLURM_NODELIST is read when the job's is absent
    env2 = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "x1", "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "1234"}
    assert slurm_environment(env2) == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1",
                                       "MASTER_PORT": "1234"}
    assert slurm_environment({**env, "RANK": "5", "WORLD_SIZE": "8"}) == {}  # torchrun under srun: its variables
    assert slurm_environment({**env, "SLURM_NTASKS": "1"}) == {}  # one task: not a distributed run
    assert slurm_environment({"SLURM_JOB_NODELIST": "gpu1"}) == {}  # an allocation, not an srun task
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        slurm_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
