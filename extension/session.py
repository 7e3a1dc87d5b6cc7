"""One generation, the same in every host (docs/design.md §6). A host adapter says only what
its host alone knows — its module trees and architecture, when its callbacks fire, how its
batch rows are laid out — and hands the rest to a Session:

    session = Session(engine, library, store, settings)
    session.prepare(prompts, steps=…, hires_steps=…, hires_prompts=…, latent=…, rows=…,
                    inline=…, sigmas=…, hires_sigmas=…, negative_rows=…)
                                       plans compiled, the engine activated, the report begun
    …the host samples, moving the engine (engine.set_step, apply_te)…
    session.collect()                  problems the engine found while sampling, into the report

`session.report` is everything the user must see (report.py); the host writes it to its
console, infotext and UI whenever `collect()` says something new came in.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from ..network.engine import Engine
from ..network.files import FileHash
from ..network.plan import CompileContext, Plan, compile_parsed, region_masks, with_hires_prompt
from ..network.sigma import pass_sigmas
from ..parser import Prompt, Severity, parse
from .library import Library
from .masks import Overlay, mask_hash, readable
from .report import Report
from .settings import Settings

Rename = Callable[[str, str], str]  # (kind, name) -> the file a host loads in its place


def compile_context(arch: str, settings: Settings, steps: int, hires_steps: Optional[int] = None,
                    masks=(), sigmas: Optional[Sequence[float]] = None,
                    hires_sigmas: Optional[Sequence[float]] = None,
                    negative_rows: bool = True) -> CompileContext:
    """What prompts compile against in a host: its model, the pass lengths, the mask names it
    has, the user's settings (default interpolation, strict tags), the sigma the model sees at
    each step of each pass where the host can say it (positions by noise level; sigmas the
    host gets wrong count as none, so the tags that need them warn instead of the generation
    failing) and whether the model has negative rows (guidance-distilled ones have none)."""
    return CompileContext(arch=arch, steps=steps, hires_steps=hires_steps,
                          masks=frozenset(masks), default_interp=settings.default_interp,
                          strict=settings.strict, blend=settings.blend / 100,
                          sigmas=pass_sigmas(sigmas, steps),
                          hires_sigmas=None if hires_steps is None
                          else pass_sigmas(hires_sigmas, hires_steps),
                          negative_rows=negative_rows)


class Session:
    def __init__(self, engine: Engine, library: Library, store: Mapping, settings: Settings,
                 file_hash: FileHash = FileHash.TENSORS):
        """`store`: the host's saved masks (name → image); `settings`: the user's, read now;
        `file_hash`: the hash the host's own Lora writes in `Lora hashes`."""
        self.engine, self.library, self.store, self.settings = engine, library, store, settings
        self.file_hash = file_hash
        self.report = Report(library.scrub)
        self.plans: List[Plan] = []
        self.masks: Mapping = store
        self._seen = (0, 0)  # engine errors and warnings already in the report
        # the experts still to come (next_expert), each with its plans' compiler (Rename: the
        # file the host loads for that expert in a network's place, or None)
        self._turns: List[Tuple[str, Callable[[Optional[Rename]], List[Plan]]]] = []

    def context(self, steps: int, hires_steps: Optional[int] = None, **host) -> CompileContext:
        """`host`: what compile_context takes from the adapter (sigmas, hires_sigmas,
        negative_rows)."""
        return compile_context(self.engine.arch, self.settings, steps, hires_steps, self.masks,
                               **host)

    def prepare(self, prompts: Sequence[str], *, steps: int, latent: Tuple[int, int], rows: int,
                hires_steps: Optional[int] = None, hires_prompts: Optional[Sequence[str]] = None,
                inline: Optional[Mapping] = None, problems: Sequence[str] = (),
                sigmas: Optional[Sequence[float]] = None,
                hires_sigmas: Optional[Sequence[float]] = None,
                negative_rows: bool = True, switch_step: Optional[int] = None,
                experts: Sequence[str] = (),
                rename: Optional[Rename] = None) -> List[Plan]:
        """Compile one plan per prompt of the batch (`hires_prompts`: the hires pass's own
        prompts, whose tags drive that pass as the hosts' do), activate the engine for a
        `latent` (h, w) of `rows` UNet rows, and begin the report. `problems`: what the host
        found before (an unreadable inline mask). `sigmas`, `hires_sigmas`: the noise level the
        model is called with at each step of each pass, where the adapter knows it before
        sampling (None: `s…` positions warn); `negative_rows`: False for a guidance-distilled
        model (`neg=` warns). `experts`: the experts of a model that take turns on this one
        engine, in order (the host loads the next one's weights while sampling: Forge Neo's
        refiner); a set of plans is compiled for each, the first's activated, and
        `next_expert` moves on; `rename`: as next_expert's, for the first of them (the host
        already holds a later expert's weights). NetWeave switched off in the settings: the
        tags are text it ignores, and every weight is pristine."""
        self.masks = Overlay(inline or {}, self.store)
        for p in problems:
            self.report.add(p)
        ctx = self.context(steps, hires_steps, sigmas=sigmas, hires_sigmas=hires_sigmas,
                           negative_rows=negative_rows)
        # A model of two experts (extension/experts.py): one set of plans per expert, the
        # first expert's reported (the same tags give the same diagnostics)
        # (`switch_step`: the step the second expert takes over, for Wan2GP's per-expert values)
        engines = getattr(self.engine, "experts", None)
        if engines and experts:
            raise ValueError("experts take turns on one engine, not on one engine each")

        def compiler(e):  # an expert's plans, compiled under a turn's names (or None)
            at = dataclasses.replace(ctx, expert=e, switch_step=switch_step if e else None)
            return lambda turn: self._compile(prompts, hires_prompts, hires_steps, at, turn)

        first = experts[0] if experts else None
        by_expert = {e: compiler(e)(None if e != first or rename is None else (e, rename))
                     for e in (engines or experts[:1] or (None,))}
        plans = next(iter(by_expert.values()))
        for plan in plans:
            self.report.add_diagnostics(plan.errors)
        self._turns = [(e, compiler(e)) for e in experts[1:]]
        self.engine.configure(**self.settings.engine_options())
        self.engine.activate(by_expert if engines else plans, latent=latent, batch=rows,
                             masks=self.masks)
        self._activated(plans)
        return plans

    def next_expert(self, engine: Optional[Engine] = None, *, rewritten: Sequence[str] = (),
                    at: Optional[Tuple[str, int]] = None,
                    rename: Optional[Rename] = None) -> Optional[str]:
        """The next of prepare's `experts` takes over at (phase, step) `at` (default: where
        the engine stands), when the host has loaded its weights: into this engine's trees,
        whose `rewritten` components now hold them (Engine.rewritten), or as a model of its
        own, on which `engine` is new (this one is the host's to release). `rename(kind,
        name)`: the file the host loads for that expert in a network's place (Forge Neo's
        LoRA replacements); one not found is reported and left out from then on. Returns the
        expert, or None when there is no next one."""
        if not self._turns:
            return None
        expert, compile_for = self._turns.pop(0)
        plans = compile_for(None if rename is None else (expert, rename))
        old = self.engine
        at = at or old.position or ("base", 0)
        if engine is None:
            old.rewritten(rewritten, plans=plans, at=at)
        else:
            self.engine = engine
            engine.configure(**self.settings.engine_options())
            engine.activate(plans, latent=old.latent, batch=old.batch, masks=self.masks, at=at)
        self._activated(plans)
        return expert

    def _renamed(self, parsed: Prompt, turn: Tuple[str, Rename]) -> Prompt:
        """The prompt's tags under the names of the files the host loads for this expert in
        their place, before they are compiled (a name may say which expert it is for:
        network/plan.py named_expert); one whose file is not found is reported and left out."""
        expert, rename = turn
        kept = []
        for tag in parsed.tags:
            name = rename(tag.kind, tag.name)
            if name != tag.name:
                try:
                    self.library.find(tag.kind, name)
                except (FileNotFoundError, ValueError):
                    self.report.add(f"{tag.kind}:{tag.name}: the {expert}-noise expert takes "
                                    f"'{name}' in its place, and there is no {tag.kind} by "
                                    "that name; it is left out there")
                    continue
                tag = dataclasses.replace(tag, name=name)
            kept.append(tag)
        return dataclasses.replace(parsed, tags=tuple(kept))

    def _activated(self, plans: List[Plan]) -> None:
        self.plans = plans
        self._seen = (0, 0)
        self.collect()
        self._describe_resources()

    def _compile(self, prompts, hires_prompts, hires_steps, ctx: CompileContext,
                 turn: Optional[Tuple[str, Rename]] = None) -> List[Plan]:
        def compiled(text):
            parsed = parse(text, strict=ctx.strict)
            return compile_parsed(parsed if turn is None else self._renamed(parsed, turn),
                                  text, ctx)
        plans = [compiled(text) for text in prompts]
        if hires_steps is not None and hires_prompts is not None:
            plans = [with_hires_prompt(plan, compiled(text))
                     for plan, text in zip(plans, hires_prompts)]
        if not self.settings.enabled:
            plans = [dataclasses.replace(plan, networks=()) for plan in plans]
        return plans

    def collect(self) -> bool:
        """The engine's problems since the last call (a layer left out at its first UNet call,
        a merge that does not fit at a later keyframe) into the report; True when any came."""
        errors, warnings = self.engine.errors, self.engine.warnings
        new = [(e, Severity.ERROR) for e in errors[self._seen[0]:]] + \
              [(w, Severity.WARNING) for w in warnings[self._seen[1]:]]
        self._seen = (len(errors), len(warnings))
        for message, severity in new:
            self.report.add(message, severity)
        return bool(new)

    def _describe_resources(self) -> None:
        used = sorted({m for plan in self.plans for n in plan.networks if n.region is not None
                       for m in region_masks(n.region) if m in self.masks})
        for name, img in readable(self.masks, used).items():
            self.report.masks[name] = mask_hash(img)
        for kind, name in self.engine.applied:
            digest = self.library.short_hash(kind, name, self.file_hash)
            if digest is not None:
                (self.report.models if kind == "model" else self.report.networks)[name] = digest
