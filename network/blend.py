"""The blended start of regional networks (docs/design.md §4, issue 21), and the text streams
of regional text-encoder networks on models without cross-attention (the Flux family).

One pass with a regional network moves the picture's layout: the shape leaves the tinted
area. The peers run two passes, one without the network and one with it, and blend the two
noise predictions by the region at every step: the layout stays, but the network acts at
half strength. The layout is decided in the first steps, so NetWeave blends only there (the
`blend=` key, or the setting) and runs one pass after that.

A regional text-encoder network conditions the image tokens inside its region on its own
encoding of the prompt. A UNet's cross-attention re-runs on those tokens (bypass.py); joint
attention has no such place: every image token attends to one text sequence, which the
transformer's text stream changes block by block. So such a network gets a stream of its
own: the host's rows again, with the text (and pooled vector) encoded with the network.

A stream is the peers' second pass for that network: it needs no blended start, so on these
models only the networks' other layers blend.

All of it runs as ONE forward whose batch holds every stream, `b` host rows each:

    [without]   the host's rows without the blended networks (while some network blends)
    main        the host's rows as they would run in one pass
    [stream j]  main with network j's text, per regional text-encoder network j acting now

A forward pre-hook on the model root repeats every argument with the host's batch (x,
timesteps, context, SDXL's y / added_cond_kwargs, control residuals: any tensor whose first
dimension is the batch, inside dicts, lists and tuples too), putting each stream's text in;
the bypass hooks compute the blended networks on every row but the "without" ones (bypass.py:
`Runtime.half`); a forward hook combines the predictions back to the host's batch:

    w = without + m ⊙ (main − without)       (while some network blends; else w = main)
    out = w + m_j ⊙ (stream_j − w)           for each stream j in turn

m_j network j's region on row r (0 where row r's prompt lacks it), m the union (max) of the
regions of the blended networks acting on the row, on the output's grid. The host never sees
the larger batch. Everything else (global networks, regional ones past their blend, per-prompt
rows, `neg`) runs on every stream as it does in one pass; the blended networks run on every
stream but "without" (inside another network's text stream, a blended network's region leaks
what attention carries from it, as in one pass).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .keymap import Family

NONE: FrozenSet[int] = frozenset()


@dataclass(frozen=True)
class Layout:
    """The streams of one forward: `b` host rows each, in the order the module doc gives."""

    b: int
    blended: FrozenSet[int]  # networks left out of the "without" stream (none: no such stream)
    streams: Tuple[int, ...] = ()  # regional text-encoder networks with a stream of their own

    @property
    def count(self) -> int:
        return int(bool(self.blended)) + 1 + len(self.streams)

    @property
    def main(self) -> int:
        """The first row of the main stream: where the blended networks' rows begin."""
        return self.b if self.blended else 0


@dataclass(frozen=True)
class Now:
    """What one step of a pass runs as extra streams."""

    blended: FrozenSet[int] = NONE
    streams: Tuple[int, ...] = ()


