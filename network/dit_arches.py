"""Every transformer architecture NetWeave maps, by its key tables (docs/design.md §5)."""
from __future__ import annotations

from .flux_keys import FLUX
from .qwen_keys import QWENIMAGE
from .sd3_keys import SD3
from .wan_keys import WAN
from .zimage_keys import ZIMAGE

ARCHES = (FLUX, ZIMAGE, QWENIMAGE, SD3, WAN)
