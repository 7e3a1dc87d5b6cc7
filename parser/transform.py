"""Builds the typed AST from the tag grammar (tag.lark), inline during the LALR parse.

Item rules return `Item`s; `tag()` assembles them, applying A1111's positional order and
collecting problems. Nothing here raises on user text: problems are returned as
(offset-in-tag, message, severity) triples.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from lark import Token, Transformer

from .ast import (BUILTIN_REGIONS, INTERPOLATIONS, STRENGTH_KEYS, TEXT_ENCODER_BLOCKS,
                  BlockWeights, Intersect, Keyframe, Mask, Not, Position, Scaled, Schedule, Tag,
                  Union_, VectorEntry, Window)
from .format import format_entry
from .names import network_name_problem

Problem = Tuple[int, str, str]  # (offset in the tag text, message, severity)

KNOWN_KEYS = STRENGTH_KEYS + (
    "in", "mid", "out", "down", "up", "double", "single", "lbw", "w", "x", "dyn", "start", "stop",
    "step", "region", "interp", "neg", "blend", "high", "low", "module") + \
    TEXT_ENCODER_BLOCKS + ("IN00", "M00", "OUT00", "D00", "S00")
MAX_REGION_DEPTH = 32  # deeper expressions are refused: evaluating them would recurse too far
GROUP_ALIASES = {"in": "in", "down": "in", "mid": "mid", "out": "out", "up": "out",
                 "double": "double", "single": "single"}
GROUPS = ("in", "mid", "out", "double", "single")  # what the block groups are called in a Tag
EXPERTS = ("high", "low")  # a two-expert model's experts (Wan 2.2: high noise, then low noise)
# SD.Next's forms: the flag `high`/`low` and `module=`, each naming the one expert a tag is on
EXPERT_FLAGS = {"high": "high", "low": "low", "transformer": "high", "transformer_2": "low"}


def region_depth(region) -> int:
    """Nesting depth of a region expression, counted without recursion (the input is hostile)."""
    deepest, stack = 0, [(region, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, (Not, Scaled)):
            stack.append((node.operand, depth + 1))
        elif isinstance(node, (Union_, Intersect)):
            stack.extend((child, depth + 1) for child in node.operands)
    return deepest


@dataclass
class Item:
    key: str  # canonical key, or "#positional"
    value: Any
    offset: int  # where the item starts in the tag text
    problems: Tuple[Problem, ...] = ()


MAX_NUMBER = 1000.0  # any number in a tag: strengths, positions (at most 1000 steps), scales


class NumberOutOfRange(ValueError):
    """A number beyond ±MAX_NUMBER (or one that overflows to infinity): never a strength a
    weight survives, so the tag is refused where the number stands."""

    def __init__(self, offset: int, text: str):
        super().__init__(f"'{text}' is out of range: numbers in a tag lie within "
                         f"±{MAX_NUMBER:g}")
        self.offset = offset


def _num(tok: Token, text: Optional[str] = None) -> float:
    """The token's number (or `text`'s, a part of it), bounded."""
    value = float(tok if text is None else text)
    if not abs(value) <= MAX_NUMBER:
        raise NumberOutOfRange(tok.start_pos, str(tok))
    return value


def _position(children) -> Position:
    tok = children[0]
    if tok.type == "SIGMA":  # s0.5: the number after the "s"
        return Position(_num(tok, str(tok)[1:]), "sigma")
    return Position(_num(tok), "percent" if len(children) > 1 else "auto")


def window_position(pos: Position, text: str) -> Tuple[Position, Optional[str]]:
    """start=/stop=/step= follow lora-block-weight: a whole number is a step number; a
    decimal is a fraction of the pass and must lie in [0, 1]. Percent and sigma positions
    say their unit themselves."""
    if pos.unit in ("percent", "sigma"):
        return pos, None
    if "." in text or "e" in text.lower():
        if not 0.0 <= pos.value <= 1.0:
            return pos, (f"'{text}' is neither a whole step number nor a fraction in [0, 1]")
        return Position(pos.value, "fraction"), None
    return Position(pos.value, "step"), None


def blend_position(pos: Position, text: str) -> Tuple[Position, Optional[str]]:
    """blend= takes a position as start= does, except that a bare 0 or 1 is a fraction: 0 no
    blended start, 1 the whole pass blended (as step numbers both would mean nothing blended)."""
    if pos.unit == "auto" and text.strip() in ("0", "1"):
        return Position(float(pos.value), "fraction"), None
    return window_position(pos, text)


class TagTransformer(Transformer):
    # ---- values -----------------------------------------------------------------
    def constant(self, children):
        return Schedule.const(_num(children[0]))

    def keyframes(self, children):
        return Schedule(keys=tuple(
            Keyframe(_num(c), Position(1.0)) if isinstance(c, Token) else c for c in children
            if not (isinstance(c, Token) and c.type == "SEMI")))

    def progress(self, children):
        """Forge Neo's [v@t,...]: a plain t is its progress sampling_step/steps."""
        return Schedule(keys=tuple(
            Keyframe(k.value, Position(k.at.value, "progress")) if k.at.unit == "auto" else k
            for k in children))

    def keyframe(self, children):
        return Keyframe(_num(children[0]), children[1][0])

    def position(self, children):
        return (_position(children), children[0])

    def ventry(self, children):
        tok = children[0]
        if tok.type == "NUMBER":
            return VectorEntry("num", _num(tok))
        text = str(tok)
        if text in ("R", "U"):
            return VectorEntry(text)
        return VectorEntry("X", _num(tok, text[1:]) if len(text) > 1 else 0.0)

    def vector(self, children):
        return BlockWeights(entries=tuple(children))

    def preset(self, children):
        return BlockWeights(preset=str(children[0]))

    def mask(self, children):
        name = str(children[0])
        return Mask(name.lower() if name.lower() in BUILTIN_REGIONS else name)

    def term(self, children):
        bang = isinstance(children[0], Token) and children[0].type == "BANG"
        node = Not(children[1]) if bang else children[0]
        last = children[-1]
        if isinstance(last, Token) and last.type == "POSNUM":
            node = Scaled(node, _num(last))
        return node

    def intersection(self, children):
        return Intersect(tuple(children))

    def region(self, children):
        return Union_(tuple(children))

    # ---- items ------------------------------------------------------------------
    def pos_schedule(self, children):
        return Item("#positional", children[0], -1)

    def pos_vector(self, children):
        if any(isinstance(c, Token) for c in children):  # a ";": Wan2GP's phases
            return _phases(children)
        return Item("#positional", BlockWeights(entries=tuple(children)), -1)

    def pos_preset(self, children):
        return Item("#positional", BlockWeights(preset=str(children[0])), -1)

    def strength_item(self, children):
        key, value = children
        return Item(key.lower(), value, key.start_pos)

    def group_item(self, children):
        key, value = children
        return Item(GROUP_ALIASES[key.lower()], value, key.start_pos)

    def expert_item(self, children):
        key, value = children
        return Item(key.lower(), value, key.start_pos)

    def expert_steps(self, children):
        key, *values = children
        return Item(key.lower(), phase_schedule([_num(v) for v in values]), key.start_pos)

    def block_item(self, children):
        key, value = children
        return Item(key.upper(), value, key.start_pos)

    def lbw_item(self, children):
        key, value = children
        return Item("lbw", value, key.start_pos)

    def number_item(self, children):
        key, value = children
        return Item(key.lower(), _num(value), key.start_pos)

    def dyn_item(self, children):
        key, value = children
        text = str(value)
        if not text.isdigit() or int(text) < 1:
            return Item("dyn", None, key.start_pos,
                        ((value.start_pos, f"dyn must be a whole number of ranks ≥ 1, not '{text}'",
                          "error"),))
        return Item("dyn", int(text), key.start_pos)

    def window_item(self, children):
        key, (pos, tok) = children
        pos, problem = window_position(pos, str(tok))
        problems = ((tok.start_pos, f"{key.lower()}: {problem}", "error"),) if problem else ()
        return Item(key.lower(), pos, key.start_pos, problems)

    def step_item(self, children):
        key, (first, ftok), (last, ltok) = children
        problems = []
        first, p1 = window_position(first, str(ftok))
        last, p2 = window_position(last, str(ltok))
        for tok, p in ((ftok, p1), (ltok, p2)):
            if p:
                problems.append((tok.start_pos, f"step: {p}", "error"))
        return Item("step", (first, last), key.start_pos, tuple(problems))

    def blend_item(self, children):
        key, (pos, tok) = children
        pos, problem = blend_position(pos, str(tok))
        problems = ((tok.start_pos, f"blend: {problem}", "error"),) if problem else ()
        return Item("blend", pos, key.start_pos, problems)

    def region_item(self, children):
        key, value = children
        depth = region_depth(value)
        if depth > MAX_REGION_DEPTH:
            return Item("region", None, key.start_pos,
                        ((key.start_pos, f"region nests {depth} levels deep; at most "
                          f"{MAX_REGION_DEPTH}", "error"),))
        return Item("region", value, key.start_pos)

    def interp_item(self, children):
        key, word = children
        name = str(word).lower()
        if name not in INTERPOLATIONS:
            return Item("interp", None, key.start_pos,
                        ((word.start_pos, f"unknown interp '{word}'; use one of "
                          + ", ".join(INTERPOLATIONS), "error"),))
        return Item("interp", name, key.start_pos)

    def unknown_item(self, children):
        key, _value = children
        if str(key).lower() == "module":  # SD.Next: module=transformer / transformer_2
            expert = EXPERT_FLAGS.get(str(_value).strip().lower())
            if expert is not None:
                return Item("#expert", expert, key.start_pos)
            return Item("#unknown", str(key), key.start_pos, (
                (key.start_pos, f"module={str(_value).strip()} names no expert "
                                "(transformer, transformer_2, high, low); it is ignored", "warning"),))
        close = difflib.get_close_matches(str(key).lower(), [k.lower() for k in KNOWN_KEYS], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return Item("#unknown", str(key), key.start_pos,
                    ((key.start_pos, f"unknown key '{key}' is ignored{hint}", "warning"),))

    # ---- the whole tag ------------------------------------------------------------
    def tag(self, children):
        kind_tok, name_tok = children[0], children[2]
        problems: List[Problem] = []
        name, name_problem = check_name(str(name_tok))
        if name_problem:
            problems.append((name_tok.start_pos, name_problem, "error"))
        fields: dict = {}
        slotted = set()  # the keys a positional value set
        columns = [("name", name_tok.start_pos)]
        positional = 0
        for colon, item in zip(children[3::2], children[4::2]):
            offset = item.offset if item.offset >= 0 else colon.start_pos + 1
            problems.extend(item.problems)
            if item.key == "#unknown" or item.problems and item.value is None:
                continue
            expert = _expert_flag(item)
            if expert is not None:  # `high` / `low` / module=: on that expert only
                other = EXPERTS[1 - EXPERTS.index(expert)]
                settings = [(other, Schedule.const(0.0))]
            elif item.key == "#positional":
                positional += 1
                key, value, problem = _positional(positional, item.value)
                if problem:
                    problems.append((offset, problem[0], problem[1]))
                if key is None or key in fields:  # A1111: a named item wins over its slot
                    continue
                settings = [(key, value)]
            elif item.key == "#phases":  # Wan2GP: high;low in the first slot
                positional += 1
                if positional != 1:
                    problems.append((offset, "Wan2GP's expert phases (high;low) go in the "
                                     "first slot; they are ignored here", "warning"))
                    continue
                settings = list(zip(EXPERTS, item.value))
            elif item.key == "step":  # step=a-b is start=a plus the last step still on
                settings = [("start", item.value[0]), ("last", item.value[1])]
            else:
                settings = [(item.key, item.value)]
            for key, value in settings:
                if key in slotted:  # A1111 reads the slot, then lets the named item replace it
                    problems.append((offset, f"'{key}' is given in its slot and as {key}=; the "
                                     "named one counts, as in A1111", "warning"))
                elif key in fields:
                    problems.append((offset, f"'{key}' is given twice; the last one counts",
                                     "warning"))
                slotted.discard(key)
                if item.key == "#positional":
                    slotted.add(key)
                fields[key] = value
                columns.append((key, offset))
        return (_build(kind_tok.lower(), name, fields), tuple(columns), tuple(problems))


def phase_schedule(values: List[float]) -> Schedule:
    """Wan2GP's values for one expert: each holds an equal share of that expert's steps."""
    if len(values) == 1:
        return Schedule.const(values[0])
    return Schedule(keys=tuple(Keyframe(v, Position(i / len(values), "phase"))
                               for i, v in enumerate(values)))


def _phases(children) -> Item:
    """Wan2GP's "high;low" multipliers: the two experts' strengths, the text encoder at 1."""
    phases: List[List] = [[]]
    for c in children:
        if isinstance(c, Token):
            phases.append([])
        else:
            phases[-1].append(c)
    if len(phases) != len(EXPERTS) or any(e.kind != "num" for p in phases for e in p):
        return Item("#positional", None, -1, ((0, f"'{_phase_text(phases)}' reads as Wan2GP's "
                    "expert phases, which are two lists of numbers: high;low (like 1;0 or "
                    "0.9,0.8;1)", "error"),))
    return Item("#phases", tuple(phase_schedule([e.value for e in p]) for p in phases), -1)


def _phase_text(phases) -> str:
    return ";".join(",".join(format_entry(e) for e in p) for p in phases)


def _expert_flag(item: Item) -> Optional[str]:
    """The expert a flag names: SD.Next's positional `high`/`low` or `module=`."""
    if item.key == "#expert":
        return item.value
    if item.key == "#positional" and isinstance(item.value, BlockWeights) and \
            item.value.preset is not None and item.value.preset.lower() in EXPERTS:
        return item.value.preset.lower()
    return None


def _positional(index: int, value) -> Tuple[Optional[str], Any, Optional[Tuple[str, str]]]:
    """A1111's positional order name:te:unet:dyn, plus lora-block-weight's legacy vector or
    preset in the later slots."""
    if isinstance(value, BlockWeights):
        if index == 1:
            if value.preset is not None:  # a lone word: most likely a typo for a number
                return None, None, (f"'{value.preset}' is not a strength: the first value is a "
                                    "number or a schedule like 0@0,1@0.5 (a block-weight preset "
                                    f"goes in lbw={value.preset})", "error")
            return None, None, ("the first value is a strength; put a block-weight vector or "
                                "preset in lbw=", "error")
        return "lbw", value, None
    if index == 1:
        return "te", value, None
    if index == 2:
        return "unet", value, None
    if index == 3:
        c = value.constant
        if c is None or c != int(c) or c < 1:
            return None, None, ("the third value is dyn, a whole number of ranks ≥ 1", "error")
        return "dyn", int(c), None
    return None, None, (f"positional value #{index} has no meaning (name:te:unet:dyn); "
                        "it is ignored", "warning")


def _build(kind: str, name: str, fields: dict) -> Tag:
    if "interp" not in fields and any(  # Forge Neo ramps its [v@t] schedules
            k.at.unit == "progress" for v in fields.values() if isinstance(v, Schedule)
            for k in v.keys):
        fields["interp"] = "linear"
    groups = tuple(sorted((k, fields[k]) for k in GROUPS if k in fields))
    experts = tuple((k, fields[k]) for k in EXPERTS if k in fields)
    blocks = tuple(sorted(((k, v) for k, v in fields.items() if k.isupper()), key=_block_sort))
    window = Window(start=fields.get("start"), stop=fields.get("stop"), last=fields.get("last"))
    simple = {k: fields.get(k) for k in STRENGTH_KEYS + ("lbw", "x", "dyn", "region", "interp",
                                                         "neg", "blend")}
    return Tag(kind=kind, name=name, groups=groups, blocks=blocks, experts=experts, window=window,
               **simple)


def _block_sort(item) -> Tuple[int, int]:
    name = item[0]
    if name in TEXT_ENCODER_BLOCKS:
        return (0, TEXT_ENCODER_BLOCKS.index(name))
    if name.startswith("IN"):
        return (1, int(name[2:]))
    if name.startswith("M"):
        return (2, 0)
    if name.startswith("B"):  # Wan's blocks
        return (4, int(name[1:]))
    if name.startswith(("NR", "CR")):  # Z-Image's noise and context refiners
        return (1, (100 if name[0] == "N" else 200) + int(name[2:]))
    if name.startswith("D"):  # Flux-family double- then single-stream blocks
        return (4, int(name[1:]))
    if name.startswith("S"):
        return (5, int(name[1:]))
    return (3, int(name[3:]))


def check_name(raw: str) -> Tuple[str, Optional[str]]:
    """The name as written (spaces around it dropped, "\\" as "/") and its problem (names.py)."""
    name = raw.strip().replace("\\", "/")
    return name, network_name_problem(name)


def shift_tag(tag: Tag, start: int, end: int, columns) -> Tag:
    """The cached tag placed at `start` in a prompt: only its positions change. (A shallow copy
    instead of dataclasses.replace, which re-runs __init__ and costs a tenth of a parse.)"""
    placed = copy.copy(tag)
    object.__setattr__(placed, "span", (start, end))
    object.__setattr__(placed, "columns", tuple((k, start + c + 1) for k, c in columns))
    return placed
