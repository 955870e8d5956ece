"""Timing and memory measurement: medians after warm-up, synchronized on GPU."""

from __future__ import annotations

import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_runs(fn: Callable[[], object], device: torch.device, *, runs: int) -> Tuple[object, float]:
    """(result of the last run, median seconds of runs 2..runs): for jobs too long to
    repeat ten times, one warm-up run and the median of the rest."""
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times[1:])


def outside_products(solve: Callable[[Callable], object], matvec: Callable, device: torch.device, *,
                     runs: int) -> Tuple[object, float, float]:
    """(result of the last run, median seconds of runs 2..runs, median seconds of them
    spent outside the products): ``solve(timed)`` gets ``matvec`` wrapped in a timer, so
    the split needs no product time measured apart (its drift between minutes made
    solvers' overhead read as 0% or 50% on this machine)."""
    inside = [0.0]

    def timed(v):
        sync(device)
        start = time.perf_counter()
        out = matvec(v)
        sync(device)
        inside[0] += time.perf_counter() - start
        return out

    totals, outsides = [], []
    for _ in range(runs):
        inside[0] = 0.0
        sync(device)
        start = time.perf_counter()
        result = solve(timed)
        sync(device)
        totals.append(time.perf_counter() - start)
        outsides.append(totals[-1] - inside[0])
    return result, statistics.median(totals[1:]), statistics.median(outsides[1:])


def paired_medians(fn: Callable[[], object], reference: Callable[[], object], device: torch.device, *,
                   warmup: int = 3, repeats: int = 10) -> Tuple[float, float]:
    """Median wall times of ``fn()`` and ``reference()``, called alternately: on a shared
    machine whose speed drifts, a ratio of the two then compares like with like."""
    for _ in range(warmup):
        fn()
        reference()
    times: Tuple[list, list] = ([], [])
    for _ in range(repeats):
        for call, out in ((fn, times[0]), (reference, times[1])):
            sync(device)
            start = time.perf_counter()
            call()
            sync(device)
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak GPU memory allocated during ``fn()`` above what was allocated before it
    (None on CPU, where PyTorch keeps no such counter); its result is freed."""
    return peak_during(fn, device)[1]


def peak_during(fn: Callable[[], object], device: torch.device) -> Tuple[object, Optional[int]]:
    """(``fn()``, the peak GPU memory allocated during it above what was allocated before
    it; None on CPU)."""
    if device.type != "cuda":
        return fn(), None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    return out, torch.cuda.max_memory_allocated(device) - base


def timed_peak_runs(fn: Callable[[], object], device: torch.device, *, runs: int) -> Tuple[object, float, List[str]]:
    """:func:`timed_runs` with the peak-memory cell of runs 2..runs (:func:`memory_cells`)."""
    peaks: List[Optional[int]] = []

    def run():
        out, peak = peak_during(fn, device)
        peaks.append(peak)
        return out

    out, seconds = timed_runs(run, device, runs=runs)
    return out, seconds, memory_cells(peaks[1:])


def mib(value: Optional[int]) -> str:
    """Bytes as MiB, one decimal ("n/a" where the device keeps no counter)."""
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def memory_cells(peaks: List[Optional[int]]) -> List[str]:
    """A table's peak-memory cell (the median, in MiB) where the device counts it, else
    no cell: CPU tables keep their columns."""
    if not peaks or any(p is None for p in peaks):
        return []
    return [mib(statistics.median(peaks))]


def memory_column(device: torch.device, cell: str) -> List[str]:
    """``[cell]`` where the device counts memory (a header, or the mark of a row that has
    no measurement), else nothing, matching :func:`memory_cells`."""
    return [cell] if device.type == "cuda" else []


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__} on {name}"


def table(headers: list, rows: list) -> str:
    """A GitHub-markdown table."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])
