"""The compiler: tags + context → Plan, the strength of every network on every component
and block at every step (docs/design.md §2, §3). Needs no model weights.

Effective strength of a network on a layer of block b in component c at step k:
    strength[c][k] * blocks[b][k]
where strength holds S_c(k)·W(k) (schedule times window) and blocks holds B_b(k).
"""
from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass, field, replace
from typing import FrozenSet, Mapping, Optional, Tuple

import numpy as np

from ..parser import (BUILTIN_REGIONS, TEXT_ENCODER_BLOCKS, TEXT_ENCODER_KEYS, Diagnostic, Mask,
                      Not, Position, Prompt, Region, Scaled, Schedule, Tag, Window, format_region,
                      format_tag, parse, snippet)
from ..parser.parse import strictly
from ..parser.transform import EXPERTS
from .blocks import (ARCH_TITLES, BLOCKS, GROUPS, TEXT_BLOCKS, TEXT_ENCODER_TITLES, TEXT_ENCODERS,
                     group_of, resolve_weights)
from .schedule import EPS, evaluate, index_of, is_phased, on_phase, window_mask
from .sigma import item_label, on_steps, sigma_index, sigma_items, sigma_problem

ONE = Schedule.const(1.0)
MAX_NETWORKS = 64  # per prompt: every one is a file to load and layers to patch
NO_WINDOW = Window()
BLOCK_INDEX = {arch: {b: i for i, b in enumerate(names)} for arch, names in BLOCKS.items()}
GROUP_ROWS = {arch: {g: np.array([i for i, b in enumerate(names) if group_of(b) == g], dtype=int)
                     for g in GROUPS} for arch, names in BLOCKS.items()}
ONES = {arch: np.ones(len(names)) for arch, names in BLOCKS.items()}
# The denoiser's blocks (no text encoder's) of each architecture, and the blocks a tag's block
# key acts on there: those and the blocks of the text encoders it has (Chroma's list names
# Flux's CLIP, which Chroma lacks).
DENOISER_BLOCKS = {arch: tuple(b for b in names if b not in TEXT_ENCODER_BLOCKS)
                   for arch, names in BLOCKS.items()}
KEYED_BLOCKS = {arch: frozenset(DENOISER_BLOCKS[arch]) | frozenset(TEXT_BLOCKS[arch].values())
                for arch in BLOCKS}


MAX_STEPS = 1000  # a plan holds a value per step, network and block: bounded memory


