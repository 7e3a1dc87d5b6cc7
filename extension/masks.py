"""The mask store: grayscale PNG files in a folder the user can see, one per name.

A mask is a map in [0, 1] (white = inside). Uploads are PNG, JPEG, WebP, BMP, TIFF or GIF (formats
PIL decodes itself: never one it hands to an external program) as bytes or base64; they are
checked before anything is written: size in bytes and in pixels (no decompression bombs), a real
image, converted to 8-bit grayscale. Names follow parser/names.py (letters, digits, `_ . -`), so
a name can never leave the folder; symlinks in the folder are not followed. The store is a
read-only mapping name → PIL image for the engine (`Engine.masks`); a stored file that cannot be
read fails only the regions that use it (UnreadableMask is a RegionError).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import stat
import tempfile
import threading
import warnings
from typing import Callable, Dict, Iterator, Mapping, Optional, Union

from PIL import Image, UnidentifiedImageError

from ..network.region_error import RegionError
from ..parser import BUILTIN_REGIONS
from ..parser.names import mask_name_problem

MAX_BYTES = 16 * 2 ** 20
MAX_PIXELS = 4096 * 4096
RESERVED = frozenset(BUILTIN_REGIONS)
# PIL identifies a file by its content; these are the formats it decodes in-process.
PIXEL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")


class MaskError(ValueError):
    """A bad mask name or upload; the message says what and why."""


class UnreadableMask(MaskError, RegionError):
    """A file in the mask folder that cannot be read as a mask."""


def check_mask_name(name: str) -> str:
    problem = mask_name_problem(name)
    if problem:
        raise MaskError(problem)
    if name.lower() in RESERVED:
        raise MaskError(f"'{name}' is a built-in region; choose another name")
    return name


def decode_image(data, where: str = "mask") -> Image.Image:
    """Bytes, or base64 text (a data: URL prefix allowed), to an 8-bit grayscale image."""
    if not isinstance(data, (str, bytes, bytearray)):  # e.g. a number where JSON had base64
        raise MaskError(f"{where}: expected PNG bytes or base64 text, not {type(data).__name__}")
    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") else data
        if len(text) > MAX_BYTES * 4 // 3 + 4:
            raise MaskError(f"{where}: larger than {MAX_BYTES // 2 ** 20} MiB")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise MaskError(f"{where}: not valid base64") from None
    if len(data) > MAX_BYTES:
        raise MaskError(f"{where}: larger than {MAX_BYTES // 2 ** 20} MiB")
    try:
        with warnings.catch_warnings():  # PIL's bomb warning: the store's own limit is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=PIXEL_FORMATS)
        with img:
            if img.width * img.height > MAX_PIXELS:
                raise MaskError(f"{where}: {img.width}×{img.height} is more than "
                                f"{MAX_PIXELS} pixels")
            img.load()
            if img.mode in ("RGBA", "LA", "PA"):  # transparent = outside
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(bg, img)
            return img.convert("L")
    except MaskError:
        raise
    except UnidentifiedImageError:
        raise MaskError(f"{where}: not an image in one of {', '.join(PIXEL_FORMATS)}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MaskError(f"{where}: a broken image ({exc})") from None


def readable(masks: Mapping, names) -> Dict[str, Image.Image]:
    """name → image of those `names` whose masks read; an unreadable one is left out (the
    regions using it were already reported as their tags' errors)."""
    found = {}
    for name in names:
        try:
            found[name] = masks[name]
        except (KeyError, UnreadableMask):
            continue
    return found


def mask_hash(img: Image.Image) -> str:
    """Short content hash of a mask, for infotexts and listings."""
    return hashlib.sha256(img.convert("L").tobytes()).hexdigest()[:10]


class MaskStore(Mapping[str, Image.Image]):
    """`folder`: a path, or a function giving it (a setting the user may change at any time:
    the store follows it at the next call)."""

    def __init__(self, folder: Union[str, Callable[[], str]]):
        self._where = folder if callable(folder) else (lambda: folder)
        self._made: Optional[str] = None
        self._lock = threading.Lock()
        self.folder  # noqa: B018  (made now, so a bad path is said at start)

    @property
    def folder(self) -> str:
        folder = self._where()
        if folder != self._made:
            os.makedirs(folder, exist_ok=True)
            self._made = folder
        return folder

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, check_mask_name(name) + ".png")

    def __getitem__(self, name: str) -> Image.Image:
        try:
            path = self._path(name)
        except MaskError:
            raise KeyError(name) from None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise KeyError(name) from None
        except OSError as exc:  # a symlink (ELOOP), no permission, ...
            raise UnreadableMask(f"mask '{name}': its file cannot be opened ({exc.strerror}); "
                                 "symlinks in the mask folder are not followed") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnreadableMask(f"mask '{name}': its file is not a regular file")
            data = f.read(MAX_BYTES + 1)
        try:
            return decode_image(data, f"mask '{name}'")
        except MaskError as exc:
            raise UnreadableMask(str(exc)) from None

    def __contains__(self, name) -> bool:
        try:
            return os.path.lexists(self._path(name))
        except MaskError:
            return False

    def __iter__(self) -> Iterator[str]:
        with os.scandir(self.folder) as entries:
            names = [e.name[:-4] for e in entries if e.name.endswith(".png")
                     and e.is_file(follow_symlinks=False)]
        return iter(sorted(n for n in names if not mask_name_problem(n)))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def put(self, name: str, data) -> Image.Image:
        """Store an upload (bytes, base64 or a PIL image) as `name`; returns the stored image."""
        path = self._path(name)
        img = data.convert("L") if isinstance(data, Image.Image) else decode_image(data, f"mask '{name}'")
        with self._lock:
            fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=os.path.dirname(path))  # a new file: no link followed
            try:
                os.fchmod(fd, 0o644)  # as a plain write would leave it, not mkstemp's 0600
                with os.fdopen(fd, "wb") as f:
                    img.save(f, format="PNG")
                os.replace(tmp, path)  # a reader never sees half a file; a link there is replaced
            except BaseException:
                os.unlink(tmp)
                raise
        return img

    def delete(self, name: str) -> None:
        path = self._path(name)
        with self._lock:
            if not os.path.lexists(path):
                raise KeyError(name)
            os.remove(path)  # a symlink itself, never its target


class Overlay(Mapping[str, Image.Image]):
    """Inline masks of one request in front of the store."""

    def __init__(self, inline: Dict[str, Image.Image], store: Optional[Mapping] = None):
        self.inline, self.store = inline, store or {}

    def __getitem__(self, name):
        return self.inline[name] if name in self.inline else self.store[name]

    def __contains__(self, name) -> bool:
        return name in self.inline or name in self.store

    def __iter__(self):
        return iter(sorted(set(self.inline) | set(self.store)))

    def __len__(self):
        return len(set(self.inline) | set(self.store))
