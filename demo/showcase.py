"""The picture in the README: the same prompt and seed on the demo model with and without
NetWeave's features, side by side, each labelled with its tags.

    python -m netweave.demo.showcase [--out docs/demo.png] [--seed 0]
"""
from __future__ import annotations

import argparse
import os

from PIL import Image, ImageDraw

PROMPT = "a red square on a white background"
# (label, tags added to the prompt)
PANELS = [
    ("no LoRA", ""),
    ("sunset", "<lora:demo_sunset:1>"),
    ("sunset region=left", "<lora:demo_sunset:1:region=left>"),
    ("sunset region=!left", "<lora:demo_sunset:1:region=!left>"),
    ("sunset from half-way", "<lora:demo_sunset:0@0,1@0.5>"),
    ("stripes", "<lora:demo_stripes:1>"),
    ("stripes in=0", "<lora:demo_stripes:1:in=0>"),
    ("stripes mid=0", "<lora:demo_stripes:1:mid=0>"),
    ("stripes out=0", "<lora:demo_stripes:1:out=0>"),
    ("boxy (LoHa)", "<lyco:demo_boxy:1>"),
    ("model pastel 0.7", "<model:demo_pastel:0.7>"),
]
SCALE = 3  # the demo draws 64 px: shown enlarged
COLUMNS = 6


def host():
    from ..extension.standalone.host import DiffusersHost
    from ..extension.library import Library
    from ..extension.standalone.models import demo_library, demo_model

    loras, models = demo_library()
    return DiffusersHost(demo_model(), Library([loras], [models]))


def render(seed: int, panels=PANELS, prompt: str = PROMPT, steps: int = 20) -> Image.Image:
    from ..extension.standalone.host import Request

    h = host()
    size = h.model.size * SCALE
    label_h = 14
    cell = size + label_h
    cols = min(COLUMNS, len(panels))
    rows = -(-len(panels) // cols)
    sheet = Image.new("RGB", (size * cols, cell * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, tags) in enumerate(panels):
        result = h.txt2img(Request(f"{prompt} {tags}".strip(), steps=steps, seed=seed,
                                   width=h.model.size, height=h.model.size))
        if result.errors:
            raise RuntimeError(f"{tags}: {result.errors}")
        x, y = (i % cols) * size, (i // cols) * cell
        sheet.paste(result.images[0].resize((size, size), Image.NEAREST), (x, y + label_h))
        draw.text((x + 3, y + 1), label, fill="black")
    return sheet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netweave.demo.showcase", description=__doc__)
    ap.add_argument("--out", default=os.path.join("docs", "demo.png"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default=PROMPT)
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    render(args.seed, prompt=args.prompt).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
