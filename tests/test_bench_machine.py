"""The timing context of `ilf bench`: threads chosen deliberately, other processes' CPU use caught."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ilf_runtime.bench.machine import BUSY_SHARE, CpuWatch, physical_cores, timing_threads


def test_timing_threads_respects_request_then_env_then_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert timing_threads(5) == (5, "requested")
    assert timing_threads(0) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    n, why = timing_threads(0)
    assert (n, why) == (physical_cores(), "physical cores") and n >= 1


def test_cpu_watch_arithmetic(monkeypatch):
    """other cores = (machine busy CPU seconds - this process's CPU seconds) / wall seconds."""
    from ilf_runtime.bench import machine

    jiffies = iter([(1000, 5000), (1000 + 300, 5400)])  # 300 busy jiffies = 3 CPU seconds at 100 Hz
    own = iter([(1.0, 0.0, 0.0, 0.0, 0.0), (1.5, 0.5, 0.0, 0.0, 0.0)])  # 1 CPU second of ours
    clock = iter([10.0, 12.0])  # 2 s of wall time
    monkeypatch.setattr(machine, "_busy_jiffies", lambda: next(jiffies))
    monkeypatch.setattr(machine.os, "times", lambda: next(own))
    monkeypatch.setattr(machine.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(clock))
    with CpuWatch() as w:
        pass
    assert w.other_cores == pytest.approx(1.0) and w.busy and "1.00 cores" in w.note()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_cpu_watch_sees_another_process_and_not_itself():
    with CpuWatch() as idle:
        time.sleep(0.5)
    if idle.other_cores > BUSY_SHARE:
        pytest.skip(f"the machine is busy ({idle.other_cores:.2f} cores in use by others): cannot test here")
    with CpuWatch() as own:  # this process busy: not counted as "other"
        t = time.perf_counter()
        while time.perf_counter() - t < 0.6:
            pass
    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
    p = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.2)
        with CpuWatch() as other:  # another process spinning one core while this one sleeps
            time.sleep(1.0)
    finally:
        p.wait()
    assert own.other_cores < BUSY_SHARE
    assert other.other_cores > 0.6 and other.busy and "machine busy" in other.note()
