"""NetworkCache: keyed by real path, size and mtime; bounded in bytes; one load per file even
when several threads ask at once. Files are real safetensors files."""
import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from netweave.network.cache import NetworkCache
from netweave.network.files import NetworkFileError, open_safetensors


class Loader:
    """Reads every tensor of a file, counting loads per path."""

    def __init__(self, delay=0.0):
        self.calls = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, path):
        with self.lock:
            self.calls.append(path)
        time.sleep(self.delay)
        with open_safetensors(path) as f:
            return {key: f.get(key) for key in f.keys()}


def size_of(tensors):
    return sum(t.numel() * t.element_size() for t in tensors.values())


def net(tmp_path, name, numel):
    """A file whose loaded size is 4·numel bytes."""
    path = tmp_path / f"{name}.safetensors"
    save_file({"w": torch.full((numel,), float(len(name)))}, str(path))
    return str(path)


def touch_later(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_hit_and_miss(tmp_path):
    a = net(tmp_path, "a", 10)
    cache, load = NetworkCache(1000), Loader()
    first = cache.get(a, load, size_of)
    assert cache.get(a, load, size_of) is first
    assert len(load.calls) == 1 and len(cache) == 1 and cache.bytes == 40
    assert cache.stats == {"hits": 1, "misses": 1, "evictions": 0}


def test_same_file_through_a_symlink_is_a_hit(tmp_path):
    a = net(tmp_path, "a", 10)
    link = tmp_path / "link.safetensors"
    link.symlink_to(a)
    cache, load = NetworkCache(1000), Loader()
    assert cache.get(a, load, size_of) is cache.get(str(link), load, size_of)
    assert len(load.calls) == 1


def test_changed_file_is_reloaded(tmp_path):
    a = net(tmp_path, "a", 10)
    cache, load = NetworkCache(1000), Loader()
    first = cache.get(a, load, size_of)
    touch_later(a)  # same bytes, newer mtime: retrained or copied over
    second = cache.get(a, load, size_of)
    assert second is not first and len(load.calls) == 2
    save_file({"w": torch.zeros(20)}, a)  # new size
    third = cache.get(a, load, size_of)
    assert torch.equal(third["w"], torch.zeros(20))
    assert len(cache) == 1 and cache.bytes == 80  # the stale versions are gone, not evicted later
    assert cache.stats == {"hits": 0, "misses": 3, "evictions": 0}


def test_least_recently_used_is_evicted_first(tmp_path):
    a, b, c = (net(tmp_path, n, 10) for n in "abc")
    cache, load = NetworkCache(100), Loader()
    cache.get(a, load, size_of)
    cache.get(b, load, size_of)
    cache.get(a, load, size_of)  # a is now the most recent
    cache.get(c, load, size_of)  # 120 > 100: b goes
    assert cache.bytes == 80 and cache.stats["evictions"] == 1
    cache.get(a, load, size_of)
    cache.get(c, load, size_of)
    assert load.calls == [a, b, c]
    cache.get(b, load, size_of)
    assert load.calls == [a, b, c, b]


def test_entry_larger_than_the_bound_is_returned_not_kept(tmp_path):
    small, big = net(tmp_path, "small", 10), net(tmp_path, "big", 100)
    cache, load = NetworkCache(100), Loader()
    cache.get(small, load, size_of)
    value = cache.get(big, load, size_of)
    assert value["w"].numel() == 100
    assert len(cache) == 1 and cache.bytes == 40 and cache.stats["evictions"] == 0  # small survives
    cache.get(big, load, size_of)
    assert load.calls.count(big) == 2


def test_failing_load_caches_nothing_and_reraises(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    cache, load = NetworkCache(1000), Loader()
    for _ in range(2):
        with pytest.raises(NetworkFileError, match="not valid JSON"):
            cache.get(str(path), load, size_of)
    assert len(load.calls) == 2 and len(cache) == 0 and cache.bytes == 0
    save_file({"w": torch.ones(3)}, str(path))  # fixed: now it loads and stays
    cache.get(str(path), load, size_of)
    cache.get(str(path), load, size_of)
    assert len(load.calls) == 3 and len(cache) == 1


def test_missing_file_is_reported_by_the_loader(tmp_path):
    cache = NetworkCache(1000)
    with pytest.raises(NetworkFileError, match="does not exist"):
        cache.get(str(tmp_path / "gone.safetensors"), Loader(), size_of)
    assert len(cache) == 0


def test_bad_size_of_caches_nothing(tmp_path):
    a = net(tmp_path, "a", 10)
    cache = NetworkCache(1000)
    with pytest.raises(ValueError, match="byte count"):
        cache.get(a, Loader(), lambda value: -1)
    assert len(cache) == 0


def test_lowering_max_bytes_evicts_at_once(tmp_path):
    paths = [net(tmp_path, n, 10) for n in "abcd"]
    cache, load = NetworkCache(1000), Loader()
    for p in paths:
        cache.get(p, load, size_of)
    cache.max_bytes = 85
    assert cache.max_bytes == 85 and len(cache) == 2 and cache.bytes == 80
    assert cache.stats["evictions"] == 2
    cache.get(paths[3], load, size_of)  # the newest two stayed
    cache.get(paths[2], load, size_of)
    assert len(load.calls) == 4
    cache.max_bytes = 0
    assert len(cache) == 0 and cache.bytes == 0
    with pytest.raises(ValueError):
        cache.max_bytes = -1
    with pytest.raises(ValueError):
        NetworkCache(1.5)


def test_clear_keeps_stats(tmp_path):
    a = net(tmp_path, "a", 10)
    cache, load = NetworkCache(1000), Loader()
    cache.get(a, load, size_of)
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0 and cache.stats["misses"] == 1
    cache.get(a, load, size_of)
    assert len(load.calls) == 2


def test_concurrent_gets_load_once_per_file(tmp_path):
    paths = [net(tmp_path, n, 10) for n in "ab"]
    cache, load = NetworkCache(1000), Loader(delay=0.2)
    start = threading.Barrier(16)
    results = [None] * 16

    def worker(i):
        start.wait()
        results[i] = cache.get(paths[i % 2], load, size_of)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(load.calls) == sorted(paths)
    for i, value in enumerate(results):
        assert value is results[i % 2]
    assert cache.stats == {"hits": 14, "misses": 2, "evictions": 0}


def test_concurrent_waiters_see_the_failure(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"")
    cache, load = NetworkCache(1000), Loader(delay=0.2)
    errors, start = [], threading.Barrier(4)

    def worker():
        start.wait()
        try:
            cache.get(str(path), load, size_of)
        except NetworkFileError as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4 and all("empty" in str(e) for e in errors)
    assert len(load.calls) == 1 and len(cache) == 0


def test_load_in_flight_during_clear_is_not_stored(tmp_path):
    a = net(tmp_path, "a", 10)
    cache, inside, release = NetworkCache(1000), threading.Event(), threading.Event()

    def slow_load(path):
        inside.set()
        release.wait()
        return Loader()(path)

    t = threading.Thread(target=cache.get, args=(a, slow_load, size_of))
    t.start()
    inside.wait()
    cache.clear()
    release.set()
    t.join()
    assert len(cache) == 0
