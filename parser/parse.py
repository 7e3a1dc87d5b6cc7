"""`parse(prompt)`: the prompt without NetWeave tags, the tags, and every problem found.

It never raises on user text. A tag with an error is skipped (and still removed from the
text, so the host never sees it); a warning drops only the offending item.
"""
from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple

from lark import Lark
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from .ast import BlockWeights, Diagnostic, Prompt, Region, Tag
from .transform import NumberOutOfRange, TagTransformer, shift_tag

_HERE = os.path.dirname(os.path.abspath(__file__))
_PROMPT = Lark.open(os.path.join(_HERE, "prompt.lark"), parser="lalr", lexer="basic")
_TAGS = Lark.open(os.path.join(_HERE, "tag.lark"), parser="lalr", start=["tag", "region", "lbw_value"],
                  transformer=TagTransformer(), maybe_placeholders=False)

# What a user should read for each terminal the grammar may expect.
_TERMINALS = {
    "NUMBER": "a number", "POSNUM": "a number ≥ 0", "SIGMA": "a sigma like s0.5",
    "NAME": "a network name", "KIND": "lora, lyco, loractl or model", "PRESET": "a preset name",
    "VSYM": "R, U or X", "MASK": "a mask name", "WORD": "a name", "OTHER_VALUE": "a value", "$END": "the end",
    "STRENGTH_KEY": "a key", "GROUP_KEY": "a key", "BLOCK_KEY": "a key", "LBW_KEY": "a key",
    "NUMBER_KEY": "a key", "DYN_KEY": "a key", "WINDOW_KEY": "a key", "STEP_KEY": "a key",
    "REGION_KEY": "a key", "INTERP_KEY": "a key", "OTHER_KEY": "a key", "SEMI": "';'",
}
MAX_SNIPPET = 80


def parse(prompt: str, strict: bool = False) -> Prompt:
    """Split `prompt` into text and tags. `strict` turns warnings into errors."""
    if not isinstance(prompt, str):
        raise TypeError(f"parse() takes the prompt as str, not {type(prompt).__name__}")
    pieces: List[str] = []
    tags: List[Tag] = []
    errors: List[Diagnostic] = []
    joint = False  # a tag was just cut out: the next text joins with sane spacing
    for tok in _PROMPT.lex(prompt):
        text = str(tok)
        if tok.type != "TAG":
            if tok.type == "UNCLOSED_TAG":
                errors.append(_diagnostic(prompt, tok.start_pos, tok.start_pos,
                                          "this tag is not closed with '>'", "error"))
            if joint:
                text = _join(pieces, text)
                joint = False
            pieces.append(text)
            continue
        tag, problems = _parse_tag(text)
        skip = tag is None
        for offset, message, severity in problems:
            if strict and severity != "error":
                severity, message = "error", strictly(message)
            skip = skip or severity == "error"
            errors.append(_diagnostic(prompt, tok.start_pos, tok.start_pos + offset, message,
                                      severity))
        if not skip:
            tag, columns = tag
            tags.append(shift_tag(tag, tok.start_pos, tok.end_pos, columns))
        if pieces:
            pieces[-1] = pieces[-1].rstrip(" \t")
            if not pieces[-1]:
                pieces.pop()
        joint = True
    return Prompt("".join(pieces), tuple(tags), tuple(errors))


def strictly(message: str) -> str:
    """A warning's message once strict tags make it an error: the whole tag is skipped."""
    return message.replace("; it is ignored", "").replace(" is ignored", "") + \
        " (strict tags: the tag is not applied)"


def parse_region(text: str) -> Tuple[Optional[Region], Optional[Diagnostic]]:
    """Parse a region expression on its own (mask tab, API)."""
    try:
        return _TAGS.parse(text, start="region"), None
    except UnexpectedInput as exc:
        offset, message = _explain_syntax_error(exc, text, "region")
        return None, _diagnostic(text, 0, offset, message, "error", whole=True)
    except NumberOutOfRange as exc:
        return None, _diagnostic(text, 0, exc.offset, str(exc), "error", whole=True)


