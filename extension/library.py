"""The network folders: where `<lora:name>` and `<model:name>` files are found.

Names are file names without extension, relative to a folder, "/" for sub-folders. Nothing
outside the folders is ever opened: names with "..", absolute paths, NUL bytes (the rule of
parser/names.py), and symlinks that lead out of a folder are refused with a message. What the
API lists about a file is kept until the file changes (its size, mtime and inode).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..network.detect import detect_architecture
from ..network.files import (NetworkFileError, base_architecture, checkpoint_files,
                             FileHash, content_hash, content_stamp, describe_metadata,
                             open_safetensors)
from ..parser.names import network_name_problem

DESCRIBED = 4096  # listing entries kept


class BadName(ValueError):
    """A network or mask name that could point outside its folder."""


def check_name(name: str) -> str:
    problem = network_name_problem(name)
    if problem:
        raise BadName(problem)
    return name


def scrub_paths(text: str, folders: Sequence, base: str) -> str:
    """Each (folder, label) of `folders` in `text` named relative to `base` when inside it,
    else as "the <label>"; longest folders first, spelled as given and as resolved."""
    spelled = []
    for folder, label in folders:
        if not folder:
            continue
        name = os.path.relpath(folder, base) if inside(base, folder) else f"the {label}"
        for form in {os.path.abspath(folder), os.path.realpath(folder), folder}:
            spelled.append((form, name))
    for form, name in sorted(spelled, key=lambda f: -len(f[0])):
        if os.path.isabs(form):
            text = text.replace(form, name)
    return text


def inside(root: str, path: str) -> bool:
    """`path`, with every symlink resolved, lies in `root`."""
    root = os.path.realpath(root)
    return os.path.commonpath([root, os.path.realpath(path)]) == root


@dataclass
class Library:
    """`base`: the folder messages name the network folders relative to (the WebUI's own);
    a folder outside it is named by its kind. None: messages keep the paths."""

    lora_dirs: Sequence[str] = ()
    model_dirs: Sequence[str] = ()
    base: Optional[str] = None
    _hashes: "OrderedDict" = field(default_factory=OrderedDict, init=False, repr=False,
                                   compare=False)
    _described: "OrderedDict" = field(default_factory=OrderedDict, init=False, repr=False,
                                      compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    def _dirs(self, kind: str) -> Sequence[str]:
        return self.model_dirs if kind == "model" else self.lora_dirs

    def find(self, kind: str, name: str) -> str:
        """The file (or diffusers folder, for models) of a tag; FileNotFoundError otherwise."""
        check_name(name)
        for root in self._dirs(kind):
            for candidate in (os.path.join(root, name + ".safetensors"), os.path.join(root, name)):
                if os.path.exists(candidate) and (candidate.endswith(".safetensors")
                                                  or kind == "model" and os.path.isdir(candidate)):
                    if not inside(root, candidate):
                        raise FileNotFoundError(f"{kind} '{name}' leads outside {root}; refused")
                    return candidate
        where = ", ".join(self._dirs(kind)) or "no folder configured"
        raise FileNotFoundError(f"no {kind} named '{name}' in {where}")

    def names(self, kind: str = "lora") -> List[str]:
        found = []
        for root in self._dirs(kind):
            for folder, dirs, files in os.walk(root):
                rel = os.path.relpath(folder, root)
                if kind == "model" and ("model_index.json" in files or "unet" in dirs):
                    found.append(rel.replace(os.sep, "/"))
                    dirs[:] = []
                    continue
                for f in files:
                    if f.endswith(".safetensors") and inside(root, os.path.join(folder, f)):
                        stem = f[:-len(".safetensors")]
                        found.append(stem if rel == "." else f"{rel}/{stem}".replace(os.sep, "/"))
        return sorted(set(found))

    def describe(self, kind: str, name: str) -> Dict:
        """What the API lists: name, path (relative to `base`), architecture (from the file's
        keys, shapes and metadata: headers only, nothing loaded), trigger words, or the file's
        error."""
        entry = self._describe(kind, name)
        for key in ("path", "error"):
            if entry[key]:
                entry[key] = self.scrub(entry[key])
        return entry

    def _describe(self, kind: str, name: str) -> Dict:
        entry: Dict = {"name": name, "kind": kind, "path": None, "architecture": None,
                       "trigger_words": [], "metadata": {}, "error": None}
        try:
            entry["path"] = path = self.find(kind, name)
        except (FileNotFoundError, BadName) as exc:
            entry["error"] = str(exc)
            return entry
        stamp = content_stamp(path)
        with self._lock:
            known = self._described.get((kind, path))
            if known is not None and known[0] == stamp and stamp is not None:
                self._described.move_to_end((kind, path))
                return dict(known[1], name=name)
        self._read_headers(kind, path, entry)
        with self._lock:
            self._described[(kind, path)] = (stamp, entry)
            while len(self._described) > DESCRIBED:
                self._described.popitem(last=False)
        return dict(entry)

    def short_hash(self, kind: str, name: str, what: FileHash = FileHash.TENSORS
                   ) -> Optional[str]:
        """The first 12 characters of the file's hash (files.content_hash), as the host's own
        Lora writes it in `Lora hashes`; kept until the file changes. None when it cannot be
        read (its tag's error says why)."""
        try:
            path = self.find(kind, name)
            stamp = content_stamp(path)
            with self._lock:
                known = self._hashes.get((path, what))
            if known is not None and stamp is not None and known[0] == stamp:
                return known[1]
            digest = content_hash(path, what)[:12]
        except (FileNotFoundError, BadName, NetworkFileError):
            return None
        with self._lock:
            self._hashes[(path, what)] = (stamp, digest)
            while len(self._hashes) > DESCRIBED:
                self._hashes.popitem(last=False)
        return digest

    def scrub(self, text: str) -> str:
        """`text` with every network folder named relative to `base`, or by its kind when
        outside it, never by its absolute path."""
        if self.base is None:
            return text
        folders = [(d, "Lora folder") for d in self.lora_dirs] + \
                  [(d, "checkpoint folder") for d in self.model_dirs]
        return scrub_paths(text, folders, self.base)

    @staticmethod
    def _read_headers(kind: str, path: str, entry: Dict) -> None:
        try:
            keys, shapes, meta = [], {}, {}
            for file, prefix in checkpoint_files(path) if kind == "model" else [(path, "")]:
                with open_safetensors(file) as f:
                    keys += [prefix + k for k in f.keys()]
                    shapes.update({prefix + k: f.shape(k) for k in f.keys()})
                    meta = meta or dict(f.metadata)
            entry["architecture"], _ = detect_architecture(keys, shapes.__getitem__,
                                                           base_architecture(meta))
            entry["metadata"] = describe_metadata(meta)
            entry["trigger_words"] = entry["metadata"]["trigger_words"]
        except NetworkFileError as exc:
            entry["error"] = str(exc)
