"""A plan, readable: a table (network × component/block × step ranges) and a heatmap PNG
(one panel per network, grouped by region; rows are components and blocks, columns steps).
When the host gave its sigmas, both show the noise level at each step and where each
position by noise level (`s0.5`) landed on the steps."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..parser import format_region
from .blocks import ARCH_TITLES, BLOCKS, TEXT_BLOCKS, TEXT_ENCODERS
from .plan import NetworkPlan, PassPlan, Plan


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def describe_series(values: Sequence[float]) -> str:
    """'1–15: 0.1  16–30: 0.6'; steps that change one by one read as a ramp '1–30: 0→1'."""
    runs: List[List] = []  # [first step, last step, first value, last value]
    for step, v in enumerate(values, start=1):
        if runs and runs[-1][2] == runs[-1][3] == v:
            runs[-1][1] = step
        else:
            runs.append([step, step, v, v])
    merged: List[List] = []
    for run in runs:
        prev = merged[-1] if merged else None
        single = run[0] == run[1]
        if prev and single and (prev[0] == prev[1] or (prev[3] - prev[2]) * (run[3] - prev[3]) > 0):
            prev[1], prev[3] = run[1], run[3]  # a ramp keeps going the same way
        else:
            merged.append(list(run))
    parts = []
    for first, last, a, b in merged:
        steps = f"{first}" if first == last else f"{first}–{last}"
        parts.append(f"{steps}: {_num(a)}" if a == b else f"{steps}: {_num(a)}→{_num(b)}")
    return "  ".join(parts)


def _rows(plan: Plan, p: PassPlan) -> List[Tuple[str, np.ndarray]]:
    """Effective strengths: each text encoder × BASE, then the UNet × each block, with
    neighbouring blocks that behave the same merged into one row."""
    text_blocks = TEXT_BLOCKS[plan.arch]  # BASE on SD; CLIP and T5 on the Flux family
    rows = [(te, p.effective(te, text_blocks[te])) for te in TEXT_ENCODERS[plan.arch]]
    blocks = [b for b in BLOCKS[plan.arch] if b not in text_blocks.values()]
    start = 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or blocks[i][:2] != blocks[start][:2] or not np.array_equal(
                p.blocks[blocks[i]], p.blocks[blocks[start]]):
            name = blocks[start] if i - 1 == start else f"{blocks[start]}–{blocks[i - 1]}"
            rows.append((name, p.effective("unet", blocks[start])))
            start = i
    return rows


def _title(n: NetworkPlan) -> str:
    region = "whole image" if n.region is None else f"region={format_region(n.region)}"
    extra = f"  neg={_num(n.neg)}" if n.neg != 1.0 else ""
    if n.lbw:
        extra += "  lbw=" + ",".join(_num(v) for v in n.lbw)
    return f"{n.kind}:{n.name}  {region}  interp={n.interp}{extra}"


# the architectures whose text reaches the image through cross-attention (the SD UNets); on
# the others a regional network's text encoders run as a stream (network/blend.py)
CROSS_ATTENTION = ("sd1", "sd2", "sdxl")


def blend_window(p: PassPlan) -> str:
    """A regional network's blended start in one pass (network/blend.py)."""
    if p.blend <= 0:
        return "one pass from step 1 (no blended start)"
    steps = "step 1" if p.blend == 1 else f"steps 1–{p.blend}"
    after = "; every step blended" if p.blend >= p.steps else " (then one pass)"
    return f"blended start: {steps}{after}"


def describe_sigmas(sigmas: Sequence[float]) -> str:
    """'1: 1  2: 0.9  3: 0.75  4: 0.5', the noise level the model sees at each step."""
    return "  ".join(f"{k}: {_num(v)}" for k, v in enumerate(sigmas, start=1))


def describe_landed(p: PassPlan) -> str:
    """'unet=s0.5 at step 4  start=s0.8 at step 2.67': where the tag's positions by noise
    level fell on this pass's steps (fractional: between two steps)."""
    return "  ".join(f"{item}s{sigma:g} at step {step:.3g}" for item, sigma, step in p.landed)


def explain_table(plan: Plan) -> str:
    hires = f", hires {plan.hires_steps} steps" if plan.hires_steps else ""
    lines = [f"prompt: {plan.prompt!r}",
             f"{ARCH_TITLES[plan.arch]}, {plan.steps} steps{hires}; "
             "values are effective strengths (component × block × window)"]
    for label, sigmas in (("sigma per step", plan.sigmas), ("hires sigma per step",
                                                           plan.hires_sigmas)):
        if sigmas is not None:
            lines.append(f"{label}  {describe_sigmas(sigmas)}")
    if not plan.networks:
        lines.append("no networks")
    for i, n in enumerate(plan.networks, start=1):
        lines += ["", f"#{i} {_title(n)}"]
        for label, p in (("", n.base), ("hires ", n.hires)):
            if p is None:
                continue
            if label:
                lines.append(f"  hires pass ({p.steps} steps)")
            rows = _rows(plan, p)
            width = max(len(name) for name, _ in rows)
            lines += [f"  {name:<{width}}  {describe_series(v.tolist())}" for name, v in rows]
            if n.region is not None:
                lines.append("  " + blend_window(p))
                if plan.arch not in CROSS_ATTENTION and any(
                        v.any() for c, v in p.strength.items() if c != "unet"):
                    lines.append("  text encoders: a text stream of its own in the same forward "
                                 "while they act (one more set of rows)")
            if p.landed:
                lines.append("  by noise level: " + describe_landed(p))
    for e in plan.errors:
        lines += ["", f"{e.severity} at column {e.column}: {e.message}"]
        lines += ["  " + s for s in e.snippet.splitlines()]
    return "\n".join(lines)


