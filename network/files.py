"""Network and checkpoint files, read safely: .safetensors only, header checked before it is trusted.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (one entry per
tensor: dtype, shape, data_offsets relative to the data section; plus an optional
`__metadata__` table of strings), then the data section. The header is validated here with the
same rules safetensors applies, so that every damaged file is reported in words a WebUI user
understands instead of as a Rust error or a crash; tensors are then read on demand with plain
reads from the file opened once, never memory-mapped: a mapped file that shrinks kills the
process (SIGBUS), a short read is only an error for that file. Pickled files (.ckpt, .pt, ...)
are refused without being unpickled: unpickling runs code from the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
import threading
from enum import Enum
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# A bigger header or more tensors is a damaged or hostile file, not a network: an SDXL
# checkpoint has about 2,500 tensors and a 300 KB header (kohya's training metadata adds a few MB).
MAX_HEADER_BYTES = 16 * 2**20
MAX_TENSORS = 100_000
_U64_MAX = 2**64 - 1

# safetensors dtype name → (torch dtype, bytes per element): the ones torch can hold.
DTYPES: Dict[str, Tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}

# torch.save writes a zip archive (new format) or a bare pickle (legacy); both start like this.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGICS = tuple(bytes([0x80, proto]) for proto in (2, 3, 4, 5))
# A safetensors header is JSON, so its first byte is "{" or whitespace.
_JSON_START = (b"{", b" ", b"\t", b"\r", b"\n")


class NetworkFileError(ValueError):
    """A network or checkpoint file that cannot be used; `str()` names the file and the problem."""

    def __init__(self, path, problem: str):
        super().__init__(os.fspath(path), problem)
        self.path = os.fspath(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class _Tensor(NamedTuple):
    dtype_name: str
    shape: Tuple[int, ...]
    start: int  # offsets into the data section
    end: int


class SafeFile:
    """A .safetensors file opened once: the header is read and validated up front, tensors are
    read on demand into memory of their own. Reads go through the descriptor opened first, so a
    file replaced on disk (a new download moved over it) still reads as it was; one rewritten
    or truncated in place is an error for this file. Use `open_safetensors`."""

    def __init__(self, path: str, file, st: os.stat_result, data_start: int,
                 tensors: Dict[str, _Tensor], metadata: dict):
        self.path = path
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self.metadata = metadata
        self._tensors = tensors
        self._file = file
        self._data_start = data_start
        self._lock = threading.Lock()  # seek + read is one step

    def keys(self) -> List[str]:
        return sorted(self._tensors)

    def has(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._entry(key).dtype_name][0]

    def nbytes(self, key: Optional[str] = None) -> int:
        if key is not None:
            entry = self._entry(key)
            return entry.end - entry.start
        return sum(t.end - t.start for t in self._tensors.values())

    def get(self, key: str) -> torch.Tensor:
        entry = self._entry(key)
        dtype = DTYPES[entry.dtype_name][0]
        buf = bytearray(entry.end - entry.start)
        with self._lock:
            if self._file is None:
                raise NetworkFileError(self.path, "the file was already closed")
            self._check_unchanged()
            try:
                self._file.seek(self._data_start + entry.start)
                got = self._file.readinto(buf)
            except OSError as e:
                raise NetworkFileError(self.path, f"tensor {key!r} could not be read ({e.strerror})") from e
            self._check_unchanged()  # rewritten in place while it was read
        if got != len(buf):
            raise NetworkFileError(self.path, f"tensor {key!r}: the file ended after {got} of its "
                                   f"{len(buf)} bytes; it was truncated while NetWeave read it")
        if not buf:
            return torch.empty(entry.shape, dtype=dtype)
        t = torch.frombuffer(buf, dtype=torch.uint8)
        if entry.dtype_name == "BOOL" and int(t.max()) > 1:
            # torch assumes a bool byte is 0 or 1; anything else is corruption, not a value.
            raise NetworkFileError(self.path, f"tensor {key!r} is BOOL but holds bytes other than 0 and 1")
        return t.view(dtype).reshape(entry.shape)  # little-endian, as the hosts' CPUs are

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "SafeFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()

    def __repr__(self) -> str:
        return f"SafeFile({self.path!r}, {len(self._tensors)} tensors)"

    def _entry(self, key: str) -> _Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None

    def _check_unchanged(self) -> None:
        st = os.fstat(self._file.fileno())
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            raise NetworkFileError(self.path, "the file changed on disk after it was opened; "
                                   "it is read again at the next generation")


def open_safetensors(path) -> SafeFile:
    """Open and validate a .safetensors file; NetworkFileError for anything else or anything damaged."""
    path = os.fspath(path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        _stat_regular_file(path)
        raise NetworkFileError(path, _pickle_advice(path))
    file = _open_regular_file(path)
    try:
        st = os.fstat(file.fileno())
        header_len, header = _read_header(path, file, st.st_size)
        tensors, raw_metadata = _validate_header(path, header, st.st_size - 8 - header_len)
        return SafeFile(path, file, st, 8 + header_len, tensors, _parse_metadata(raw_metadata))
    except BaseException:
        file.close()
        raise


def _open_regular_file(path: str):
    """The file opened for reading, after checking it is a regular file (opened without
    blocking: a FIFO put in its place would wait forever)."""
    _stat_regular_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise NetworkFileError(path, f"the file cannot be opened ({e.strerror})") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped since the check above
        os.close(fd)
        raise NetworkFileError(path, "this is not a regular file")
    return os.fdopen(fd, "rb", buffering=0)


def _stat_regular_file(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NetworkFileError(path, "the file does not exist") from None
    except OSError as e:
        raise NetworkFileError(path, f"the file cannot be accessed ({e.strerror})") from e
    if stat.S_ISDIR(st.st_mode):
        raise NetworkFileError(path, "this is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        # A FIFO or device would block or never end when read.
        raise NetworkFileError(path, "this is not a regular file")
    return st


def _read_header(path: str, f, size: int) -> Tuple[int, bytes]:
    """The header length and the header bytes, after the checks that need only the first bytes."""
    try:
        head = f.read(9)
        if len(head) < 8:
            raise NetworkFileError(path, "the file is empty" if not head else
                                   f"the file is only {len(head)} bytes long, too short to be a safetensors file")
        if _looks_pickled(head):
            raise NetworkFileError(path, _pickle_advice(path))
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > MAX_HEADER_BYTES:
            raise NetworkFileError(path, f"the header claims to be {header_len} bytes long (the limit is "
                                   f"{MAX_HEADER_BYTES}); the file is damaged or not a safetensors file")
        if 8 + header_len > size:
            raise NetworkFileError(path, f"the header claims to be {header_len} bytes long but only {size - 8} "
                                   "bytes follow; the file is truncated (an interrupted download or copy?) "
                                   "or not a safetensors file")
        f.seek(8)
        header = f.read(header_len)
    except OSError as e:
        raise NetworkFileError(path, f"the file cannot be read ({e.strerror})") from e
    if len(header) != header_len:
        raise NetworkFileError(path, "the file was truncated while its header was read")
    return header_len, header


def _looks_pickled(head: bytes) -> bool:
    # A real safetensors header length can start with the same two bytes as a pickle
    # (640 = b"\x80\x02\0..."), so also require that no JSON header follows.
    magic = head.startswith(_ZIP_MAGIC) or head[:2] in _PICKLE_MAGICS
    return magic and head[8:9] not in _JSON_START


def _pickle_advice(path: str) -> str:
    out = os.path.splitext(path)[0] + ".safetensors"
    return (
        "this is a pickled PyTorch file (.ckpt/.pt/.pth/.bin). NetWeave reads only .safetensors, "
        "because loading a pickle can run any code hidden in it. If you trust where the file came "
        "from, convert it once with Python:\n"
        "    import torch, safetensors.torch\n"
        f"    sd = torch.load({path!r}, map_location='cpu', weights_only=True)\n"
        "    sd = sd.get('state_dict', sd)\n"
        "    safetensors.torch.save_file({k: v.contiguous().clone() for k, v in sd.items() "
        f"if isinstance(v, torch.Tensor)}}, {out!r})\n"
        "and use the .safetensors file instead."
    )


def _validate_header(path: str, header: bytes, data_len: int) -> Tuple[Dict[str, _Tensor], dict]:
    # every tensor has its data_offsets: a count of them refuses a hostile file before parsing
    _check_count(path, header.count(b'"data_offsets"'))
    doc = _parse_header_json(path, header)
    raw_metadata = doc.pop("__metadata__", None)
    if raw_metadata is None:
        raw_metadata = {}
    if not isinstance(raw_metadata, dict) or not all(isinstance(v, str) for v in raw_metadata.values()):
        raise NetworkFileError(path, "the header's __metadata__ is not a table of text values")
    _check_count(path, len(doc))
    tensors = {key: _validate_entry(path, key, entry, data_len) for key, entry in doc.items()}
    _check_layout(path, tensors, data_len)
    return tensors, raw_metadata


def _check_count(path: str, count: int) -> None:
    if count > MAX_TENSORS:
        raise NetworkFileError(path, f"the header lists {count} tensors (the limit is {MAX_TENSORS}); "
                               "the file is damaged or not a network")


def _parse_header_json(path: str, header: bytes) -> dict:
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        raise NetworkFileError(path, "the header is not UTF-8 text; the file is damaged or not a safetensors file") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise NetworkFileError(path, f"the header lists {_brief(e.args[0])} twice") from None
    except (ValueError, RecursionError) as e:
        raise NetworkFileError(path, f"the header is not valid JSON ({e}); the file is damaged or not a "
                               "safetensors file") from None
    if not isinstance(doc, dict):
        raise NetworkFileError(path, f"the header is a JSON {_json_kind(doc)}, not an object; the file is "
                               "damaged or not a safetensors file")
    try:  # JSON may escape a lone surrogate ("\\ud800"), which no UTF-8 text holds
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise NetworkFileError(path, "the header holds text that is not valid Unicode (a lone surrogate "
                               "escape); the file is damaged or not a safetensors file") from None
    return doc


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    # json keeps the last of two equal keys; safetensors does not, and neither should we.
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _json_kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _validate_entry(path: str, key: str, entry, data_len: int) -> _Tensor:
    def bad(problem: str) -> NetworkFileError:
        return NetworkFileError(path, f"tensor {key!r} {problem}")

    if not isinstance(entry, dict):
        raise bad("is not described by a JSON object in the header")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise bad(f"has no {field} in the header")
    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise bad(f"has dtype {_brief(dtype_name)}, which NetWeave cannot read (it reads {', '.join(DTYPES)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise bad(f"has shape {_brief(shape)}, which is not a list of non-negative whole numbers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise bad(f"has data_offsets {_brief(offsets)}, which is not a pair of non-negative whole numbers")
    start, end = offsets
    if end < start:
        raise bad(f"has data_offsets {offsets!r} that end before they start")
    span = end - start
    expected = _byte_size(shape, DTYPES[dtype_name][1], limit=max(span, data_len))
    if expected is None:
        raise bad(f"has shape {_brief(shape)} of {dtype_name}, far more data than its data_offsets "
                  f"{offsets} span ({span} bytes)")
    if span != expected:
        raise bad(f"should take {expected} bytes (shape {shape} of {dtype_name}) but its data_offsets "
                  f"{offsets} span {span} bytes")
    if end > data_len:
        raise bad(f"ends at byte {end} of the data but the file holds only {data_len} bytes of data; "
                  "the file is truncated (an interrupted download or copy?)")
    return _Tensor(dtype_name, tuple(shape), start, end)


def _byte_size(shape: List[int], itemsize: int, limit: int) -> Optional[int]:
    """Bytes a tensor of this shape takes, or None when that is over `limit` (stopping early, so a
    hostile shape of many huge numbers costs no time)."""
    if 0 in shape:
        return 0
    size = itemsize
    for dim in shape:
        size *= dim
        if size > limit:
            return None
    return size


def _brief(value, limit: int = 80) -> str:
    # Header values quoted in a message come from the file and may be huge.
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _is_u64(value) -> bool:
    return type(value) is int and 0 <= value <= _U64_MAX


def _check_layout(path: str, tensors: Dict[str, _Tensor], data_len: int) -> None:
    """Tensors must tile the data section exactly, as safetensors requires: no overlap, no gap,
    nothing after the last one."""
    position, previous = 0, None
    for key, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start < position:
            raise NetworkFileError(path, f"tensors {previous!r} and {key!r} overlap in the file")
        if t.start > position:
            raise NetworkFileError(path, f"there are {t.start - position} unused bytes before tensor {key!r}; "
                                   "the header does not match the data")
        position, previous = t.end, key
    if position != data_len:
        raise NetworkFileError(path, f"the file has {data_len - position} bytes after the last tensor; "
                               "the header does not match the data")


# ---- a diffusers folder's files, and what a path held when it was read --------------------

COMPONENTS = (("unet", "unet."), ("transformer", "transformer."), ("text_encoder", "text_encoder."),
              ("text_encoder_2", "text_encoder_2."))


def checkpoint_files(path: str) -> List[Tuple[str, str]]:
    """(file, key prefix) of a checkpoint: one single-file .safetensors, or a diffusers folder
    whose component files get their component's name in front of every key. Component folders
    and files that are symlinks leading out of the folder are refused."""
    if not os.path.isdir(path):
        return [(path, "")]
    found = []
    for folder, prefix in COMPONENTS:
        d = os.path.join(path, folder)
        if not os.path.isdir(d):
            continue
        _check_inside(path, d)
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))
        except OSError as e:
            raise NetworkFileError(d, f"the folder cannot be read ({e.strerror})") from e
        for n in names:
            _check_inside(path, os.path.join(d, n))
            found.append((os.path.join(d, n), prefix))
    if not found:
        raise NetworkFileError(path, "a diffusers folder needs unet/, transformer/ or text_encoder/ "
                                     ".safetensors files")
    return found


def _check_inside(root: str, path: str) -> None:
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise NetworkFileError(path, f"a symlink leading out of {root}; refused")


Stamp = Tuple[Tuple[str, int, int, int], ...]


def content_stamp(path: str) -> Optional[Stamp]:
    """(file, size, mtime_ns, inode) of every file a network or checkpoint at `path` is read
    from (each component file of a diffusers folder): it changes when any of them does. None
    when one cannot be found or stat'ed."""
    try:
        files = [f for f, _ in checkpoint_files(path)]
        stamps = [(f, st.st_size, st.st_mtime_ns, st.st_ino) for f, st in
                  ((f, os.stat(f)) for f in files)]
    except (OSError, NetworkFileError):
        return None
    return tuple(stamps)


