"""Parsed networks kept between generations, bounded in bytes, least recently used evicted first.

An entry belongs to a file as it was on disk: it is keyed by the real path (symlinks resolved)
together with the size, mtime and inode of every file read from it (each component file of a
diffusers folder: files.content_stamp), so a file that was retrained or re-downloaded in place
is loaded again. A WebUI calls from several threads (the generation thread, the API, the UI), so
all bookkeeping happens under one lock, and two threads asking for the same file at once load it
once (the load itself runs outside the lock).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, Dict, NamedTuple, Optional, Tuple, TypeVar

from .files import Stamp, content_stamp

T = TypeVar("T")
_Stamp = Optional[Stamp]  # None when a file cannot be stat'ed


class _Entry(NamedTuple):
    stamp: Stamp
    value: object
    nbytes: int


class _Pending:
    """A load in progress that other threads wait for instead of loading the same file again."""

    def __init__(self):
        self._done = threading.Event()
        self._value = None
        self._error: Optional[BaseException] = None

    def finish(self, value=None, error: Optional[BaseException] = None) -> None:
        self._value, self._error = value, error
        self._done.set()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class NetworkCache:
    """Loaded files by (real path, content stamp), at most `max_bytes` in all as `size_of` counts."""

    def __init__(self, max_bytes: int):
        self._lock = threading.Lock()
        self._entries: "OrderedDict[str, _Entry]" = OrderedDict()  # real path → entry; oldest use first
        self._pending: Dict[Tuple[str, _Stamp], _Pending] = {}
        self._bytes = 0
        self._max_bytes = _check_max(max_bytes)
        self._stats = {"hits": 0, "misses": 0, "evictions": 0}
        # Bumped by clear(): a load that started before a clear must not refill the cache
        # with what it read from before the clear.
        self._generation = 0

    def get(self, path: str, load: Callable[[str], T], size_of: Callable[[T], int]) -> T:
        """The loaded file, from the cache if it is unchanged on disk, else `load(path)`,
        kept if `size_of(value)` fits. A load that raises caches nothing and re-raises (in every
        thread that was waiting for it)."""
        real = os.path.realpath(path)
        stamp = content_stamp(real)
        with self._lock:
            entry = self._entries.get(real)
            if entry is not None and entry.stamp == stamp:
                self._entries.move_to_end(real)
                self._stats["hits"] += 1
                return entry.value
            if entry is not None:
                self._remove(real)  # stale: free it before the new version is loaded
            key = (real, stamp)
            pending = self._pending.get(key)
            if pending is not None:  # another thread is loading this very file: wait for it
                self._stats["hits"] += 1
                waiting = True
            else:
                pending = self._pending[key] = _Pending()
                self._stats["misses"] += 1
                waiting, generation = False, self._generation
        if waiting:
            return pending.result()
        return self._load(path, key, generation, pending, load, size_of)

    def _load(self, path, key, generation, pending, load, size_of):
        real, stamp = key
        try:
            value = load(path)
            nbytes = size_of(value)
            if not isinstance(nbytes, int) or nbytes < 0:
                raise ValueError(f"size_of returned {nbytes!r}, not a byte count")
        except BaseException as e:
            with self._lock:
                del self._pending[key]
            pending.finish(error=e)
            raise
        # Keep it only if the file did not change while it was read: otherwise the value may
        # mix two versions, and it would be stored under a stamp it does not match.
        unchanged = stamp is not None and content_stamp(real) == stamp
        with self._lock:
            del self._pending[key]
            if unchanged and generation == self._generation:
                self._store(real, _Entry(stamp, value, nbytes))
        pending.finish(value)
        return value

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        with self._lock:
            self._max_bytes = _check_max(value)
            self._evict()

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._generation += 1

    # The helpers below run with the lock held.

    def _store(self, real: str, entry: _Entry) -> None:
        if real in self._entries:  # a load of another version finished first
            self._remove(real)
        if entry.nbytes > self._max_bytes:
            return  # returned to the caller, but keeping it would evict everything else
        self._entries[real] = entry
        self._bytes += entry.nbytes
        self._evict()

    def _evict(self) -> None:
        while self._bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            self._stats["evictions"] += 1

    def _remove(self, real: str) -> None:
        self._bytes -= self._entries.pop(real).nbytes


def _check_max(max_bytes: int) -> int:
    if not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a whole number of bytes ≥ 0, not {max_bytes!r}")
    return max_bytes
