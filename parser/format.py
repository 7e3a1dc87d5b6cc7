"""Canonical tag text: `parse(format_tag(t))` gives back `t`."""
from __future__ import annotations

from decimal import Decimal

from .ast import (TEXT_ENCODER_KEYS, BlockWeights, Intersect, Mask, Not, Position, Region, Scaled,
                  Schedule, Tag, VectorEntry)


def format_number(x: float) -> str:
    """Shortest text that reads back as the same float, without an exponent."""
    text = format(Decimal(repr(float(x))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def format_position(pos: Position) -> str:
    if pos.unit == "percent":
        return format_number(pos.value) + "%"
    if pos.unit == "sigma":
        return "s" + format_number(pos.value)
    if pos.unit == "step":
        return str(int(pos.value))
    if pos.unit == "progress":  # inside Forge Neo's brackets, where it is the plain number
        return format_number(pos.value)
    text = format_number(pos.value)
    if pos.unit == "fraction" and "." not in text:
        text += ".0"  # a whole number would read back as a step number
    return text


def format_schedule(s: Schedule) -> str:
    if s.constant is not None:
        return format_number(s.constant)
    units = {k.at.unit for k in s.keys}
    if units == {"phase"}:  # Wan2GP's values over one expert's steps
        return ",".join(format_number(k.value) for k in s.keys)
    keys = ",".join(f"{format_number(k.value)}@{format_position(k.at)}" for k in s.keys)
    return f"[{keys}]" if "progress" in units else keys


def format_entry(e: VectorEntry) -> str:
    if e.kind == "num":
        return format_number(e.value)
    if e.kind == "X" and e.value:
        return "X" + ("+" if e.value > 0 else "-") + format_number(abs(e.value))
    return e.kind


def format_weights(w: BlockWeights) -> str:
    return w.preset if w.preset is not None else ",".join(format_entry(e) for e in w.entries)


def format_region(r: Region) -> str:
    if isinstance(r, Mask):
        return r.name
    if isinstance(r, Not):
        return "!" + _atom(r.operand)
    if isinstance(r, Scaled):
        inner = format_region(r.operand) if isinstance(r.operand, Not) else _atom(r.operand)
        return f"{inner}*{format_number(r.weight)}"
    if isinstance(r, Intersect):
        return "&".join(_paren_unless(o, (Mask, Not, Scaled)) for o in r.operands)
    return "+".join(_paren_unless(o, (Mask, Not, Scaled, Intersect)) for o in r.operands)


def _atom(r: Region) -> str:
    return r.name if isinstance(r, Mask) else f"({format_region(r)})"


def _paren_unless(r: Region, bare: tuple) -> str:
    return format_region(r) if isinstance(r, bare) else f"({format_region(r)})"


def format_tag(tag: Tag) -> str:
    items = [tag.kind, tag.name]
    if tag.te is not None:
        items.append(format_schedule(tag.te))
    for key in TEXT_ENCODER_KEYS + ("unet",):
        if getattr(tag, key) is not None:
            items.append(f"{key}={format_schedule(getattr(tag, key))}")
    items += [f"{k}={format_schedule(v)}" for k, v in tag.groups + tag.blocks + tag.experts]
    if tag.lbw is not None:
        items.append(f"lbw={format_weights(tag.lbw)}")
    for key in ("x", "dyn"):
        if getattr(tag, key) is not None:
            items.append(f"{key}={format_number(getattr(tag, key))}")
    w = tag.window
    if w.last is not None:
        items.append(f"step={format_position(w.start)}-{format_position(w.last)}")
    elif w.start is not None:
        items.append(f"start={format_position(w.start)}")
    if w.stop is not None:
        items.append(f"stop={format_position(w.stop)}")
    for key in ("hr", "hrte", "hrunet"):
        if getattr(tag, key) is not None:
            items.append(f"{key}={format_schedule(getattr(tag, key))}")
    if tag.region is not None:
        items.append(f"region={format_region(tag.region)}")
    if tag.blend is not None:
        items.append(f"blend={format_position(tag.blend)}")
    if tag.interp is not None:
        items.append(f"interp={tag.interp}")
    if tag.neg is not None:
        items.append(f"neg={format_number(tag.neg)}")
    return "<" + ":".join(items) + ">"
