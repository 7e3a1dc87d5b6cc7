"""Where the image sits in a transformer layer's rows: the vocabulary each architecture's key
tables use (flux_keys.py, zimage_keys.py, qwen_keys.py, sd3_keys.py) and the one rule the
engine, the bypass and the blended start read a region's place from (docs/design.md §4)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Tuple


class Tokens(Enum):
    """What the rows of a transformer layer's input are: where a region can act."""

    IMAGE = "image"  # the latent's 2×2 patches, row by row: a region's mask on that grid
    TEXT = "text"  # the text stream: a regional network leaves it alone
    JOINT = "joint"  # one sequence of text and image tokens (TokenLayout says the order)
    VECTOR = "vector"  # one row per image (embedders, modulations): no place to mask
    FLAT = "flat"  # image rows of the whole batch in one run, or a convolution patch embedder:
    #               no row of its own per image, so nothing to mask per image either


PAD_TO = 32  # Z-Image pads its image and caption sequences to a multiple of this


class Order(Enum):
    """Where a joint sequence holds its image tokens."""

    TEXT_FIRST = "text first"  # Flux, SD3's original tree, Z-Image's original tree
    IMAGE_FIRST = "image first"  # diffusers' Z-Image: image, then caption


@dataclass(frozen=True)
class TokenLayout:
    """How a transformer lays out its tokens: the latent packed into `patch`×`patch` patches
    row by row, a joint sequence in `order`, image sequences padded at their end when
    `padded` (Z-Image pads to a multiple of 32), a video's frames one after the other when
    `frames` (Wan: the same region on every frame), about `text` text tokens per image
    (for the cost model only), and whether the model takes and returns lists of one tensor
    per image (`per_image`: diffusers' Z-Image) instead of batched tensors."""

    order: Order = Order.TEXT_FIRST
    padded: bool = False
    text: int = 512
    patch: int = 2
    frames: bool = False
    per_image: bool = False

    def grid(self, latent: Tuple[int, int]) -> Tuple[int, int]:
        """The patch grid of a latent (h, w)."""
        return latent[0] // self.patch, latent[1] // self.patch

    def image_place(self, kind: Tokens, n: int, cells: int) -> Optional[Tuple[int, int]]:
        """(first image token, how many frames of `cells` tokens follow it) among a layer's
        `n` rows, or None when that layer's rows hold no image grid of this size."""
        if kind is Tokens.IMAGE:
            if n == cells or (self.padded and n > cells):
                return 0, 1
            return (0, n // cells) if self.frames and n % cells == 0 else None
        if kind is not Tokens.JOINT or n < cells:
            return None
        # text first: the image ends the sequence, with its padding after it
        image = cells + (-cells) % PAD_TO if self.padded else cells
        return (max(n - image, 0) if self.order is Order.TEXT_FIRST else 0), 1