@dataclass(frozen=True)
class CompileContext:
    arch: str = "sd1"  # one of blocks.BLOCKS: sd1, sd2, sdxl, flux, chroma
    steps: int = 20
    hires_steps: Optional[int] = None
    seed: int = 0  # for lora-block-weight's R and U
    default_interp: Optional[str] = None  # a setting; None: step for lora/lyco/model, linear for loractl
    presets: Mapping[str, str] = field(default_factory=dict)  # user lbw presets, NAME -> "v,v,..."
    masks: Optional[FrozenSet[str]] = None  # mask names the host has; None: not checked
    networks: Optional[FrozenSet[str]] = None  # lora/lyco/loractl names the host has; None: not checked
    models: Optional[FrozenSet[str]] = None  # <model:> checkpoint names the host has; None: not checked
    strict: bool = False  # warnings become errors
    # the blended start of regional networks without blend= (a setting): a fraction of each
    # pass in [0, 1]; 0 one pass from the first step (network/blend.py)
    blend: float = 0.0
    # the sigma the model is called with at each step of the base / hires pass, for positions
    # by noise level (s0.5, network/sigma.py); None: the host cannot say, such items warn
    sigmas: Optional[Tuple[float, ...]] = None
    hires_sigmas: Optional[Tuple[float, ...]] = None
    # False for guidance-distilled models (Flux dev/schnell): no negative rows, so neg= warns
    negative_rows: bool = True
    # which expert of a two-expert model (Wan 2.2: "high" noise, then "low") the plan is for:
    # a tag's high=/low= multiply its unet strength there; None: a model of one denoiser
    expert: Optional[str] = None
    # the first step (0-based) of the base pass the low-noise expert runs, for Wan2GP's values
    # that step through each expert's own steps; None: the host does not say
    switch_step: Optional[int] = None

    def __post_init__(self):
        if self.arch not in BLOCKS:
            raise ValueError(f"unknown architecture '{self.arch}'; use one of {', '.join(BLOCKS)}")
        for name in ("steps", "hires_steps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 1 <= value <= MAX_STEPS):
                raise ValueError(f"{name} must be a whole number from 1 to {MAX_STEPS}, not {value!r}")
        if self.expert not in (None,) + EXPERTS:
            raise ValueError(f"expert must be one of {', '.join(EXPERTS)} or None, not {self.expert!r}")
        if self.switch_step is not None and not (
                isinstance(self.switch_step, int) and 0 <= self.switch_step <= self.steps):
            raise ValueError(f"switch_step must be a step index from 0 to {self.steps}, "
                             f"not {self.switch_step!r}")
        if not 0.0 <= float(self.blend) <= 1.0:
            raise ValueError(f"blend must be a fraction of the pass in [0, 1], not {self.blend!r}")
        for name, steps in (("sigmas", self.steps), ("hires_sigmas", self.hires_steps)):
            value = getattr(self, name)
            if value is None:
                continue
            problem = "there is no hires pass" if steps is None else sigma_problem(value, steps)
            if problem:
                raise ValueError(f"{name}: {problem}")
            object.__setattr__(self, name, tuple(float(v) for v in value))  # hashable, exact


@dataclass(frozen=True)
class PassPlan:
    steps: int
    strength: Mapping[str, np.ndarray]  # te, te1, te2, te3, unet: S_c(k)·W(k)
    blocks: Mapping[str, np.ndarray]  # every block of the architecture: B_b(k)
    blend: int = 0  # a regional network: its first `blend` steps run blended (network/blend.py)
    # where the tag's positions by noise level landed: (item, sigma, step number counted
    # from 1, fractional between steps), for explain
    landed: Tuple[Tuple[str, float, float], ...] = ()

    def effective(self, component: str, block: str) -> np.ndarray:
        return self.strength[component] * self.blocks[block]

    def to_dict(self) -> dict:
        return {"steps": self.steps, "blend": self.blend,
                "sigma_positions": [{"item": item, "sigma": sigma, "step": step}
                                    for item, sigma, step in self.landed],
                "strength": {c: v.tolist() for c, v in self.strength.items()},
                "blocks": {b: v.tolist() for b, v in self.blocks.items()}}


@dataclass(frozen=True)
class NetworkPlan:
    tag: Tag
    interp: str
    base: PassPlan
    hires: Optional[PassPlan]
    lbw: Tuple[float, ...] = ()  # the resolved vector, R/U/X filled in

    @property
    def kind(self) -> str:
        return self.tag.kind

    @property
    def name(self) -> str:
        return self.tag.name

    @property
    def region(self) -> Optional[Region]:
        return self.tag.region

    @property
    def neg(self) -> float:
        return 1.0 if self.tag.neg is None else self.tag.neg

    def to_dict(self) -> dict:
        base = self.base.to_dict()
        return {"kind": self.kind, "name": self.name, "tag": format_tag(self.tag),
                "region": None if self.region is None else format_region(self.region),
                "interp": self.interp, "neg": self.neg, "dyn": self.tag.dyn,
                "lbw": list(self.lbw) or None,
                "strength": base["strength"], "blocks": base["blocks"],
                "sigma_positions": base["sigma_positions"],
                "hires": None if self.hires is None else self.hires.to_dict()}


@dataclass(frozen=True)
class Plan:
    prompt: str  # the prompt without tags
    arch: str
    steps: int
    hires_steps: Optional[int]
    networks: Tuple[NetworkPlan, ...]
    errors: Tuple[Diagnostic, ...]
    sigmas: Optional[Tuple[float, ...]] = None  # the host's, per step (CompileContext)
    hires_sigmas: Optional[Tuple[float, ...]] = None

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "arch": self.arch, "steps": self.steps,
                "hires_steps": self.hires_steps,
                "sigmas": None if self.sigmas is None else list(self.sigmas),
                "hires_sigmas": None if self.hires_sigmas is None else list(self.hires_sigmas),
                "errors": [e.to_dict() for e in self.errors],
                "networks": [n.to_dict() for n in self.networks]}


def compile_prompt(source: str, ctx: CompileContext) -> Plan:
    """Parse and compile a prompt."""
    return compile_parsed(parse(source, strict=ctx.strict), source, ctx)


