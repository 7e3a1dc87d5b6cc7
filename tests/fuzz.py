"""Fuzzing at scale: the parser and plan compiler, the region compiler, the network-file loader
and the HTTP API, each with N random or mutated inputs. Each must answer with its documented
result or its documented error (a message that says what and where) — no other exception, no
hang (the slowest input is reported), no 500.

    .venv/bin/python tests/fuzz.py [parser|regions|files|api|all] [N] [SEED]

The tests (test_fuzz.py) run every fuzzer briefly; the notes give the numbers of a long run.
"""
import base64
import io
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))

from netweave.network.files import NetworkFileError  # noqa: E402
from netweave.network.keymap import KeyMap  # noqa: E402
from netweave.network.loader import load_network  # noqa: E402
from netweave.network.plan import CompileContext, Plan, compile_parsed  # noqa: E402
from netweave.network.regions import RegionError, RegionMaps, canvas_size  # noqa: E402
from netweave.parser import Diagnostic, Prompt, Tag, parse  # noqa: E402

SEEDS = [
    "<lora:pixel:te=0.1@0,0.6@0.5:unet=1:in=0:mid=1:out=0:region=mask1>",
    "<model:anime_v3:0.7> a cat", "<loractl:x:0@0~1@0.5;0@1:hr=1@0,0@1>",
    "<lora:n:1:lbw=1,0,R,U,X+0.2,X-1,0,0,0,0,0,0,0,0,0,0,0:x=0.5:step=5-10>",
    "(a:1.2) <lyco:sub/dir name:0.5:0.3:8> [a:b:0.5] AND c BREAK <lora:q:region=!(a+b)&left*0.5>",
    "<lora:n:start=0.25:stop=75%:interp=ease_in_out:neg=0:IN04=0.5:BASE=0:OUT11=0@1,1@30>",
    "<lora:n:0.8:te3=0@0,1@s0.5:t5=0.5:Clip=1:qwen3=0:QWENVL=2:umt5=1:hrte=0.2>",
]
ALPHABET = "<>:=@~,;%!&+*()-_. /\\\t\n\x00\x7féß0123456789abcdefXRUloramyctdeinpsuwx" \
           "LORAMODELYCOTBASEINOUT"
CONTEXTS = [CompileContext(arch="sd1", steps=20, hires_steps=5),
            CompileContext(arch="sdxl", steps=3, strict=True, masks=frozenset({"mask1"}))]


class Slowest:
    """The slowest input seen (a hang shows up here as seconds, not as a stuck run)."""

    def __init__(self):
        self.seconds, self.input = 0.0, None

    def time(self, fn, arg):
        t = time.perf_counter()
        out = fn(arg)
        dt = time.perf_counter() - t
        if dt > self.seconds:
            self.seconds, self.input = dt, arg
        return out


def mutate(rng, text, alphabet=ALPHABET, edits=5):
    chars = list(text)
    for _ in range(rng.randint(1, edits)):
        op = rng.random()
        i = rng.randint(0, len(chars))
        if op < 0.4:
            chars.insert(i, rng.choice(alphabet))
        elif op < 0.7 and chars:
            del chars[min(i, len(chars) - 1)]
        elif op < 0.85 and chars:
            j = rng.randint(0, len(chars))
            chars[i:i] = chars[min(i, j):max(i, j)][:20]
        elif chars:
            chars[min(i, len(chars) - 1)] = rng.choice(alphabet)
    return "".join(chars)


def random_unicode(rng, n):
    """Any code point but surrogates, weighted toward the ASCII the grammar cares about."""
    out = []
    for _ in range(n):
        r = rng.random()
        cp = rng.randint(32, 126) if r < 0.7 else rng.randint(0, 0x2FFF) if r < 0.95 else \
            rng.randint(0x10000, 0x10FFFF)
        out.append(chr(cp if not 0xD800 <= cp <= 0xDFFF else 0xFFFD))
    return "".join(out)


def check_prompt(prompt):
    parsed = parse(prompt)
    assert isinstance(parsed, Prompt) and isinstance(parsed.text, str)
    assert all(isinstance(t, Tag) for t in parsed.tags)
    for e in parsed.errors:
        assert isinstance(e, Diagnostic) and e.severity in ("error", "warning")
        assert 1 <= e.column <= len(prompt) + 1 and "^" in e.snippet and e.message
    for ctx in CONTEXTS:
        plan = compile_parsed(parsed, prompt, ctx)
        assert isinstance(plan, Plan)
        for n in plan.networks:
            assert all(len(v) == ctx.steps for v in n.base.strength.values())
    return parsed


