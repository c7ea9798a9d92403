"""clipforge.allocator: glibc keeps freed blocks for reuse, checked through glibc's own statistics.

The behaviour is read back from ``mallinfo2()`` in a fresh interpreter (the test process's malloc state is
whatever pytest and torch made of it): with the settings a 16 MiB block comes from the heap, not from its own
``mmap``, and once freed it stays at the heap's top (``keepcost``) instead of being given back; with glibc's
defaults the same block is mapped on its own. The default case is the control that lets the first test fail.
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from clipforge import allocator

SRC = str(Path(allocator.__file__).resolve().parents[1])

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the settings are glibc's")

CHILD = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in fields]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
settings = None
if sys.argv[2] == "configure":
    from clipforge.allocator import configure
    settings = configure().applied
before = libc.mallinfo2().hblks
block = libc.malloc(16 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"applied": settings, "own_mappings": mapped, "kept_at_top": libc.mallinfo2().keepcost}))
"""


def _child(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "CLIPFORGE_MALLOC")}
    out = subprocess.run([sys.executable, "-c", CHILD, SRC, mode], env={**environ, **env}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


@glibc_only
def test_configured_malloc_serves_large_blocks_from_the_heap_and_keeps_them_after_free():
    tuned = _child("configure")
    assert tuned["applied"] is True
    assert tuned["own_mappings"] == 0
    assert tuned["kept_at_top"] >= 16 << 20
    default = _child("default")  # the control: glibc's defaults map the block on its own and unmap it on free
    assert default["own_mappings"] == 1
    assert default["kept_at_top"] < 16 << 20


@glibc_only
def test_child_processes_inherit_the_settings_through_the_environment():
    env: dict[str, str] = {}
    assert allocator.configure(env).applied
    assert env == {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
    # a process started with that environment behaves as a configured one, without calling configure
    inherited = _child("default", **env)
    assert inherited["own_mappings"] == 0 and inherited["kept_at_top"] >= 16 << 20
    assert allocator.configure(env).applied  # its own values, seen again: applied again, not "given by the user"


def test_system_switch_and_user_settings_are_left_alone_and_bad_switches_are_named():
    off = allocator.configure({"CLIPFORGE_MALLOC": "system"})
    assert not off.applied and "CLIPFORGE_MALLOC=system" in off.reason
    env = {"MALLOC_TRIM_THRESHOLD_": "0"}
    given = allocator.configure(env)
    assert not given.applied and "MALLOC_TRIM_THRESHOLD_" in given.reason
    assert env == {"MALLOC_TRIM_THRESHOLD_": "0"}
    tunables = allocator.configure({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not tunables.applied and "GLIBC_TUNABLES" in tunables.reason
    with pytest.raises(ValueError, match="CLIPFORGE_MALLOC='fast' is not a choice.*'tuned'.*'system'"):
        allocator.configure({"CLIPFORGE_MALLOC": "fast"})


def test_every_cli_command_configures_the_allocator_first(monkeypatch):
    from clipforge.cli import main as cli_main

    calls = []
    monkeypatch.setattr(allocator, "configure", lambda: calls.append(True))
    assert cli_main.main(["train", "not-a-key-value"]) == 2  # fails on its arguments, after the allocator
    assert calls == [True]


def test_a_bad_switch_is_one_line_from_the_cli(monkeypatch, capsys):
    from clipforge.cli import main as cli_main

    monkeypatch.setenv("CLIPFORGE_MALLOC", "fast")
    assert cli_main.main(["train", "steps=1"]) == 2
    assert "CLIPFORGE_MALLOC='fast' is not a choice" in capsys.readouterr().err


def test_the_training_benchmark_runs_openclip_with_glibc_defaults_unless_asked(monkeypatch):
    from benchhelpers import load_benchmark

    btt = load_benchmark("bench_train_throughput.py")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")  # as configure() leaves clipforge's own process
    monkeypatch.setenv("CLIPFORGE_MALLOC", "tuned")
    plain = btt.openclip_env(tuned_malloc=False)
    assert not {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "CLIPFORGE_MALLOC"} & set(plain)
    tuned = btt.openclip_env(tuned_malloc=True)
    assert (tuned["MALLOC_MMAP_THRESHOLD_"], tuned["MALLOC_TRIM_THRESHOLD_"]) == (
        str(allocator.MMAP_THRESHOLD), str(allocator.TRIM_THRESHOLD))
