"""Transformer (DiT) layers as rows of canonical layers, and every name a file gives them: the
machinery each architecture's table (flux_keys.py, zimage_keys.py, qwen_keys.py, sd3_keys.py)
fills in (docs/design.md §5).

Coordinates are an architecture's canonical layers: its original release's names, whose
attention projections may be fused (`qkv`: q, k, v in row thirds). A host's tree is either
that native tree or diffusers', which may split fused layers, rename others and store some
with their two halves swapped. So a host layer is a `Span`: the rows of canonical layers it
holds, in its own row order; a file's layer name is one too. The keymap intersects the two,
row by row, so a fused file reaches split layers and split files a fused one exactly.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

from torch import nn

from .quantized import logical_shape
from .tokens import TokenLayout, Tokens


@dataclass(frozen=True)
class Segment:
    """`length` rows of a canonical layer from row `start`, at row `offset` of the weight
    (a host layer's or a file layer's) that holds them."""

    layer: str
    start: int
    offset: int
    length: int


Span = Tuple[Segment, ...]
NATIVE, DIFFUSERS = "native", "diffusers"  # the two trees a host may hold


def pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def match(table, name: str) -> Optional[Tuple[str, str]]:
    """(template key, its index or "") of the table entry `name` fills."""
    for template in table:
        m = pattern(template).match(name)
        if m:
            return template, (m.group(1) if m.groups() else "")
    return None


def fill(template: str, index: str) -> str:
    return template.replace("{}", index)


def underscored(path: str) -> str:
    return path.replace(".", "_")


def thirds(fused: str, rows: int, width: int) -> Tuple[int, ...]:
    """q, k, v of a fused qkv: a third of the rows each."""
    return (rows // 3,) * 3


def block_namer(stacks: Mapping[str, str], first: Tuple[str, ...], last: Tuple[str, ...]
                ) -> Callable[[str], Optional[str]]:
    """A `block_of` for canonical layers: `stack.N.…` → the stack's prefix and N in two
    digits (`stacks`: {stack: prefix}), layers named from `first` → IN, from `last` → OUT."""
    indexed = re.compile("(" + "|".join(map(re.escape, stacks)) + r")\.(\d+)\.")

    def block_of(layer: str) -> Optional[str]:
        m = indexed.match(layer)
        if m:
            return f"{stacks[m.group(1)]}{int(m.group(2)):02d}"
        if layer.startswith(first):
            return "IN"
        return "OUT" if layer.startswith(last) else None
    return block_of


def _no_extra(layer: str, rows: int, width: int) -> Iterator[Tuple[str, Span]]:
    return iter(())


@dataclass(frozen=True, eq=False)
class DitKeys:
    """One architecture's canonical layers on both trees and the names files use.

    `fused`: canonical template -> the diffusers layers that split it, in row order
    (`part_rows` says their sizes); `renamed`: one canonical layer, one diffusers layer, the
    same rows; `swapped`: the same layer with its two halves in the other order, where
    `swap_when(rows, width)` holds; `same_names`: a diffusers layer no table names is its
    own canonical layer (architectures whose trees share most names)."""

    arch: str
    tree_layout: Callable[[nn.Module], Optional[str]]  # NATIVE, DIFFUSERS or None
    tokens_of: Callable[[str], Tokens]
    block_of: Callable[[str], Optional[str]]
    tokens: Mapping[str, TokenLayout]  # per tree
    fused: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    renamed: Mapping[str, str] = field(default_factory=dict)
    swapped: Mapping[str, str] = field(default_factory=dict)
    swap_when: Callable[[int, int], bool] = lambda rows, width: True
    same_names: bool = False
    part_rows: Callable[[str, int, int], Tuple[int, ...]] = thirds
    native_prefixes: Tuple[str, ...] = ("diffusion_model.", "model.diffusion_model.",
                                        "transformer.", "base_model.model.", "")
    diffusers_prefixes: Tuple[str, ...] = ("transformer.", "")
    native_underscored: Tuple[str, ...] = ("lora_unet_", "lycoris_")
    diffusers_underscored: Tuple[str, ...] = ("lora_transformer_", "lycoris_", "lora_unet_")
    extra_names: Callable[[str, int, int], Iterator[Tuple[str, Span]]] = _no_extra
    # norms with a learned scale a checkpoint (or a file's norm layers) may change: canonical
    # module template -> the diffusers module that holds the same vector
    norms: Mapping[str, str] = field(default_factory=dict)

    @functools.cached_property
    def _split_parts(self) -> Dict[str, Tuple[str, int]]:
        return {d: (fused, i) for fused, parts in self.fused.items() for i, d in enumerate(parts)}

    @functools.cached_property
    def _swapped_back(self) -> Dict[str, str]:
        return {d: c for c, d in self.swapped.items()}

    @functools.cached_property
    def _renamed_back(self) -> Dict[str, str]:
        return {d: c for c, d in self.renamed.items()}

    def host_layers(self, root: nn.Module, patchable) -> Iterator[Tuple[str, nn.Module, Span]]:
        """(path, module, span) of every patchable layer with a 2-D weight, or a 4-D one (a
        convolution patch embedder)."""
        layout = self.tree_layout(root)
        if layout is None:
            raise ValueError(f"{type(root).__name__} is no {self.arch} transformer")
        modules = dict(root.named_modules())
        for path, module in modules.items():
            if not patchable(module) or getattr(module, "weight", None) is None or \
                    len(logical_shape(module)) not in (2, 4):
                continue  # norms hold 1-D weights (or none): no file's layer
            shape = logical_shape(module)
            if layout == NATIVE:
                yield path, module, (Segment(path, 0, 0, shape[0]),)
                continue
            span = self._diffusers_span(path, shape[0], int(shape[1]), modules)
            if span is not None:
                yield path, module, span

    def _diffusers_span(self, path: str, rows: int, width: int, modules) -> Optional[Span]:
        hit = match(self._split_parts, path)
        if hit:
            fused, i = self._split_parts[hit[0]]
            siblings = [modules.get(fill(p, hit[1])) for p in self.fused[fused]]
            if any(s is None for s in siblings):
                return None
            start = sum(logical_shape(s)[0] for s in siblings[:i])
            return (Segment(fill(fused, hit[1]), start, 0, rows),)
        hit = match(self._swapped_back, path)
        if hit:
            layer = fill(self._swapped_back[hit[0]], hit[1])
            if not self.swap_when(rows, width):
                return (Segment(layer, 0, 0, rows),)
            half = rows // 2
            return (Segment(layer, half, 0, half), Segment(layer, 0, half, half))
        hit = match(self._renamed_back, path)
        if hit:
            return (Segment(fill(self._renamed_back[hit[0]], hit[1]), 0, 0, rows),)
        return (Segment(path, 0, 0, rows),) if self.same_names else None

    def norm_layers(self, root: nn.Module) -> Iterator[Tuple[str, nn.Module, str, str]]:
        """(path, module, its scale's parameter name, canonical name) of every norm in `norms`:
        RMSNorms over attention heads, whose vector the original trees call `scale` and
        diffusers `weight`."""
        layout = self.tree_layout(root)
        table = {c: c for c in self.norms} if layout == NATIVE else \
            {d: c for c, d in self.norms.items()}
        for path, module in root.named_modules():
            hit = match(table, path)
            if hit is None:
                continue
            param = next((p for p in ("scale", "weight")
                          if isinstance(getattr(module, p, None), nn.Parameter)), None)
            if param is not None:
                yield path, module, param, fill(table[hit[0]], hit[1])

    def norm_spellings(self, canonical: str) -> Tuple[str, ...]:
        """Every name a file gives a norm of `norms` (its tensor is `<name>.scale` or
        `<name>.weight`)."""
        hit = match(self.norms, canonical)
        names = [p + canonical for p in self.native_prefixes] + \
            [u + underscored(canonical) for u in self.native_underscored]
        if hit is not None:
            d = fill(self.norms[hit[0]], hit[1])
            names += [p + d for p in self.diffusers_prefixes] + \
                [u + underscored(d) for u in self.diffusers_underscored]
        return tuple(dict.fromkeys(names))

    def file_spellings(self, layers: Dict[str, Tuple[int, int]]) -> Iterator[Tuple[str, Span]]:
        """(name, span) of every layer name a file may use, for canonical layers
        {name: (rows, input width)}."""
        for layer, (rows, width) in layers.items():
            whole = (Segment(layer, 0, 0, rows),)
            for name in [p + layer for p in self.native_prefixes] + \
                    [u + underscored(layer) for u in self.native_underscored]:
                yield name, whole
            for d, span in self._diffusers_names(layer, rows, width):
                for name in [p + d for p in self.diffusers_prefixes] + \
                        [u + underscored(d) for u in self.diffusers_underscored]:
                    yield name, span
            yield from self.extra_names(layer, rows, width)

    def _diffusers_names(self, layer: str, rows: int, width: int) -> Iterator[Tuple[str, Span]]:
        hit = match(self.fused, layer)
        if hit:
            start = 0
            for part, n in zip(self.fused[hit[0]], self.part_rows(layer, rows, width)):
                yield fill(part, hit[1]), (Segment(layer, start, 0, n),)
                start += n
            return
        hit = match(self.swapped, layer)
        if hit and self.swap_when(rows, width):
            half = rows // 2
            yield fill(self.swapped[hit[0]], hit[1]), (Segment(layer, half, 0, half),
                                                      Segment(layer, 0, half, half))
            return
        if hit:
            yield fill(self.swapped[hit[0]], hit[1]), (Segment(layer, 0, 0, rows),)
            return
        hit = match(self.renamed, layer)
        if hit:
            yield fill(self.renamed[hit[0]], hit[1]), (Segment(layer, 0, 0, rows),)
        elif self.same_names:
            yield layer, (Segment(layer, 0, 0, rows),)
