"""The engine: a plan applied to a host's module trees (DESIGN §4).

    engine.activate(plan)          networks loaded, weights at (base pass, step 0)
    engine.te_segments(phase)      step ranges with one set of text-encoder strengths each
    engine.apply_te(segment)       text encoders merged for that range (the host encodes)
    engine.set_step(k, phase)      UNet layers re-merged only where a strength changes at k
    engine.deactivate()            every weight back to its pristine bits

Merged path: W = W0 + Σ s_i·ΔW_i(s_i), computed in fp32 from the pristine copy W0 and cast back;
never by subtracting, so nothing drifts however often a layer changes. A layer is re-merged
only when the strengths of its own contributions change, so a constant schedule costs nothing
after the first step and a new plan that keeps a network's strengths leaves its layers alone.
Weights stay merged between generations; `deactivate()` restores them. Any failure while
weights change (a bad file is caught before that) restores everything and re-raises.

A contribution is one network's adapter on one layer with its strength per step. Engine II adds
contributions that run as a bypass (regions, per-row strengths) beside the merged ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .algorithms import Adapter
from .blocks import BLOCKS
from .cache import NetworkCache
from .files import NetworkFileError
from .keymap import KeyMap, Target
from .loader import LoadedNetwork, load_checkpoint, load_network
from .plan import NetworkPlan, PassPlan, Plan

PHASES = ("base", "hires")


@dataclass(frozen=True)
class Segment:
    """Steps [start, stop) of a pass during which every text-encoder strength is the same."""

    phase: str
    start: int
    stop: int
    strengths: Tuple[Tuple[int, str, float], ...]  # (network, component, strength), nonzero only


@dataclass
class Contribution:
    network: int  # index into plan.networks
    adapter: Adapter
    dyn: Optional[int]
    series: Dict[str, np.ndarray]  # phase -> effective strength per step on this layer
    bypass: bool = False  # y + s·f(x) at run time instead of merged into W

    def at(self, phase: str, k: int) -> float:
        return float(self.series[phase][k]) if phase in self.series else 0.0


@dataclass
class _Slot:
    """A target the plan changes: its contributions and what is merged into it now."""

    target: Target
    contributions: List[Contribution] = field(default_factory=list)
    # ((adapter, strength), ...) as merged now, () when pristine. The adapters themselves, not
    # their ids: a reloaded file must never look like the one merged before.
    applied: Tuple = ()
    hook: Optional[object] = None  # the forward hook of its bypass contributions

    @property
    def merged(self) -> List[Contribution]:
        return [c for c in self.contributions if not c.bypass]


class Engine:
    def __init__(self, trees: Mapping[str, nn.Module], arch: str,
                 find: Callable[[str, str], str], *, pristine_on_cpu: bool = False,
                 cache_bytes: int = 2 ** 30, latent: Tuple[int, int] = (64, 64), batch: int = 2,
                 strategy: str = "auto"):
        """`trees`: {"unet", "te1"[, "te2"]} module roots; `find(kind, name)` → file path
        (raises FileNotFoundError when there is none); `pristine_on_cpu`: keep the pristine
        copies in CPU memory instead of beside the weights; `latent` (h, w) and `batch`: the
        generation's size, for the cost of a bypass (set them before `activate`); `strategy`:
        "auto" (the cost model), or "merge" / "bypass" for every contribution that can."""
        if strategy not in ("auto", "merge", "bypass"):
            raise ValueError(f"strategy must be auto, merge or bypass, not {strategy!r}")
        self.strategy = strategy
        self.keymap = KeyMap(trees)
        self.arch = arch
        self.find = find
        self.pristine_on_cpu = pristine_on_cpu
        self.cache = NetworkCache(cache_bytes)
        self.latent, self.batch = latent, batch
        # A bypass also pays per call, whatever its size: the hook and its kernel launches;
        # as multiply-adds, about 100 µs of a 2-core CPU (measured: tiny bypasses lost to
        # re-merging at every keyframe without this term).
        self.bypass_call_macs = 4_000_000
        self.plan: Optional[Plan] = None
        self.errors: List[str] = []
        self.merges = 0  # layers merged so far (benchmarks and tests read it)
        self._slots: Dict[Target, _Slot] = {}
        self._pristine: Dict[Tuple[int, str], Tuple[nn.Module, Tensor]] = {}
        self._phase_step: Optional[Tuple[str, int]] = None
        self._changes: Dict[str, Dict[int, List[_Slot]]] = {}
        self._segments: Dict[str, List[Segment]] = {}

    # ---- public ----------------------------------------------------------------------
    def activate(self, plan: Plan) -> List[str]:
        """Load the plan's networks and merge them at (base, step 0). Returns the problems
        (a missing or bad file skips its network; the generation goes on)."""
        if BLOCKS[plan.arch] != BLOCKS[self.arch]:  # the host compiled for another model
            raise ValueError(f"the plan was compiled for {plan.arch}, the model is {self.arch}")
        errors, loaded = [], {}
        for i, net in enumerate(plan.networks):
            if net.region is not None or net.neg != 1.0:
                errors.append(f"{net.kind}:{net.name}: regions and neg= need the bypass path "
                              "(Engine II); this network is skipped")
                continue
            try:
                loaded[i] = self._load(net)
            except (NetworkFileError, FileNotFoundError, KeyError) as exc:
                errors.append(f"{net.kind}:{net.name}: {exc}")
        slots = self._build_slots(plan, loaded)
        self._choose_strategies(slots)
        self._guarded(self._switch, slots)
        self.plan, self.errors, self._segments = plan, errors, {}
        self._changes = {phase: _change_steps(self._unet_slots(), phase) for phase in PHASES}
        self._guarded(self._merge_where_changed, "base", 0, list(self._slots.values()))
        self._phase_step = ("base", 0)
        return errors

    def set_step(self, k: int, phase: str = "base") -> None:
        """UNet weights for step k (0-based) of `phase`."""
        if self.plan is None:
            return
        self._check_step(k, phase)
        if self._phase_step == (phase, k):
            return  # samplers call the denoiser more than once per step
        if self._phase_step == (phase, k - 1):  # the usual case: only layers that change at k
            slots = self._changes[phase].get(k, [])
        else:  # a jump (first hires step, a restart): compare every layer
            slots = self._unet_slots()
        self._guarded(self._merge_where_changed, phase, k, slots)
        self._phase_step = (phase, k)

    def te_segments(self, phase: str = "base") -> List[Segment]:
        """Runs of steps with the same text-encoder strengths: one encoding each."""
        if self.plan is None:
            return []
        if phase not in self._segments:  # segment_at asks at every step: compute once
            self._segments[phase] = self._find_segments(phase)
        return self._segments[phase]

    def _find_segments(self, phase: str) -> List[Segment]:
        steps = self._steps(phase)
        # every text-encoder layer of a network carries the same strength (component × BASE)
        series = {}
        for slot in self._slots.values():
            if slot.target.component != "unet":
                for c in slot.contributions:
                    if phase in c.series:
                        series[c.network, slot.target.component] = c.series[phase]
        keys = [tuple(sorted((i, comp, float(v[k])) for (i, comp), v in series.items() if v[k]))
                for k in range(steps)]
        segments, start = [], 0
        for k in range(1, steps + 1):
            if k == steps or keys[k] != keys[start]:
                segments.append(Segment(phase, start, k, keys[start]))
                start = k
        return segments

    def apply_te(self, segment: Segment) -> None:
        """Text-encoder weights for a segment (the host encodes its prompt after this)."""
        te = [s for s in self._slots.values() if s.target.component != "unet"]
        self._guarded(self._merge_where_changed, segment.phase, segment.start, te)

    def segment_at(self, k: int, phase: str = "base") -> Segment:
        """The text-encoder segment step k belongs to: which conditioning to use."""
        return next(s for s in self.te_segments(phase) if s.start <= k < s.stop)

    def deactivate(self) -> None:
        """Every weight back to its pristine bits; all patches dropped."""
        self._restore_all()
        self.plan, self._phase_step = None, None

    def strengths(self, target: Target) -> Dict[int, float]:
        """What is merged into a layer now: {network index: strength}."""
        slot = self._slots.get(target)
        if slot is None:
            return {}
        ids = {id(c.adapter): c.network for c in slot.contributions}
        now = {ids[id(a)]: s for a, s in slot.applied}
        if self._phase_step is not None:
            now.update({c.network: c.at(*self._phase_step) for c in slot.contributions
                        if c.bypass and c.at(*self._phase_step)})
        return now

    @property
    def pristine_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self._pristine.values())

    # ---- building the contributions --------------------------------------------------
    def _unet_slots(self) -> List[_Slot]:
        return [s for s in self._slots.values() if s.target.component == "unet"]

    def _load(self, net: NetworkPlan) -> LoadedNetwork:
        path = self.find(net.kind, net.name)
        loader = load_checkpoint if net.kind == "model" else load_network
        return self.cache.get(path, lambda p: loader(p, self.keymap, self.arch),
                              lambda n: n.nbytes)

    def _build_slots(self, plan: Plan, loaded: Dict[int, LoadedNetwork]) -> Dict[Target, _Slot]:
        slots: Dict[Target, _Slot] = {}
        for i, network in loaded.items():
            net = plan.networks[i]
            for target, adapter in network.layers.items():
                series = {phase: _series(p, target) for phase, p in
                          (("base", net.base), ("hires", net.hires)) if p is not None}
                slot = slots.setdefault(target, _Slot(target))
                slot.contributions.append(Contribution(i, adapter, net.tag.dyn, series))
        return slots

    def _switch(self, slots: Dict[Target, _Slot]) -> None:
        """Adopt new slots: layers nothing touches any more go back to pristine; layers that
        keep their contributions and strengths keep their merged weights."""
        for target, old in self._slots.items():
            if old.hook is not None:
                old.hook.remove()
            if target not in slots:
                self._write(target, None)
                self._forget(target)
            else:
                slots[target].applied = old.applied
        self._slots = slots
        for slot in slots.values():
            if any(c.bypass for c in slot.contributions):
                slot.hook = slot.target.module.register_forward_hook(self._bypass_hook(slot))

    def _bypass_hook(self, slot: _Slot):
        def hook(module, args, out):
            if self._phase_step is None:
                return out
            phase, k = self._phase_step
            for c in slot.contributions:
                s = c.at(phase, k) if c.bypass else 0.0
                if s:
                    out = out + c.adapter.bypass(args[0], module, out, s, c.dyn)
            return out
        return hook

    # ---- merge or bypass --------------------------------------------------------------
    def _choose_strategies(self, slots: Dict[Target, _Slot]) -> None:
        """DESIGN §4's cost model, per layer and contribution: a scheduled contribution runs
        as a bypass where its low-rank forward over the pass costs less than re-merging the
        layer at each of its keyframes (deep, low-resolution layers); everything else merges."""
        levels = 3 if self.arch == "sdxl" else 4
        for slot in slots.values():
            t = slot.target
            if t.component != "unet" or t.chunk is not None or \
                    not isinstance(t.module, (nn.Linear, nn.Conv2d)):
                continue
            tokens = self._tokens(t, levels)
            for c in slot.contributions:
                costs = c.adapter.costs(tuple(t.weight.shape), tokens)
                if costs is None or self.strategy == "merge":
                    continue
                series = c.series["base"]
                merges = 1 + int(np.count_nonzero(np.diff(series)))
                merge, bypass = costs
                per_pass = (bypass + self.bypass_call_macs) * np.count_nonzero(series)
                c.bypass = self.strategy == "bypass" or (merges > 1 and per_pass < merge * merges)

    def _tokens(self, target: Target, levels: int) -> int:
        """Rows a UNet layer sees per forward: latent pixels at its level (or the 77 text
        tokens for cross-attention keys and values), times the batch."""
        if re.search(r"attn2\.to_[kv]$", target.name):
            return 77 * self.batch
        level = _level(target.block, levels)
        h, w = self.latent
        return max(1, (h >> level) * (w >> level)) * self.batch

    # ---- merging ---------------------------------------------------------------------
    def _merge_where_changed(self, phase: str, k: int, slots: List[_Slot]) -> None:
        for slot in slots:
            wanted = tuple((c.adapter, c.at(phase, k)) for c in slot.merged if c.at(phase, k))
            if wanted != slot.applied:
                self._merge(slot, phase, k)
                slot.applied = wanted

    def _merge(self, slot: _Slot, phase: str, k: int) -> None:
        target = slot.target
        w0 = self._pristine_slice(target, target.param)
        live = [c for c in slot.merged if c.at(phase, k)]
        if not live:
            self._write(target, None)
            return
        device = target.weight.device
        w0f = w0.to(device=device, dtype=torch.float32)
        dest = _chunk(self._param(target, target.param).data, target.chunk)
        direct = dest.dtype == torch.float32 and dest.is_contiguous()
        with torch.no_grad():
            w = self._merged_weight(w0f, live, phase, k, out=dest if direct else None)
        bias = None
        if target.bias_param is not None:  # full, norm and checkpoints change the bias too
            b0f = self._pristine_slice(target, target.bias_param).to(device=device,
                                                                      dtype=torch.float32)
            deltas = [d for d in (c.adapter.bias_delta(b0f, float(c.series[phase][k]))
                                  for c in live) if d is not None]
            if deltas:
                bias = b0f + sum(deltas)
        self._write(target, None if direct else w, bias, weight_done=direct)
        self.merges += 1

    def _merged_weight(self, w0f: Tensor, live: List[Contribution], phase: str, k: int,
                       out: Optional[Tensor] = None) -> Tensor:
        """W0 + Σ ΔW_i in fp32, into `out` when given (an fp32 weight: no temporary). Plain
        two-factor contributions (LoRA) go into one fused multiply-add
        W0 + [U_1 … U_n]·[D_1; …; D_n]: one pass over W instead of one per network."""
        factors, others = [], []
        for c in live:
            s = float(c.series[phase][k])
            lr = c.adapter.low_rank(s, c.dyn, w0f.device)
            if lr is None:
                others.append((c, s))
            else:
                factors.append(lr)
        w = out if out is not None else torch.empty_like(w0f)
        if factors:
            torch.addmm(w0f.reshape(w0f.shape[0], -1), torch.cat([u for u, _ in factors], 1),
                        torch.cat([d for _, d in factors], 0), out=w.view(w.shape[0], -1))
        else:
            w.copy_(w0f)
        for c, s in others:
            w += c.adapter.delta(w0f, s, c.dyn).reshape(w.shape)
        return w

    # ---- pristine copies and writes -------------------------------------------------
    def _param(self, target: Target, name: str) -> Tensor:
        return target.module.get_parameter(name)

    def _pristine_slice(self, target: Target, name: str) -> Tensor:
        key = (id(target.module), name)
        if key not in self._pristine:
            p = self._param(target, name).detach()
            copy = p.to("cpu", copy=True) if self.pristine_on_cpu else p.clone()
            self._pristine[key] = (target.module, copy)
        full = self._pristine[key][1]
        return _chunk(full, target.chunk)

    def _write(self, target: Target, weight: Optional[Tensor], bias: Optional[Tensor] = None,
               weight_done: bool = False):
        """Set a target's weight (and bias) from fp32 values, or back to pristine (None);
        `weight_done`: the weight was already written in place."""
        names = [target.param] + ([target.bias_param] if target.bias_param else [])
        with torch.no_grad():
            for name, value in zip(names, (weight, bias)):
                if weight_done and name == target.param:
                    continue
                key = (id(target.module), name)
                if key not in self._pristine:
                    if value is None:
                        continue
                    self._pristine_slice(target, name)
                dest = _chunk(self._param(target, name).data, target.chunk)
                if value is None:
                    dest.copy_(_chunk(self._pristine[key][1], target.chunk))
                else:
                    dest.copy_(value.reshape(dest.shape).to(dest.dtype))

    def _forget(self, target: Target) -> None:
        """Drop pristine copies no slot needs (a fused param stays while a chunk uses it)."""
        still = {(id(t.module), n) for t in self._slots for n in (t.param, t.bias_param) if n}
        for name in (target.param, target.bias_param):
            key = (id(target.module), name)
            if name and key in self._pristine and key not in still:
                del self._pristine[key]

    def _restore_all(self) -> None:
        for slot in self._slots.values():
            if slot.hook is not None:
                slot.hook.remove()
        with torch.no_grad():
            for (_, name), (module, copy) in self._pristine.items():
                module.get_parameter(name).data.copy_(copy)
        self._pristine.clear()
        self._slots = {}

    def _guarded(self, fn, *args) -> None:
        """Run a weight change; on any failure (OOM, an interrupt) put everything back."""
        try:
            fn(*args)
        except BaseException:
            self._restore_all()
            self.plan = None
            raise

    # ---- steps ------------------------------------------------------------------------
    def _steps(self, phase: str) -> int:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
        if phase == "hires":
            if self.plan.hires_steps is None:
                raise ValueError("the plan has no hires pass: compile it with hires_steps")
            return self.plan.hires_steps
        return self.plan.steps

    def _check_step(self, k: int, phase: str) -> None:
        steps = self._steps(phase)
        if not 0 <= k < steps:
            raise ValueError(f"step {k} is outside the {phase} pass of {steps} steps")


def _series(p: PassPlan, target: Target) -> np.ndarray:
    """Effective strength of a network on one layer at every step: component × block."""
    series = p.strength[target.component]
    if target.block is not None:
        series = series * p.blocks[target.block]
    return series


def _chunk(t: Tensor, chunk: Optional[Tuple[int, int]]) -> Tensor:
    if chunk is None:
        return t
    size = t.shape[0] // chunk[1]
    return t.narrow(0, chunk[0] * size, size)


def _level(block: Optional[str], levels: int) -> int:
    """Resolution level (0 = full latent) of a block: IN01-IN03 0, IN04-IN06 1, ...; M00 the
    deepest; OUT00-OUT02 the deepest, OUT03-OUT05 one up, ..."""
    if block is None or block in ("IN00", "BASE"):
        return 0
    if block == "M00":
        return levels - 1
    index = int(block[-2:])
    if block.startswith("IN"):
        return min((index - 1) // 3, levels - 1)
    return max(levels - 1 - index // 3, 0)


def _change_steps(slots: List[_Slot], phase: str) -> Dict[int, List[_Slot]]:
    """{step k: the layers whose merged strengths differ between steps k-1 and k}."""
    changes: Dict[int, List[_Slot]] = {}
    for slot in slots:
        steps = set()
        for c in slot.merged:
            if phase in c.series:
                steps.update((np.nonzero(np.diff(c.series[phase]))[0] + 1).tolist())
        for k in steps:
            changes.setdefault(k, []).append(slot)
    return changes
