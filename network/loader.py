"""Loading a network file for a host's module trees: every key onto exactly one target.

`load_network` reads a LoRA-family file (kohya, LyCORIS, PEFT/diffusers, OFT names) and
builds one adapter per host layer; `load_checkpoint` turns another checkpoint of the same
architecture into full-rank contributions W_target − W_base, read from the file only when a
layer is merged (model-as-LoRA). Nothing here touches a weight: a bad file fails before the
engine starts, with a message that names the file: damaged, degenerate (empty, rank 0),
non-finite or absurd tensors refuse their network here, so they never reach a weight.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .algorithms import Adapter, FormatError, detect, make
from .algorithms.checkpoint import CheckpointDelta
from .algorithms.rows import Placed, rows_of
from .blocks import ARCH_TITLES
from .detect import FLUX_FAMILY, detect_architecture
from .files import (NetworkFileError, SafeFile, base_architecture, checkpoint_files,
                    open_safetensors)
from .keymap import KeyMap, Piece, Target


def _title(arch: Optional[str]) -> str:
    return ARCH_TITLES.get(arch, "unknown")


# Part names after a layer name, longest first so "lora_down.weight" wins over "weight".
PARTS = sorted((
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "alpha", "scale", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
    "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
    "lokr_w2_b", "lokr_t2", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "oft_blocks",
    "oft_diag", "rescale", "diff", "diff_b", "w_norm", "b_norm", "weight", "on_input",
), key=len, reverse=True)
# Other spellings of LoRA factors (older diffusers and transformers savers).
PART_ALIASES = {"lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                "lora_linear_layer.down.weight": "lora_down.weight",
                "lora_linear_layer.up.weight": "lora_up.weight",
                "lora_A.default.weight": "lora_A.weight", "lora_B.default.weight": "lora_B.weight"}
# XLabs' Flux files: `double_blocks.0.processor.qkv_lora1.down.weight` (flux_keys.py).
XLABS_PARTS = {"down.weight": "lora_down.weight", "up.weight": "lora_up.weight"}
UNDERSCORED = ("lora_", "lycoris_", "oft_")  # kohya-style layer names never hold a "."


# Anime-Z's Z-Image files write diffusers' to_q/to_k/to_v with a dot (`attention.to.q`), its
# alpha under either name; no tree has a module `to` holding `q`.
_DOTTED_QKV = re.compile(r"\.to\.([qkv])$")


def split_key(key: str) -> Optional[Tuple[str, str]]:
    """`lora_unet_x.lora_down.weight` → ("lora_unet_x", "lora_down.weight"); None if the key
    ends in no part name NetWeave knows."""
    found = _split_key(key)
    return None if found is None else (_DOTTED_QKV.sub(r".to_\1", found[0]), found[1])


def _split_key(key: str) -> Optional[Tuple[str, str]]:
    if key.startswith(UNDERSCORED) and "." in key:
        layer, part = key.split(".", 1)
        part = PART_ALIASES.get(part, part)
        return (layer, part) if part in PARTS else None
    for alias, part in PART_ALIASES.items():
        if key.endswith("." + alias):
            return key[:-len(alias) - 1], part
    if ".processor." in key:
        for alias, part in XLABS_PARTS.items():
            if key.endswith("." + alias):
                return key[:-len(alias) - 1], part
    for part in PARTS:
        if key.endswith("." + part):
            return key[:-len(part) - 1], part
    return None


@dataclass
class LoadedNetwork:
    path: str
    kind: str  # "lora" or "checkpoint"
    arch: Optional[str]  # what the file is for, as detected
    layers: Dict[Target, Adapter]
    unmatched: Tuple[str, ...] = ()  # keys that reach no layer of this host
    embeddings: Tuple[str, ...] = ()  # bundled textual-inversion keys (bundle_emb.*)
    metadata: Mapping = field(default_factory=dict)
    arch_reasons: Tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.layers.values())

    @property
    def algorithms(self) -> Dict[str, int]:
        return dict(Counter(a.algorithm for a in self.layers.values()))


class ArchitectureMismatch(NetworkFileError):
    """The file is for another architecture than the model's."""


def _check_architecture(path: str, found: Optional[str], reasons, host: Optional[str],
                        kind: str = "lora") -> None:
    """A file for another architecture is refused, except a LoRA between Flux and Chroma: they
    share their blocks, and the layers only one has are reported as unmatched keys."""
    if kind == "lora" and {found, host} <= set(FLUX_FAMILY):
        return
    if found is not None and host is not None and found != host:
        raise ArchitectureMismatch(path, f"this file is for {_title(found)} ({'; '.join(reasons)}), "
                          f"but the model is {_title(host)}")


