"""What the load generator (bench/load.py) reads of the processes it watches: CPU time and resident memory, from
/proc."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat), None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_used(pids: dict[str, int], before: dict[str, float | None]) -> dict[str, float]:
    """CPU seconds each process used since `before` (the load generator's own included, as "load")."""
    now = {name: cpu_seconds(pid) for name, pid in pids.items()}
    return {name: now[name] - before[name] for name in pids if now[name] is not None and before[name] is not None}


# -- memory over a soak -------------------------------------------------------------------------------------------

def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_rss(pids: dict[str, int], interval_s: float, samples: dict[str, list[tuple[float, float]]],
                     stop: asyncio.Event) -> None:
    started = time.monotonic()
    while not stop.is_set():
        for name, pid in pids.items():
            value = rss_mib(pid)
            if value is not None:
                samples.setdefault(name, []).append((time.monotonic() - started, value))
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except asyncio.TimeoutError:
            pass


def memory_report(samples: dict[str, list[tuple[float, float]]], max_growth_mib: float) -> dict:
    """Per process: RSS at the start, the middle and the end of the run, its peak, and its growth over the second
    half (median of the last tenth of the samples minus the median of the tenth around the middle)."""
    report = {}
    for name, points in samples.items():
        values = [value for _, value in points]
        n = len(values)
        tenth = max(1, n // 10)
        middle = statistics.median(values[max(0, n // 2 - tenth // 2): n // 2 + tenth // 2 + 1])
        end = statistics.median(values[-tenth:])
        report[name] = {"start_mib": values[0], "middle_mib": middle, "end_mib": end, "peak_mib": max(values),
                        "growth_second_half_mib": end - middle, "is_flat": end - middle < max_growth_mib,
                        "samples": n}
    return report


# -- the engine alone ---------------------------------------------------------------------------------------------
