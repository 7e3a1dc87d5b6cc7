"""The engine: a plan applied to a host's module trees (docs/design.md §4).

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

A contribution is one network's adapter on one layer with its strength per step. Global
contributions merge (or bypass where the cost model says a low-rank branch is cheaper);
regional ones, per-prompt ones (a batch of different prompts) and `neg` ≠ 1 run as a bypass
beside them on the same layer (bypass.py). Text encoders have no grid and no rows: they are
merged per encoding, and the host encodes once per segment, prompt and regional network.

    engine.set_rows(prompts, uncond)  which prompt each UNet batch row is, which are unconditional
    engine.set_text_variants(base, {network: cond})   conditionings of regional TE networks
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..parser import format_tag
from .algorithms import Adapter
from .blocks import ARCH_TITLES, BLOCKS
from .blend import Blender, stream_steps
from .bypass import AttentionUnit, Factors, Rows, Runtime, dequantized_view, layer_view
from . import batched_merge
from .batched_merge import Job
from .cache import NetworkCache
from .calibrate import Calibration, calibration
from .deltas import Deltas, delta_dtype
from .files import NetworkFileError
from .tokens import Tokens
from .keymap import Family, KeyMap, Target, linear_like
from .quantized import dequantize_as
from .requantize import requantize, requantizer
from .loader import LoadedNetwork, load_checkpoint, load_network, split_key
from .plan import NetworkPlan, PassPlan, Plan
from .regions import RegionError, RegionMaps, rest_of, uses_rest

PHASES = ("base", "hires")


class Strategy(str, Enum):
    """How global contributions on the UNet run: the cost model's choice, or all one way."""

    AUTO = "auto"
    MERGE = "merge"
    BYPASS = "bypass"


# A scheduled layer runs beside its networks only where that is priced at most half of its
# re-merges: nearer parity the measured costs' own noise decides (the same layer flipped
# between two calibrations), and a merged layer computes what the hosts' own LoRA does.
BYPASS_BELOW = 0.5
CROSS_KV = re.compile(r"attn2\.to_[kv]$")  # cross-attention keys and values: they see the text
ATTENTION_CHILD = re.compile(r"^(.*\.attn2)\.(to_q|to_k|to_v|to_out\.0)$")


@dataclass(frozen=True)
class Segment:
    """Steps [start, stop) of a pass during which every text-encoder strength is the same."""

    phase: str
    start: int
    stop: int
    strengths: Tuple[Tuple[int, str, float], ...]  # (network, component, strength), nonzero only
    prompt: int = 0  # which prompt of the batch
    variants: Tuple[int, ...] = ()  # regional networks acting on the text here: one encoding each


@dataclass(frozen=True)
class Entry:
    """One network of the generation: shared by every prompt of the batch (owner None) or
    one prompt's own; `region`: its key in the region maps when it has a region."""

    net: NetworkPlan
    owner: Optional[int]
    prompt: int
    region: Optional[int] = None


@dataclass
class Contribution:
    network: int  # index into plan.networks
    adapter: Adapter
    dyn: Optional[int]
    series: Dict[str, np.ndarray]  # phase -> effective strength per step on this layer
    bypass: bool = False  # y + s·f(x) at run time instead of merged into W
    region: Optional[int] = None  # key of its region map; None: everywhere
    owner: Optional[int] = None  # the prompt of the batch it belongs to; None: every prompt
    neg: float = 1.0  # factor on the unconditional rows
    route: str = "layer"  # "layer", "attention" or "emb" (bypass.py)
    # a bypassed text-encoder contribution (on a quantized layer): its strength for the
    # encoding under way, set where others are merged (apply_te); None: its own at the step
    now: Optional[float] = None

    def at(self, phase: str, k: int) -> float:
        return float(self.series[phase][k]) if phase in self.series else 0.0

    @property
    def uniform(self) -> bool:
        """The same everywhere in the image and on every row: may merge."""
        return self.region is None and self.owner is None and self.neg == 1.0


@dataclass
class _Slot:
    """A target the plan changes: its contributions and what is merged into it now."""

    target: Target
    contributions: List[Contribution] = field(default_factory=list)
    # ((adapter, strength), ...) as merged now, () when pristine. The adapters themselves, not
    # their ids: a reloaded file must never look like the one merged before.
    applied: Tuple = ()
    merged_now: Dict[int, float] = field(default_factory=dict)  # network -> strength merged
    hook: Optional[object] = None  # the forward hook of its bypass contributions
    emb_norm: Optional[nn.Module] = None  # route "emb": the norm its delta is added before
    views: Dict[Tuple[bool, bool], nn.Module] = field(default_factory=dict)

    @property
    def merged(self) -> List[Contribution]:
        return [c for c in self.contributions if not c.bypass]