def load_network(path: str, keymap: KeyMap, arch: Optional[str] = None) -> LoadedNetwork:
    """A LoRA-family file for the host whose trees `keymap` holds (`arch`: the host's)."""
    with open_safetensors(path) as f:
        found, reasons = detect_architecture(f.keys(), f.shape, base_architecture(f.metadata))
        _check_architecture(path, found, reasons, arch)
        layers: Dict[str, Dict[str, str]] = {}
        unmatched, embeddings = [], []
        for key in f.keys():
            if key.startswith("bundle_emb."):
                embeddings.append(key)
                continue
            split = split_key(key)
            if split is None:
                unmatched.append(key)
                continue
            layers.setdefault(split[0], {})[split[1]] = key
        default_alpha = _metadata_alpha(f.metadata)
        placed: Dict[Target, List[Tuple[Piece, Adapter, str]]] = {}
        for layer, part_keys in layers.items():
            pieces = keymap.pieces(layer)
            if not pieces or detect(part_keys) is None:
                unmatched.extend(part_keys.values())
                continue
            parts = {part: _read(f, path, key) for part, key in part_keys.items()}
            shape = (pieces[0].src_rows, *pieces[0].target.shape[1:])
            try:
                adapter = make(parts, default_alpha)
                problem = adapter.check(tuple(shape))
                if not problem:
                    for piece in pieces:
                        placed.setdefault(piece.target, []).append(
                            (piece, rows_of(adapter, piece.src, piece.length, piece.src_rows), layer))
            except (FormatError, RuntimeError, ValueError, ArithmeticError, IndexError) as exc:
                # odd shapes fail inside torch before an algorithm can say what is wrong
                raise NetworkFileError(path, f"layer '{layer}': {exc}") from None
            if problem:
                where = ", ".join(f"{p.target.component} {p.target.name}" for p in pieces)
                raise NetworkFileError(path, f"layer '{layer}' does not fit this {_title(arch)} model "
                                  f"({where}): {problem}")
        adapters = {target: _assemble(path, target, items) for target, items in placed.items()}
    return LoadedNetwork(path, "lora", found, adapters, tuple(sorted(unmatched)),
                         tuple(embeddings), dict(f.metadata), tuple(reasons))


def _assemble(path: str, target: Target, items: List[Tuple[Piece, Adapter, str]]) -> Adapter:
    """One adapter for a target from the file layers that reach its rows."""
    items = _without_duplicates(target, sorted(items, key=lambda item: (item[0].dst,
                                                                         -item[0].length)))
    for (a, _, first), (b, _, second) in zip(items, items[1:]):
        if b.dst < a.dst + a.length:
            raise NetworkFileError(path, f"'{first}' and '{second}' both change {target.component} "
                                         f"layer {target.name}")
    piece, adapter, _ = items[0]
    rows = int(target.shape[0])
    if len(items) == 1 and piece.dst == 0 and piece.length == rows:
        return adapter
    return Placed([(p.dst, p.length, a) for p, a, _ in items], rows)


def _without_duplicates(target: Target, items: List[Tuple[Piece, Adapter, str]]
                        ) -> List[Tuple[Piece, Adapter, str]]:
    """`items` (by first row, longest first) without those whose rows lie inside an earlier
    one's and change them exactly as it does: some trainers store a layer under two names
    (Anime-Z's Z-Image files: the fused `qkv` beside `to.q/k/v`, `out` beside `to_out.0`)."""
    kept: List[Tuple[Piece, Adapter, str]] = []
    deltas: Dict[int, torch.Tensor] = {}  # an outer item's ΔW, built once for all it holds
    for item in items:
        piece = item[0]
        outer = next((k for k in kept if k[0].dst <= piece.dst and
                      piece.dst + piece.length <= k[0].dst + k[0].length), None)
        if outer is None or not _same_rows(target, outer, item, deltas):
            kept.append(item)
    return kept


def _same_rows(target: Target, outer, inner, deltas: Dict[int, torch.Tensor]) -> bool:
    """Whether `inner` builds the same ΔW as `outer` on its rows (float rounding aside)."""
    (po, ao, _), (pi, ai, _) = outer, inner
    if ao.uses_weight or ai.uses_weight:  # built from W: a second copy is no duplicate
        return False
    rest = tuple(target.shape[1:])
    if id(outer) not in deltas:
        deltas[id(outer)] = ao.delta(torch.zeros(po.length, *rest))
    start = pi.dst - po.dst
    a = deltas[id(outer)][start:start + pi.length]
    b = ai.delta(torch.zeros(pi.length, *rest))
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4,
                                                 atol=1e-6 * float(a.abs().max().clamp(min=1)))


