"""The typed AST of NetWeave tags. Frozen dataclasses, so tags compare and hash by value.

Positions in the prompt (`span`, `columns`) are kept out of equality: the same tag typed at
another place is the same tag.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Tuple, Union

KINDS = ("lora", "lyco", "loractl", "model")
INTERPOLATIONS = ("step", "linear", "ease_in", "ease_out", "ease_in_out", "cosine")
BUILTIN_REGIONS = ("full", "left", "right", "top", "bottom", "rest")
# One text encoder's strength each (te sets them all): te3 is SD3.5's T5-XXL.
TEXT_ENCODER_KEYS = ("te1", "te2", "te3")
# The keys whose values are a component's strength schedule, as the Tag's fields name them.
STRENGTH_KEYS = ("te",) + TEXT_ENCODER_KEYS + ("unet", "hr", "hrte", "hrunet")
# The block keys that name a text encoder (network/blocks.py places each in its architectures'
# lists): BASE SD's (and SD3.5's CLIPs), CLIP and T5 the Flux family's (T5 also SD3.5's),
# QWEN3 Z-Image's, QWENVL Qwen-Image's, UMT5 Wan's. In this order before any other block.
TEXT_ENCODER_BLOCKS = ("BASE", "CLIP", "T5", "QWEN3", "QWENVL", "UMT5")


@dataclass(frozen=True)
class Position:
    """Where on a pass something happens.

    unit "step": a step number counted from 1, as the progress bar shows;
    "fraction": progress in [0, 1]; "percent": progress in percent;
    "sigma": where the sampler's noise level falls to `value` (`s0.5`), placed on the steps
    by the pass's own sigmas (network/sigma.py);
    "progress": Forge Neo's `[v@t]`, step k of N at k/N (not k/(N-1));
    "phase": Wan2GP's values for one expert, the progress k/M over that expert's M steps;
    "auto": a schedule keyframe whose unit the whole schedule decides (docs/design.md §3).
    """

    value: float
    unit: str = "auto"


@dataclass(frozen=True)
class Keyframe:
    value: float
    at: Position


@dataclass(frozen=True)
class Schedule:
    """A constant (`keys` empty, `constant` set) or keyframes `v@p,...` in written order."""

    constant: Optional[float] = None
    keys: Tuple[Keyframe, ...] = ()

    @staticmethod
    def const(value: float) -> "Schedule":
        return Schedule(constant=float(value))


@dataclass(frozen=True)
class VectorEntry:
    """One lora-block-weight value: kind "num" (value), "R", "U" (random), "X" (x + value)."""

    kind: str
    value: float = 0.0


@dataclass(frozen=True)
class BlockWeights:
    """`lbw=`: either a preset name or explicit entries."""

    preset: Optional[str] = None
    entries: Tuple[VectorEntry, ...] = ()


@dataclass(frozen=True)
class Mask:
    name: str  # built-in region names are lower-case


@dataclass(frozen=True)
class Not:
    operand: "Region"


@dataclass(frozen=True)
class Scaled:
    operand: "Region"
    weight: float


@dataclass(frozen=True)
class Union_:
    operands: Tuple["Region", ...]


@dataclass(frozen=True)
class Intersect:
    operands: Tuple["Region", ...]


Region = Union[Mask, Not, Scaled, Union_, Intersect]


@dataclass(frozen=True)
class Window:
    """start=/stop=/step=a-b: the network is on from `start` (inclusive) and off from `stop`.
    step=a-b sets `start` a and `last` b, the last position still on."""

    start: Optional[Position] = None
    stop: Optional[Position] = None
    last: Optional[Position] = None


@dataclass(frozen=True)
class Tag:
    kind: str
    name: str
    te: Optional[Schedule] = None  # named te= or the first positional item
    te1: Optional[Schedule] = None
    te2: Optional[Schedule] = None
    te3: Optional[Schedule] = None  # SD3.5's T5-XXL
    unet: Optional[Schedule] = None  # named unet= or the second positional item
    hr: Optional[Schedule] = None
    hrte: Optional[Schedule] = None
    hrunet: Optional[Schedule] = None
    groups: Tuple[Tuple[str, Schedule], ...] = ()  # ("in"|"mid"|"out", schedule), sorted
    # ("IN04", schedule) in block order, the text encoders' (TEXT_ENCODER_BLOCKS) first
    blocks: Tuple[Tuple[str, Schedule], ...] = ()
    # ("high"|"low", schedule): a two-expert model's (Wan 2.2) multiplier on each expert
    experts: Tuple[Tuple[str, Schedule], ...] = ()
    lbw: Optional[BlockWeights] = None
    x: Optional[float] = None
    dyn: Optional[int] = None
    window: Window = Window()
    region: Optional[Region] = None
    interp: Optional[str] = None
    neg: Optional[float] = None
    # blend=: where a regional network's blended start ends (the pass is one pass from there);
    # None: the setting's default
    blend: Optional[Position] = None
    span: Tuple[int, int] = field(default=(0, 0), compare=False)
    columns: Tuple[Tuple[str, int], ...] = field(default=(), compare=False)

    def column_of(self, key: str) -> int:
        """1-based prompt column of an item (the tag's own column if not recorded)."""
        for k, col in self.columns:
            if k == key:
                return col
        return self.span[0] + 1


class Severity(str, Enum):
    """How bad a problem is: an error skips its tag (or network); a warning ignores one item."""

    ERROR = "error"
    WARNING = "warning"

    def __str__(self) -> str:  # Python 3.10's WebUIs and 3.11+ format it alike
        return self.value

    __format__ = str.__format__


@dataclass(frozen=True)
class Diagnostic:
    """A problem in the prompt. "error": the tag is skipped; "warning": the item is ignored."""

    message: str
    column: int  # 1-based character offset in the whole prompt
    snippet: str  # the tag text and a caret line under the column
    severity: Severity = Severity.ERROR

    def __post_init__(self):
        object.__setattr__(self, "severity", Severity(self.severity))

    def to_dict(self) -> dict:
        return {"message": self.message, "column": self.column, "snippet": self.snippet,
                "severity": self.severity.value}


@dataclass(frozen=True)
class Prompt:
    text: str  # the prompt with NetWeave tags removed
    tags: Tuple[Tag, ...]
    errors: Tuple[Diagnostic, ...]
