"""The NetWeave tag language: grammar (tag.lark, prompt.lark), AST, parse and format."""
from .ast import (BUILTIN_REGIONS, INTERPOLATIONS, KINDS, STRENGTH_KEYS, TEXT_ENCODER_BLOCKS,
                  TEXT_ENCODER_KEYS, BlockWeights, Diagnostic, Severity, Intersect,
                  Keyframe, Mask, Not, Position, Prompt, Region, Scaled, Schedule, Tag, Union_,
                  VectorEntry, Window)
from .format import format_region, format_schedule, format_tag
from .parse import parse, parse_region, parse_weights, snippet
from .transform import KNOWN_KEYS

format = format_tag  # noqa: A001 - the public name the design uses: parse(format(t)) == t

__all__ = ["BUILTIN_REGIONS", "INTERPOLATIONS", "KINDS", "KNOWN_KEYS", "STRENGTH_KEYS",
           "TEXT_ENCODER_BLOCKS", "TEXT_ENCODER_KEYS", "BlockWeights", "Diagnostic", "Severity",
           "Intersect",
           "Keyframe", "Mask", "Not", "Position", "Prompt", "Region", "Scaled", "Schedule", "Tag",
           "Union_", "VectorEntry", "Window", "format", "format_region", "format_schedule",
           "format_tag", "parse", "parse_region", "parse_weights", "snippet"]