class FileHash(str, Enum):
    """Which SHA-256 a host writes for a network in `Lora hashes` (its first 12 digits)."""

    TENSORS = "tensor data"  # a safetensors file's bytes after its header: A1111, SD.Next, Civitai's AutoV3
    WHOLE_FILE = "whole file"  # every byte of the file: Forge 2 (its hashes.py ignores addnet)


def content_hash(path: str, what: FileHash = FileHash.TENSORS) -> str:
    """SHA-256 (hex) of a network or checkpoint file; for a diffusers folder, the hash of its
    component files' hashes in order."""
    files = checkpoint_files(path)
    if len(files) > 1 or os.path.isdir(path):
        return hashlib.sha256("".join(content_hash(f, what) for f, _ in files)
                              .encode("ascii")).hexdigest()
    digest = hashlib.sha256()
    with _open_regular_file(path) as f:
        if what == FileHash.TENSORS:
            header_len, _ = _read_header(path, f, os.fstat(f.fileno()).st_size)
            f.seek(8 + header_len)
        try:
            for chunk in iter(lambda: f.read(2 ** 20), b""):
                digest.update(chunk)
        except OSError as e:
            raise NetworkFileError(path, f"the file cannot be read ({e.strerror})") from e
    return digest.hexdigest()


def _parse_metadata(raw: Dict[str, str]) -> dict:
    """`__metadata__` with string values that look like JSON parsed, as A1111 does; strings that
    do not parse stay strings."""
    return {key: _maybe_json(value) for key, value in raw.items()}