# ---- heatmap -------------------------------------------------------------------------
CELL_H, LABEL_W, TITLE_H, PAD = 12, 92, 16, 8
CHAR_W = 6  # PIL's default bitmap font


def _text_w(text: str) -> int:
    return CHAR_W * len(text)


def _sigmas(plan: Plan, n: NetworkPlan, p: PassPlan) -> Optional[Tuple[float, ...]]:
    return plan.hires_sigmas if p is n.hires else plan.sigmas


def _pass_label(plan: Plan, n: NetworkPlan, p: PassPlan) -> str:
    label = f"hires 1-{p.steps}" if p is n.hires else f"steps 1-{p.steps}"
    sigmas = _sigmas(plan, n, p)
    return label if sigmas is None else f"{label}, sigma {_num(sigmas[0])} to {_num(sigmas[-1])}"


SIGMA_ROW = "sigma"
TICK = (0, 200, 255)  # where a position by noise level landed


def _colour(values: np.ndarray, scale: float) -> np.ndarray:
    """0 is black, positive values warm up to yellow, negative ones go blue."""
    t = np.clip(values / scale, -1.0, 1.0)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    rgb = np.stack([255 * np.minimum(1, 1.6 * pos),
                    255 * np.clip(1.6 * pos - 0.6, 0, 1) + 120 * neg,
                    60 * pos * (1 - pos) + 255 * neg], axis=-1)
    return rgb.astype(np.uint8)


def heatmap(plan: Plan, texts: Optional[list] = None) -> Image.Image:
    """One panel per network in the table's order (base pass, then hires to its right): its
    title on one line, each pass's step label on the next, then the blocks' rows. `texts`,
    when given, receives every ((x, y), text) drawn (tests check none is clipped)."""
    passes = [[p for p in (n.base, n.hires) if p is not None] for n in plan.networks]
    all_rows = [[_rows(plan, p) for p in ps] for ps in passes]
    scale = max([1.0] + [float(np.abs(v).max()) for rs in all_rows for r in rs for _, v in r])
    # a row of each pass's noise level, grey from its first sigma (white) down to 0 (black)
    sigma_rows = [any(_sigmas(plan, n, p) is not None for p in ps)
                  for n, ps in zip(plan.networks, passes)]
    cell_w = max(4, min(24, 480 // plan.steps))
    widths = [[max(p.steps * cell_w, _text_w(_pass_label(plan, n, p))) for p in ps]
              for n, ps in zip(plan.networks, passes)]
    width = max([420] + [LABEL_W + 2 * PAD + sum(w + PAD for w in ws) for ws in widths]
                + [2 * PAD + _text_w(_title(n)) for n in plan.networks])
    heights = [2 * TITLE_H + (max(len(r) for r in rs) + extra) * CELL_H + PAD
               for rs, extra in zip(all_rows, sigma_rows)]
    height = PAD + sum(heights) + 40
    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    said = texts if texts is not None else []

    def text(xy, words, fill=(40, 40, 40)):
        said.append((xy, words))
        draw.text(xy, words, fill=fill)
    y = PAD
    for n, ps, rs, ws, h, has_sigma in zip(plan.networks, passes, all_rows, widths, heights,
                                           sigma_rows):
        text((PAD, y), _title(n), fill=(20, 20, 20))
        x, top = PAD + LABEL_W, y + 2 * TITLE_H
        below = top + max(len(rows) for rows in rs) * CELL_H  # the sigma row's place
        for p, rows, w in zip(ps, rs, ws):
            grid = _colour(np.stack([v for _, v in rows]), scale)
            cells = np.repeat(np.repeat(grid, CELL_H, axis=0), cell_w, axis=1)
            img.paste(Image.fromarray(cells), (x, top))
            sigmas = _sigmas(plan, n, p)
            if sigmas is not None:
                grey = np.asarray(sigmas) / max(sigmas[0], 1e-12) * 255
                row = np.repeat(grey.astype(np.uint8)[None, :, None], 3, axis=2)
                img.paste(Image.fromarray(np.repeat(np.repeat(row, CELL_H - 2, axis=0),
                                                    cell_w, axis=1)),
                          (x, below + 2))
            for _, _, step in p.landed:  # a tick through the panel at each landing point
                tx = x + min(int((step - 0.5) * cell_w), p.steps * cell_w - 1)
                draw.line([(tx, top), (tx, top + len(rows) * CELL_H - 1)], fill=TICK)
            text((x, y + TITLE_H), _pass_label(plan, n, p), fill=(90, 90, 90))
            x += w + PAD
        for j, (name, _) in enumerate(rs[0]):
            text((PAD, top + j * CELL_H), name.replace("–", "-"))
        if has_sigma:
            text((PAD, below), SIGMA_ROW)
        y += h
    # legend: -scale … 0 … +scale
    bar = _colour(np.linspace(-scale, scale, 200)[None, :], scale)
    img.paste(Image.fromarray(np.repeat(bar, 10, axis=0)), (PAD + LABEL_W, y + 4))
    text((PAD, y + 2), "strength")
    for frac, v in ((0, -scale), (0.5, 0.0), (1, scale)):
        text((PAD + LABEL_W + int(frac * 190), y + 16), _num(v))
    if not plan.networks:
        text((PAD, PAD), "no networks")
    return img
