"""A model of two denoisers that take turns (Wan 2.2 A14B: the high-noise `transformer`, then
the low-noise `transformer_2`, switched at the pipeline's boundary), driven as one engine.

Each expert has an engine of its own with a plan compiled for it (CompileContext.expert: a
tag's high=/low= scale its strength there); the text encoders are applied by the first (the
others hold them at strength 0, so a file's text-encoder keys still name layers there). Steps are
counted across the whole run: at step k both engines stand at k, so a schedule written for
the pass means the same on either expert, and the idle expert's weights are already right
when the pipeline switches. Deactivating restores both.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from ..network.engine import Engine
from ..network.plan import EXPERTS


class ExpertEngines:
    """The Engine calls a host and a Session make, over one engine per expert."""

    def __init__(self, engines: Mapping[str, Engine]):
        if tuple(engines) != EXPERTS:
            raise ValueError(f"one engine per expert, in order: {', '.join(EXPERTS)}")
        self.engines: Dict[str, Engine] = dict(engines)
        self.first = self.engines[EXPERTS[0]]
        self.arch = self.first.arch
        self._log: Dict[str, List[str]] = {"errors": [], "warnings": []}
        self._read: Dict[Tuple[str, str], int] = {}

    @property
    def experts(self) -> Tuple[str, ...]:
        return tuple(self.engines)

    @property
    def trees(self) -> dict:
        return self.first.trees

    # ---- the whole run --------------------------------------------------------------------
    def configure(self, **options) -> None:
        for e in self.engines.values():
            e.configure(**options)

    def activate(self, plans: Mapping[str, Sequence], **kw) -> List[str]:
        """`plans`: each expert's plans (Session.prepare compiles one set per expert). The
        later experts' engines hold the text encoders too, so a file's text-encoder keys name
        layers there, but their plans leave them at 0: the first engine alone applies them."""
        self._log = {"errors": [], "warnings": []}
        self._read = {}
        for name, e in self.engines.items():
            e.activate(plans[name] if e is self.first else
                       [_denoiser_only(p) for p in plans[name]], **kw)
        return self.errors

    def deactivate(self) -> None:
        for e in self.engines.values():
            e.deactivate()

    def set_rows(self, prompts, uncond) -> None:
        for e in self.engines.values():
            e.set_rows(prompts, uncond)

    def set_step(self, k: int, phase: str = "base") -> None:
        for e in self.engines.values():
            e.set_step(k, phase)

    def set_text_variants(self, *args, **kw) -> None:
        for e in self.engines.values():
            e.set_text_variants(*args, **kw)

    # ---- the text encoders: the first expert's engine holds them --------------------------
    def te_segments(self, *args, **kw):
        return self.first.te_segments(*args, **kw)

    def apply_te(self, *args, **kw):
        return self.first.apply_te(*args, **kw)

    def segment_at(self, *args, **kw):
        return self.first.segment_at(*args, **kw)

    # ---- what the report reads ------------------------------------------------------------
    @property
    def applied(self) -> Tuple[Tuple[str, str], ...]:
        return tuple(dict.fromkeys(a for e in self.engines.values() for a in e.applied))

    @property
    def errors(self) -> List[str]:
        return self._merged("errors")

    @property
    def warnings(self) -> List[str]:
        return self._merged("warnings")

    def _merged(self, kind: str) -> List[str]:
        """Both engines' messages in the order they came, each once (a missing file is
        found by both), as one list that only grows (Session.collect reads its tail)."""
        log = self._log[kind]
        for name, e in self.engines.items():
            items = getattr(e, kind)
            start = self._read.get((name, kind), 0)
            for message in items[start:]:
                if message not in log:
                    log.append(message)
            self._read[(name, kind)] = len(items)
        return log


def _denoiser_only(plan):
    """The plan with every text-encoder strength 0 (the first expert's engine applies them)."""
    def quiet(passplan):
        return None if passplan is None else dataclasses.replace(passplan, strength={
            c: (v if c == "unet" else np.zeros_like(v)) for c, v in passplan.strength.items()})
    return dataclasses.replace(plan, networks=tuple(
        dataclasses.replace(n, base=quiet(n.base), hires=quiet(n.hires)) for n in plan.networks))


def flow_engine(pipe, arch: str, trees: dict, find):
    """The engine of a flow-matching pipeline: an Engine on `trees`, or for a model of two
    experts one per expert, the second on `transformer_2` alone."""
    from .flow_families import has_experts

    if not has_experts(pipe):
        return Engine(trees, arch, find)
    return ExpertEngines({EXPERTS[0]: Engine(trees, arch, find),
                          EXPERTS[1]: Engine(dict(trees, unet=pipe.transformer_2), arch, find)})