def _maybe_json(value: str):
    text = value.strip()
    if (text[:1], text[-1:]) not in (("{", "}"), ("[", "]")):
        return value
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return value


# ---- what the UI and API show about a file -------------------------------------------------

MAX_TRIGGER_WORDS = 20


def describe_metadata(metadata: dict) -> dict:
    """Trigger words, base model, network type, rank, alpha, title and training resolution from
    kohya (`ss_*`) and modelspec (`modelspec.*`) metadata; None where the file does not say."""
    return {
        "trigger_words": _trigger_words(metadata),
        "base_model": _first_text(metadata, "ss_sd_model_name", "ss_base_model_version")
        or _architecture_base(metadata),
        "network_type": _network_type(metadata),
        "rank": _as_int(metadata.get("ss_network_dim")),
        "alpha": _as_float(metadata.get("ss_network_alpha")),
        "title": _first_text(metadata, "modelspec.title", "ss_output_name"),
        "resolution": _resolution(metadata.get("modelspec.resolution") or metadata.get("ss_resolution")),
    }


def _trigger_words(metadata: dict) -> List[str]:
    """modelspec.trigger_phrase's comma-separated parts first, then the training tags by total
    count over all datasets (descending, ties by name); at most 20."""
    phrase = metadata.get("modelspec.trigger_phrase")
    words = [w.strip() for w in phrase.split(",")] if isinstance(phrase, str) else []
    counts = _tag_counts(metadata.get("ss_tag_frequency"))
    words += sorted(counts, key=lambda tag: (-counts[tag], tag))
    return list(dict.fromkeys(w for w in words if w))[:MAX_TRIGGER_WORDS]


