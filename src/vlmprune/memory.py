"""Peak memory growth while a function runs, on CUDA or on CPU (used by latency and weight pruning).

* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the run (exact, tensors only).
* CPU: the C allocator's in-use bytes (glibc ``mallinfo2``: ``uordblks + hblkhd``, which counts
  freed-but-cached memory as free, unlike the resident set) sampled by a thread every `interval`
  seconds, minus the value before the run. Sampling can miss a peak shorter than the interval, so it
  is a lower bound. Without glibc it falls back to the growth of the resident set
  (``/proc/self/statm``), which allocator caching can understate. The returned name says which.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from typing import Any, Callable

import torch

SAMPLE_INTERVAL_S = 2e-4


def peak_memory_growth(
    fn: Callable[[], Any], device: torch.device, interval: float = SAMPLE_INTERVAL_S, pause_gc: bool = True
) -> tuple[Any, int, str]:
    """(fn's result, peak growth in bytes while it ran with its result still alive, method name).

    With `pause_gc`, garbage is collected first and the collector paused during the run, so that
    freeing older objects mid-run cannot hide part of the growth (for short runs; a long one should
    keep the collector on).
    """
    gc.collect()
    paused = pause_gc and gc.isenabled()
    if paused:
        gc.disable()
    try:
        return _peak_growth(fn, torch.device(device), interval)
    finally:
        if paused:
            gc.enable()


def _peak_growth(fn: Callable[[], Any], device: torch.device, interval: float) -> tuple[Any, int, str]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, int(torch.cuda.max_memory_allocated(device) - base), "cuda max_memory_allocated"
    read, method = _cpu_reader()
    base = read()
    # The sampler keeps its own maximum and the main thread its final reading; they are merged after the
    # join. (One shared maximum lost updates: a sampler descheduled between its reading and its write
    # overwrote the final reading with an older, lower one, so the result's own memory could be missed.)
    sampled = [base]  # written by the sampler thread only
    stop = threading.Event()

    def sample() -> None:
        high = base
        while not stop.is_set():
            high = max(high, read())
            sampled[0] = high
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
        final = read()  # the final state, with the result still alive
    finally:
        stop.set()
        sampler.join()
    return result, max(0, max(sampled[0], final) - base), method


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _cpu_reader() -> tuple[Callable[[], int], str]:
    """A cheap reader of the process's current memory in bytes: malloc's in-use bytes, else the resident set."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
        mallinfo2.restype = _MallInfo2
        mallinfo2.argtypes = []

        def in_use() -> int:
            info = mallinfo2()
            return info.uordblks + info.hblkhd  # heap chunks in use + mmapped chunks

        in_use()
        return in_use, "malloc in-use bytes (glibc mallinfo2), sampled"
    except (OSError, AttributeError):
        pass
    if not os.path.exists("/proc/self/statm"):
        return (lambda: 0), "not measured (neither glibc mallinfo2 nor /proc/self/statm)"
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    return resident, "resident set (/proc/self/statm), sampled"