class Blender:
    """The model root's two hooks, and the streams at each step of each pass."""

    def __init__(self, engine):
        self.engine = engine
        self.steps: Dict[str, List[Now]] = {}  # phase -> per step
        self.handles: List[object] = []
        self._masks: Dict[Tuple, Tensor] = {}
        # keyword arguments the host repeats its own way, not by the batch-sized rule of
        # _expand: name -> fn(value, copies) (an adapter's, e.g. Forge's transformer_options)
        self._host_repeats: Dict[str, Callable[[object, int], object]] = {}

    def attach(self, unet: Optional[nn.Module], steps: Dict[str, List[Now]]) -> None:
        self.detach()
        self.steps = steps
        self._masks.clear()
        if unet is None or not any(n.blended or n.streams for s in steps.values() for n in s):
            return
        self.handles = [unet.register_forward_pre_hook(self._expand, with_kwargs=True),
                        unet.register_forward_hook(self._combine, with_kwargs=True)]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.steps = {}
        self._masks.clear()
        self.engine.runtime.layout = None

    def now(self) -> Now:
        """The streams at the engine's step."""
        at = self.engine.position
        if at is None or at[0] not in self.steps:
            return Now()
        steps = self.steps[at[0]]
        return steps[at[1]] if at[1] < len(steps) else Now()

    # ---- the hooks ----------------------------------------------------------------
    def _expand(self, module, args, kwargs):
        runtime = self.engine.runtime
        runtime.layout = None
        now = self._with_text(self.now())
        if not now.blended and not now.streams:
            return None
        b = _batch(args, kwargs)
        if b is None:
            return None
        layout = Layout(b, now.blended, now.streams)
        runtime.layout = layout
        shared = {k: v for k, v in kwargs.items() if k in TOKEN_IDS and v.dim() == 2}
        call = (args, {k: v for k, v in kwargs.items() if k not in shared})
        lists = self._per_image()
        versions = [call] * (layout.count - len(now.streams)) + [
            _mapped(call, b, lambda t, j=j: runtime.variant_text(t, j), lists)
            for j in now.streams]
        args, kwargs = _joined(versions, b, lists)
        return args, {**kwargs, **shared, **self._host_repeated(call[1], layout.count)}

    def repeat_with(self, name: str, fn: Callable[[object, int], object]) -> None:
        """The host's own way to repeat its keyword argument `name` for a batch repeated
        `copies` times, where the batch-sized rule does not fit (Forge's transformer_options:
        lists per chunk, extension/webui/forge.py)."""
        self._host_repeats[name] = fn

    def _host_repeated(self, kwargs, copies: int) -> dict:
        """The arguments the host said how to repeat, for its batch repeated `copies` times."""
        return {k: fn(kwargs[k], copies) for k, fn in self._host_repeats.items() if k in kwargs}

    def _per_image(self) -> bool:
        """Whether the model takes lists of one tensor per image (tokens.TokenLayout)."""
        tokens = self.engine.keymap.tokens
        return tokens is not None and tokens.per_image

    def _with_text(self, now: Now) -> Now:
        """`now` with only the streams whose network's encoding the host gave for this call
        (none for a negative prompt's rows)."""
        runtime, kept = self.engine.runtime, []
        for j in now.streams:
            given = runtime.has_text(j)
            if given:
                kept.append(j)
            elif given is None:
                e = self.engine.entries[j]
                runtime.report(("no text", j), f"{e.net.kind}:{e.net.name}: regional on the text "
                               "encoders, but the host gave no encoding with it; its text-encoder "
                               "part is left out")
        return Now(now.blended, tuple(kept))

    def _combine(self, module, args, kwargs, out):
        runtime = self.engine.runtime
        layout, runtime.layout = runtime.layout, None
        if layout is None:
            return None
        b, lists = layout.b, self._per_image()
        given = _prediction(out, lists)
        pred = torch.stack(given) if isinstance(given, list) and given else given
        if not isinstance(pred, Tensor) or pred.shape[0] != layout.count * b:
            return None
        parts = pred.split(b)
        shape, first = tuple(pred.shape[1:]), layout.main // b
        w = parts[first]
        if layout.blended:
            m = self.mask(b, layout.blended, shape, pred.device)
            if m is not None:
                w = parts[0].float() + (w.float() - parts[0].float()) * m
        for k, j in enumerate(layout.streams):
            m = self.mask(b, frozenset((j,)), shape, pred.device)
            if m is not None:
                w = w.float() + (parts[first + 1 + k].float() - w.float()) * m
        w = w.to(pred.dtype)
        return _with_prediction(out, list(w.unbind()) if isinstance(given, list) else w, lists)

    def mask(self, b: int, networks: FrozenSet[int], shape: Tuple[int, ...], device
             ) -> Optional[Tensor]:
        """Per row, the union of the regions of `networks` acting on that row's prompt,
        shaped to broadcast over one row's prediction `shape`: (b, 1, h, w) for a UNet's
        (c, h, w); (b, n, 1) for a transformer's n packed patches (None when n is not the
        latent's patch count)."""
        rows = self.engine.runtime.rows
        prompts = rows.prompts if rows is not None and len(rows.prompts) == b else (0,) * b
        key = (prompts, networks, shape, str(device))
        if key not in self._masks:
            entries = self.engine.entries
            maps = self.engine.runtime.maps
            layout = self.engine.keymap.tokens  # a transformer's packed patches (tokens.py)
            packed = layout is not None and len(shape) == 2
            if packed:
                grid = layout.grid(self.engine.latent)
                if grid[0] * grid[1] != shape[0]:
                    return None
            else:
                grid = shape[-2:] if len(shape) >= 3 else (1, 1)
            per_row = []
            for p in prompts:
                m = torch.zeros(grid[0] * grid[1], dtype=torch.float32, device=device)
                for j in sorted(networks):
                    if entries[j].owner in (None, p):
                        m = torch.maximum(m, maps.on_grid(entries[j].region, grid, device)
                                          .values.to(torch.float32))
                per_row.append(m.view(-1, 1) if packed else m.view(1, *grid))
            m = torch.stack(per_row)  # (b, 1, h, w) or (b, n, 1)
            if len(shape) > 3:  # a video-like (b, c, f, h, w) output: the same on every frame
                m = m.view(b, 1, *([1] * (len(shape) - 3)), *grid)
            self._masks[key] = m
        return self._masks[key]


