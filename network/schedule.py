"""Schedules, windows and interpolation resolved over the steps of one pass (docs/design.md §3).

Everything works in step-index space: step k (0-based) of N sits at progress k/(N-1);
a fraction p sits at p·(N-1); step number s (1-based) at s-1.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ..parser import Position, Schedule, Window

EPS = 1e-6  # float slack, so "0.5 of 29 steps" lands on index 14.5 whatever the rounding

CURVES = {
    "linear": lambda t: t,
    "ease_in": lambda t: t * t,
    "ease_out": lambda t: 1.0 - (1.0 - t) ** 2,
    # quadratic in-out, the same family as ease_in / ease_out
    "ease_in_out": lambda t: np.where(t < 0.5, 2.0 * t * t, 1.0 - 2.0 * (1.0 - t) ** 2),
    "cosine": lambda t: (1.0 - np.cos(math.pi * t)) / 2.0,
}


def index_of(pos: Position, steps: int, unit: str) -> float:
    """Step index (0-based, may be fractional) of a position; `unit` decides "auto".
    A one-step pass keeps its step at progress 0 (and fraction 1 one index later)."""
    span = max(steps - 1, 1)
    if pos.unit == "percent":
        return pos.value / 100.0 * span
    unit = unit if pos.unit == "auto" else pos.unit
    if unit in ("progress", "phase"):  # Forge Neo's and Wan2GP's k/N
        return pos.value * steps
    if unit == "fraction":
        return pos.value * span
    return pos.value - 1.0


def schedule_unit(schedule: Schedule) -> str:
    """loractl and SD.Next: positions are fractions when the last one is ≤ 1, else steps."""
    plain = [k.at.value for k in schedule.keys if k.at.unit == "auto"]
    return "fraction" if not plain or max(plain) <= 1.0 else "step"


@functools.lru_cache(maxsize=2048)
def evaluate(schedule: Schedule, steps: int, interp: str) -> np.ndarray:
    """The schedule's value at every step of a pass of `steps` steps (read-only array)."""
    if schedule.constant is not None:
        out = np.full(steps, schedule.constant)
    else:
        unit = schedule_unit(schedule)
        pos = np.array([index_of(k.at, steps, unit) for k in schedule.keys])
        val = np.array([k.value for k in schedule.keys])
        order = np.argsort(pos, kind="stable")
        pos, val = pos[order], val[order]
        k = np.arange(steps, dtype=np.float64)
        i = np.searchsorted(pos, k + EPS, side="right") - 1  # last keyframe at or before k
        held = val[np.clip(i, 0, len(val) - 1)]  # also holds before the first / after the last
        if interp == "step" or len(val) == 1:
            out = held
        else:
            inside = (i >= 0) & (i < len(val) - 1)
            lo = np.clip(i, 0, len(val) - 2)
            span = pos[lo + 1] - pos[lo]
            t = np.clip((k - pos[lo]) / np.where(span > 0, span, 1.0), 0.0, 1.0)
            ramp = val[lo] + (val[lo + 1] - val[lo]) * CURVES[interp](t)
            out = np.where(inside, ramp, held)
    out = np.asarray(out, dtype=np.float64)
    out.flags.writeable = False
    return out


def on_phase(schedule: Schedule, steps: int, first: int, end: int) -> np.ndarray:
    """Wan2GP's values for one expert: each holds an equal share of the steps [first, end)
    that expert runs (as Wan2GP spreads them), the first and last held outside."""
    if end <= first:
        out = np.full(steps, schedule.keys[0].value)  # an expert that runs no step
    else:
        inside = evaluate(schedule, end - first, "step")
        out = np.concatenate([np.full(first, inside[0]), inside,
                              np.full(steps - end, inside[-1])])
    out.flags.writeable = False
    return out


def is_phased(schedule: Schedule) -> bool:
    return any(k.at.unit == "phase" for k in schedule.keys)


@functools.lru_cache(maxsize=1024)
def window_mask(window: Window, steps: int) -> np.ndarray:
    """1.0 where the network is on, 0.0 where start=/stop=/step=a-b switch it off."""
    k = np.arange(steps, dtype=np.float64)
    on = np.ones(steps, dtype=bool)
    if window.start is not None:
        on &= k >= index_of(window.start, steps, "step") - EPS
    if window.stop is not None:
        on &= k < index_of(window.stop, steps, "step") - EPS
    if window.last is not None:
        on &= k <= index_of(window.last, steps, "step") + EPS
    out = on.astype(np.float64)
    out.flags.writeable = False
    return out