def fuzz_parser(n, seed):
    rng = random.Random(seed)
    stats, slow = Counter(), Slowest()
    for i in range(n):
        kind = i % 4
        if kind == 0:
            prompt = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 80)))
        elif kind == 1:
            prompt = random_unicode(rng, rng.randint(0, 80))
        else:
            prompt = mutate(rng, " ".join(rng.sample(SEEDS, rng.randint(1, 3))))
        parsed = slow.time(check_prompt, prompt)
        stats["tags"] += len(parsed.tags)
        stats["problems"] += len(parsed.errors)
    stats["inputs"] = n
    return dict(stats, slowest_ms=round(slow.seconds * 1000, 2), slowest_input=slow.input)


# ---- regions ---------------------------------------------------------------------------

ATOMS = ["left", "right", "top", "bottom", "full", "rest", "mask1", "soft", "odd", "missing",
         "LEFT"]
REGION_ALPHABET = "()!&+*.0123456789 leftrightmask1"


def random_region(rng, depth=0):
    r = rng.random()
    if depth > 4 or r < 0.35:
        node = rng.choice(ATOMS)
    elif r < 0.55:
        node = "!(" + random_region(rng, depth + 1) + ")"
    elif r < 0.8:
        node = (rng.choice("+&")).join(random_region(rng, depth + 1)
                                       for _ in range(rng.randint(2, 4)))
        node = "(" + node + ")" if rng.random() < 0.5 else node
    else:
        node = "(" + random_region(rng, depth + 1) + ")*" + rng.choice(["0", "0.5", "2", "1e3", ".25"])
    return node


def user_masks(rng):
    """Masks as a user stores them: any size, soft or hard, one of them very thin."""
    return {"mask1": (rng.random((rng.integers(1, 90), rng.integers(1, 90))) > 0.5).astype(np.float32),
            "soft": rng.random((rng.integers(1, 40), rng.integers(1, 40))).astype(np.float32),
            "odd": np.ones((1, rng.integers(1, 500)), np.float32)}