class Engine:
    def __init__(self, trees: Mapping[str, nn.Module], arch: str,
                 find: Callable[[str, str], str], *, pristine_on_cpu: bool = False,
                 cache_bytes: int = 2 ** 30, latent: Tuple[int, int] = (64, 64), batch: int = 2,
                 strategy: str = "auto", masks: Optional[Mapping[str, object]] = None,
                 weight_scale: Optional[Callable[[nn.Module], Optional[Tensor]]] = None,
                 costs: Optional[Calibration] = None, merge_batch_bytes: int = 64 * 2 ** 20,
                 delta_bytes: int = 2 ** 30):
        """`trees`: {"unet", "te1"[, "te2"]} module roots; `find(kind, name)` → file path
        (raises FileNotFoundError when there is none); `pristine_on_cpu`: keep the pristine
        copies in CPU memory instead of beside the weights; `latent` (h, w) and `batch`: the
        generation's size, for regions and the cost of a bypass (set them before `activate`;
        set `latent` to the hires latent before the hires pass);
        `strategy`: "auto" (the cost model), or "merge" / "bypass" for every global
        contribution that can; `costs`: the cost model's prices (default: measured on this
        machine at first use, calibrate.py); `merge_batch_bytes`: the fp32 scratch one batch
        of layers re-merged together may take (batched_merge.py); `delta_bytes`: the memory
        ΔW kept for layers re-merged at keyframes may take (deltas.py); `masks`: the host's mask
        store, name → image (regions.as_mask);
        `weight_scale(module)`: the factor a host multiplies a stored weight by in its forward
        (scaled low-precision storage), or None: merges then store (W + ΔW) / factor."""
        try:
            self.strategy = Strategy(strategy)
        except ValueError:
            raise ValueError(f"strategy must be one of {[m.value for m in Strategy]}, "
                             f"not {strategy!r}") from None
        self.costs = costs
        self.merge_batch_bytes = merge_batch_bytes
        self.deltas = Deltas(delta_bytes)
        self._jobs: Dict[int, Optional[Job]] = {}  # a contribution's merge job, per generation
        self.trees = trees
        self.keymap = KeyMap(trees)
        self.arch = arch
        self.find = find
        self.masks: Mapping[str, object] = masks if masks is not None else {}
        self.weight_scale = weight_scale
        self.pristine_on_cpu = pristine_on_cpu
        self.cache = NetworkCache(cache_bytes)
        self.latent, self.batch = latent, batch
        self.plan: Optional[Plan] = None
        self.plans: List[Plan] = []
        self.entries: List[Entry] = []
        self.errors: List[str] = []
        self.warnings: List[str] = []  # what the user should know, that skipped nothing
        self.applied: Tuple[Tuple[str, str], ...] = ()  # (kind, name) of the networks loaded
        self.merges = 0  # layers merged so far (benchmarks and tests read it)
        self.runtime = Runtime(self)
        self.blender = Blender(self)  # regional networks' blended start (blend.py)
        self._slots: Dict[Target, _Slot] = {}
        self.quantized_merge = False
        # quantized weights replaced by a merge: id(module) -> (module, the original param)
        self._quantized: Dict[int, Tuple[nn.Module, nn.Parameter]] = {}
        self._rounding: Dict[int, float] = {}  # network -> largest requantization error
        self._units: Dict[str, AttentionUnit] = {}
        self._norm_hooks: List[object] = []
        self._pristine: Dict[Tuple[int, str], Tuple[nn.Module, Tensor]] = {}
        self._phase_step: Optional[Tuple[str, int]] = None
        self._changes: Dict[str, Dict[int, List[_Slot]]] = {}
        self._segments: Dict[Tuple[str, int], List[Segment]] = {}

    # ---- public ----------------------------------------------------------------------
    def configure(self, *, cache_bytes: Optional[int] = None,
                  pristine_on_cpu: Optional[bool] = None,
                  quantized_merge: Optional[bool] = None,
                  delta_bytes: Optional[int] = None) -> None:
        """The user's settings, which may change between generations: the network cache's
        size, where new pristine copies go, whether static networks merge into quantized
        layers (requantize.py: faster steps, the format's rounding) instead of running
        beside them (exact), and the memory kept ΔW may take (deltas.py)."""
        if cache_bytes is not None:
            self.cache.max_bytes = int(cache_bytes)
        if delta_bytes is not None:
            self.deltas = Deltas(delta_bytes)
        if pristine_on_cpu is not None:
            self.pristine_on_cpu = bool(pristine_on_cpu)
        if quantized_merge is not None:
            self.quantized_merge = bool(quantized_merge)

    def set_latent(self, latent: Tuple[int, int]) -> None:
        """The latent (h, w) of the coming UNet calls: the hires pass's, after an upscale."""
        self.latent = tuple(int(v) for v in latent)

    def activate(self, plan, *, latent: Optional[Tuple[int, int]] = None,
                 batch: Optional[int] = None,
                 masks: Optional[Mapping[str, object]] = None,
                 at: Tuple[str, int] = ("base", 0)) -> List[str]:
        """Load the networks of a plan — or of one plan per prompt of the batch — and merge
        them at (base, step 0), or at the (phase, step) `at` (a plan that takes over while
        sampling). `latent` (h, w), `batch` (UNet rows) and `masks` (name →
        image) describe this generation; each left out keeps the last one given. Returns the
        problems (a missing or bad file, or a missing mask, skips its network; the generation
        goes on); `errors` holds them, and those found while sampling."""
        if latent is not None:
            self.set_latent(latent)
        if batch is not None:
            self.batch = int(batch)
        if masks is not None:
            self.masks = masks
        plans = [plan] if isinstance(plan, Plan) else list(plan)
        for p in plans:
            if BLOCKS[p.arch] != BLOCKS[self.arch]:  # the host compiled for another model
                raise ValueError(f"the plan was compiled for {p.arch}, the model is {self.arch}")
            if (p.steps, p.hires_steps) != (plans[0].steps, plans[0].hires_steps):
                raise ValueError("the plans of one batch must have the same steps")
        errors: List[str] = []
        warnings: List[str] = []
        entries = _entries(plans)
        maps = RegionMaps(self.latent)
        loaded = {}
        for i, e in enumerate(entries):
            label = f"{e.net.kind}:{e.net.name}"
            try:
                if e.region is not None:
                    rest = rest_of([n.region for n in plans[e.prompt].networks
                                    if n.region is not None], maps.size, self.masks) \
                        if uses_rest(e.net.region) else None
                    maps.add(e.region, e.net.region, self.masks, rest)
                loaded[i] = self._load(e.net)
            except (NetworkFileError, FileNotFoundError, KeyError, RegionError) as exc:
                errors.append(f"{label}: {exc}")
                continue
            refused = self.keymap.refused(loaded[i].unmatched)
            if refused:
                (t, why), more = next(iter(refused.items())), len(refused) - 1
                errors.append(f"{label}: left out on {len(refused)} layer(s) whose weights cannot "
                              f"be merged: {t.component} {t.name}: {why}"
                              + (f" (and {more} more)" if more else ""))
            loose = _loose_layers(loaded[i], self.keymap)
            if loose and loaded[i].kind == "lora":
                warnings.append(f"{label}: {len(loose)} of its layers name no layer of this "
                                f"model (first: {loose[0]}); it acts on the other "
                                f"{len(loaded[i].layers)}")
        self._rounding = {}
        slots, unmasked = self._build_slots(entries, loaded)
        warnings += [_unmasked_note(entries[i], targets, self.arch)
                     for i, targets in unmasked.items()]
        self._choose_strategies(slots)
        units = self._choose_routes(slots)
        self.runtime.reset()
        self._jobs.clear()
        self.runtime.maps = maps
        self.entries = entries
        self._guarded(self._switch, slots, units)
        self.plan, self.plans, self.errors, self._segments = plans[0], plans, errors, {}
        self.warnings = warnings
        self.applied = tuple(dict.fromkeys((entries[i].net.kind, entries[i].net.name)
                                           for i in sorted(loaded)))
        self._changes = {phase: _change_steps(self._unet_slots(), phase) for phase in PHASES}
        self.blender.attach(self.trees.get("unet"), {
            phase: stream_steps(self, phase, n) for phase, n in
            (("base", self.plan.steps), ("hires", self.plan.hires_steps)) if n})
        phase, k = at
        self._check_step(k, phase)
        try:
            self._guarded(self._merge_where_changed, phase, k, list(self._slots.values()))
        except MergeOverflow as exc:  # everything is restored: again without that network
            e = entries[exc.contribution.network]
            errors = errors + [f"{e.net.kind}:{e.net.name}: left out: {exc}"] + \
                self.activate(_without(plans, e), at=at)
            self.errors = list(errors)
            return errors
        self._phase_step = (phase, k)
        self.warnings += [f"{entries[i].net.kind}:{entries[i].net.name}: merged into quantized "
                          f"layers and quantized again; the format's rounding is up to "
                          f"{100 * e:.2g} % of its change" for i, e in sorted(self._rounding.items())]
        return errors

    def rewritten(self, components: Sequence[str] = ("unet",), plans=None,
                  at: Optional[Tuple[str, int]] = None) -> List[str]:
        """The host loaded other weights into the layers of these trees (a checkpoint's state
        dict copied into the same modules, e.g. a model's second expert): they are the
        pristine weights from now on. Their pristine copies are dropped (taken again, from
        the new weights, at their next merge) and the networks merged again at (phase, step)
        `at`, default where the engine stands: the plan's, or `plans` instead (activated
        there, so each layer is merged once). Returns activate's problems (none without
        `plans`)."""
        if self.plan is None:
            return [] if plans is None else self.activate(plans, at=at or ("base", 0))
        at = at or self._phase_step or ("base", 0)
        touched = [s for s in self._slots.values() if s.target.component in set(components)]
        modules = {id(s.target.module) for s in touched}
        for key in [key for key, (m, _) in self._pristine.items() if id(m) in modules]:
            del self._pristine[key]
        self._jobs.clear()
        for key, (module, _) in list(self._quantized.items()):
            if key in modules:  # the parameter the host loaded into is the original now
                self._quantized[key] = (module, module._parameters["weight"])
        held = {}
        for slot in touched:  # each holds its new pristine weight, nothing merged
            held[slot.target] = dict(slot.merged_now)
            slot.applied, slot.views = (), {}
        if plans is not None:
            return self.activate(plans, at=at)
        self._guarded(self._merge_where_changed, *at,
                      [s for s in touched if s.target.component == "unet"])
        for slot in touched:
            if slot.target.component != "unet":  # what was merged for the encoding under way
                now = held[slot.target]
                self._guarded(self._merge_where_changed, *at, [slot], lambda c: (
                    c.now if c.bypass and c.now is not None else now.get(c.network, 0.0)))
        if at != self._phase_step:  # the other layers to that step as well
            self.set_step(at[1], at[0])
        return []

    def set_rows(self, prompts: Sequence[int], uncond: Sequence[bool]) -> None:
        """What each row of the next UNet calls is: its prompt (index into the plans given to
        activate) and whether it is an unconditional (negative) row. Unset, every row is a
        conditional row of prompt 0."""
        if len(prompts) != len(uncond):
            raise ValueError("prompts and uncond must have one entry per row")
        self.runtime.set_rows(Rows(tuple(int(p) for p in prompts), tuple(map(bool, uncond))))

    def set_text_variants(self, base, variants: Mapping[int, object],
                          pooled: Optional[Tensor] = None,
                          pooled_variants: Optional[Mapping[int, Tensor]] = None) -> None:
        """The conditionings of regional text-encoder networks for the coming steps: `base`
        (rows, tokens, width) as encoded without them — or a list of one (tokens, width) per
        row, each caption at its own length, where the model takes them so (Z-Image) —
        `variants[network]` the same rows encoded with that network (apply_te(segment, variant=network)); likewise a pooled vector
        (rows, width) where the model takes one (Flux's CLIP-L). Cross-attention uses a
        network's rows inside its region; a model without cross-attention runs them as the
        network's own stream (blend.py)."""
        self.runtime.set_text(base, dict(variants), None if pooled is None else
                              (pooled, dict(pooled_variants or {})))

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
        self.runtime.new_step()

    def te_segments(self, phase: str = "base", prompt: int = 0) -> List[Segment]:
        """Runs of steps with the same text-encoder strengths for one prompt: one encoding
        each (one more per regional network in `variants`)."""
        if self.plan is None:
            return []
        if (phase, prompt) not in self._segments:  # segment_at asks at every step
            self._segments[phase, prompt] = self._find_segments(phase, prompt)
        return self._segments[phase, prompt]

    def _find_segments(self, phase: str, prompt: int) -> List[Segment]:
        steps = self._steps(phase)
        # every text-encoder layer of a network carries the same strength (component × BASE)
        series = {}
        for slot in self._slots.values():
            if slot.target.component != "unet":
                for c in slot.contributions:
                    if phase in c.series and c.owner in (None, prompt):
                        series[c.network, slot.target.component] = c.series[phase]
        keys = [tuple(sorted((i, comp, float(v[k])) for (i, comp), v in series.items() if v[k]))
                for k in range(steps)]
        segments, start = [], 0
        for k in range(1, steps + 1):
            if k == steps or keys[k] != keys[start]:
                variants = tuple(sorted({i for i, _, _ in keys[start]
                                         if self.entries[i].region is not None}))
                segments.append(Segment(phase, start, k, keys[start], prompt, variants))
                start = k
        return segments

    def apply_te(self, segment: Segment, variant: Optional[int] = None,
                 uncond: bool = False) -> None:
        """Text-encoder weights for a segment (the host encodes its prompt after this): the
        prompt's global networks, plus regional network `variant` for its own conditioning;
        `uncond`: for the negative prompt (strengths times each network's `neg`)."""
        def pick(c: Contribution) -> float:
            if c.owner not in (None, segment.prompt) or \
                    (c.region is not None and c.network != variant):
                return 0.0
            return c.at(segment.phase, segment.start) * (c.neg if uncond else 1.0)
        te = [s for s in self._slots.values() if s.target.component != "unet"]
        self._guarded(self._merge_where_changed, segment.phase, segment.start, te, pick)

    def segment_at(self, k: int, phase: str = "base", prompt: int = 0) -> Segment:
        """The text-encoder segment step k belongs to: which conditioning to use."""
        return next(s for s in self.te_segments(phase, prompt) if s.start <= k < s.stop)

    def deactivate(self) -> None:
        """Every weight back to its pristine bits; all patches dropped."""
        self._restore_all()
        self.plan, self.plans, self._phase_step, self.applied = None, [], None, ()
        self.runtime.reset()
        self.runtime.set_rows(None)
        self.deltas.clear()

    def strengths(self, target: Target) -> Dict[int, float]:
        """What acts on a layer now: {network index: strength} (merged, or bypassed)."""
        slot = self._slots.get(target)
        if slot is None:
            return {}
        now = dict(slot.merged_now)
        if self._phase_step is not None and target.component == "unet":
            now.update({c.network: c.at(*self._phase_step) for c in slot.contributions
                        if c.bypass and c.at(*self._phase_step)})
        return now

    @property
    def position(self) -> Optional[Tuple[str, int]]:
        """(phase, step) the UNet weights are at now; None when nothing is active."""
        return self._phase_step

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

    def _build_slots(self, entries: List[Entry], loaded: Dict[int, LoadedNetwork]
                     ) -> Tuple[Dict[Target, _Slot], Dict[int, List[Target]]]:
        """The contributions on each layer, and per regional network the layers it cannot
        act on (`_maskable`)."""
        slots: Dict[Target, _Slot] = {}
        unmasked: Dict[int, List[Target]] = {}
        for i, network in loaded.items():
            e = entries[i]
            net = e.net
            for target, adapter in network.layers.items():
                if e.region is not None and not _maskable(target, self.keymap.family):
                    unmasked.setdefault(i, []).append(target)
                    continue
                series = {phase: _series(p, target) for phase, p in
                          (("base", net.base), ("hires", net.hires)) if p is not None}
                slot = slots.setdefault(target, _Slot(target))
                slot.contributions.append(Contribution(i, adapter, net.tag.dyn, series,
                                                       region=e.region, owner=e.owner,
                                                       neg=net.neg))
        return slots, unmasked

    def _switch(self, slots: Dict[Target, _Slot], units: Dict[str, AttentionUnit]) -> None:
        """Adopt new slots and attention units: layers nothing touches any more go back to
        pristine; layers that keep their contributions and strengths keep their merged weights."""
        self._remove_hooks()
        self._units = units
        for target, old in self._slots.items():
            if target not in slots:
                self._write(target, None)
                self._forget(target)
            else:
                slots[target].applied = old.applied
        self._slots = slots
        norms = {}
        for slot in slots.values():
            if any(c.bypass for c in slot.contributions):
                slot.hook = slot.target.module.register_forward_hook(self.runtime.layer_hook(slot))
            if slot.emb_norm is not None:
                norms[id(slot.emb_norm)] = slot.emb_norm
        self._norm_hooks = [n.register_forward_pre_hook(self.runtime.emb_prehook(n))
                            for n in norms.values()]
        for unit in self._units.values():
            self.runtime.attach(unit)

    def _remove_hooks(self) -> None:
        self.blender.detach()
        for slot in self._slots.values():
            if slot.hook is not None:
                slot.hook.remove()
                slot.hook = None
        for unit in self._units.values():
            unit.remove_hooks()
        for h in self._norm_hooks:
            h.remove()
        self._norm_hooks = []

    def unit_contributions(self, unit: AttentionUnit, network: int) -> List[Contribution]:
        return [c for s in unit.slots for c in s.contributions
                if c.network == network and c.route == "attention"]

    def view(self, slot: _Slot, cropped: bool = False, pristine: bool = False) -> nn.Module:
        """The slot's layer computing with its pristine weights and/or without padding."""
        key = (cropped, pristine)
        if slot.target.quant is not None:  # not kept: a dequantized weight is full size
            return dequantized_view(slot.target.module, cropped)
        if key not in slot.views:
            t = slot.target
            params = None
            if pristine:
                names = [t.param] + ([t.bias_param] if t.bias_param else [])
                params = {n: self._pristine_slice(t, n).to(t.weight.device) for n in names}
            slot.views[key] = layer_view(t.module, params, cropped)
        return slot.views[key]

    # ---- merge or bypass --------------------------------------------------------------
    def _choose_strategies(self, slots: Dict[Target, _Slot]) -> None:
        """docs/design.md §4's cost model, per layer and contribution: a scheduled contribution runs
        as a bypass where its low-rank forward over the pass costs less than re-merging the
        layer at each of its keyframes (deep, low-resolution layers), both priced with the
        costs measured on this machine (calibrate.py), by a clear margin (BYPASS_BELOW);
        everything else merges. Regional and per-row contributions on the UNet always
        bypass: no merge is exact."""
        levels = 3 if self.arch == "sdxl" else 4
        priced = []  # (contribution, weight, its multiply-adds merged and beside)
        for slot in slots.values():
            t = slot.target
            if t.quant is not None:  # beside it, or merged and quantized again (requantize.py)
                can_merge = requantizer(t.module) is not None
                for c in slot.contributions:
                    c.bypass = not (can_merge and c.uniform and _static(c) and
                                    (self.quantized_merge or c.adapter.algorithm in FULL_RANK))
                continue
            if t.component != "unet":
                continue  # text encoders: merged per encoding
            for c in slot.contributions:
                if not c.uniform:
                    c.bypass = True
            layer = linear_like(t.module) or isinstance(t.module, nn.Conv2d)
            if t.chunk is not None or not layer:
                continue
            weight = t.weight
            tokens = self._tokens(t, levels)
            for c in slot.contributions:
                costs = c.adapter.costs(tuple(weight.shape), tokens)
                if not c.uniform or costs is None:
                    continue
                priced.append((c, weight, costs))
        # a kept ΔW (deltas.py) makes each merge after a layer's first one pass over its
        # weight; it is kept where that pass is measured cheaper than a merge from the factors
        wanted = []
        for c, weight, costs in priced:
            measured = self.costs or calibration(weight.device, weight.dtype)
            if measured.delta_ns_per_value is not None and \
                    measured.delta_seconds(weight.numel()) < measured.merge_seconds(costs[0]):
                nbytes = weight.numel() * torch.finfo(delta_dtype(weight.dtype)).bits // 8
                wanted.append((id(c), nbytes, _merges(c)))
        kept = self.deltas.grant(wanted)
        if self.strategy is Strategy.MERGE:
            return
        for c, weight, costs in priced:
            measured = self.costs or calibration(weight.device, weight.dtype)
            merges = _merges(c)
            merge = measured.merge_seconds(costs[0]) * merges
            if id(c) in kept:
                merge = measured.merge_seconds(costs[0]) + \
                    measured.delta_seconds(weight.numel()) * (merges - 1)
            bypass = measured.bypass_seconds(costs[1]) * np.count_nonzero(c.series["base"])
            c.bypass = self.strategy is Strategy.BYPASS or \
                (merges > 1 and bypass < merge * BYPASS_BELOW)
        beside = {id(c) for c, _, _ in priced if c.bypass}
        self.deltas.grant(w for w in wanted if w[0] not in beside)

    def _choose_routes(self, slots: Dict[Target, _Slot]) -> Dict[str, AttentionUnit]:
        """Where each regional contribution acts (bypass.py): at its layer; in a re-run of
        its cross-attention (keys and values see the text; a regional text-encoder network
        needs every cross-attention); or on its resblock's feature map (time embedding)."""
        units: Dict[str, AttentionUnit] = {}
        unet = self.trees.get("unet")
        if self.keymap.tokens is not None:  # a transformer: its attn2 (SD3.5) sees no text
            return units

        def unit(path: str) -> AttentionUnit:
            if path not in units:
                units[path] = AttentionUnit(unet.get_submodule(path), path)
            return units[path]

        regional_te = {c.network for s in slots.values() if s.target.component != "unet"
                       for c in s.contributions if c.region is not None}
        if regional_te and unet is not None:
            for t in self.keymap.targets:
                if t.component == "unet" and CROSS_KV.search(t.name):
                    unit(ATTENTION_CHILD.match(t.path).group(1)).networks.update(regional_te)
        for slot in slots.values():
            t = slot.target
            for c in slot.contributions:
                if c.region is None or t.component != "unet":
                    continue
                if CROSS_KV.search(t.name):
                    unit(ATTENTION_CHILD.match(t.path).group(1)).networks.add(c.network)
                elif t.name.endswith("time_emb_proj"):
                    slot.emb_norm = _emb_norm(unet, t.path)
                    if slot.emb_norm is not None:
                        c.route = "emb"
        for slot in slots.values():  # a network re-run in an attention acts there as a whole
            m = ATTENTION_CHILD.match(slot.target.path) if slot.target.component == "unet" else None
            if m and m.group(1) in units:
                u = units[m.group(1)]
                u.slots.append(slot)
                for c in slot.contributions:
                    if c.network in u.networks:
                        c.route, c.bypass = "attention", True
        return units

    def _tokens(self, target: Target, levels: int) -> int:
        """Rows a UNet layer sees per forward: latent pixels at its level (or the 77 text
        tokens for cross-attention keys and values), times the batch. A transformer layer
        sees the packed 2×2 patches and, in joint sequences, the text tokens too (an upper
        bound: the modulation layers see one row per image; tokens.TokenLayout)."""
        h, w = self.latent
        layout = self.keymap.tokens
        if layout is not None:
            gh, gw = layout.grid((h, w))
            return (gh * gw + layout.text) * self.batch
        if CROSS_KV.search(target.name):
            return 77 * self.batch
        level = _level(target.block, levels)
        return max(1, (h >> level) * (w >> level)) * self.batch

    # ---- merging ---------------------------------------------------------------------
    def _merge_where_changed(self, phase: str, k: int, slots: List[_Slot], pick=None) -> None:
        """Re-merge the slots whose merged strengths differ from what they hold; `pick(c)`:
        a contribution's strength (default: its own at the step, when it merges). Layers
        with one plain LoRA merge as jobs, same-shaped ones in batches where the measured
        costs say so (batched_merge.py); the others one by one."""
        jobs: List[Job] = []
        for slot in slots:
            if slot.target.quant is not None and pick is not None:
                for c in slot.contributions:  # an encoding: the bypass takes these strengths
                    c.now = pick(c) if c.bypass else None
            live = []
            for c in slot.contributions:
                s = 0.0 if c.bypass else (pick(c) if pick is not None else c.at(phase, k))
                if s:
                    live.append((c, s))
            wanted = tuple((c.adapter, s) for c, s in live)
            if wanted != slot.applied and slot.target.quant is not None:
                self._merge_quantized(slot, live)
            elif wanted != slot.applied:
                job = self._job(slot, live)
                if job is None:
                    self._merge(slot, live)
                else:
                    jobs.append(job)
                slot.applied = wanted
            slot.merged_now = {c.network: s for c, s in live}
        try:
            for group in batched_merge.groups(jobs).values():
                if group[0].delta is not None:
                    batched_merge.merge_deltas(group)
                elif len(group) > 1 and self._batch_pays(group[0]):
                    batched_merge.merge(group, self.merge_batch_bytes)
                else:
                    for job in group:
                        batched_merge.merge_one(job)
                self.merges += len(group)
        except batched_merge.Overflow as exc:
            slot, c = exc.job.source
            raise MergeOverflow(slot.target, c, exc.job.dest.dtype) from None

    def _job(self, slot: _Slot, live: List[Tuple[Contribution, float]]) -> Optional[Job]:
        """The slot's merge as a job, when it is one plain LoRA on a whole, unscaled weight
        whose bias nothing changed; None otherwise (_merge does it)."""
        target = slot.target
        if len(live) != 1 or target.chunk is not None or self.weight_scale is not None:
            return None
        (c, s), = live
        if c.adapter.changes_bias:
            return None
        if id(c) not in self._jobs:  # what stays the same at each of its merges: found once
            self._jobs[id(c)] = self._job_of(slot, c)
        job = self._jobs[id(c)]
        if job is None:
            return None
        bias = target.bias_param
        if bias and (id(target.module), bias) in self._pristine:
            return None  # the bias was merged too: _merge writes it back
        return Job(job.dest, job.w0, job.factors, s, job.source, job.delta)

    def _job_of(self, slot: _Slot, c: Contribution) -> Optional[Job]:
        target = slot.target
        dest = self._param(target, target.param).data
        factors = self.runtime.low_rank(c, dest.device)
        if factors is None or not dest.is_contiguous():
            return None
        return Job(dest, self._pristine_slice(target, target.param), factors, 0.0, (slot, c),
                   self._kept_delta(c, factors, dest))

    def _kept_delta(self, c: Contribution, factors: Factors, like: Tensor) -> Optional[Tensor]:
        """The contribution's ΔW = up · down shaped like the weight `like`, where it is kept
        (deltas.py): made at its first merge."""
        if not self.deltas.granted(id(c)):
            return None
        return self.deltas.get(id(c), lambda: (factors.up @ factors.down).to(
            delta_dtype(like.dtype)).view(like.shape))

    def _batch_pays(self, job: Job) -> bool:
        """Whether a batch merges a layer like this one for less than a merge of its own."""
        measured = self.costs or calibration(job.dest.device, job.dest.dtype)
        macs = job.dest.numel() * (job.factors.down.shape[0] + 1)
        return measured.batch_seconds(macs) < measured.merge_seconds(macs)

    def _merge(self, slot: _Slot, live: List[Tuple[Contribution, float]]) -> None:
        target = slot.target
        if not live:
            self._write(target, None)
            return
        w0 = self._pristine_slice(target, target.param)
        device = target.weight.device
        w0f = w0.to(device=device, dtype=torch.float32)
        scale = self.weight_scale(target.module) if self.weight_scale is not None else None
        if scale is not None:  # the layer computes with stored · scale: merge on that
            scale = scale.detach().to(device=device, dtype=torch.float32)
            w0f = w0f * scale
        dest = _chunk(self._param(target, target.param).data, target.chunk)
        direct = dest.dtype == torch.float32 and dest.is_contiguous() and scale is None
        with _writing(dest):
            w = self._merged_weight(w0f, live, out=dest if direct else None, like=dest)
            if scale is not None:
                w = w / scale
        if not direct and not bool(batched_merge.fits(w.reshape(1, -1), dest.dtype)[0]):
            raise MergeOverflow(target, live[0][0], dest.dtype)
        self._write(target, None if direct else w, self._merged_bias(target, live, device),
                    weight_done=direct)
        self.merges += 1

    def _merged_bias(self, target: Target, live: List[Tuple[Contribution, float]], device
                     ) -> Optional[Tensor]:
        """b0 + Σ Δb_i in fp32 when some contribution changes the bias, else None."""
        if target.bias_param is None or not any(c.adapter.changes_bias for c, _ in live):
            return None
        b0f = self._pristine_slice(target, target.bias_param).to(device=device, dtype=torch.float32)
        deltas = [d for d in (c.adapter.bias_delta(b0f, s) for c, s in live) if d is not None]
        return b0f + sum(deltas) if deltas else None

    def _merge_quantized(self, slot: _Slot, live: List[Tuple[Contribution, float]]) -> None:
        """Merge into a quantized layer: the original weight dequantized, the networks added,
        quantized again in its format; the original parameter is kept for restore."""
        module = slot.target.module
        if not live:
            self._write(slot.target, None)
            return
        module, original = self._quantized.setdefault(id(module), (module, module._parameters["weight"]))
        w0 = dequantize_as(module, original)
        done = requantize(module, self._merged_weight(w0, live), w0)
        module._parameters["weight"] = done.param
        self._write(slot.target, done.param, self._merged_bias(slot.target, live, w0.device))
        for c, _ in live:
            self._rounding[c.network] = max(self._rounding.get(c.network, 0.0), done.error)
        self.merges += 1

    def _merged_weight(self, w0f: Tensor, live: List[Tuple[Contribution, float]],
                       out: Optional[Tensor] = None, like: Optional[Tensor] = None) -> Tensor:
        """W0 + Σ ΔW_i in fp32, into `out` when given (an fp32 weight: no temporary). Plain
        two-factor contributions (LoRA) go into one fused multiply-add, from their factors made
        once per generation: W0 + s·U·D for one, W0 + [s_1·U_1 … s_n·U_n]·[D_1; …; D_n] for
        several (one pass over W instead of one per network); those with a kept ΔW
        (deltas.py, for the weight `like`) add s·ΔW instead."""
        factors, kept, others = [], [], []
        for c, s in live:
            f = self.runtime.low_rank(c, w0f.device)
            delta = None if f is None or like is None else self._kept_delta(c, f, like)
            if delta is not None:
                kept.append((delta, s))
            elif f is None:
                others.append((c, s))
            else:
                factors.append((f, s))
        w = out if out is not None else torch.empty_like(w0f)
        flat, flat0 = w.view(w.shape[0], -1), w0f.reshape(w0f.shape[0], -1)
        if len(factors) == 1:
            (f, s), = factors
            torch.addmm(flat0, f.up, f.down, alpha=s, out=flat)
        elif factors:
            torch.addmm(flat0, torch.cat([f.up * s for f, s in factors], 1),
                        torch.cat([f.down for f, _ in factors], 0), out=flat)
        elif kept:  # the first kept ΔW in the same pass as the copy
            delta, s = kept.pop(0)
            torch.add(flat0, delta.view(flat.shape), alpha=s, out=flat)
        else:
            w.copy_(w0f)
        for delta, s in kept:
            flat.add_(delta.view(flat.shape), alpha=s)
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
        values = (weight, bias)
        if target.quant is not None:  # its weight is only put back (requantize.py makes new ones)
            held = self._quantized.pop(id(target.module), None) if weight is None else None
            if held is not None:
                held[0]._parameters["weight"] = held[1]
            names, values = names[1:], values[1:]
        for name, value in zip(names, values):
            if weight_done and name == target.param:
                continue
            key = (id(target.module), name)
            if key not in self._pristine:
                if value is None:
                    continue
                self._pristine_slice(target, name)
            dest = _chunk(self._param(target, name).data, target.chunk)
            with _writing(dest):
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
        self._remove_hooks()
        self._units = {}
        for module, original in self._quantized.values():
            module._parameters["weight"] = original
        self._quantized.clear()
        self._jobs.clear()
        for (_, name), (module, copy) in self._pristine.items():
            dest = module.get_parameter(name).data
            with _writing(dest):
                dest.copy_(copy)
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