def stream_steps(engine, phase: str, steps: int) -> List[Now]:
    """Per step of a pass: the regional entries whose blended start covers it and that act
    on the model then (some strength of theirs is not 0); and, on a model without
    cross-attention, the regional networks acting on a text encoder then (their streams)."""
    acting: Dict[int, np.ndarray] = {}
    text: Dict[int, np.ndarray] = {}
    streams = engine.keymap.family is not Family.SD  # joint attention: no cross-attention
    for slot in engine._slots.values():
        for c in slot.contributions:
            if c.region is not None and phase in c.series:
                a = np.asarray(c.series[phase]) != 0
                found = text if streams and slot.target.component != "unet" else acting
                found[c.network] = found.get(c.network, np.zeros(steps, bool)) | a
    out: List[Now] = []
    for k in range(steps):
        blended = []
        for j, on in acting.items():
            p = engine.entries[j].net.base if phase == "base" else engine.entries[j].net.hires
            if p is not None and k < p.blend and on[k]:
                blended.append(j)
        out.append(Now(frozenset(blended), tuple(sorted(j for j, on in text.items() if on[k]))))
    return out


# diffusers' Flux-family position ids: (tokens, 3), one set for every row, never doubled
# (a 2-D ids tensor whose token count equals the batch would look batch-sized)
TOKEN_IDS = ("img_ids", "txt_ids")


def _batch(args, kwargs) -> Optional[int]:
    """The rows of a call: the first batched tensor's (the latent, else the time), or the
    length of a list of one latent per image (diffusers' Z-Image, called by keyword)."""
    values = list(args) + [kwargs.get(k) for k in ("x", "sample", "hidden_states", "t",
                                                   "timestep")]
    for v in values:
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    for v in values:
        if isinstance(v, list) and v and all(isinstance(t, Tensor) for t in v):
            return len(v)
    return None


def _mapped(value, b: int, fn: Callable[[Tensor], Tensor], lists: bool = False):
    """`value` with fn applied to every tensor whose first dimension is the batch (with
    `lists`, to each tensor of a list of one per image, as a batch of one)."""
    if isinstance(value, Tensor):
        return fn(value) if value.dim() > 0 and value.shape[0] == b else value
    if lists and _per_image(value, b):
        return [fn(v.unsqueeze(0))[0] for v in value]
    if isinstance(value, dict):
        return _rebuilt(value, {k: _mapped(v, b, fn, lists) for k, v in value.items()})
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_mapped(v, b, fn, lists) for v in value)
    if isinstance(value, list):
        return [_mapped(v, b, fn, lists) for v in value]
    return value


def _joined(versions: list, b: int, lists: bool = False):
    """One value from several versions of the same structure: each tensor whose first
    dimension is the batch, the versions' tensors one after the other along it (with `lists`,
    each list of one tensor per image, the versions' lists one after the other); anything
    else, the first version's."""
    first = versions[0]
    if isinstance(first, Tensor):
        return torch.cat(versions) if first.dim() > 0 and first.shape[0] == b else first
    if lists and _per_image(first, b):
        return [t for v in versions for t in v]
    if isinstance(first, dict):
        return _rebuilt(first, {k: _joined([v[k] for v in versions], b, lists) for k in first})
    if isinstance(first, tuple) and not hasattr(first, "_fields"):
        return tuple(_joined(list(v), b, lists) for v in zip(*versions))
    if isinstance(first, list):
        return [_joined(list(v), b, lists) for v in zip(*versions)]
    return first


def _per_image(value, b: int) -> bool:
    """A list of one tensor per image of a batch of b."""
    return isinstance(value, list) and len(value) == b and \
        all(isinstance(t, Tensor) for t in value)


def _doubled(value, b: int):
    """Every tensor whose first dimension is the batch, twice along it; containers rebuilt."""
    return _joined([value, value], b)


def _rebuilt(like: dict, new: dict) -> dict:
    """`new` as the mapping type of `like` where that type can be built from a dict."""
    if type(like) is not dict:
        try:
            return type(like)(new)
        except TypeError:
            pass
    return new


def _prediction(out, lists: bool = False):
    """The model's prediction in its output: a tensor, or with `lists` a list of one per
    image (the output itself, its first item or its `sample`)."""
    def found(v) -> bool:
        return isinstance(v, Tensor) or (lists and isinstance(v, list) and bool(v) and
                                         all(isinstance(t, Tensor) for t in v))
    if isinstance(out, Tensor) or (lists and found(out)):
        return out
    if isinstance(out, (tuple, list)) and out and found(out[0]):
        return out[0]
    sample = getattr(out, "sample", None)
    return sample if found(sample) else None


def _with_prediction(out, pred, lists: bool = False):
    if isinstance(out, Tensor) or (lists and _prediction(out, lists) is out):
        return pred
    if isinstance(out, tuple):
        return (pred,) + tuple(out[1:])
    if isinstance(out, list):
        return [pred] + list(out[1:])
    out.sample = pred  # diffusers' output classes set their dict entry too
    return out
