"""Many layers re-merged at one keyframe in a few large operations (the merged path, engine.py).

Same-shaped layers that each take one plain two-factor contribution (LoRA) merge together:

    B   = [W0_1; …; W0_n]                       one multi-tensor copy, into fp32
    B  += [s_1·U_1; …; s_n·U_n] @ [D_1; …; D_n]  one batched multiply-add
    W_i = B_i                                    one multi-tensor copy, cast to each weight

instead of one Python round trip per layer. It costs one more pass over the weights than
merging layer by layer straight into each weight, so it wins where the round trip dominates (a
GPU, small layers) and loses where memory does (large layers on a CPU); the engine asks the
measured cost model (calibrate.py) for each group. A layer whose ΔW is kept (deltas.py) merges
as W = W0 + s·ΔW instead: on a GPU, fp32 weights of one strength in two multi-tensor
operations (few launches); on a CPU, one pass per weight (no launches to save, and a copy
then an add would pass over it twice). Values
are the per-layer ones up to fp32 rounding; restore never depends on them (it copies the
pristine bits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .bypass import Factors


@dataclass(frozen=True)
class Job:
    """One layer's merge: `dest` = `w0` + strength · up · down, written in place."""

    dest: Tensor  # the weight (or the chunk of it) the layer computes with
    w0: Tensor  # its pristine copy, any dtype, on any device
    factors: Factors  # fp32, on dest's device
    strength: float
    source: object = None  # what the caller names in an Overflow (the engine: a contribution)
    delta: Optional[Tensor] = None  # up · down kept (deltas.py): merged from it instead

    @property
    def key(self) -> Tuple:
        """Layers with the same key can share one batch."""
        if self.delta is not None:
            return ("delta", self.dest.dtype, self.dest.device, self.dest.is_inference())
        return (tuple(self.dest.shape), self.dest.dtype, self.dest.device,
                self.factors.down.shape[0], self.dest.is_inference())

    @property
    def bytes(self) -> int:
        return self.dest.numel() * 4  # its row of the fp32 batch


class Overflow(ArithmeticError):
    """A merged weight that does not fit its dtype (beyond its largest finite value, or NaN):
    nothing of it was written."""

    def __init__(self, job: Job):
        super().__init__(f"the merged weight does not fit {job.dest.dtype}")
        self.job = job


def fits(values: Tensor, dtype: torch.dtype) -> Tensor:
    """Per leading row, whether fp32 `values` fit `dtype` (fp32 itself: whether finite)."""
    limit = torch.finfo(dtype).max
    return (values.abs() <= limit).flatten(1).all(1)


def groups(jobs: Iterable[Job]) -> Dict[Tuple, List[Job]]:
    out: Dict[Tuple, List[Job]] = {}
    for job in jobs:
        out.setdefault(job.key, []).append(job)
    return out


def merge_one(job: Job) -> None:
    """One layer on its own: W0 + s·ΔW from a kept ΔW, else the fused multiply-add; straight
    into an fp32 weight (finite values cannot overflow it)."""
    rows = job.dest.shape[0]
    dest = job.dest.view(rows, -1)
    mode = torch.inference_mode() if job.dest.is_inference() else torch.no_grad()
    with mode:
        w0 = job.w0.reshape(rows, -1).to(job.dest.device, torch.float32)
        out = dest if dest.dtype == torch.float32 else None
        if job.delta is not None:
            w = torch.add(w0, job.delta.view(rows, -1), alpha=job.strength, out=out)
        else:
            w = torch.addmm(w0, job.factors.up, job.factors.down, alpha=job.strength, out=out)
        if out is None:
            if not bool(fits(w[None], dest.dtype)[0]):
                raise Overflow(job)
            dest.copy_(w)


def merge_deltas(jobs: List[Job]) -> None:
    """Layers with a kept ΔW: fp32 weights in one pass each on a CPU, or of one strength in a
    multi-tensor copy of W0 and a multi-tensor add elsewhere; any other dtype one by one (the
    cast and its overflow check)."""
    if jobs[0].dest.dtype != torch.float32:
        for job in jobs:
            merge_one(job)
        return
    mode = torch.inference_mode() if jobs[0].dest.is_inference() else torch.no_grad()
    with mode:
        if jobs[0].dest.device.type == "cpu":  # no launches to save: one pass per weight
            for job in jobs:
                torch.add(job.w0, job.delta, alpha=job.strength, out=job.dest)
            return
        by_strength: Dict[float, List[Job]] = {}
        for job in jobs:
            by_strength.setdefault(job.strength, []).append(job)
        for strength, group in by_strength.items():
            dests = [j.dest for j in group]
            torch._foreach_copy_(dests, [j.w0.to(j.dest.device, non_blocking=True) for j in group])
            torch._foreach_add_(dests, [j.delta for j in group], alpha=strength)


def merge(jobs: List[Job], budget_bytes: int) -> None:
    """Merge same-keyed jobs in batches of at most `budget_bytes` of fp32 scratch each."""
    per_batch = max(1, budget_bytes // jobs[0].bytes)
    for start in range(0, len(jobs), per_batch):
        _merge_batch(jobs[start:start + per_batch])


def _merge_batch(jobs: List[Job]) -> None:
    first = jobs[0]
    device = first.dest.device
    rows = first.dest.shape[0]
    flat = [j.dest.view(rows, -1) for j in jobs]
    mode = torch.inference_mode() if first.dest.is_inference() else torch.no_grad()
    with mode:
        batch = torch.empty((len(jobs), *flat[0].shape), dtype=torch.float32, device=device)
        parts = list(batch.unbind(0))
        torch._foreach_copy_(parts, [j.w0.reshape(rows, -1).to(device, non_blocking=True)
                                     for j in jobs])
        strengths = torch.tensor([j.strength for j in jobs], dtype=torch.float32)
        up = torch.stack([j.factors.up for j in jobs]) * strengths.to(device).view(-1, 1, 1)
        batch.baddbmm_(up, torch.stack([j.factors.down for j in jobs]))
        if first.dest.dtype != torch.float32:
            ok = fits(batch, first.dest.dtype)
            if not bool(ok.all()):
                raise Overflow(jobs[int((~ok).nonzero()[0])])
        torch._foreach_copy_(flat, parts)