class MergeOverflow(ArithmeticError):
    """A merge whose result does not fit the weight's dtype: never written. At activation the
    network is left out and reported; at a later keyframe the weights are restored and the
    error goes to the host (a strength the schedule reaches only then)."""

    def __init__(self, target: Target, contribution: Contribution, dtype: torch.dtype):
        super().__init__(f"merged into {target.component} {target.name} at its strength, it "
                         f"does not fit {str(dtype).replace('torch.', '')} (values beyond its "
                         f"range)")
        self.contribution = contribution


def _loose_layers(net: LoadedNetwork, keymap: KeyMap) -> List[str]:
    """The file's layers (by name) that reach no layer of the host and are not refused ones:
    a file for another model variant, or renamed keys."""
    names = dict.fromkeys((split_key(k) or (k, ""))[0] for k in net.unmatched)
    return [n for n in names if not keymap.refused([n + ".weight"])]


def _without(plans: List[Plan], entry: Entry) -> List[Plan]:
    """The plans with one network's tags taken out (every prompt's, when it was shared)."""
    text = format_tag(entry.net.tag)
    return [replace(p, networks=tuple(n for n in p.networks if format_tag(n.tag) != text))
            if entry.owner in (None, i) else p for i, p in enumerate(plans)]


def _entries(plans: List[Plan]) -> List[Entry]:
    """The networks of a batch's plans. A tag that every prompt has, in the same words, is one
    shared network (it may merge); the others belong to their prompt (per-row bypass). A region
    that uses `rest` depends on its prompt's other regions, so it is never shared. The same tag
    twice in one prompt is two networks (they add up, as two different strengths would)."""
    def keyed(plan):
        seen: Dict[str, int] = {}
        for net in plan.networks:
            text = format_tag(net.tag)
            seen[text] = seen.get(text, 0) + 1
            yield (text, seen[text]), net
    counts: Dict = {}
    for p in plans:
        for k, _ in keyed(p):
            counts[k] = counts.get(k, 0) + 1
    entries, shared = [], set()
    for index, p in enumerate(plans):
        for k, net in keyed(p):
            everywhere = len(plans) == 1 or (counts[k] == len(plans) and
                                             not (net.region is not None and uses_rest(net.region)))
            if everywhere and k in shared:
                continue
            if everywhere:
                shared.add(k)
            region = len(entries) if net.region is not None else None
            entries.append(Entry(net, None if everywhere else index, index, region))
    return entries


