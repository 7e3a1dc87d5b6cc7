"""What NetWeave makes of a file, without any model loaded: the file is mapped onto the real
trees of each architecture (SD1/SD2/SDXL, Flux/Chroma, Z-Image, Qwen-Image, SD3.5 Large and
Medium, Wan 2.2; built on the meta device), so every key, layer and shape is checked."""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from .detect import ARCHS
from .files import NetworkFileError, checkpoint_files, describe_metadata, open_safetensors
from .keymap import KeyMap
from .loader import ArchitectureMismatch, LoadedNetwork, load_checkpoint, load_network
from .reference import reference_trees, variants

_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.",
                        "first_stage_model.")


def file_kind(path: str) -> str:
    """"checkpoint" for a single-file model or a diffusers folder, else "lora"."""
    if os.path.isdir(path):
        return "checkpoint"
    with open_safetensors(path) as f:
        keys = f.keys()
    return "checkpoint" if any(k.startswith(_CHECKPOINT_PREFIXES) for k in keys) else "lora"


def _load(path: str, kind: str, arch: str) -> LoadedNetwork:
    """Loaded onto the architecture's reference tree; of several sizes (SD3.5 Large and
    Medium), onto the first whose shapes the file fits."""
    loader = load_checkpoint if kind == "checkpoint" else load_network
    names = variants(arch)
    for name in names[:-1]:
        try:
            return loader(path, KeyMap(reference_trees(name)), arch)
        except ArchitectureMismatch:
            raise
        except NetworkFileError:
            continue  # another size may fit
    return loader(path, KeyMap(reference_trees(names[-1])), arch)


def inspect(path: str) -> Dict:
    """The `inspect` report: {"file", "architecture", "kind", "algorithms", "layers",
    "unmatched_keys", "metadata", "error"}."""
    report = {"file": path, "architecture": None, "kind": None, "algorithms": {}, "layers": 0,
              "unmatched_keys": [], "metadata": {}, "error": None}
    try:
        kind = report["kind"] = file_kind(path)
        first = checkpoint_files(path)[0][0] if kind == "checkpoint" else path
        with open_safetensors(first) as f:
            report["metadata"] = describe_metadata(f.metadata)
        loaded = _best_fit(path, kind)
    except NetworkFileError as exc:
        report["error"] = str(exc)
        return report
    network, arch = loaded
    report.update(architecture=arch, algorithms=network.algorithms, layers=len(network.layers),
                  unmatched_keys=list(network.unmatched))
    return report


def _best_fit(path: str, kind: str) -> Tuple[LoadedNetwork, Optional[str]]:
    """Load for the detected architecture; when the keys do not tell, for the one the
    file fits best (all shapes fit, fewest unmatched keys)."""
    errors = []
    fits = []
    for arch in ARCHS:
        try:
            network = _load(path, kind, arch)
        except NetworkFileError as exc:
            errors.append(exc)
            continue
        if network.arch is not None:
            return network, network.arch  # the keys decided, and the file fits
        # a tie goes to the first in ARCHS (a lone kohya T5: Flux's before Chroma's and SD3's)
        fits.append((len(network.unmatched), -len(network.layers), ARCHS.index(arch), arch,
                     network))
    reaching = [f for f in fits if f[-1].layers]  # reaching no layer at all is no fit
    if reaching:
        *_, arch, network = min(reaching, key=lambda f: f[:3])
        return network, arch
    if fits and not errors:
        return fits[0][-1], None
    raise _first_real_error(errors)


def _first_real_error(errors) -> NetworkFileError:
    """An architecture mismatch for the two wrong architectures says less than the error
    for the one the file claims to be for."""
    return next((e for e in errors if not isinstance(e, ArchitectureMismatch)), errors[0])
