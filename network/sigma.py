"""Positions by noise level (docs/design.md §3): `s0.5` is the point of a pass where the
sampler's sigma falls to 0.5, placed on that pass's steps.

Why: flow models sample with a shifted schedule and few steps (Flux schnell: 4), so "half the
steps" says little about how much of the picture is settled; the noise level does. The host
gives the sigma the model is called with at each step of the pass; a sigma position becomes an
ordinary (fractional) step position, and schedules, windows and blend= work on it unchanged.

Mapping: step k (0-based) sits at the pass's k-th sigma; between two steps the position is
interpolated linearly on sigma; at or above the first sigma it is step 0. The pass ends at
sigma 0, one step past its last step, so a sigma below the last step's lies between that step
and the end, and no step of the pass reaches it.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from ..parser import STRENGTH_KEYS, Keyframe, Position, Schedule, Tag


def pass_sigmas(values: Optional[Sequence[float]], steps: int) -> Optional[Tuple[float, ...]]:
    """`values` as one pass's sigmas (one per step, finite, ≥ 0, never rising), or None when
    they cannot be: a host that cannot say its sigmas leaves sigma positions unplaced (each a
    warning), never a failed generation."""
    if values is None:
        return None
    try:
        levels = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    if len(levels) != steps or not all(math.isfinite(v) and v >= 0 for v in levels):
        return None
    if any(b > a for a, b in zip(levels, levels[1:])):
        return None
    return levels


def sigma_problem(values, steps: int) -> Optional[str]:
    """Why `values` are not a pass's sigmas (None when they are)."""
    if values is None or pass_sigmas(values, steps) is not None:
        return None
    try:
        count = len(values)
    except TypeError:
        return "not a list of numbers"
    if count != steps:
        return f"{count} values for {steps} steps; give one per step"
    return "the values must be finite, ≥ 0, and never rise from one step to the next"


def sigma_index(sigma: float, sigmas: Sequence[float]) -> float:
    """The 0-based (fractional) step index where the noise level falls to `sigma`."""
    levels = np.append(np.asarray(sigmas, dtype=np.float64), 0.0)  # the end: sigma 0
    if sigma >= levels[0]:
        return 0.0
    k = int(np.searchsorted(-levels, -sigma, side="left"))  # first level at or below sigma
    hi, lo = levels[k - 1], levels[k]  # hi > sigma >= lo
    return (k - 1) + (hi - sigma) / (hi - lo)


def flow_sigmas(steps: int, shift: float = 1.0) -> Tuple[float, ...]:
    """The sigmas of a flow-matching pass as Flux's and SD3's pipelines make them: time
    t = 1 − k/N shifted, shift·t / (1 + (shift − 1)·t) (shift 1: no shift, Flux schnell)."""
    t = 1.0 - np.arange(steps, dtype=np.float64) / steps
    return tuple(float(v) for v in shift * t / (1.0 + (shift - 1.0) * t))


# ---- sigma positions in a tag ------------------------------------------------------------
def _uses_sigma(schedule: Optional[Schedule]) -> bool:
    return schedule is not None and any(k.at.unit == "sigma" for k in schedule.keys)


def sigma_items(tag: Tag) -> Iterator[Tuple[str, Tuple[float, ...]]]:
    """Each item of the tag with sigma positions: (its key as `Tag.columns` records it, the
    sigmas it names in written order). `step=a-b` is one item, keyed "last"."""
    for key in STRENGTH_KEYS:
        s = getattr(tag, key)
        if _uses_sigma(s):
            yield key, tuple(k.at.value for k in s.keys if k.at.unit == "sigma")
    for key, s in tag.groups + tag.blocks + tag.experts:
        if _uses_sigma(s):
            yield key, tuple(k.at.value for k in s.keys if k.at.unit == "sigma")
    w = tag.window
    if w.last is not None:
        named = [p.value for p in (w.start, w.last) if p.unit == "sigma"]
        if named:
            yield "last", tuple(named)
    elif w.start is not None and w.start.unit == "sigma":
        yield "start", (w.start.value,)
    if w.stop is not None and w.stop.unit == "sigma":
        yield "stop", (w.stop.value,)
    if tag.blend is not None and tag.blend.unit == "sigma":
        yield "blend", (tag.blend.value,)


def item_label(key: str) -> str:
    """How the user wrote the item of `key`: 'unet=', 'step=' (for "last")."""
    return "step=" if key == "last" else f"{key}="


def _on_steps(pos: Optional[Position], sigmas) -> Optional[Position]:
    if pos is None or pos.unit != "sigma":
        return pos
    return Position(float(sigma_index(pos.value, sigmas)) + 1.0, "step")  # counted from 1


def _schedule_on_steps(s: Optional[Schedule], sigmas) -> Optional[Schedule]:
    if not _uses_sigma(s):
        return s
    if sigmas is None:
        return None
    return Schedule(keys=tuple(Keyframe(k.value, _on_steps(k.at, sigmas)) for k in s.keys))


def on_steps(tag: Tag, sigmas: Optional[Sequence[float]]) -> Tag:
    """The tag with every sigma position turned into a (fractional) step number of the pass
    whose sigmas these are; with no sigmas, the items that use one are left out."""
    keys = {k for k, _ in sigma_items(tag)}
    if not keys:
        return tag
    changes = {key: _schedule_on_steps(getattr(tag, key), sigmas) for key in STRENGTH_KEYS
               if key in keys}
    for field in ("groups", "blocks", "experts"):
        pairs = ((k, _schedule_on_steps(s, sigmas)) for k, s in getattr(tag, field))
        changes[field] = tuple((k, s) for k, s in pairs if s is not None)
    placed = (lambda pos: _on_steps(pos, sigmas)) if sigmas is not None else (lambda pos: None)
    w = tag.window
    if "last" in keys:  # step=a-b is one item: placed or left out as a whole
        w = replace(w, start=placed(w.start), last=placed(w.last))
    elif "start" in keys:
        w = replace(w, start=placed(w.start))
    if "stop" in keys:
        w = replace(w, stop=placed(w.stop))
    changes["window"] = w
    if "blend" in keys:
        changes["blend"] = placed(tag.blend)
    return replace(tag, **changes)
