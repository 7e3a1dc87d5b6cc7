"""The blended start of regional networks (docs/design.md §4, issue 21).

One pass with a regional network moves the picture's layout: the shape leaves the tinted
area. The peers run two passes, one without the network and one with it, and blend the two
noise predictions by the region at every step: the layout stays, but the network acts at
half strength. The layout is decided in the first steps, so NetWeave blends only there (the
`blend=` key, or the setting) and runs one pass after that.

During a blended step the UNet's batch is doubled inside ONE forward:

    rows [0, b)   "without": the host's rows without the blended networks
    rows [b, 2b)  "with":    the host's rows as they would run in one pass

A forward pre-hook on the UNet root doubles every argument with the host's batch (x,
timesteps, context, SDXL's y / added_cond_kwargs, control residuals: any tensor whose first
dimension is the batch, inside dicts, lists and tuples too); the bypass hooks compute the
blended networks on the "with" rows only (bypass.py: `Runtime.half`); a forward hook blends
the two predictions back to the host's batch:

    out[r] = without[r] + m_r ⊙ (with[r] − without[r])

m_r the union (max) of the regions of the blended networks that act on row r (its prompt's
and the shared ones), on the output's grid. The host never sees the doubled batch. Everything
else (global networks, regional ones past their blend, per-prompt rows, `neg`) runs on both
halves as it does in one pass.
"""
from __future__ import annotations

from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .keymap import Family


class Blender:
    """The UNet root's two hooks and which networks blend at each step of each pass."""

    def __init__(self, engine):
        self.engine = engine
        self.steps: Dict[str, List[FrozenSet[int]]] = {}  # phase -> blended entries per step
        self.handles: List[object] = []
        self._masks: Dict[Tuple, Tensor] = {}
        # keyword arguments the host repeats its own way, not by the batch-sized rule of
        # _doubled: name -> fn(value, copies) (an adapter's, e.g. Forge's transformer_options)
        self.host_doubling: Dict[str, Callable[[object, int], object]] = {}

    def attach(self, unet: Optional[nn.Module], steps: Dict[str, List[FrozenSet[int]]]) -> None:
        self.detach()
        self.steps = steps
        self._masks.clear()
        if unet is None or not any(any(s) for s in steps.values()):
            return
        self.handles = [unet.register_forward_pre_hook(self._double, with_kwargs=True),
                        unet.register_forward_hook(self._blend, with_kwargs=True)]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.steps = {}
        self._masks.clear()
        self.engine.runtime.blend = None

    def now(self) -> FrozenSet[int]:
        """The entries blended at the engine's step."""
        at = self.engine.position
        if at is None or at[0] not in self.steps:
            return frozenset()
        steps = self.steps[at[0]]
        return steps[at[1]] if at[1] < len(steps) else frozenset()

    # ---- the hooks ----------------------------------------------------------------
    def _double(self, module, args, kwargs):
        runtime = self.engine.runtime
        runtime.blend = None
        networks = self.now()
        if not networks:
            return None
        x = _first_tensor(args, kwargs)
        if x is None or x.dim() == 0:
            return None
        b = int(x.shape[0])
        runtime.blend = (b, networks)
        shared = {k: v for k, v in kwargs.items() if k in TOKEN_IDS and v.dim() == 2}
        doubled = _doubled({k: v for k, v in kwargs.items() if k not in shared}, b)
        return _doubled(args, b), {**doubled, **shared, **self._host_doubled(kwargs, 2)}

    def _host_doubled(self, kwargs, copies: int) -> dict:
        """The arguments the host said how to repeat, for its batch repeated `copies` times."""
        return {k: fn(kwargs[k], copies) for k, fn in self.host_doubling.items() if k in kwargs}

    def _blend(self, module, args, kwargs, out):
        runtime = self.engine.runtime
        state, runtime.blend = runtime.blend, None
        if state is None:
            return None
        b, networks = state
        pred = _prediction(out)
        if pred is None or pred.shape[0] != 2 * b:
            return None
        without, with_ = pred[:b], pred[b:]
        m = self.mask(b, networks, tuple(pred.shape[1:]), pred.device)
        if m is None:
            return None
        blended = (without.float() + (with_.float() - without.float()) * m).to(pred.dtype)
        return _with_prediction(out, blended)

    def mask(self, b: int, networks: FrozenSet[int], shape: Tuple[int, ...], device
             ) -> Optional[Tensor]:
        """Per row, the union of the regions of the blended networks acting on that row's
        prompt, shaped to broadcast over one row's prediction `shape`: (b, 1, h, w) for a
        UNet's (c, h, w); (b, n, 1) for a Flux-family transformer's n packed 2×2 patches
        (None when n is not the latent's patch count)."""
        rows = self.engine.runtime.rows
        prompts = rows.prompts if rows is not None and len(rows.prompts) == b else (0,) * b
        key = (prompts, networks, shape, str(device))
        if key not in self._masks:
            entries = self.engine.entries
            maps = self.engine.runtime.maps
            packed = self.engine.keymap.family is Family.FLUX and len(shape) == 2
            if packed:
                h, w = self.engine.latent
                grid = (h // 2, w // 2)
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


def blended_steps(engine, phase: str, steps: int) -> List[FrozenSet[int]]:
    """Per step of a pass: the regional entries whose blended start covers it and that act
    on the model then (some strength of theirs is not 0)."""
    acting: Dict[int, np.ndarray] = {}
    for slot in engine._slots.values():
        for c in slot.contributions:
            if c.region is not None and phase in c.series:
                a = np.asarray(c.series[phase]) != 0
                acting[c.network] = acting.get(c.network, np.zeros(steps, bool)) | a
    out: List[FrozenSet[int]] = []
    for k in range(steps):
        now = []
        for j, on in acting.items():
            p = engine.entries[j].net.base if phase == "base" else engine.entries[j].net.hires
            if p is not None and k < p.blend and on[k]:
                now.append(j)
        out.append(frozenset(now))
    return out


# diffusers' Flux-family position ids: (tokens, 3), one set for every row, never doubled
# (a 2-D ids tensor whose token count equals the batch would look batch-sized)
TOKEN_IDS = ("img_ids", "txt_ids")


def _first_tensor(args, kwargs) -> Optional[Tensor]:
    for v in list(args) + [kwargs.get(k) for k in ("x", "sample", "hidden_states")]:
        if isinstance(v, Tensor):
            return v
    return None


def _doubled(value, b: int):
    """Every tensor whose first dimension is the batch, twice along it; containers rebuilt."""
    if isinstance(value, Tensor):
        return torch.cat([value, value]) if value.dim() > 0 and value.shape[0] == b else value
    if isinstance(value, dict):
        new = {k: _doubled(v, b) for k, v in value.items()}
        if type(value) is not dict:
            try:
                return type(value)(new)
            except TypeError:
                pass
        return new
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_doubled(v, b) for v in value)
    if isinstance(value, list):
        return [_doubled(v, b) for v in value]
    return value


def _prediction(out) -> Optional[Tensor]:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    sample = getattr(out, "sample", None)
    return sample if isinstance(sample, Tensor) else None


def _with_prediction(out, pred: Tensor):
    if isinstance(out, Tensor):
        return pred
    if isinstance(out, tuple):
        return (pred,) + tuple(out[1:])
    if isinstance(out, list):
        return [pred] + list(out[1:])
    out.sample = pred  # diffusers' output classes set their dict entry too
    return out