def compile_parsed(parsed: Prompt, source: str, ctx: CompileContext) -> Plan:
    rng = random.Random(ctx.seed)
    errors = list(parsed.errors)
    networks = []
    tags = parsed.tags
    if len(tags) > MAX_NETWORKS:
        extra = tags[MAX_NETWORKS]
        errors.append(Diagnostic(
            f"{len(tags)} network tags; NetWeave applies at most {MAX_NETWORKS} per prompt, the "
            f"{len(tags) - MAX_NETWORKS} from here on are ignored", extra.span[0] + 1,
            snippet(source, extra.span[0], 0)))
        tags = tags[:MAX_NETWORKS]
    for tag in tags:
        problems = []

        def problem(key: str, message: str, severity: str = "error"):
            if ctx.strict and severity != "error":
                severity, message = "error", strictly(message)
            col = tag.column_of(key)
            problems.append(Diagnostic(message, col, snippet(source, tag.span[0], col - 1),
                                       severity))

        _check(tag, ctx, problem)
        _check_sigmas(tag, ctx, problem)
        if tag.neg is not None and not ctx.negative_rows:
            problem("neg", f"{ARCH_TITLES[ctx.arch]} has no negative prompt rows "
                           "(guidance-distilled); neg= is ignored", "warning")
            tag = replace(tag, neg=None)  # the engine reads neg from the plan's tag: 1
        lbw_row, lbw_values = None, ()
        if tag.lbw is not None:
            lbw_row, lbw_values, message = resolve_weights(tag.lbw, ctx.arch, tag.x, rng,
                                                           ctx.presets)
            if message:
                problem("lbw", message)
        errors.extend(problems)
        if any(p.severity == "error" for p in problems):
            continue
        interp = tag.interp or ctx.default_interp or ("linear" if tag.kind == "loractl" else "step")
        base = _pass(tag, ctx, ctx.steps, interp, lbw_row, hires=False)
        hires = None if ctx.hires_steps is None else _pass(tag, ctx, ctx.hires_steps, interp,
                                                           lbw_row, hires=True)
        networks.append(NetworkPlan(tag, interp, base, hires, lbw_values))
    return Plan(parsed.text, ctx.arch, ctx.steps, ctx.hires_steps, tuple(networks), tuple(errors),
                ctx.sigmas, ctx.hires_sigmas)


def with_hires_prompt(main: Plan, hires: Plan) -> Plan:
    """The plan of a generation whose hires pass has a prompt of its own (the WebUIs' hires
    prompt), as the hosts apply it: the hires pass takes its networks from that prompt, each
    with its own hires strengths (`hr*` keys, else its curves). A network of the main prompt
    the hires prompt does not name acts in the hires pass only where its tag says how, with
    `hr*` keys; the rest stop after the base pass. Hires prompt tags equal to the main
    prompt's (the host copies the prompt when the field is empty) change nothing."""
    if main.hires_steps is None or hires.hires_steps != main.hires_steps:
        raise ValueError("both plans need the same hires steps")
    if [format_tag(n.tag) for n in hires.networks] == [format_tag(n.tag) for n in main.networks]:
        return replace(main, errors=main.errors + _hires_errors(main, hires))
    named = {(n.kind, n.name) for n in hires.networks}
    kept = tuple(n if (n.kind, n.name) not in named and _says_hires(n.tag)
                 else replace(n, hires=_off(n.hires)) for n in main.networks)
    added = tuple(replace(n, base=_off(n.base)) for n in hires.networks)
    return replace(main, networks=kept + added,
                   errors=main.errors + _hires_errors(main, hires))


def _says_hires(tag: Tag) -> bool:
    return any(v is not None for v in (tag.hr, tag.hrte, tag.hrunet))


def _off(p: PassPlan) -> PassPlan:
    return replace(p, strength={c: np.zeros_like(v) for c, v in p.strength.items()})


def _hires_errors(main: Plan, hires: Plan) -> Tuple[Diagnostic, ...]:
    """The hires prompt's problems, said to be its own (their columns count in that prompt)."""
    seen = {(e.message, e.column) for e in main.errors}
    return tuple(replace(e, message=f"hires prompt: {e.message}") for e in hires.errors
                 if (e.message, e.column) not in seen)


