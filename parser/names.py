"""The one rule for names: a network or model name (a file or folder below a network folder)
and a mask name (a file in the mask folder). The parser, the network folders, the mask store
and the API all ask here, about the whole string."""
from __future__ import annotations

import re
from typing import Optional

MASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MASK_RULE = "1–64 letters, digits, '_', '.' or '-', not starting with '.' or '-'"


def network_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot name a network, or None. Sub-folders ("/") and spaces are fine; "..",
    ".", empty folder names, absolute paths, drive letters and control characters are not."""
    if not isinstance(name, str) or not name:
        return "the network name is empty"
    bad = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"the network name holds a control character (code {ord(bad)})"
    if not valid_unicode(name):
        return "the network name is not valid Unicode"
    name = name.replace("\\", "/")
    if name.startswith(("/", "~")) or re.match(r"[A-Za-z]:", name):
        return f"the network name '{name}' is an absolute path; name it relative to the network folder"
    parts = name.split("/")
    if any(p.strip() in ("..", ".") for p in parts):
        return f"the network name '{name}' may not use '.' or '..' folders"
    if any(not p.strip() for p in parts):
        return f"the network name '{name}' has an empty folder name"
    return None


def mask_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot name a mask, or None."""
    if not isinstance(name, str) or not MASK_NAME.fullmatch(name):
        shown = name if isinstance(name, str) and valid_unicode(name) else repr(name)
        return f"'{shown}' is not a valid mask name: {MASK_RULE}"
    return None


def valid_unicode(text: str) -> bool:
    """No lone surrogates (JSON can escape them; no UTF-8 text holds them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
