"""Benchmark: loading an SD1.5-sized rank-32 LoRA (every linear and conv layer of the UNet and
text encoder, fp16), built by the fixture writer from the real SD1.5 shapes.

    .venv/bin/python tests/bench/bench_load.py [--rank 32] [--repeat 5]

Rows side by side: reading the header only, a first load (file bytes from the OS page cache,
every tensor read, checked for NaN, mapped and shape-checked), and a hit in NetworkCache.
"""
import argparse
import os
import statistics
import tempfile
import time

from netweave.network.cache import NetworkCache
from netweave.network.files import open_safetensors
from netweave.network.keymap import KeyMap
from netweave.network.loader import load_network
from netweave.network.reference import reference_trees
from netweave.devtools.synthetic import write_network


def median_ms(fn, repeat):
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    trees = reference_trees("sd1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sd15-rank32.safetensors")
        written = write_network(path, trees, "lora", "kohya", "sd1", rank=args.rank)
        size_mb = os.path.getsize(path) / 2 ** 20
        t = time.perf_counter()
        keymap = KeyMap(trees)
        keymap_ms = (time.perf_counter() - t) * 1e3
        cache = NetworkCache(max_bytes=2 ** 30)
        first = median_ms(lambda: load_network(path, keymap, "sd1"), args.repeat)
        cache.get(path, lambda p: load_network(p, keymap, "sd1"), lambda n: n.nbytes)
        hit = median_ms(lambda: cache.get(path, lambda p: load_network(p, keymap, "sd1"),
                                          lambda n: n.nbytes), args.repeat)
        header = median_ms(lambda: open_safetensors(path).close(), args.repeat)
    print(f"SD1.5 rank-{args.rank} LoRA: {len(written)} layers, {size_mb:.1f} MiB fp16; "
          f"median of {args.repeat}; key map for the model built once: {keymap_ms:.0f} ms")
    print(f"  {'header only':<22}{header:9.2f} ms")
    print(f"  {'load (not cached)':<22}{first:9.2f} ms")
    print(f"  {'load (cache hit)':<22}{hit:9.4f} ms   ({first / hit:,.0f}× faster)")


if __name__ == "__main__":
    main()