def _check(tag: Tag, ctx: CompileContext, problem) -> None:
    arch = ARCH_TITLES[ctx.arch]
    known = ctx.models if tag.kind == "model" else ctx.networks
    if known is not None and tag.name not in known:
        problem("name", f"no {tag.kind} network named '{tag.name}' was found"
                + _did_you_mean(tag.name, known))
    for name, _ in tag.blocks:
        if name in KEYED_BLOCKS[ctx.arch]:
            continue
        if name in TEXT_ENCODER_BLOCKS:
            problem(name, f"{arch} has no text-encoder block {name} "
                          f"({_text_block_names(ctx.arch)}); {name}= is ignored", "warning")
        else:
            problem(name, f"block {name} does not exist in {arch} "
                          f"({_block_spans(DENOISER_BLOCKS[ctx.arch])}); it is ignored",
                    "warning")
    for group, _ in tag.groups:
        if not len(GROUP_ROWS[ctx.arch][group]):
            problem(group, f"{arch} has no {group} blocks; {group}= is ignored", "warning")
    for expert, _ in tag.experts[:1]:
        if ctx.expert is None:
            problem(expert, f"{arch} runs one denoiser here: the tag's expert (high, low, "
                            "module=) is ignored", "warning")
        elif ctx.switch_step is None and any(is_phased(s) for _, s in tag.experts):
            problem(expert, "the host does not say at which step the experts switch, so each "
                            "expert's values step through the whole pass", "warning")
    encoders = TEXT_ENCODERS[ctx.arch]
    for te in TEXT_ENCODER_KEYS:
        if getattr(tag, te) is not None and te not in encoders:
            problem(te, f"{arch} has no {te} ({_encoder_names(ctx.arch)}); {te} is ignored",
                    "warning")
    if tag.kind == "model" and tag.dyn is not None:
        problem("dyn", "dyn applies to LoRA files, not to <model:…>; it is ignored", "warning")
    if tag.blend is not None and tag.region is None:
        problem("blend", "blend= is for regional networks (region=); it is ignored", "warning")
    if tag.region is not None and ctx.masks is not None:
        missing = sorted(region_masks(tag.region) - ctx.masks)
        if missing:
            problem("region", "no mask named " + ", ".join(f"'{m}'" for m in missing)
                    + _did_you_mean(missing[0], ctx.masks))


def _pass_uses(tag: Tag, key: str, hires: bool) -> bool:
    """Whether the item `key` (as sigma_items names it) acts in the base or hires pass: the
    hr* keys only in the hires pass, where they stand in for the base curves they replace."""
    if not hires:
        return key not in ("hr", "hrte", "hrunet")
    te_hr, unet_hr = tag.hrte or tag.hr, tag.hrunet or tag.hr
    if key == "hr":
        return tag.hrte is None or tag.hrunet is None
    if key == "te" or key in TEXT_ENCODER_KEYS:
        return te_hr is None or (key == "te" and unet_hr is None and tag.unet is None)
    if key == "unet":
        return unet_hr is None
    return True


def _check_sigmas(tag: Tag, ctx: CompileContext, problem) -> None:
    """Positions by noise level need the pass's sigmas: where the host gave none, each item
    that uses one warns and is left out of that pass (network/sigma.py)."""
    passes = [("base", ctx.sigmas, False)]
    if ctx.hires_steps is not None:
        passes.append(("hires", ctx.hires_sigmas, True))
    for key, named in sorted(sigma_items(tag), key=lambda item: tag.column_of(item[0])):
        used = [(name, given) for name, given, hires in passes if _pass_uses(tag, key, hires)]
        lacking = [name for name, given in used if given is None]
        if not lacking:
            continue
        where = f"in the {lacking[0]} pass, " if len(lacking) < len(passes) else ""
        problem(key, f"{where}{item_label(key)} uses a noise-level position "
                     f"(s{named[0]:g}) but the host gave no sigmas; it is ignored", "warning")


def _encoder_names(arch: str) -> str:
    names = TEXT_ENCODERS[arch]
    return "its text encoder is " + " and ".join(f"{te} ({TEXT_ENCODER_TITLES[arch][te]})"
                                                 for te in names)


def _text_block_names(arch: str) -> str:
    """"it has CLIP for te1 and T5 for te2": the text-encoder blocks of `arch`."""
    blocks = TEXT_BLOCKS[arch]
    named = {b: "/".join(te for te in blocks if blocks[te] == b) for b in blocks.values()}
    return "it has " + " and ".join(f"{b} for {tes}" for b, tes in named.items())


def _block_spans(names: Tuple[str, ...]) -> str:
    """"IN, D00–D18, S00–S37, OUT": a block list, each run of one prefix as its ends."""
    runs: list = []
    for name in names:
        prefix = name.rstrip("0123456789")
        if runs and runs[-1][0] == prefix:
            runs[-1][2] = name
        else:
            runs.append([prefix, name, name])
    return ", ".join(first if first == last else f"{first}–{last}" for _, first, last in runs)


