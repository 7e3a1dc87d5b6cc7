"""Soak: many generations on the tiny default model with random tag sets (every key, schedules,
regions, model blends, bad tags mixed in) and injected failures (a network file that vanishes,
files truncated in place while they load and while a blend reads them, an exception in a step
callback, an interrupt mid-step, interrupts from another thread, out-of-memory in a forward). After each
generation every parameter and buffer must be bit-identical to the pristine model once the
engine lets go, and memory must stay bounded.

    .venv/bin/python tests/soak.py [N] [SEED]      (the test runs a short one)
"""
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from helpers import standalone_host  # noqa: E402

from netweave.extension.standalone.host import Interrupted, Request  # noqa: E402

NAMES = ["demo_style", "demo_texture", "demo_style", "typo_name"]
REGIONS = ["left", "right", "top&!left", "rest", "half", "half*0.5+bottom", "nosuchmask", "!("]
KEYS = ["te={s}", "unet={s}", "te={s}:unet={s}", "in={v}:mid={v}:out={v}", "lbw=MIDD",
        "lbw=1,0,1,0,1,0,1,0,1,0,1,0,1,0,1,0,1", "start=0.3", "stop=0.6", "step=2-4",
        "interp=linear", "interp=cosine", "neg=0", "region={r}", "dyn=2", "OUT03={v}",
        "hr=0.5", "regio=left", "te=", "unet=abc"]


FAILURES = ("vanish", "callback", "interrupt", "oom", "rewrite", "interrupts")


class Failure(Exception):
    pass


def random_prompt(rng: random.Random) -> str:
    def value():
        return f"{rng.choice([0, 0.3, 0.5, 1, 1.2])}"

    def schedule():
        if rng.random() < 0.5:
            return value()
        return ",".join(f"{value()}@{p}" for p in sorted(rng.sample([0, 0.25, 0.5, 0.75, 1], 2)))
    tags = []
    for _ in range(rng.randint(0, 4)):
        kind = rng.choice(["lora", "lora", "lyco", "loractl", "model"])
        name = "demo_blend" if kind == "model" else rng.choice(NAMES)
        items = [schedule()] if rng.random() < 0.6 else []
        for key in rng.sample(KEYS, rng.randint(0, 3)):
            items.append(key.format(s=schedule(), v=value(), r=rng.choice(REGIONS)))
        tags.append(f"<{kind}:{name}{''.join(':' + i for i in items)}>")
    if rng.random() < 0.1:
        tags.append(rng.choice(["<lora:", "<lora:demo_style:1", "<>", "<lora::>", "<model:x:y:z>"]))
    return "a fox " + " ".join(tags)


def snapshot(trees):
    return {(c, k): v.detach().clone() for c, t in trees.items()
            for k, v in t.state_dict(keep_vars=True).items()}


def same(trees, before) -> bool:
    return all(torch.equal(v.detach(), before[c, k]) for c, t in trees.items()
               for k, v in t.state_dict(keep_vars=True).items())


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def interrupts(host, stop: threading.Event) -> None:
    while not stop.is_set():
        host.interrupt()
        time.sleep(0.005)


def soak(n: int = 1000, seed: int = 0) -> Counter:
    rng = random.Random(seed)
    root = __import__("pathlib").Path(tempfile.mkdtemp(prefix="netweave-soak-"))
    host, library, masks = standalone_host(root)
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    masks.put("half", Image.fromarray(half))
    trees = host.model.trees()
    pristine = snapshot(trees)
    engine = host.engine
    style = os.path.join(library.lora_dirs[0], "demo_style.safetensors")
    blend = os.path.join(library.model_dirs[0], "demo_blend", "unet",
                         "diffusion_pytorch_model.safetensors")
    counts: Counter = Counter()
    rss = []
    for i in range(n):
        prompt = random_prompt(rng)
        steps = rng.randint(1, 6)
        failure = FAILURES[i // 2 % len(FAILURES)] if i % 2 else None  # each one, in turn
        fail_at = rng.randrange(steps)
        moved = None
        hooks = []
        original = engine.set_step

        def set_step(k, phase="base", failure=failure, fail_at=fail_at):
            if k == fail_at and failure == "rewrite":  # a blend's layers are read from it now
                truncate(blend)
            original(k, phase)
            if k == fail_at and failure == "callback":
                raise Failure("an extension's step callback failed")
            if k == fail_at and failure == "interrupt":
                host.interrupt()
        engine.set_step = set_step
        if failure == "vanish":  # the file disappears between parse and load
            moved = os.path.join(library.lora_dirs[0], "demo_style.safetensors")
            os.rename(moved, moved + ".away")
        if failure == "rewrite":  # rewritten in place, as a trainer saving over it would
            kept = {path: open(path, "rb").read() for path in (style, blend)}
            truncate(style)
        if failure == "interrupts":  # another client stopping whatever runs, again and again
            stop = threading.Event()
            hooks.append(stop)
            threading.Thread(target=interrupts, args=(host, stop), daemon=True).start()
        if failure == "oom":
            module = rng.choice([m for m in trees["unet"].modules()
                                 if isinstance(m, torch.nn.Conv2d)])
            hooks.append(module.register_forward_hook(
                lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))))
        try:
            result = host.txt2img(Request(prompt, steps=steps, seed=i, width=64, height=64))
            counts["finished"] += 1
            counts["with tag problems"] += bool(result.errors)
            counts["run again after a file changed"] += any("run again" in e for e in result.errors)
        except Failure:
            counts["failed: callback exception"] += 1
        except Interrupted:
            counts["failed: interrupted"] += 1
        except torch.OutOfMemoryError:
            counts["failed: out of memory"] += 1
        finally:
            engine.set_step = original
            for h in hooks:
                h.set() if isinstance(h, threading.Event) else h.remove()
            if failure == "rewrite":
                for path, data in kept.items():
                    with open(path, "r+b") as f:
                        f.write(data)
            if moved:
                os.rename(moved + ".away", moved)
        if failure:
            counts[f"injected: {failure}"] += 1
        engine.deactivate()  # weights stay merged between generations; let go to compare
        if not same(trees, pristine):
            raise AssertionError(f"generation {i} ({prompt!r}, {failure}) left weights changed")
        counts["bit-exact after"] += 1
        if not (engine._slots or engine._units or any(
                m._forward_hooks or m._forward_pre_hooks for m in trees["unet"].modules())):
            counts["no hook left"] += 1
        rss.append(rss_mib())
        assert engine.cache.bytes <= engine.cache.max_bytes
    counts["rss first MiB"] = round(rss[min(len(rss) - 1, 20)])
    counts["rss last MiB"] = round(rss[-1])
    counts["cache MiB"] = round(engine.cache.bytes / 2 ** 20)
    return counts


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    result = soak(n, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    for key, value in sorted(result.items()):
        print(f"{key}: {value}")
