"""ΔW kept for the layers a plan re-merges more than once (the engine's merged path).

A scheduled LoRA re-merges its layer at each of its keyframes. From the factors that is
W = W0 + s·U·D, in·out·(r+1) multiply-adds; with U·D kept after the first merge, every later
one is W = W0 + s·ΔW, one pass over the weight. The kept products take memory the size of the
layers' weights, so they get a budget (a setting), given first to the contributions merged
most often per byte. Values differ from the factor path only by fp32 rounding; restore never
depends on them (it copies the pristine bits).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Set, Tuple

import torch
from torch import Tensor


class Deltas:
    """ΔW per contribution (keyed by the caller), made at first use within a budget in bytes."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = _check(budget_bytes)
        self._granted: Set[int] = set()
        self._made: Dict[int, Tensor] = {}

    def grant(self, wanted: Iterable[Tuple[int, int, int]]) -> Set[int]:
        """Which of `wanted` (key, bytes of its ΔW, merges it will make) get a kept ΔW: those
        with at least two merges, the most merges first, while the budget lasts."""
        self.clear()
        left = self.budget_bytes
        for key, nbytes, _ in sorted((w for w in wanted if w[2] > 1), key=lambda w: -w[2]):
            if nbytes <= left:
                self._granted.add(key)
                left -= nbytes
        return set(self._granted)

    def granted(self, key: int) -> bool:
        return key in self._granted

    def get(self, key: int, make: Callable[[], Tensor]) -> Tensor:
        """The kept ΔW of a granted key, made by `make()` the first time."""
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def clear(self) -> None:
        self._granted.clear()
        self._made.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._made.values())


def delta_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """fp32 beside fp32 weights; a 16-bit weight keeps its ΔW in its own dtype, half the
    memory, whose rounding is far below that of the merged weight's own (|ΔW| ≪ |W|)."""
    return weight_dtype if weight_dtype in (torch.float16, torch.bfloat16) else torch.float32


def _check(budget: int) -> int:
    if isinstance(budget, bool) or int(budget) != budget or budget < 0:
        raise ValueError(f"the ΔW budget is a whole number of bytes ≥ 0, not {budget!r}")
    return int(budget)
