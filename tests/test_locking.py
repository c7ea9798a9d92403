"""clipforge.locking: one writer at a time, the holder named, a dead holder's lock taken over."""
import fcntl
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from clipforge.locking import LockHeld, exclusive_lock

HOLDER = textwrap.dedent("""
    import sys, time
    from clipforge.locking import exclusive_lock
    with exclusive_lock(sys.argv[1], what="index"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _hold(directory, seconds):
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_with_the_holders_pid(tmp_path):
    p = _hold(tmp_path, 30)
    try:
        with pytest.raises(LockHeld) as e:
            with exclusive_lock(tmp_path, what="index"):
                pass
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and str(tmp_path / ".lock") in msg and "choose another directory" in msg
    finally:
        p.kill()
        p.wait()


def test_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path, caplog):
    p = _hold(tmp_path, 30)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with caplog.at_level(logging.WARNING, logger="clipforge.locking"):
        with exclusive_lock(tmp_path, what="training run"):
            assert f"pid={os.getpid()}" in (tmp_path / ".lock").read_text()
    assert any(f"stale lock left by pid {p.pid}" in r.message and "no longer running" in r.message
               for r in caplog.records)


def test_waiting_holder_gets_the_lock_when_released(tmp_path):
    p = _hold(tmp_path, 1.0)
    start = time.monotonic()
    with exclusive_lock(tmp_path, timeout=20):
        waited = time.monotonic() - start
    p.wait()
    assert 0.2 < waited < 20


def test_clean_release_leaves_nothing_stale(tmp_path, caplog):
    with exclusive_lock(tmp_path):
        pass
    with caplog.at_level(logging.WARNING, logger="clipforge.locking"):
        with exclusive_lock(tmp_path):
            pass
    assert not caplog.records


def test_a_holder_that_has_not_written_its_stamp_yet_is_still_named(tmp_path):
    # the race CI hit once (tests/serve/test_index_lock.py): the loser found the lock taken in the instant before
    # the winner wrote its pid, read an empty file and said "another process"; it now re-reads for a moment
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken, nothing written yet
    writer = threading.Timer(0.2, lambda: os.pwrite(fd, b"pid=4242 host=h since=s\n", 0))
    writer.start()
    try:
        with pytest.raises(LockHeld, match="in use by pid 4242 on h since s"):
            with exclusive_lock(tmp_path, what="index"):
                pass
    finally:
        writer.join()
        os.close(fd)