def _tag_counts(frequency) -> Dict[str, float]:
    if isinstance(frequency, str):
        frequency = _maybe_json(frequency)
    counts: Dict[str, float] = {}
    if not isinstance(frequency, dict):
        return counts
    for tags in frequency.values():
        if not isinstance(tags, dict):
            continue
        for tag, count in tags.items():
            if isinstance(count, (int, float)) and not isinstance(count, bool):
                counts[tag.strip()] = counts.get(tag.strip(), 0) + count
    return counts


def base_architecture(metadata: dict) -> Optional[str]:
    """"sd1" | "sd2" | "sdxl" | "flux" | "chroma" from the metadata alone, or None when it does
    not say or names a model NetWeave does not handle (SD3, the SDXL refiner, ...)."""
    version = metadata.get("ss_base_model_version")
    if isinstance(version, str) and version.strip():
        return _arch_from_version(version.strip().lower())
    architecture = _architecture_base(metadata)
    if architecture:
        return _arch_from_modelspec(architecture.lower())
    v2 = metadata.get("ss_v2")
    if v2 in ("True", True):
        return "sd2"
    if v2 in ("False", False):
        return "sd1"
    return None


def _arch_from_version(version: str) -> Optional[str]:
    # kohya writes e.g. "sd_v1", "sd_v2", "sd_2.0", "sdxl_base_v1-0", "flux1", "chroma".
    if version.startswith(("flux1", "chroma")):
        return "flux" if version.startswith("flux1") else "chroma"
    if version.startswith("sdxl"):
        return None if "refiner" in version else "sdxl"
    m = re.match(r"sd[_-]?v?(\d)", version)
    return {"1": "sd1", "2": "sd2"}.get(m.group(1)) if m else None


