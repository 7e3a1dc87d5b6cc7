"""NetWeave's settings, the same in every host: on/off, the network cache size, where pristine
copies live, the default interpolation, strict mode, the blended start of regional networks,
whether static networks merge into quantized layers, the memory of kept ΔW, the mask folder. A1111 and SD.Next keep them in their Settings page (`netweave_*` options); the
standalone page has them in its tab."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional

from ..parser import INTERPOLATIONS

DEFAULT_INTERP = "by kind"  # step for lora/lyco/model, linear for loractl
PRISTINE = ("beside the weights", "CPU memory")


@dataclass
class Settings:
    enabled: bool = True
    cache_mb: int = 1024
    pristine: str = PRISTINE[0]
    interp: str = DEFAULT_INTERP
    strict: bool = False
    blend: int = 15  # regional networks' blended start, % of each pass (network/blend.py)
    quantized_merge: bool = False  # static networks merged into quantized layers (requantize.py)
    delta_mb: int = 1024  # ΔW kept for layers re-merged at keyframes (network/deltas.py)
    mask_dir: str = ""  # empty: the host's own place (netweave-masks in its data folder)

    # Paths are set by the host's own settings page or command line, never over HTTP: the
    # standalone page does not show them (anyone who can reach it could point them anywhere).
    HOST_ONLY = ("mask_dir",)

    LABELS = {"enabled": "Apply lora/lyco/loractl/model tags with NetWeave",
              "cache_mb": "Network file cache (MiB)",
              "pristine": "Where the untouched copies of patched weights live",
              "interp": "Default interpolation between keyframes",
              "strict": "Strict tags: warnings (unknown keys, te2 on SD1, …) are errors",
              "blend": "Blended start of regional networks, % of each pass (keeps the "
                       "composition; 0: one pass, 100: the full two-stream blend; blend= per tag)",
              "quantized_merge": "Merge static networks into quantized layers (faster steps; "
                                 "the format's rounding, reported) instead of running them "
                                 "beside (exact)",
              "delta_mb": "Memory for the ΔW of scheduled layers (MiB): each keyframe then "
                          "re-merges a layer with one add instead of a matrix product",
              "mask_dir": "Mask folder (empty: netweave-masks in the WebUI's data folder)"}

    def check(self) -> "Settings":
        if not 0 <= int(self.cache_mb) <= 1 << 20:
            raise ValueError(f"cache size must be 0–{1 << 20} MiB, not {self.cache_mb}")
        if isinstance(self.delta_mb, bool) or not 0 <= int(self.delta_mb) <= 1 << 20:
            raise ValueError(f"the ΔW memory must be 0–{1 << 20} MiB, not {self.delta_mb}")
        self.delta_mb = int(self.delta_mb)
        if self.pristine not in PRISTINE:
            raise ValueError(f"pristine copies live {' or '.join(PRISTINE)}, not {self.pristine!r}")
        if self.interp != DEFAULT_INTERP and self.interp not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interp!r}")
        if isinstance(self.blend, bool) or not isinstance(self.blend, (int, float)) or \
                self.blend != int(self.blend) or not 0 <= self.blend <= 100:
            raise ValueError(f"the blended start is a whole percentage 0–100, not {self.blend!r}")
        self.blend = int(self.blend)
        if not isinstance(self.quantized_merge, bool):
            raise ValueError(f"merging into quantized layers is on or off, not {self.quantized_merge!r}")
        if not isinstance(self.mask_dir, str) or "\x00" in self.mask_dir:
            raise ValueError(f"the mask folder must be a path, not {self.mask_dir!r}")
        return self

    @property
    def default_interp(self) -> Optional[str]:
        return None if self.interp == DEFAULT_INTERP else self.interp

    def engine_options(self) -> dict:
        """Engine.configure's arguments: cache size, where new pristine copies go, merges into
        quantized layers, the memory of kept ΔW."""
        return {"cache_bytes": int(self.cache_mb) * 2 ** 20,
                "pristine_on_cpu": self.pristine == PRISTINE[1],
                "quantized_merge": bool(self.quantized_merge),
                "delta_bytes": int(self.delta_mb) * 2 ** 20}

    @classmethod
    def from_options(cls, data: dict, report: Callable[[str], None] = lambda message: None
                     ) -> "Settings":
        """From a WebUI's opts.data (`netweave_<field>` keys). A missing key keeps its default;
        an invalid one keeps its default alone, the others apply, and `report` says which."""
        settings = cls()
        for f in fields(cls):
            key = "netweave_" + f.name
            if key not in data:
                continue
            try:  # the fields taken so far are valid: a failure is this one's
                settings = replace(settings, **{f.name: data[key]}).check()
            except (TypeError, ValueError) as exc:
                report(f"setting {key}: {exc}; its default {f.default!r} applies")
        return settings

    @staticmethod
    def choices(name: str):
        return {"pristine": list(PRISTINE),
                "interp": [DEFAULT_INTERP] + list(INTERPOLATIONS)}.get(name)
