"""Procedural training pictures: one coloured shape on a plain background, with its caption
("a red circle on a blue background"), and the variants each demo network learns.

Pictures are drawn at 4× and reduced with a box filter, so edges are soft as in photographs.
Everything is seeded: the same (seed, index) gives the same picture everywhere.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {
    "red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (240, 220, 40),
    "green": (40, 170, 60), "blue": (40, 80, 220), "purple": (140, 50, 180),
    "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# What each variant does to a picture; the networks learn exactly this.
STYLES = ("base", "sunset", "stripes", "boxy", "pastel")
SUNSET = (250, 110, 30)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    cx: float  # centre, as a fraction of the width / height
    cy: float
    radius: float  # as a fraction of the size

    @property
    def caption(self) -> str:
        return f"{_a(self.colour)} {self.shape} on {_a(self.background)} background"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def random_scene(rng: random.Random) -> Scene:
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    return Scene(colour, rng.choice(SHAPES), background, rng.uniform(0.3, 0.7),
                 rng.uniform(0.3, 0.7), rng.uniform(0.16, 0.28))


def _mix(a, b, t):
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def draw(scene: Scene, style: str = "base", size: int = SIZE) -> Image.Image:
    """The picture of `scene` as the variant `style` paints it:
    - sunset: every colour pulled 55 % toward orange-red (a colour shift);
    - stripes: horizontal stripes across the background (a texture);
    - boxy: every shape drawn as a square (a shape change);
    - pastel: every colour pulled 50 % toward white (the second checkpoint's palette)."""
    if style not in STYLES:
        raise ValueError(f"style {style!r}: one of {', '.join(STYLES)}")
    big = size * 4
    fg, bg = COLOURS[scene.colour], COLOURS[scene.background]
    if style == "sunset":
        fg, bg = _mix(fg, SUNSET, 0.55), _mix(bg, SUNSET, 0.55)
    elif style == "pastel":
        fg, bg = _mix(fg, (255, 255, 255), 0.5), _mix(bg, (255, 255, 255), 0.5)
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    if style == "stripes":
        dark = _mix(bg, (0, 0, 0), 0.6) if sum(bg) > 200 else _mix(bg, (255, 255, 255), 0.5)
        period = big // 4
        for y in range(0, big, period):
            d.rectangle((0, y, big, y + period // 2 - 1), fill=dark)
    cx, cy, r = scene.cx * big, scene.cy * big, scene.radius * big
    shape = "square" if style == "boxy" else scene.shape
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        s = r * 0.89  # the same area as the circle, roughly
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fg)
    else:
        d.polygon([(cx, cy - r * 1.1), (cx - r * 1.1, cy + r * 0.8), (cx + r * 1.1, cy + r * 0.8)],
                  fill=fg)
    return img.resize((size, size), Image.BOX)


def batch(seed: int, count: int, style: str = "base"):
    """`count` (pixels [N, 3, H, W] in −1…1, captions) from scenes drawn with `seed`."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(draw(s, style), dtype=np.float32) for s in scenes])
    return pixels.transpose(0, 3, 1, 2) / 127.5 - 1.0, [s.caption for s in scenes]
