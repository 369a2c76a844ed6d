"""The machine under a timing: threads chosen deliberately, other processes' CPU use measured while
timing, progress bars that only a terminal sees.

`timing_threads` respects ``OMP_NUM_THREADS`` and otherwise takes the physical cores, so that two
processes never oversubscribe by default. `CpuWatch` measures, over a timed window, how much CPU the
*other* processes used (system busy time from ``/proc/stat`` minus this process's own CPU time): a
timing taken while they used a noticeable share of the cores is flagged as untrustworthy rather than
printed as a clean speed-up.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Self

__all__ = ["BUSY_SHARE", "CpuWatch", "physical_cores", "progress_bar", "timing_threads"]

BUSY_SHARE = 0.25  # other processes using more than this many cores' worth of CPU: a busy machine


def physical_cores() -> int:
    """Physical cores (distinct (package, core) pairs on Linux), else the logical CPU count."""
    seen = set()
    for d in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            seen.add(((d / "physical_package_id").read_text().strip(), (d / "core_id").read_text().strip()))
        except OSError:
            continue
    n = len(seen) or (os.cpu_count() or 1)
    try:  # a process limited to fewer CPUs (taskset, cgroups) gets no more threads than it may use
        n = min(n, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    return max(1, n)


def timing_threads(requested: int = 0) -> tuple[int, str]:
    """(threads, why): ``requested`` if > 0, else ``OMP_NUM_THREADS`` if set, else the physical cores."""
    if requested > 0:
        return requested, "requested"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env), "OMP_NUM_THREADS"
    return physical_cores(), "physical cores"


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU jiffies of the whole machine since boot (Linux), else None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


class CpuWatch:
    """CPU used by other processes over a window: ``with CpuWatch() as w: ...; w.other_cores`` (cores'
    worth, averaged over the window; None where ``/proc/stat`` is unavailable)."""

    def __enter__(self) -> Self:
        self.other_cores: float | None = None
        self._t = time.perf_counter()
        self._own = sum(os.times()[:4])  # user + system of this process and its children
        self._sys = _busy_jiffies()
        return self

    def __exit__(self, *exc: object) -> None:
        end = _busy_jiffies()
        wall = time.perf_counter() - self._t
        if self._sys is None or end is None or wall <= 0:
            return
        hz = os.sysconf("SC_CLK_TCK")
        busy = (end[0] - self._sys[0]) / hz  # CPU seconds used by everything
        own = sum(os.times()[:4]) - self._own
        self.other_cores = max(0.0, busy - own) / wall

    @property
    def busy(self) -> bool:
        return self.other_cores is not None and self.other_cores > BUSY_SHARE

    def note(self) -> str | None:
        """A warning line for a busy machine, else None."""
        if not self.busy:
            return None
        return (
            f"machine busy: other processes used {self.other_cores:.2f} cores on average while timing "
            f"({os.cpu_count()} CPUs); these times are unreliable: rerun on an idle machine"
        )


def progress_bar(total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar with an ETA on stderr, shown only when ``enabled`` and stderr is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()), leave=False)
