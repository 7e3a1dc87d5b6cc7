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
from typing import List, Mapping, Optional, Sequence, Tuple

from ..network.engine import Engine
from ..network.files import FileHash
from ..network.plan import CompileContext, Plan, compile_prompt, region_masks, with_hires_prompt
from ..network.sigma import pass_sigmas
from ..parser import Severity
from .library import Library
from .masks import Overlay, mask_hash, readable
from .report import Report
from .settings import Settings


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
                negative_rows: bool = True, switch_step: Optional[int] = None) -> List[Plan]:
        """Compile one plan per prompt of the batch (`hires_prompts`: the hires pass's own
        prompts, whose tags drive that pass as the hosts' do), activate the engine for a
        `latent` (h, w) of `rows` UNet rows, and begin the report. `problems`: what the host
        found before (an unreadable inline mask). `sigmas`, `hires_sigmas`: the noise level the
        model is called with at each step of each pass, where the adapter knows it before
        sampling (None: `s…` positions warn); `negative_rows`: False for a guidance-distilled
        model (`neg=` warns). NetWeave switched off in the settings: the tags are text it
        ignores, and every weight is pristine."""
        self.masks = Overlay(inline or {}, self.store)
        for p in problems:
            self.report.add(p)
        ctx = self.context(steps, hires_steps, sigmas=sigmas, hires_sigmas=hires_sigmas,
                           negative_rows=negative_rows)
        # A model of two experts (extension/experts.py): one set of plans per expert, the
        # first expert's reported (the same tags give the same diagnostics)
        # (`switch_step`: the step the second expert takes over, for Wan2GP's per-expert values)
        experts = getattr(self.engine, "experts", None)
        by_expert = {e: self._compile(prompts, hires_prompts, hires_steps,
                                      dataclasses.replace(ctx, expert=e, switch_step=switch_step
                                                          if e else None))
                     for e in (experts or (None,))}
        plans = next(iter(by_expert.values()))
        for plan in plans:
            self.report.add_diagnostics(plan.errors)
        self.engine.configure(**self.settings.engine_options())
        self.engine.activate(by_expert if experts else plans, latent=latent, batch=rows,
                             masks=self.masks)
        self.plans = plans
        self._seen = (0, 0)
        self.collect()
        self._describe_resources()
        return plans

    def _compile(self, prompts, hires_prompts, hires_steps, ctx: CompileContext) -> List[Plan]:
        plans = [compile_prompt(text, ctx) for text in prompts]
        if hires_steps is not None and hires_prompts is not None:
            plans = [with_hires_prompt(plan, compile_prompt(text, ctx))
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