def _did_you_mean(name: str, known: FrozenSet[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def region_masks(region: Region) -> FrozenSet[str]:
    """Names of the user masks a region expression refers to (built-ins left out)."""
    if isinstance(region, Mask):
        return frozenset() if region.name in BUILTIN_REGIONS else frozenset([region.name])
    if isinstance(region, (Not, Scaled)):
        return region_masks(region.operand)
    return frozenset().union(*(region_masks(r) for r in region.operands))


def named_expert(name: str) -> Optional[str]:
    """The expert a network is for by its file's name, as the published pairs of Wan 2.2
    LoRAs are named (`…_high_noise`/`…_low_noise`, `…-HIGH_fp16`, `…_low`): the word `high`
    or `low` (or `highnoise`/`lownoise`) in the name; None where it has neither, or both."""
    stem = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    words = set(re.split(r"[^a-z0-9]+", stem))
    found = [e for e in EXPERTS if e in words or e + "noise" in words]
    return found[0] if len(found) == 1 else None


def _experts(tag: Tag, ctx: CompileContext) -> Tuple[Tuple[str, Schedule], ...]:
    """A tag's multiplier per expert: its own items, else the expert its network's name says
    (the other's multiplier 0, as SD.Next's flag), else none (both experts)."""
    if tag.experts or ctx.expert is None:
        return tag.experts
    named = named_expert(tag.name)
    if named is None:
        return ()
    return ((EXPERTS[1 - EXPERTS.index(named)], Schedule.const(0.0)),)


def _expert_strength(expert: str, s: Schedule, ctx: CompileContext, steps: int, interp: str,
                     hires: bool) -> np.ndarray:
    """A tag's multiplier on one expert; Wan2GP's stepped values cover that expert's steps."""
    if not is_phased(s):
        return evaluate(s, steps, interp)
    first, end = 0, steps
    if ctx.switch_step is not None and not hires:
        first, end = (0, ctx.switch_step) if expert == EXPERTS[0] else (ctx.switch_step, steps)
    return on_phase(s, steps, first, end)


def _pass(tag: Tag, ctx: CompileContext, steps: int, interp: str,
          lbw_row: Optional[np.ndarray], hires: bool) -> PassPlan:
    sigmas = ctx.hires_sigmas if hires else ctx.sigmas
    landed = () if sigmas is None else tuple(
        (item_label(key), s, float(sigma_index(s, sigmas)) + 1.0)
        for key, named in sigma_items(tag) if _pass_uses(tag, key, hires) for s in named)
    tag = on_steps(tag, sigmas)  # positions by noise level: step numbers of this pass
    te = tag.te or ONE
    schedules = {"te": te, **{c: getattr(tag, c) or te for c in TEXT_ENCODER_KEYS},
                 "unet": tag.unet or te}
    if hires:  # loractl: hr sets both, hrte / hrunet one each, else the base pass's curves
        te_hr, unet_hr = tag.hrte or tag.hr, tag.hrunet or tag.hr
        if te_hr is not None:
            schedules.update(dict.fromkeys(("te",) + TEXT_ENCODER_KEYS, te_hr))
        if unet_hr is not None:
            schedules["unet"] = unet_hr
    strength = {c: evaluate(s, steps, interp) for c, s in schedules.items()}
    for expert, s in _experts(tag, ctx):  # this expert's share of the denoiser's strength
        if expert == ctx.expert:
            strength["unet"] = strength["unet"] * _expert_strength(expert, s, ctx, steps,
                                                                   interp, hires)
    if tag.window != NO_WINDOW:
        window = window_mask(tag.window, steps)
        strength = {c: v * window for c, v in strength.items()}

    # One row per block: the lbw vector (or 1), a block's own schedule instead, times its group.
    names = BLOCKS[ctx.arch]
    table = np.repeat((ONES[ctx.arch] if lbw_row is None else lbw_row)[:, None], steps, axis=1)
    for b, s in tag.blocks:
        if b in KEYED_BLOCKS[ctx.arch]:
            table[BLOCK_INDEX[ctx.arch][b]] = evaluate(s, steps, interp)
    for g, s in tag.groups:
        table[GROUP_ROWS[ctx.arch][g]] *= evaluate(s, steps, interp)
    table.flags.writeable = False
    return PassPlan(steps, strength, dict(zip(names, table)), _blend_steps(tag, ctx, steps),
                    landed)


def _blend_steps(tag: Tag, ctx: CompileContext, steps: int) -> int:
    """How many steps of a pass a regional network runs blended: those before its blend=
    position (read as start= reads one, in this pass's steps), or the setting's fraction;
    a fraction of 1 (or 100 %) is every step."""
    if tag.region is None:
        return 0
    pos = tag.blend if tag.blend is not None else Position(float(ctx.blend), "fraction")
    whole = 100.0 if pos.unit == "percent" else 1.0
    if pos.unit in ("fraction", "percent") and pos.value >= whole:
        return steps
    index = index_of(pos, steps, "step")
    return int(min(steps, max(0, np.ceil(index - EPS))))
