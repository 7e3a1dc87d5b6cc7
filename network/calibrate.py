"""The engine's cost model, measured on this machine (merge or bypass: engine.py).

A scheduled contribution either re-merges its layer at each keyframe or runs beside it as a
low-rank branch at every step. Which is cheaper depends on the machine: per multiply-add a
merge and a branch cost about the same, but each also pays per call — a branch its forward
hook and kernel launches at every step, a merge its Python round trip at every keyframe — and
that fixed part is what decides small, deep layers. So at the first use on a device and dtype,
both are timed through the code the engine runs (the branch on a real Linear's output, plus
what calling a forward hook costs; the fused multiply-add and the cast back for a merge) at
two sizes, about a tenth of a second in all, and fitted as `seconds = per_mac · macs +
per_call`. The branch is timed on its own, not as a hooked forward less a plain one: on a
large layer the branch is a tenth of the forward, and the difference of two timings that
large is mostly their noise (it once priced the branch at 0.001 ns per multiply-add). Merging same-shaped
layers in one batch (batched_merge.py), and merging from a kept ΔW (deltas.py, priced per
weight value), are priced the same way.
"""
from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from . import batched_merge
from .batched_merge import Job
from .bypass import Factors, added, low_rank_add, low_rank_delta
from .deltas import delta_dtype

# (width, rank, tokens) of the two sizes each cost is timed at: a small deep layer and a
# large shallow one, so the fit separates the fixed part from the part per multiply-add.
SIZES = ((64, 4, 16), (512, 32, 1024))
REPEATS = 5
LAYERS = 8  # layers merged per timing


@dataclass(frozen=True)
class Calibration:
    merge_ns_per_mac: float  # a layer merged on its own
    merge_us_per_layer: float
    bypass_ns_per_mac: float  # a layer's low-rank branch
    bypass_us_per_call: float
    batch_ns_per_mac: float = float("inf")  # a layer merged in a batch (batched_merge.py)
    batch_us_per_layer: float = 0.0
    # a layer merged from its kept ΔW (deltas.py), per weight value; None: not measured, and
    # every merge is priced from the factors
    delta_ns_per_value: Optional[float] = None
    delta_us_per_layer: float = 0.0

    def merge_seconds(self, macs: float) -> float:
        return (self.merge_ns_per_mac * macs) * 1e-9 + self.merge_us_per_layer * 1e-6

    def bypass_seconds(self, macs: float) -> float:
        return (self.bypass_ns_per_mac * macs) * 1e-9 + self.bypass_us_per_call * 1e-6

    def batch_seconds(self, macs: float) -> float:
        return (self.batch_ns_per_mac * macs) * 1e-9 + self.batch_us_per_layer * 1e-6

    def delta_seconds(self, values: float) -> float:
        return (self.delta_ns_per_value * values) * 1e-9 + self.delta_us_per_layer * 1e-6

    def as_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=8)
def _measured(device: str, dtype: torch.dtype) -> Calibration:
    dev = torch.device(device)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # one thread: a parallel op stalls for a scheduler tick whenever another process
        # holds a core, and all three costs scale alike with threads; their ratios count
        torch.set_num_threads(1)
    try:
        merge = [_time_merges(dev, dtype, n, r, "one") for n, r, _ in SIZES]
        batch = [_time_merges(dev, dtype, n, r, "batch") for n, r, _ in SIZES]
        delta = [_time_merges(dev, dtype, n, r, "delta") for n, r, _ in SIZES]
        hook = _time_hook_call(dev, dtype)
        bypass = [_time_branch(dev, dtype, n, r, t) + hook for n, r, t in SIZES]
    finally:
        torch.set_num_threads(threads)
    m_macs = [n * n * (r + 1) for n, r, _ in SIZES]
    b_macs = [t * r * 2 * n for n, r, t in SIZES]
    fits = [_fit(m_macs, merge), _fit(b_macs, bypass), _fit(m_macs, batch),
            _fit([n * n for n, _, _ in SIZES], delta)]
    return Calibration(*(v * scale for fit in fits for v, scale in zip(fit, (1e9, 1e6))))


def calibration(device, dtype: torch.dtype = torch.float32) -> Calibration:
    """The measured costs for layers of `dtype` on `device` (timed once per process)."""
    return _measured(str(torch.device(device)), dtype)


def _fit(macs, seconds):
    """The line through the two points. On a loaded machine the larger size can time faster:
    then the larger point's whole time is priced per MAC (a price is never zero or negative)."""
    slope = (seconds[1] - seconds[0]) / (macs[1] - macs[0])
    per_mac = slope if slope > 0 else max(seconds) / macs[1]
    per_mac = max(per_mac, 1e-15)  # a timer that read 0 on a loaded machine: still priced
    return per_mac, max(seconds[0] - per_mac * macs[0], 0.0)


def _timed(fn, device) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    runs = []
    for _ in range(REPEATS):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        runs.append(time.perf_counter() - start)
    return min(runs)  # the cost without interference from other work on the machine


def _time_merges(device, dtype, n, r, how: str) -> float:
    """Seconds per layer to re-merge LAYERS same-shaped layers: each on its own ("one"),
    batched ("batch"), or from their kept ΔW ("delta")."""
    gen = torch.Generator().manual_seed(0)
    jobs = []
    for _ in range(LAYERS):
        f = Factors(torch.randn(r, n, generator=gen).to(device),
                    torch.randn(n, r, generator=gen).to(device))
        delta = (f.up @ f.down).to(delta_dtype(dtype)) if how == "delta" else None
        jobs.append(Job(torch.zeros(n, n, dtype=dtype, device=device),
                        torch.randn(n, n, generator=gen).to(device=device, dtype=dtype),
                        f, 0.5, delta=delta))

    def merge():
        if how == "batch":
            batched_merge.merge(jobs, 2 ** 30)
        elif how == "delta":
            batched_merge.merge_deltas(jobs)
        else:
            for job in jobs:
                batched_merge.merge_one(job)
    return _timed(merge, device) / LAYERS


def _time_branch(device, dtype, n, r, tokens) -> float:
    """One layer's low-rank branch on its output, as the bypass adds it (bypass.py: into an
    fp32 output in place, else a delta cast and added)."""
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(n, n, bias=False).to(device=device, dtype=dtype)
    x = torch.randn(2, tokens // 2, n, generator=gen).to(device=device, dtype=dtype)
    f = Factors(torch.randn(r, n, generator=gen).to(device),
                torch.randn(n, r, generator=gen).to(device))
    with torch.no_grad():
        out = layer(x)  # the branch adds to it at every timing: its values do not matter
        if dtype == torch.float32:
            return _timed(lambda: low_rank_add(x, f, 0.5, None, None, out), device)
        return _timed(lambda: added(out, low_rank_delta(layer, x, f, 0.5, None, None)), device)


def _time_hook_call(device, dtype) -> float:
    """What calling a forward hook adds to a layer's call: on a layer too small for its own
    work to hide it."""
    layer = nn.Linear(8, 8, bias=False).to(device=device, dtype=dtype)
    x = torch.zeros(1, 8, device=device, dtype=dtype)
    with torch.no_grad():
        plain = _timed(lambda: layer(x), device)
        hook = layer.register_forward_hook(lambda module, args, out: out)
        try:
            hooked = _timed(lambda: layer(x), device)
        finally:
            hook.remove()
    return max(hooked - plain, 0.0)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