@functools.lru_cache(maxsize=256)
def parse_weights(text: str) -> Tuple[Optional[BlockWeights], Optional[str]]:
    """Parse an lbw value (vector or preset name) on its own, e.g. a line of a preset file."""
    try:
        return _TAGS.parse(text, start="lbw_value"), None
    except UnexpectedInput as exc:
        return None, _explain_syntax_error(exc, text, "value")[1]
    except NumberOutOfRange as exc:
        return None, str(exc)


def _join(pieces: List[str], text: str) -> str:
    """Text after a removed tag: one space between words; none at line or prompt
    edges or before punctuation."""
    text = text.lstrip(" \t")
    before = pieces[-1] if pieces else ""
    if before and text and not before.endswith("\n") and text[0] not in "\n,.;:!?)]":
        return " " + text
    return text


@functools.lru_cache(maxsize=4096)
def _parse_tag(text: str):
    """((Tag, columns) or None, problems) for one tag's text; offsets are within `text`."""
    try:
        tag, columns, problems = _TAGS.parse(text, start="tag")
    except UnexpectedInput as exc:
        return None, (_explain_syntax_error(exc, text, "tag") + ("error",),)
    except NumberOutOfRange as exc:
        return None, ((exc.offset, f"{_item_at(text, exc.offset)}{exc}", "error"),)
    return (tag, columns), problems


def _explain_syntax_error(exc: UnexpectedInput, text: str, what: str) -> Tuple[int, str]:
    if isinstance(exc, UnexpectedCharacters):
        offset = exc.pos_in_stream
        found = repr(text[offset])
        expected = exc.allowed
    elif isinstance(exc, UnexpectedToken) and exc.token.type != "$END":
        offset = exc.token.start_pos
        found = repr(_clip(str(exc.token)))
        expected = exc.expected
    else:  # the input ended early
        offset = len(text) - 1 if what == "tag" else len(text)
        found = "the end of the " + what
        expected = getattr(exc, "expected", ()) or ()
    where = _item_at(text, offset) if what == "tag" else ""
    wanted = sorted({_describe(name) for name in expected if name != "$END"} - {""})
    hint = ""
    if "'@'" in wanted and found in ("','", "';'"):
        hint = " (a schedule needs a position on every value: value@position)"
    wanted_text = ", ".join(wanted) if wanted else "something else"
    return offset, f"{where}expected {wanted_text}, found {found}{hint}"


def _clip(text: str, size: int = 16) -> str:
    return text if len(text) <= size else text[:size] + "…"


def _item_at(text: str, offset: int) -> str:
    """'in "te=abc": ' - the item of a tag that holds `offset`, to say where it went wrong."""
    start = text.rfind(":", 0, offset) + 1
    end = text.find(":", offset)
    item = text[start:end if end >= 0 else len(text) - 1].strip()
    return f"in '{item}': " if start > 0 and item else ""


def _describe(terminal: str) -> str:
    if terminal in _TERMINALS:
        return _TERMINALS[terminal]
    try:
        pattern = _TAGS.get_terminal(terminal).pattern
    except KeyError:
        return terminal.lower()
    return repr(pattern.value) if pattern.type == "str" else terminal.lower()


def _diagnostic(prompt: str, tag_start: int, offset: int, message: str, severity: str,
                whole: bool = False) -> Diagnostic:
    return Diagnostic(message, offset + 1, snippet(prompt, tag_start, offset, whole), severity)


def snippet(prompt: str, start: int, offset: int, whole: bool = False) -> str:
    """The tag that starts at `start` (or the whole text), with a caret under `offset`."""
    if whole:
        end = len(prompt)
    else:
        end = prompt.find(">", start)
        end = len(prompt) if end < 0 else end + 1
    line = prompt[start:end].replace("\n", " ").replace("\t", " ")
    caret = offset - start
    if len(line) > MAX_SNIPPET:  # keep the caret in view
        lo = max(0, min(caret - MAX_SNIPPET // 2, len(line) - MAX_SNIPPET))
        line = ("…" if lo else "") + line[lo:lo + MAX_SNIPPET] + ("…" if lo + MAX_SNIPPET < len(line) else "")
        caret = caret - lo + (1 if lo else 0)
    return line + "\n" + " " * max(caret, 0) + "^"
