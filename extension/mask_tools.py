"""Making and changing masks (the tab's buttons): presets, invert, feather, a drawing turned
into a mask, a preview over an image. Pure PIL: a mask is an 8-bit grayscale image, white
inside."""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

# name -> (left, top, right, bottom) as fractions of the image
PRESETS = {
    "left half": (0, 0, .5, 1), "right half": (.5, 0, 1, 1),
    "top half": (0, 0, 1, .5), "bottom half": (0, .5, 1, 1),
    "left third": (0, 0, 1 / 3, 1), "middle third": (1 / 3, 0, 2 / 3, 1),
    "right third": (2 / 3, 0, 1, 1),
    "top left quarter": (0, 0, .5, .5), "top right quarter": (.5, 0, 1, .5),
    "bottom left quarter": (0, .5, .5, 1), "bottom right quarter": (.5, .5, 1, 1),
    "centre": (.25, .25, .75, .75),
}


def preset(name: str, width: int = 512, height: int = 512) -> Image.Image:
    if name not in PRESETS:
        raise ValueError(f"no preset '{name}'; presets: {', '.join(PRESETS)}")
    l, t, r, b = PRESETS[name]
    img = Image.new("L", (width, height), 0)
    ImageDraw.Draw(img).rectangle((round(l * width), round(t * height),
                                   round(r * width) - 1, round(b * height) - 1), fill=255)
    return img


def invert(mask: Image.Image) -> Image.Image:
    return ImageChops.invert(mask.convert("L"))


def feather(mask: Image.Image, radius: float) -> Image.Image:
    """Soft edges: a Gaussian blur of `radius` pixels (0 leaves the mask as it is)."""
    return mask.convert("L") if radius <= 0 else mask.convert("L").filter(ImageFilter.GaussianBlur(radius))


def from_drawing(value) -> Optional[Image.Image]:
    """A drawing as a mask, white where the brush painted; None when nothing was painted.
    Gradio 4+'s ImageEditor gives {"background", "layers", "composite"} (the paint is the
    layers' alpha; the eraser removes it); Gradio 3's sketch tool {"image", "mask"}."""
    if not value:
        return None
    if value.get("mask") is not None:
        mask = value["mask"].convert("L")
        return mask if mask.getbbox() else None
    layers = [l for l in (value.get("layers") or []) if l is not None]
    if not layers:
        return None
    alpha = np.zeros(layers[0].size[::-1], np.uint8)
    for layer in layers:
        alpha = np.maximum(alpha, np.asarray(layer.convert("RGBA"))[..., 3])
    return Image.fromarray(alpha, "L") if alpha.any() else None


def overlay(mask: Image.Image, image: Optional[Image.Image]) -> Image.Image:
    """A preview: the image (or grey) with the inside of the mask tinted."""
    base = (image or Image.new("RGB", mask.size, (128, 128, 128))).convert("RGB")
    m = mask.convert("L").resize(base.size, Image.Resampling.BOX)
    tint = Image.new("RGB", base.size, (255, 64, 32))
    return Image.composite(Image.blend(base, tint, 0.5), base, m)