def _arch_from_modelspec(architecture: str) -> Optional[str]:
    # modelspec names, e.g. "stable-diffusion-v1", "stable-diffusion-v2-768-v",
    # "stable-diffusion-xl-v1-base", "flux-1-dev", "flux-1-schnell", "chroma".
    if architecture.startswith(("flux-1", "chroma")):
        return "flux" if architecture.startswith("flux-1") else "chroma"
    if architecture.startswith("stable-diffusion-xl-v1-base"):
        return "sdxl"
    if architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    if architecture.startswith("stable-diffusion-v2"):
        return "sd2"
    return None


def _architecture_base(metadata: dict) -> Optional[str]:
    """modelspec.architecture before the "/" (which separates the model from the network kind)."""
    architecture = metadata.get("modelspec.architecture")
    if not isinstance(architecture, str):
        return None
    return architecture.split("/", 1)[0].strip() or None


def _network_type(metadata: dict) -> Optional[str]:
    module = metadata.get("ss_network_module")
    args = metadata.get("ss_network_args")
    args = _maybe_json(args) if isinstance(args, str) else args
    args = args if isinstance(args, dict) else {}
    if isinstance(module, str) and module.strip():
        module = module.strip().lower()
        if module.startswith("lycoris"):
            return str(args.get("algo") or "lora").strip().lower()  # LyCORIS' default algo is "lora"
        name = module.rsplit(".", 1)[-1]
        if name == "lora" and "conv_dim" in args:
            return "locon"  # kohya's LoRA with conv layers (LoRA-C3Lier)
        return {"locon_kohya": "locon"}.get(name, name)
    architecture = metadata.get("modelspec.architecture")
    if isinstance(architecture, str) and "/" in architecture:
        return architecture.split("/", 1)[1].strip().lower() or None
    return None


def _first_text(metadata: dict, *keys: str) -> Optional[str]:
    for key in keys:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip() and value.strip() != "None":
            return value.strip()
    return None


def _as_int(value) -> Optional[int]:
    number = _as_float(value)
    return int(number) if number is not None and number.is_integer() else None


def _as_float(value) -> Optional[float]:
    # kohya writes numbers as strings, and "None" or "Dynamic" when there is no single value.
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _resolution(value) -> Optional[str]:
    """"WxH" from kohya's "(512, 512)", a parsed [1024, 1024], or modelspec's "1024x1024"."""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    if not isinstance(value, str) or not value.strip():
        return None
    numbers = re.findall(r"\d+", value)
    if len(numbers) == 1:
        return f"{numbers[0]}x{numbers[0]}"
    if len(numbers) == 2:
        return f"{numbers[0]}x{numbers[1]}"
    return value.strip()