# A weight or factor beyond this is damage, not training (real ones stay below a few hundred):
# merged in half precision it would overflow to infinity and draw a black image.
ABSURD = 1e4


def _read(f: SafeFile, path: str, key: str) -> torch.Tensor:
    t = f.get(key)
    if t.numel() == 0:
        raise NetworkFileError(path, f"tensor '{key}' is empty (shape {list(t.shape)}): a rank-0 "
                                     "or damaged layer")
    check_values(t, path, key)
    return t


def check_values(t: torch.Tensor, path: str, key: str) -> None:
    """NetworkFileError when a float tensor holds NaN, infinity or an absurd magnitude."""
    if not t.is_floating_point():
        return
    peak = (t.float() if t.element_size() == 1 else t).abs().max()  # fp8 has no abs: widen it
    if not torch.isfinite(peak):
        raise NetworkFileError(path, f"tensor '{key}' holds NaN or infinite values")
    if peak > ABSURD:
        raise NetworkFileError(path, f"tensor '{key}' holds {float(peak):.3g}, far beyond any "
                                     f"trained weight (|w| ≤ {ABSURD:g})")


def _metadata_alpha(metadata: Mapping) -> Optional[float]:
    """PEFT/diffusers files keep alpha in their adapter config, not per layer."""
    config = metadata.get("lora_adapter_metadata")
    if isinstance(config, Mapping):
        alpha = config.get("lora_alpha")
        if isinstance(alpha, (int, float)):
            return float(alpha)
    return None


# Checkpoint tensors that are no patchable layer: the VAE, EMA copies, sampler schedules,
# embeddings and other plain parameters.
NOT_PATCHED = re.compile(r"^(first_stage_model|model_ema|vae)\.|^[^.]+$|embedding|position_ids|"
                         r"text_projection|logit_scale")


def load_checkpoint(path: str, keymap: KeyMap, arch: Optional[str] = None) -> LoadedNetwork:
    """Another checkpoint as a network: ΔW = W_target − W_base on every layer both have. Each
    tensor is read once here to check its values, then again from the file only when the engine
    merges that layer, so two full models never sit in memory at once."""
    sources = []
    try:  # the files stay open for the adapters; closed if loading fails
        for file, prefix in checkpoint_files(path):
            sources.append((open_safetensors(file), prefix))
        layers, unmatched, found, reasons = _map_checkpoint(path, sources, keymap, arch)
    except Exception:
        for f, _ in sources:
            f.close()
        raise
    return LoadedNetwork(path, "checkpoint", found, layers, tuple(sorted(unmatched)), (),
                         dict(sources[0][0].metadata), tuple(reasons))


def _map_checkpoint(path, sources, keymap: KeyMap, arch: Optional[str]):
    keys = [prefix + k for f, prefix in sources for k in f.keys()]
    shapes = {prefix + k: f.shape(k) for f, prefix in sources for k in f.keys()}
    found, reasons = detect_architecture(keys, shapes.__getitem__,
                                         base_architecture(sources[0][0].metadata))
    _check_architecture(path, found, reasons, arch, "checkpoint")
    weights: Dict[Target, List[Tuple[SafeFile, str, Piece]]] = {}
    unmatched = []
    for f, prefix in sources:
        for key in f.keys():
            hits = keymap.lookup_tensor(prefix + key)
            if not hits and not NOT_PATCHED.search(prefix + key):
                unmatched.append(prefix + key)
            for piece, is_bias in hits:
                if not is_bias:  # a bias is read beside its weight; alone it changes nothing
                    weights.setdefault(piece.target, []).append((f, key, piece))
    layers: Dict[Target, Adapter] = {}
    read = []
    for target, items in weights.items():
        parts = []
        for f, key, piece in items:
            rows = None if piece.whole else (piece.src, piece.length)
            bias_key = key[:-len("weight")] + "bias"  # .weight, in_proj_weight, out_proj.weight
            bias = (f, bias_key, rows) if target.bias_param and f.has(bias_key) else None
            parts.append((piece, CheckpointDelta((f, key, rows), bias), key))
            read += [(f, key)] + ([(f, bias_key)] if bias else [])
        adapter = _assemble(path, target, parts)
        problem = adapter.check(target.shape)
        if problem:
            raise NetworkFileError(path, f"{target.component} {target.name} does not fit this "
                                         f"{_title(arch)} model: {problem}")
        layers[target] = adapter
    for f, key in dict.fromkeys(read):
        check_values(f.get(key), f.path, key)
    return layers, unmatched, found, reasons
