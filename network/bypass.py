"""The bypass path at run time (docs/design.md §4): y = layer(x) + Σ m ⊙ s_i·r·f_i(x).

m is a contribution's region on the layer's grid, s_i its strength at this step, r its factor
per batch row (0 on the rows of prompts without the network, `neg` on unconditional rows).
Only the tokens inside the region are computed: Linear layers on flattened positions gather
them, convolutions run on the region's bounding box plus the kernel's halo.

Three routes, by what a layer's output is:
- "layer": the output is spatial (or the contribution has no region): masked at the layer.
- "attention": cross-attention keys and values see the text, not the image. The whole
  cross-attention module runs a second time on the tokens inside the region with the network
  (and the network's own text conditioning, for regional text-encoder networks), and its
  output is blended by the mask: exact per token, since a query token's output depends only
  on itself and the text. For the same reason the main call leaves out the tokens a re-run
  replaces whole (inside one region at weight 1), so each token's attention runs once.
- "emb": a resblock's time-embedding projection adds one vector to every position; the delta
  is held back and added, masked, to the feature map where the resblock adds the embedding.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .algorithms import factor_bypass_ok, is_conv, pointwise
from .blend import Layout
from .keymap import frozen
from .quantized import dequantize
from .regions import RegionMaps, grid_for


@dataclass
class Rows:
    """What each row of the UNet's batch is: (prompt index, unconditional?)."""

    prompts: Tuple[int, ...]
    uncond: Tuple[bool, ...]


@dataclass
class AttentionUnit:
    """A cross-attention module whose output some networks change per region."""

    module: nn.Module
    path: str
    networks: Set[int] = field(default_factory=set)  # entries re-run here
    slots: List[object] = field(default_factory=list)  # its q, k, v, out layers the plan changes
    hooks: List[object] = field(default_factory=list)
    # The main call's key and value projections of the text, id(layer) -> (input, output): a
    # re-run on the same text reuses them and adds only the re-run network's own delta.
    kv: Dict[int, Tuple[Tensor, Tensor]] = field(default_factory=dict)
    # the main call's whole input when it runs on fewer tokens, and the networks re-run after
    # it (Runtime.narrow_hook: found once per call)
    full: Optional[Tensor] = None
    runs: Tuple[int, ...] = ()

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.kv.clear()
        self.full, self.runs = None, ()


KV_LAYERS = ("to_k", "to_v")  # the text projections, in diffusers' and LDM's attention alike


@dataclass(frozen=True)
class Factors:
    """A plain two-factor contribution made ready once per generation: fp32 on the layer's
    device, the file's scale in `up`. Δy = up · (weight ⊙ down · x): the strength, the region
    and the row factors all multiply the rank-r intermediate, never an output-sized tensor."""

    down: Tensor  # [r, in·kernel]
    up: Tensor  # [out, r]


@dataclass(frozen=True)
class TokenRegion:
    """A region on a layer's tokens, made once per generation: its value per token, the
    indices where it acts, and its values there shaped to scale (B, n, C) rows."""

    values: Tensor
    inside: Tensor
    weights: Tensor
    held: Optional[Tensor] = None  # a re-run's token subset, kept so its id stays its own

    @staticmethod
    def of(values: Tensor, inside: Tensor, held: Optional[Tensor] = None) -> "TokenRegion":
        return TokenRegion(values, inside, values[inside].view(1, -1, 1), held)


@dataclass(frozen=True)
class RowFactors:
    """A contribution's factor per batch row: `values` (batch,) or None when every row takes it
    whole; `none`: no row takes it (nothing to compute). Known without reading the device."""

    values: Optional[Tensor]
    none: bool = False


@dataclass(frozen=True)
class Prepared:
    """A kind of layer call made ready at its first: its two-factor contributions' factors
    (stacked when several; None: nothing to add) and each one's s·rows⊙mask on its part of
    the intermediate; `subset`: the re-run's tokens it was made for, kept alive while their
    id is part of the call's kind."""

    factors: Optional[Factors]
    scales: Tuple[Tuple[int, Union[float, Tensor]], ...]
    subset: Optional[Tensor] = None

    def add(self, x: Tensor, out: Tensor) -> Tensor:
        return out if self.factors is None else scaled_add(x, self.factors, self.scales, out)


