"""What one request to the standalone server may ask for, checked before it costs anything:
the body's size (refused from its Content-Length, or while it streams) and the work of a
generation, in megapixel-steps (width × height × steps × images). Set from `serve`'s options,
never from the page: a client must not be able to raise its own budget."""
from __future__ import annotations

from dataclasses import dataclass

# 1024² × 50 steps × 20 images; an SD1.5 picture at 512² and 20 steps is 5.
DEFAULT_WORK = 1000.0
DEFAULT_BODY_MB = 64  # a txt2img request with a few inline masks of at most 16 MiB each


class OverBudget(ValueError):
    """A generation request asks for more work than the server allows."""


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = DEFAULT_BODY_MB * 2 ** 20
    max_work: float = DEFAULT_WORK  # megapixel-steps per request

    def check_work(self, width: int, height: int, steps: int, images: int) -> None:
        work = width * height * steps * images / 1e6
        if work > self.max_work:
            raise OverBudget(
                f"{width}×{height} px × {steps} steps × {images} image(s) is {work:,.0f} "
                f"megapixel-steps; this server allows {self.max_work:,.0f} per request "
                "(serve --max-work)")