def fuzz_regions(n, seed):
    """Region expressions (generated and mutated) compiled to maps on random latent sizes and
    resampled to every layer grid: values stay in [0, 1] (or ≥ 0 when scaled up), shapes are
    right, and the only error is RegionError naming the mask."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    stats, slow = Counter(), Slowest()
    for i in range(n):
        expr = random_region(rng)
        if i % 3 == 0:
            expr = mutate(rng, expr, REGION_ALPHABET, 3)
        plan = compile_parsed(parse(f"<lora:x:region={expr}>"), "", CONTEXTS[0])
        if not plan.networks or plan.networks[0].region is None:
            stats["refused by the parser"] += 1
            continue
        latent = (rng.randint(1, 24), rng.randint(1, 24))
        maps = RegionMaps(latent)
        try:
            slow.time(lambda r: maps.add("k", r, user_masks(nrng)), plan.networks[0].region)
        except RegionError as exc:
            assert str(exc).startswith("no mask named '"), (expr, exc)
            stats["missing mask"] += 1
            continue
        canvas = maps.canvas("k")
        assert canvas.shape == canvas_size(latent) and canvas.dtype == np.float32
        assert np.isfinite(canvas).all() and canvas.min() >= 0, expr
        if "*" not in expr:
            assert canvas.max() <= 1, expr
        h, w = latent
        for shape in ((h, w), (-(-h // 2), -(-w // 2)), (-(-h // 4), -(-w // 4))):
            grid = maps.on_grid("k", shape, "cpu")
            values = grid.values.reshape(-1)
            assert values.numel() == shape[0] * shape[1] and torch.isfinite(values).all()
        stats["compiled"] += 1
    stats["inputs"] = n
    return dict(stats, slowest_ms=round(slow.seconds * 1000, 2))


# ---- network files ----------------------------------------------------------------------

def _tiny_trees():
    from tinymodels import diffusers_trees
    return diffusers_trees("sd1")


def _damage(rng, raw: bytes) -> bytes:
    """One of: flipped bits anywhere, a cut, a header with a field changed (shape, dtype,
    offsets, length), NaN/Inf written into a tensor, or junk appended."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    body = bytearray(raw[8 + n:])
    how = rng.choice(["bits", "cut", "shape", "dtype", "offsets", "length", "nan", "junk", "meta",
                      "huge", "absurd", "empty", "surrogate"])
    if how == "bits":
        out = bytearray(raw)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return how, bytes(out)
    if how == "cut":
        return how, raw[:rng.randrange(len(raw))]
    if how == "length":
        return how, rng.choice([0, 7, n - 1, n + 1, 2**40, 2**64 - 1]).to_bytes(8, "little") + raw[8:]
    if how == "junk":
        return how, raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if how == "huge":  # a header of a hundred thousand entries, or one claiming 17 MiB
        if rng.random() < 0.5:
            return how, (17 * 2 ** 20).to_bytes(8, "little") + raw[8:]
        entry = b'"t%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'
        text = b"{" + b",".join(entry % i for i in range(100_001)) + b"}"
        return how, len(text).to_bytes(8, "little") + text
    keys = [k for k in header if k != "__metadata__"
            and (how != "nan" or header[k]["dtype"] in ("F16", "F32"))]
    key = rng.choice(keys)
    entry = header[key]
    if how == "shape":
        entry["shape"] = rng.choice([[], [0], [1, 1], list(reversed(entry["shape"])),
                                     [d * 2 for d in entry["shape"]], [10**12], [-1, 3]])
    elif how == "dtype":
        entry["dtype"] = rng.choice(["F64", "I8", "BOOL", "U8", "F8_E4M3", "Q4", "", 7])
    elif how == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 2], [a - 2, b], [0, len(body) + 10],
                                            [a, a], ["x", b]])
    elif how == "meta":
        header["__metadata__"] = rng.choice([{"ss_network_dim": "NaN"}, {"a": 1}, [],
                                             {"ss_network_alpha": "1e400"}, "meta"])
    elif how == "surrogate":
        header["__metadata__"] = {"ss_output_name": "\ud800"}
    elif how in ("absurd", "empty") and entry["dtype"] in ("F16", "F32"):
        a, b = entry["data_offsets"]
        if how == "empty":  # rank 0: no data at all (the tensors after it move up)
            entry["shape"] = [0] + entry["shape"][1:]
            del body[a:b]
            for other in header.values():
                if isinstance(other, dict) and "data_offsets" in other and other["data_offsets"][0] >= b:
                    other["data_offsets"] = [o - (b - a) for o in other["data_offsets"]]
            entry["data_offsets"] = [a, a]
        elif b > a:
            dtype = np.float16 if entry["dtype"] == "F16" else np.float32
            body[a:a + np.dtype(dtype).itemsize] = np.array([6e4], dtype).tobytes()
    elif how == "nan":
        a, b = entry["data_offsets"]
        if b > a:
            bad = np.array([rng.choice([np.nan, np.inf, -np.inf])],
                           np.float16 if entry["dtype"] == "F16" else np.float32).tobytes()
            at = a + rng.randrange(0, (b - a) // len(bad)) * len(bad)
            body[at:at + len(bad)] = bad
    text = json.dumps(header).encode()
    return how, len(text).to_bytes(8, "little") + text + bytes(body)


def fuzz_files(n, seed):
    """Damaged network files of several formats through the whole load path (header checks,
    tensor reads, algorithm detection, shapes against the model): a loaded network, or a
    NetworkFileError that names the file."""
    from netweave.devtools.synthetic import write_network

    rng = random.Random(seed)
    trees = _tiny_trees()
    keymap = KeyMap(trees)
    stats, slow = Counter(), Slowest()
    with tempfile.TemporaryDirectory() as d:
        originals = []
        for fmt in ("lora", "loha", "lokr", "full", "ia3"):
            path = os.path.join(d, fmt + ".safetensors")
            write_network(path, trees, fmt, "kohya", "sd1", components=("unet", "te1"), seed=1,
                          select=lambda t, r=random.Random(fmt): r.random() < 0.2)
            with open(path, "rb") as f:
                originals.append(f.read())
        path = os.path.join(d, "damaged.safetensors")
        for _ in range(n):
            how, raw = _damage(rng, rng.choice(originals))
            with open(path, "wb") as f:
                f.write(raw)
            try:
                slow.time(lambda p: load_network(p, keymap, "sd1"), path)
                stats[f"{how}: loaded"] += 1
            except NetworkFileError as exc:
                assert path in str(exc), exc
                stats[f"{how}: refused"] += 1
    stats["inputs"] = n
    return dict(sorted(stats.items()), slowest_ms=round(slow.seconds * 1000, 2))


# ---- HTTP API ---------------------------------------------------------------------------

def random_json(rng, depth=0):
    r = rng.random()
    if depth > 2 or r < 0.5:
        return rng.choice([None, True, False, 0, -1, 2**63, 1.5, -1e308, "", "x" * rng.randint(0, 300),
                           random_unicode(rng, 8), "<lora:demo_style:1>", "NaN"])
    if r < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_unicode(rng, rng.randint(0, 6)): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


NAMES = ["m", "..", "a..b", "%2e%2e", "a b", "x" * 300, "名前", "a.png", "-", "_", "con", "a\tb",
         "mask1", "nul%00x", "%2F", "a%2Fb"]
FIELDS = {
    "prompt": ["a fox", "", "<lora:demo_style:1:region=left>", "<lora:", "x" * 100_001, 3, None],
    "negative_prompt": ["", "<lora:demo_texture:0.5>", ["a"]],
    "steps": [1, 2, 0, -1, 501, 10**12, "2", None, 1.5],
    "cfg_scale": [7, 0, -1, 101, "NaN", None],
    "seed": [1, -1, 2**63, "s"],
    "width": [64, 63, 0, -8, 8, 10**12, "x", None, 4104],
    "height": [64, 56, 0, 1.5, 4104],
    "batch_size": [1, 0, 17, -1, None],
    "n_iter": [1, 0, 101, 10**9, None],
    "send_images": [True, False, "yes"],
    "alwayson_scripts": [{}, {"NetWeave": {"args": []}}, {"netweave": {"args": [{"masks": {"m": "%%%"}}]}},
                         {"NetWeave": {"args": "x"}}, {"NetWeave": None}, [],
                         {"NetWeave": {"args": [{"masks": {"..": ""}}]}}],
}


def _alwayson(rng):
    """alwayson_scripts of any shape around NetWeave's [flag, {"masks": {name: base64}}]."""
    masks = {rng.choice(NAMES): rng.choice([random_json(rng), "%%%", ""])
             for _ in range(rng.randint(0, 2))}
    arg = rng.choice([{"masks": masks}, {"masks": random_json(rng)}, random_json(rng)])
    args = rng.choice([[arg], [True, arg], [False, arg, arg], random_json(rng)])
    return {rng.choice(["NetWeave", "netweave", "other"]):
            rng.choice([{"args": args}, args, random_json(rng)])}


def _raw_json(rng, body) -> bytes:
    """The body as JSON text with one value made non-finite or one text an invalid surrogate."""
    text = json.dumps(body)
    bad = rng.choice(["NaN", "Infinity", "-Infinity", '"\\ud800"', '"a\\udfffb"', "1e999"])
    key = rng.choice(list(body))
    return text.replace(json.dumps(key) + ": " + json.dumps(body[key]), json.dumps(key) + ": " + bad,
                        1).encode()


def _image_bytes(rng):
    from PIL import Image

    kind = rng.choice(["png", "jpeg", "rgba", "16bit", "1bit", "junk", "empty", "gif", "cut"])
    if kind == "junk":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    if kind == "empty":
        return b""
    mode = {"rgba": "RGBA", "16bit": "I;16", "1bit": "1"}.get(kind, "L")
    img = Image.new(mode, (rng.randint(1, 64), rng.randint(1, 64)))
    buf = io.BytesIO()
    img.save(buf, format={"jpeg": "JPEG", "gif": "GIF"}.get(kind, "PNG"))
    data = buf.getvalue()
    return data[:len(data) // 2] if kind == "cut" else data


def _request(rng):
    """(method, path, kwargs for the test client) of one random request."""
    r = rng.random()
    name = rng.choice(NAMES) if rng.random() < 0.8 else random_unicode(rng, rng.randint(1, 20))
    quoted = "".join(c if c.isalnum() or c in "-_.%" else f"%{ord(c):02X}" if ord(c) < 128
                     else c for c in name)
    if r < 0.35:
        body = {k: rng.choice(v) for k, v in FIELDS.items() if rng.random() < 0.5}
        body.setdefault("steps", 1)
        body.setdefault("width", 64)
        body.setdefault("height", 64)
        if rng.random() < 0.15:
            junk = random_json(rng)
            if isinstance(junk, dict):  # A1111's defaults would draw 512² for 20 steps: minutes
                junk.update(steps=1, width=64, height=64)
            return "POST", "/sdapi/v1/txt2img", {"json": junk}
        if rng.random() < 0.05:
            return "POST", "/sdapi/v1/txt2img", {"content": bytes(rng.randrange(256) for _ in range(20)),
                                                 "headers": {"content-type": "application/json"}}
        if rng.random() < 0.3:
            body["alwayson_scripts"] = _alwayson(rng)
        if rng.random() < 0.15:
            return "POST", "/sdapi/v1/txt2img", {"content": _raw_json(rng, body),
                                                 "headers": {"content-type": "application/json"}}
        return "POST", "/sdapi/v1/txt2img", {"json": body}
    if r < 0.55:
        body = {"prompt": mutate(rng, rng.choice(SEEDS)), "steps": rng.choice([20, 0, 501, "x"]),
                "hires_steps": rng.choice([None, 5, 0]), "arch": rng.choice([None, "sd1", "sdxl", "x", 3]),
                "strict": rng.choice([True, False, "maybe"])}
        if rng.random() < 0.3:
            body = random_json(rng)
        return "POST", "/netweave/v1/parse", {"json": body}
    if r < 0.75:
        data = _image_bytes(rng)
        if rng.random() < 0.3:
            return "PUT", f"/netweave/v1/masks/{quoted}", {
                "json": rng.choice([{"image": base64.b64encode(data).decode()}, {"image": 3}, [],
                                    {"img": ""}, {"image": "%%%"}])}
        return "PUT", f"/netweave/v1/masks/{quoted}", {"content": data}
    return rng.choice([("GET", f"/netweave/v1/masks/{quoted}", {}),
                       ("DELETE", f"/netweave/v1/masks/{quoted}", {}),
                       ("GET", "/netweave/v1/masks", {}), ("GET", "/netweave/v1/networks", {}),
                       ("GET", "/netweave/v1/vocabulary", {}), ("GET", "/sdapi/v1/loras", {}),
                       ("GET", "/sdapi/v1/progress", {}),
                       ("POST", "/sdapi/v1/interrupt", {"json": random_json(rng)}),
                       ("GET", f"/netweave/v1/{quoted}", {})])


class ApiTarget:
    """The standalone app on the tiny model, and the check every response must pass: never a
    500, every 4xx with a message. `finish()` checks what must hold afterwards: the mask folder
    holds only safe names and the model is untouched."""

    def __init__(self, root):
        from fastapi.testclient import TestClient
        from helpers import standalone_host
        from soak import snapshot

        from netweave.extension.standalone.server import build_app

        host, library, self.masks = standalone_host(root)
        self.trees = host.model.trees()
        self.before = snapshot(self.trees)
        self.client = TestClient(build_app(host, library, self.masks, ui=False),
                                 raise_server_exceptions=False)

    def send(self, method, path, kw) -> str:
        resp = self.client.request(method, path, **kw)
        assert resp.status_code < 500, (method, path, kw, resp.status_code, resp.text[:300])
        if resp.status_code >= 400:
            assert resp.json().get("detail"), (method, path, resp.text[:300])
        return f"{method} {path.split('/')[3] if path.count('/') > 2 else path}: {resp.status_code}"

    def finish(self):
        from soak import same

        from netweave.extension.masks import check_mask_name

        for name in os.listdir(self.masks.folder):
            check_mask_name(name[:-len(".png")])
        assert same(self.trees, self.before), "weights changed"


def fuzz_api(n, seed, root=None):
    """`n` random requests against every route (see ApiTarget)."""
    import pathlib

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as d:
        target = ApiTarget(pathlib.Path(root or d))
        stats, slow = Counter(), Slowest()
        for _ in range(n):
            stats[slow.time(lambda a: target.send(*a), _request(rng))] += 1
        target.finish()
    stats["inputs"] = n
    slowest = slow.input[:2] if slow.input else None
    return dict(sorted(stats.items()), slowest_ms=round(slow.seconds * 1000, 2),
                slowest_request=slowest)


FUZZERS = {"parser": fuzz_parser, "regions": fuzz_regions, "files": fuzz_files, "api": fuzz_api}

if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    for name in FUZZERS if which == "all" else [which]:
        started = time.time()
        result = FUZZERS[name](count, seed)
        print(f"{name}: {json.dumps(result, default=str)} ({time.time() - started:.0f} s)", flush=True)