def _emb_norm(unet: nn.Module, path: str) -> Optional[nn.Module]:
    """The norm a resblock applies right after adding its time embedding (LDM out_layers.0,
    diffusers norm2), or None where the embedding is a scale and shift (not a sum)."""
    for suffix, norm in ((".emb_layers.1", "out_layers.0"), (".time_emb_proj", "norm2")):
        if path.endswith(suffix):
            block = unet.get_submodule(path[:-len(suffix)])
            if getattr(block, "use_scale_shift_norm", False) or \
                    getattr(block, "time_embedding_norm", "default") != "default":
                return None
            return block.get_submodule(norm)
    return None


FULL_RANK = ("model", "full")  # no low-rank form: beside a quantized layer, a full matmul


def _merges(c: Contribution) -> int:
    """Merges a contribution makes over the base pass: its first, then one per change."""
    return 1 + int(np.count_nonzero(np.diff(c.series["base"])))


def _static(c: Contribution) -> bool:
    """The same strength at every step of every pass: one merge for the whole generation."""
    values = np.concatenate([np.asarray(v, dtype=float) for v in c.series.values()])
    return bool(values.size) and bool(np.all(values == values[0]))


def _maskable(target: Target, family: Family) -> bool:
    """Whether a regional network can act on a layer: everywhere on SD; on the Flux family on
    the text encoders (the network's own encoding, run as its stream: blend.py) and on the
    layers that see image tokens. Its text stream and the layers that hold one vector per
    image stay as they are (flux_keys.Tokens): no token of theirs lies in a region."""
    if family is Family.SD or target.component != "unet":
        return True
    return target.tokens in (Tokens.IMAGE, Tokens.JOINT)


def _unmasked_note(entry: "Entry", targets: List[Target], arch: str) -> str:
    stream = sum(t.tokens is Tokens.TEXT for t in targets)
    norms = sum(t.tokens is None for t in targets)  # RMSNorms over heads (dit_keys.norms)
    vector = len(targets) - stream - norms
    parts = [f"{n} {what}" for n, what in ((stream, "text-stream layers"),
                                          (vector, "embedding and modulation layers"),
                                          (norms, "attention norms")) if n]
    return (f"{entry.net.kind}:{entry.net.name}: regional on {ARCH_TITLES.get(arch, arch)}, "
            f"it acts on the image tokens inside its region; left out on {', '.join(parts)}, "
            "which hold no image token of their own")


def _series(p: PassPlan, target: Target) -> np.ndarray:
    """Effective strength of a network on one layer at every step: component × block."""
    series = p.strength[target.component]
    if target.block is not None:
        series = series * p.blocks[target.block]
    return series


def _writing(dest: Tensor):
    """The mode to write into `dest` in: a host may create its parameters inside
    torch.inference_mode() (inference tensors), which take in-place writes only there."""
    return torch.inference_mode() if dest.is_inference() else torch.no_grad()


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