class Runtime:
    """State the forward hooks read: the step, the regions, the rows, the text variants."""

    def __init__(self, engine):
        self.engine = engine
        self.maps: Optional[RegionMaps] = None
        self.rows: Optional[Rows] = None
        self.variant: Optional[int] = None  # the network a cross-attention re-run is for
        self.subset: Optional[Tensor] = None  # token indices of that re-run
        self._full_tokens = 0  # and how many tokens the layer has outside it
        self.text: Optional[Tuple[Text, Dict[int, Text]]] = None
        self.pooled: Optional[Tuple[Tensor, Dict[int, Tensor]]] = None  # the same, pooled
        self._reused: Dict[int, Tensor] = {}  # a layer whose output a re-run reuses: its input
        self._row_factors: Dict[Tuple, RowFactors] = {}
        self._factors: Dict[Tuple[int, str], Optional[Factors]] = {}
        self._stacked: Dict[Tuple, Factors] = {}  # a layer's contributions' factors, joined
        # a layer's calls, each kind as first found: id(slot) -> {call: (strengths, Prepared)}
        self._prepared: Dict[int, Dict[Tuple, Tuple[Tuple[float, ...], Prepared]]] = {}
        self._scales: Dict[Tuple, Tuple[Tensor, Tuple]] = {}  # s·rows⊙mask, shared by layers
        self._direct = 0  # contributions added, or held, other than as prepared parts
        self._subsets: Dict[Tuple, TokenRegion] = {}
        self._main: Dict[Tuple, Optional[Tensor]] = {}  # a cross-attention's main tokens
        self._contexts: Dict[Tuple, Tensor] = {}
        # a resblock's held time-embedding deltas: (region, delta, first row or None)
        self._emb: Dict[int, List[Tuple[object, Tensor, Optional[int]]]] = {}
        self.reported: Set[Tuple] = set()
        # the streams of a forward with more than the host's rows (blend.py)
        self.layout: Optional[Layout] = None

    def reset(self) -> None:
        self.variant, self.subset, self.text, self.pooled, self.layout = (None,) * 5
        self._row_factors.clear()
        self._factors.clear()
        self._stacked.clear()
        self._prepared.clear()
        self._scales.clear()
        self._subsets.clear()
        self._main.clear()
        self._contexts.clear()
        self._emb.clear()
        self.reported.clear()

    def set_rows(self, rows: Optional[Rows]) -> None:
        if rows == self.rows:
            return  # hosts say it at every denoiser call: keep the factors made for it
        self.rows = rows
        self._row_factors.clear()
        self._scales.clear()
        self._prepared.clear()  # made for the rows before

    def set_text(self, base: Text, variants: Dict[int, Text],
                 pooled: Optional[Tuple[Tensor, Dict[int, Tensor]]] = None) -> None:
        """The text without and with each regional text-encoder network: (rows, tokens,
        width), or one (tokens, width) per row, each of its caption's own length (Z-Image). A
        variant whose rows are not as many as the base's or not shaped as its rows is left
        out, with a warning."""
        shapes = _row_shapes(base)
        kept = {}
        for j, v in variants.items():
            if len(v) == len(base) and _row_shapes(v) == shapes:
                kept[j] = v
                continue
            e = self.engine.entries[j]
            self.report(("text shape", j), f"{e.net.kind}:{e.net.name}: regional on the text "
                        f"encoders, but its encoding's {len(v)} rows of {_shapes_text(v)} "
                        f"are not the prompt's {len(base)} of {_shapes_text(base)}; its "
                        "text-encoder part is left out")
        self.text, self.pooled = (base, kept), pooled
        self._contexts.clear()

    def new_step(self) -> None:
        self._contexts.clear()

    # ---- per contribution -----------------------------------------------------------
    def strength(self, c) -> float:
        if c.now is not None:
            return c.now
        step = self.engine._phase_step
        return 0.0 if step is None else c.at(*step)

    def row_factors(self, c, batch: int, device) -> RowFactors:
        """A contribution's factors per row of a batch of `batch` rows (made once per rows)."""
        if c.owner is None and c.neg == 1.0:
            return WHOLE
        key = (c.owner, c.neg, batch, str(device))
        if key not in self._row_factors:
            rows = self.rows
            if rows is None:  # the host said nothing: every row is conditional, of prompt 0
                rows = Rows((0,) * batch, (False,) * batch)
            n = len(rows.prompts)
            if self.layout is not None and n and batch != n and batch % n == 0:  # streams
                rows = Rows(rows.prompts * (batch // n), rows.uncond * (batch // n))
            if len(rows.prompts) != batch:
                raise ValueError(f"the UNet got {batch} rows, but set_rows described "
                                 f"{len(rows.prompts)}")
            f = [(0.0 if c.owner is not None and p != c.owner else 1.0) * (c.neg if u else 1.0)
                 for p, u in zip(rows.prompts, rows.uncond)]
            self._row_factors[key] = WHOLE if all(v == 1.0 for v in f) else RowFactors(
                torch.tensor(f, dtype=torch.float32, device=device), not any(f))
        return self._row_factors[key]

    def low_rank(self, c, device) -> Optional[Factors]:
        """A contribution's two factors on `device` (made at its first use in a generation,
        for its merges and its branch alike), or None where it has no such form (Tucker,
        LoHa, LoKr, algorithms built on W)."""
        key = (id(c), str(device))
        if key not in self._factors:
            pair = c.adapter.low_rank(1.0, c.dyn, device)
            self._factors[key] = None if pair is None else \
                Factors(pair[1].contiguous(), pair[0].contiguous())
        return self._factors[key]

    def half(self, network: int, batch: int) -> Optional[int]:
        """In a blended step's forward, where the rows of a blended network begin (every
        stream after "without": its contributions are computed on those rows only); None
        otherwise."""
        layout = self.layout
        if layout is None or network not in layout.blended or batch != layout.count * layout.b:
            return None
        return layout.main

    def has_text(self, network: int) -> Optional[bool]:
        """Whether the host gave an encoding with regional network j for the coming calls;
        None when it gave none at all (set_text never called)."""
        if self.text is None:
            return None
        return any(p is not None and network in p[1] for p in (self.text, self.pooled))

    def variant_text(self, value: Tensor, network: int) -> Tensor:
        """A call's text (or pooled vector) with network j's encoding on each row that
        equals a row of the base encoding (of the same shape: captions of their own lengths
        are matched each with its own); `value` itself where there is none."""
        for pair in (self.text, self.pooled):
            if pair is None or network not in pair[1] or \
                    tuple(value.shape[1:]) not in _row_shapes(pair[0]):
                continue
            key = (value.data_ptr(), tuple(value.shape), network)
            if key not in self._contexts:
                self._contexts[key] = _rows_replaced(value, pair[0], pair[1][network])
            return self._contexts[key]
        return value

    def report(self, key: Tuple, message: str) -> None:
        if key not in self.reported:
            self.reported.add(key)
            self.engine.errors.append(message)

    # ---- the layer hook ----------------------------------------------------------------
    def layer_hook(self, slot):
        text = slot.target.component != "unet"  # a region acts through the conditioning there

        def hook(module, args, out):
            bypassed = [c for c in slot.contributions if c.bypass]
            if self.engine._phase_step is None or not bypassed:
                return out
            x = args[0]
            reused = self._reused.get(id(module))
            if reused is not None:  # the output is the main call's, with everything but the
                x = reused  # re-run network already in it; the layer ran on no tokens
            # what decides this call's arithmetic besides the strengths; a call like one before
            # (the same step's CFG rows, the next step, the next image) only runs its products
            kind = (self.variant, id(self.subset), reused is not None, tuple(out.shape),
                    out.dtype, out.device, out.is_contiguous(), torch.is_grad_enabled(),
                    self.layout, self.engine.latent)
            strengths = tuple(self.strength(c) for c in bypassed)
            prepared = self._prepared.setdefault(id(slot), {})
            known = prepared.get(kind)
            if known is not None and known[0] == strengths:
                return known[1].add(x, out)
            joint: List[Joint] = []
            direct = self._direct
            for c in bypassed:
                if c.route == "attention":
                    if self.variant != c.network:
                        continue
                    out = self._add(slot, c, x, out, None, joint)
                elif reused is not None:
                    continue
                elif c.route == "emb":
                    self._hold_emb(slot, c, x, out)
                else:
                    out = self._add(slot, c, x, out, None if text else c.region, joint)
            if self._direct != direct:  # some other arithmetic ran: found again at each call
                return self._add_joint(x, joint, out) if joint else out
            ready = self._prepare(joint, x.dim(), self.subset)
            prepared[kind] = (strengths, ready)
            return ready.add(x, out)
        return hook

    def _prepare(self, joint: List["Joint"], dims: int, subset: Optional[Tensor]) -> "Prepared":
        """A layer call's two-factor contributions as one product pair: their factors (stacked
        when more than one) and each one's s·rows⊙mask on its part of the intermediate."""
        if not joint:
            return Prepared(None, (), subset)
        f = joint[0][1] if len(joint) == 1 else self._joined(joint)
        return Prepared(f, tuple((g.down.shape[0], self._scale(s, rows, mask, dims))
                                 for _, g, s, rows, mask in joint), subset)

    def _scale(self, s: float, rows: Optional[Tensor], mask: Optional[Tensor], dims: int):
        """_scale_of, made once for the layers that share it (until the rows change)."""
        if rows is None and mask is None:
            return s
        key = (s, dims, None if rows is None else rows.data_ptr(),
               None if mask is None else (mask.data_ptr(), tuple(mask.shape)))
        if key not in self._scales:  # rows and mask stay: their addresses are the key
            self._scales[key] = (_scale_of(s, rows, mask, dims), (rows, mask))
        return self._scales[key][0]

    def _add(self, slot, c, x: Tensor, out: Tensor, region, joint: List["Joint"]) -> Tensor:
        h = self.half(c.network, out.shape[0])
        if h is None:
            return self._add_rows(slot, c, x, out, region, joint)
        n = out.shape[0] - h  # on fewer rows: not with the others
        part = self._add_rows(slot, c, x.narrow(0, h, n), out.narrow(0, h, n), region, None)
        return _rows_back(out, part, h)

    def _add_rows(self, slot, c, x: Tensor, out: Tensor, region,
                  joint: Optional[List["Joint"]]) -> Tensor:
        s = self.strength(c)
        if not s:
            return out
        rows = self.row_factors(c, out.shape[0], out.device)
        if rows.none:
            return out
        if region is None:
            return self._add_all(slot, c, x, out, s, rows, None, joint)
        if out.dim() == 4:  # conv or norm on (B, C, H, W)
            grid = self.maps.on_grid(region, out.shape[-2:], out.device)
            if grid.empty:
                return out
            if _pointwise_conv(slot.target.module) and self._thin(slot, c, x.device) and \
                    grid.inside.numel() * GATHER_BELOW >= grid.values.numel():
                return self._add_all(slot, c, x, out, s, rows,
                                     grid.values.view(1, 1, *grid.shape), joint)
            if not grid.full and _croppable(slot.target.module):
                return self._add_conv_box(slot, c, x, out, s, rows, grid)
            mask = grid.values.view(1, 1, *grid.shape)
            return added(out, self._delta(slot, c, x, out, s, rows, mask))
        if out.dim() == 3:  # tokens (B, N, C)
            found = self._token_region(slot.target, region, out.shape[1], out.device)
            if found is not None:
                inside = found.inside
                if inside.numel() == 0:
                    return out
                if inside.numel() == found.values.numel() or self._thin(slot, c, x.device) \
                        and inside.numel() * GATHER_BELOW >= found.values.numel():
                    return self._add_all(slot, c, x, out, s, rows, found.values.view(1, -1, 1),
                                         joint)
                d = self._delta(slot, c, x.index_select(1, inside),
                                lambda: out.index_select(1, inside), s, rows, found.weights)
                return added(out, d, inside)
        self.report(("flat", slot.target), f"{slot.target.name}: its output has no image grid "
                    f"({list(out.shape)}), so a regional network cannot act on it; left out there")
        return out

    def _add_all(self, slot, c, x: Tensor, out: Tensor, s: float, rows: RowFactors,
                 mask: Optional[Tensor], joint: Optional[List["Joint"]]) -> Tensor:
        """A contribution on every token or position (`mask`: its weight on each, or None): a
        plain two-factor one on a Linear or a 1×1 conv adds its up factor's product into the
        output in place, with the layer's others of its kind when `joint` collects them."""
        module = slot.target.module
        f = self._thin(slot, c, x.device)
        if f is not None and not torch.is_grad_enabled() and out.dtype == torch.float32 and \
                out.is_contiguous() and out.dim() >= 2 and \
                (not is_conv(module) or (_pointwise_conv(module) and out.dim() == 4)):
            if joint is None:
                self._direct += 1
                return low_rank_add(x, f, s, rows.values, mask, out)
            joint.append((id(c), f, s, rows.values, mask))
            return out
        return added(out, self._delta(slot, c, x, out, s, rows, mask))

    def _add_joint(self, x: Tensor, joint: List["Joint"], out: Tensor) -> Tensor:
        """Several two-factor contributions on one layer's input as one: their down factors
        stacked make one intermediate, each takes its own strength, mask and rows on its
        part of it, and their up factors side by side add it into the output in one product
        (two products per layer instead of two per network)."""
        return self._prepare(joint, x.dim(), None).add(x, out)

    def _joined(self, joint: List["Joint"]) -> Factors:
        key = tuple(j[0] for j in joint) + (str(joint[0][1].down.device),)
        if key not in self._stacked:
            self._stacked[key] = Factors(torch.cat([j[1].down for j in joint]),
                                         torch.cat([j[1].up for j in joint], dim=1))
        return self._stacked[key]

    def _thin(self, slot, c, device) -> Optional[Factors]:
        """A contribution's two factors where its delta runs through them (its rank-r
        intermediate is then cheap on every token); None where it has other arithmetic."""
        if c.adapter.uses_weight or not factor_bypass_ok(slot.target.module):
            return None
        return self.low_rank(c, device)

    def _token_region(self, target, region, n: int, device) -> Optional[TokenRegion]:
        """A region on a layer's N tokens, or None when the tokens are no image grid. A UNet
        layer's grid follows from its token count; a transformer layer says what its rows are
        (tokens.Tokens) and the model where the packed patches sit among them
        (tokens.TokenLayout: after or before the text tokens of a joint sequence, padding
        after them)."""
        if target.tokens is None:
            n = n if self.subset is None else self._full_tokens
            shape = grid_for(n, self.engine.latent)
            return None if shape is None else self._tokens_inside(region, shape, device)
        key = (region, target.tokens, n, str(device))
        if key not in self._subsets:
            layout = self.engine.keymap.tokens
            grid = self.maps.on_grid(region, layout.grid(self.engine.latent), device)
            cells = grid.values.numel()
            place = layout.image_place(target.tokens, n, cells)
            if place is None:
                return None
            first, frames = place
            values = torch.cat([grid.values.new_zeros(first), grid.values.repeat(frames),
                                grid.values.new_zeros(n - first - frames * cells)])
            inside = torch.cat([grid.inside + first + f * cells for f in range(frames)])
            self._subsets[key] = TokenRegion.of(values, inside)
        return self._subsets[key]

    def _tokens_inside(self, region, shape, device) -> TokenRegion:
        """A region on a token grid; inside a cross-attention's re-run or its narrowed main
        call, on that call's tokens only."""
        key = (region, tuple(shape), str(device), None if self.subset is None else id(self.subset))
        if key not in self._subsets:
            grid = self.maps.on_grid(region, shape, device)
            if self.subset is None:
                self._subsets[key] = TokenRegion.of(grid.values, grid.inside)
            else:
                values = grid.values[self.subset]
                self._subsets[key] = TokenRegion.of(values, torch.nonzero(values).flatten(),
                                                    self.subset)
        return self._subsets[key]

    def _add_conv_box(self, slot, c, x, out, s, rows, grid) -> Tensor:
        """A conv's delta on the region's bounding box only: the input window it needs
        (stride, dilation, padding: the halo) is cut out and padded where it leaves the image."""
        module = slot.target.module
        top, bottom, left, right = grid.box
        window, pad = [], []
        for (lo, hi), size, k, st, dil, p in zip(((top, bottom), (left, right)), x.shape[-2:],
                                                 module.kernel_size, module.stride,
                                                 module.dilation, module.padding):
            a = lo * st - p
            b = (hi - 1) * st - p + dil * (k - 1) + 1
            window.append((max(a, 0), min(b, size)))
            pad.append((max(0, -a), max(0, b - size)))
        xs = x[..., window[0][0]:window[0][1], window[1][0]:window[1][1]]
        if any(any(p) for p in pad):
            xs = torch.nn.functional.pad(xs, (*pad[1], *pad[0]))
        view = self.engine.view(slot, cropped=True)
        ys = out[..., top:bottom, left:right]
        mask = grid.values.view(1, 1, *grid.shape)[..., top:bottom, left:right]
        d = self._delta(slot, c, xs, ys, s, rows, mask, module=view)
        out = out.clone() if torch.is_grad_enabled() else out
        out[..., top:bottom, left:right] += d
        return out

    def _delta(self, slot, c, x, y, s, rows: RowFactors, mask: Optional[Tensor] = None,
               module=None) -> Tensor:
        """One contribution's Δy times its strength, row factors and `mask` (the caller casts
        it to the output's dtype). `y`: the layer's output for x, or a function that gives it
        (only algorithms that read it ask). Two-factor contributions take the fast path
        (Factors); algorithms built on W (DoRA, OFT, model, …) see the pristine weight and its
        output, not the weight other networks are merged into."""
        self._direct += 1
        cropped = module is not None
        module = module or slot.target.module
        f = self._thin(slot, c, x.device)
        if f is not None:
            return low_rank_delta(module, x, f, s, rows.values, mask)
        if slot.target.quant is not None:
            d = self._quantized_delta(slot, c, x, s, cropped)
        else:
            if c.adapter.uses_weight and slot.applied:
                module = self.engine.view(slot, cropped=cropped, pristine=True)
                y = module.forward(x)
            d = c.adapter.bypass(x, module, y() if callable(y) else y, s, c.dyn)
        if mask is not None:
            d = d * mask.to(d.dtype)
        return _by_rows(d, rows.values)

    def _quantized_delta(self, slot, c, x: Tensor, s: float, cropped: bool) -> Tensor:
        """Δy beside a quantized layer for an algorithm without two plain factors: from ΔW,
        which needs only the layer's shape (a stub like the layer: a Linear, or the conv with
        its stride, padding or crop, holding zeros); algorithms built on W (DoRA, OFT,
        `<model:>`, …) see the dequantized layer."""
        module = slot.target.module
        if c.adapter.uses_weight:
            view = self.engine.view(slot, cropped=cropped)
            return c.adapter.bypass(x, view, view.forward(x.float()), s, c.dyn)
        stub = float_layer(module, x.new_zeros(()).expand(slot.target.shape), cropped)
        return c.adapter.bypass(x, stub, x.new_zeros(()), s, c.dyn)

    # ---- the time-embedding route ------------------------------------------------------
    def _hold_emb(self, slot, c, x, out) -> None:
        self._direct += 1  # held for the resblock at each call: never a prepared part
        s = self.strength(c)
        if not s:
            return
        h = self.half(c.network, out.shape[0])
        if h is not None:  # the "with" rows only
            n = out.shape[0] - h
            x, out = x.narrow(0, h, n), out.narrow(0, h, n)
        rows = self.row_factors(c, out.shape[0], out.device)
        if rows.none:
            return
        d = self._delta(slot, c, x, out, s, rows)
        self._emb.setdefault(id(slot.emb_norm), []).append((c.region, d, h))

    def emb_prehook(self, norm):
        def hook(module, args):
            held = self._emb.pop(id(norm), None)
            if not held:
                return None
            h = args[0]
            for region, d, half in held:
                grid = self.maps.on_grid(region, h.shape[-2:], h.device)
                add = d.to(h.dtype)[:, :, None, None] * \
                    grid.values.view(1, 1, *grid.shape).to(h.dtype)
                h = h + add if half is None else torch.cat([h[:half], h[half:] + add])
            return (h,) + tuple(args[1:])
        return hook

    # ---- the cross-attention route -----------------------------------------------------
    def attach(self, unit: AttentionUnit) -> None:
        """Hook a unit: the tokens of its main call, its re-runs after it, and the reuse of its
        key and value projections in them (the layer hooks of those projections come in
        between)."""
        unit.hooks += [unit.module.register_forward_pre_hook(self.narrow_hook(unit),
                                                             with_kwargs=True),
                       unit.module.register_forward_hook(self.attention_hook(unit),
                                                         with_kwargs=True)]
        for name in KV_LAYERS:
            layer = getattr(unit.module, name, None)
            # only plain Linear layers are asked to run on no tokens (a quantized or exotic
            # layer class may not take an empty input); the others simply run again
            if isinstance(layer, nn.Linear) and frozen(layer.weight) is None:
                unit.hooks += [layer.register_forward_pre_hook(self._kv_skip(unit, layer),
                                                               prepend=True),
                               layer.register_forward_hook(self._kv_reuse(unit, layer),
                                                           prepend=True),
                               layer.register_forward_hook(self._kv_record(unit, layer))]

    def _kv_skip(self, unit, layer):
        """In a re-run on the main call's very text tensor: run the layer on no tokens."""
        def hook(module, args):
            held = unit.kv.get(id(layer))
            if self.variant is None or held is None or not args or args[0] is not held[0]:
                return None
            self._reused[id(layer)] = args[0]
            return (args[0].narrow(-2, 0, 0),) + tuple(args[1:])
        return hook

    def _kv_reuse(self, unit, layer):
        def hook(module, args, out):
            if self.variant is None or id(layer) not in self._reused:
                return None
            return unit.kv[id(layer)][1].clone()
        return hook

    def _kv_record(self, unit, layer):
        def hook(module, args, out):
            if self.variant is None:
                if args and isinstance(out, Tensor):
                    unit.kv[id(layer)] = (args[0], out.detach().clone())
            else:
                self._reused.pop(id(layer), None)
            return None
        return hook

    def narrow_hook(self, unit: AttentionUnit):
        """Before the main call: which networks re-run after it, and the tokens they replace
        whole left out of it."""
        def hook(module, args, kwargs):
            if self.variant is not None:
                return None
            unit.full, unit.runs = None, ()
            if self.engine._phase_step is None or not args:
                return None
            unit.runs = tuple(j for j in sorted(unit.networks) if self._wanted(unit, j))
            keep = self._main_tokens(unit, args[0])
            if keep is None:
                return None
            unit.full = args[0]
            # the layers inside see a subset of the grid's tokens, as in a re-run
            self.subset, self._full_tokens = keep, args[0].shape[1]
            return (args[0].index_select(1, keep),) + tuple(args[1:]), kwargs
        return hook

    def _main_tokens(self, unit: AttentionUnit, x) -> Optional[Tensor]:
        """The token indices the main call needs: all but those inside exactly one re-run
        network's region at weight 1 (on every row: none is blended); None for all of them.
        One token stays if none would, for hosts whose attention wants some."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            return None
        shape, runs = grid_for(x.shape[1], self.engine.latent), unit.runs
        if shape is None or not runs or \
                any(self.half(j, x.shape[0]) is not None for j in runs):
            return None
        regions = tuple(self.engine.entries[j].region for j in runs)
        key = (regions, tuple(shape), str(x.device))
        if key not in self._main:
            values = torch.stack([self.maps.on_grid(r, shape, x.device).values for r in regions])
            whole = (values == 1).any(0) & (values.sum(0) == 1)
            keep = torch.nonzero(~whole).flatten()
            if keep.numel() == 0:
                keep = keep.new_zeros(1)
            self._main[key] = None if keep.numel() == x.shape[1] else keep
        return self._main[key]

    def attention_hook(self, unit: AttentionUnit):
        def hook(module, args, kwargs, out):
            if self.variant is not None:
                return out
            full, runs, unit.full, unit.runs = unit.full, unit.runs, None, ()
            try:
                if full is not None:  # the main call ran on some tokens: zeros on the others,
                    keep, self.subset = self.subset, None  # which the re-runs fill
                    out = out.new_zeros(out.shape[0], full.shape[1], *out.shape[2:]) \
                        .index_copy_(1, keep, out)
                    args = (full,) + tuple(args[1:])
                return self._rerun(unit, runs, module, args, kwargs, out)
            finally:
                unit.kv.clear()  # the text of this call only
        return hook

    def _rerun(self, unit: AttentionUnit, runs: Tuple[int, ...], module, args, kwargs, out):
        """The unit's output with each re-run network's (`runs`) blended in by its region."""
        if self.engine._phase_step is None:
            return out
        x = args[0]
        if x.dim() != 3:
            return out
        shape = grid_for(x.shape[1], self.engine.latent)
        if shape is None:
            self.report(("attention", unit.path), f"{unit.path}: cross-attention on "
                        f"{x.shape[1]} tokens fits no grid of the latent; regions skipped")
            return out
        for j in runs:
            region = self.engine.entries[j].region
            grid = self.maps.on_grid(region, shape, x.device)
            if grid.empty:
                continue
            inside = grid.inside
            h = self.half(j, x.shape[0])  # blended: the "with" rows only
            xs, a_rest, kw = x, tuple(args[1:]), dict(kwargs)
            if h is not None:
                n = x.shape[0]
                xs, a_rest, kw = x.narrow(0, h, n - h), _rows_of(a_rest, n, h), \
                    _rows_of(kw, n, h)
            tokens = xs if grid.full else xs.index_select(1, inside)
            a, kw = self._with_context((tokens,) + a_rest, kw, j)
            self.variant, self.subset, self._full_tokens = j, inside, x.shape[1]
            try:
                out_j = module(*a, **kw)
            finally:
                self.variant, self.subset = None, None
            target = out if h is None else out.narrow(0, h, out.shape[0] - h)
            base = target if grid.full else target.index_select(1, inside)
            d = (out_j - base) * self._tokens_inside(region, shape, x.device).weights \
                .to(out.dtype)
            part = added(target, d, None if grid.full else inside)
            out = part if h is None else _rows_back(out, part, h)
        return out

    def _wanted(self, unit, j) -> bool:
        """Whether network j changes this attention now: strength on its layers, or a text
        conditioning of its own."""
        if self.text is not None and j in self.text[1]:
            return True
        return any(self.strength(c) for c in self.engine.unit_contributions(unit, j))

    def _with_context(self, args, kwargs, j):
        """The same call with network j's conditioning in place of the host's: each row of the
        host's context that equals a row of the base encoding takes the variant's row."""
        if self.text is None or j not in self.text[1]:
            return args, kwargs
        ctx, where = _context_of(args, kwargs)
        if ctx is None:
            return args, kwargs
        new = self.variant_text(ctx, j)
        if where == "args":
            return args[:1] + (new,) + tuple(args[2:]), kwargs
        return args, {**kwargs, where: new}


CONTEXT_NAMES = ("encoder_hidden_states", "context")


def _context_of(args, kwargs):
    for name in CONTEXT_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name], name
    if len(args) > 1 and isinstance(args[1], Tensor):
        return args[1], "args"
    return None, None


Text = Union[Tensor, Sequence[Tensor]]  # (rows, tokens, width), or one (tokens, width) per row


def _row_shapes(text: Text) -> Tuple[Tuple[int, ...], ...]:
    """The shape of each row of a text (of one row when all share it)."""
    if isinstance(text, Tensor):
        return (tuple(text.shape[1:]),)
    shapes = tuple(tuple(t.shape) for t in text)
    return shapes[:1] if len(set(shapes)) == 1 else shapes


def _shapes_text(text: Text) -> str:
    return ", ".join("×".join(map(str, s)) for s in _row_shapes(text))


def _rows_replaced(value: Tensor, base: Text, variant: Text) -> Tensor:
    """`value` with each row that equals a row of `base` replaced by that row of `variant`
    (rows are matched by value, so the host's batching does not matter; rows of `base` of
    another shape than `value`'s never match)."""
    new = value.clone()
    for b in range(value.shape[0]):
        for r in range(len(base)):
            if base[r].shape == value[b].shape and \
                    torch.equal(value[b], base[r].to(value.device, value.dtype)):
                new[b] = variant[r].to(value.device, value.dtype)
                break
    return new


def _pointwise_conv(module: nn.Module) -> bool:
    """A 1×1 conv that is a matrix product on the channels (no stride, padding or groups)."""
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and \
        module.stride == (1, 1) and module.padding in ((0, 0), "valid") and \
        module.groups == 1


def _croppable(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and isinstance(module.padding, tuple) and \
        module.padding_mode == "zeros"


WHOLE = RowFactors(None)
# a two-factor contribution a layer's hook adds with the others of its kind (Runtime._add_joint):
# (its id, its factors, strength, row factors or None, mask or None)
Joint = Tuple[int, Factors, float, Optional[Tensor], Optional[Tensor]]
# A region on at least 1/GATHER_BELOW of a layer's tokens is computed on all of them, masked:
# gathering and scattering its tokens would move about as many bytes as the thin products save.
GATHER_BELOW = 3


def low_rank_delta(module: nn.Module, x: Tensor, f: Factors, s: float, rows: Optional[Tensor],
                   mask: Optional[Tensor]) -> Tensor:
    """up · (s · rows ⊙ mask ⊙ down · x) in fp32: the factors on the rank-r intermediate."""
    x = x.to(torch.float32)
    if is_conv(module):
        h = module._conv_forward(x, f.down.view(f.down.shape[0], -1, *module.kernel_size), None)
    else:
        h = F.linear(x, f.down)
    h.mul_(s if mask is None else mask.to(torch.float32) * s)
    if rows is not None:
        h.mul_(rows.view(-1, *([1] * (h.dim() - 1))))
    return pointwise(module, h, f.up)


def low_rank_add(x: Tensor, f: Factors, s: float, rows: Optional[Tensor],
                 mask: Optional[Tensor], out: Tensor) -> Tensor:
    """out += up · (s · rows ⊙ mask ⊙ down · x) for the fp32 output of a Linear (channels
    last) or of a 1×1 conv on (B, C, H, W) (channels first, as matrix products: no conv
    kernel's layout changes), the last product accumulated into `out` itself: no
    output-sized temporary, one operation fewer."""
    return scaled_add(x, f, ((f.down.shape[0], _scale_of(s, rows, mask, x.dim())),), out)


def _scale_of(s: float, rows: Optional[Tensor], mask: Optional[Tensor], dims: int):
    """s·rows⊙mask shaped for the rank-r intermediate of an input of `dims` dimensions:
    (B, r, HW) for a 1×1 conv's (B, C, H, W), channels last otherwise; s where it is all."""
    spatial = dims == 4
    scale = s if mask is None else \
        (mask.to(torch.float32).flatten(2) if spatial else mask.to(torch.float32)) * s
    if rows is not None:
        scale = rows.view(-1, *([1] * ((3 if spatial else dims) - 1))) * scale
    return scale


def scaled_add(x: Tensor, f: Factors, scales: Sequence[Tuple[int, Union[float, Tensor]]],
               out: Tensor) -> Tensor:
    """out += up · h, h = down · x, each part of h's rank (r, scale), in order, times its
    scale: one network's factors, or several stacked."""
    x = x.to(torch.float32)
    spatial = x.dim() == 4
    h = torch.matmul(f.down, x.flatten(2)) if spatial else F.linear(x, f.down)
    if len(scales) == 1:
        h.mul_(scales[0][1])
    else:
        start = 0
        for r, scale in scales:
            h.narrow(1 if spatial else -1, start, r).mul_(scale)
            start += r
    if spatial:
        out.flatten(2).baddbmm_(f.up.expand(h.shape[0], -1, -1), h)
    else:
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), f.up.t())
    return out


def added(out: Tensor, d: Tensor, index: Optional[Tensor] = None) -> Tensor:
    """out + d (d on the token positions `index` only), in place unless autograd records."""
    d = d.to(out.dtype)
    if torch.is_grad_enabled():
        return out + d if index is None else out.index_add(1, index, d)
    return out.add_(d) if index is None else out.index_add_(1, index, d)


def _rows_back(out: Tensor, part: Tensor, h: int) -> Tensor:
    """`out` with its rows from h on replaced by `part` (a result computed on them): nothing
    to do where `part` was changed in place, as it is unless autograd records."""
    in_place = part.data_ptr() == out.narrow(0, h, part.shape[0]).data_ptr()
    if in_place and not torch.is_grad_enabled():
        return out
    return torch.cat([out.narrow(0, 0, h), part])


def _rows_of(value, batch: int, h: int):
    """Every tensor of a call's arguments with `batch` rows cut to its rows from h on."""
    if isinstance(value, Tensor):
        return value.narrow(0, h, batch - h) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _rows_of(v, batch, h) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_rows_of(v, batch, h) for v in value)
    return value


def _by_rows(d: Tensor, rows: Optional[Tensor]) -> Tensor:
    if rows is None:
        return d
    return d * rows.view(-1, *([1] * (d.dim() - 1))).to(d.dtype)


def dequantized_view(module: nn.Module, cropped: bool = False) -> nn.Module:
    """A float layer computing what a quantized layer computes, from its dequantized weight
    (quantized.py), for the algorithms that read W and b."""
    return float_layer(module, dequantize(module), cropped)


def float_layer(module: nn.Module, weight: Tensor, cropped: bool = False) -> nn.Module:
    """A layer like a quantized `module` holding `weight` and its bias in float: the conv
    itself (its stride and padding; none where `cropped`), else a plain Linear."""
    weight = nn.Parameter(weight, requires_grad=False)
    bias = getattr(module, "bias", None)
    bias = None if bias is None else \
        nn.Parameter(torch.as_tensor(bias).detach().float(), requires_grad=False)
    if is_conv(module):
        return layer_view(module, {"weight": weight, "bias": bias}, cropped)
    view = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    view.weight, view.bias = weight, bias
    return view


def layer_view(module: nn.Module, params: Optional[Dict[str, Tensor]] = None,
               cropped: bool = False) -> nn.Module:
    """A shallow copy of a layer, called through .forward (so no hooks run): with other
    parameter tensors (the pristine ones, for algorithms whose delta is built from W), and for
    a conv with no padding (it runs on a window already padded)."""
    view = copy.copy(module)
    if params:
        view._parameters = {**module._parameters, **params}
    if cropped:
        view.padding = (0,) * len(module.kernel_size)
    return view
