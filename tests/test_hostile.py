"""Hostile input against the standalone host, its files and its command line (issue 17): no
crash, no escape from the configured folders, no unbounded request, no 500. Real files, the
real FastAPI app on the tiny model; each test fails if its property is broken."""
import asyncio
import base64
import io
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from netweave.extension.standalone.cli import main
from netweave.extension.library import BadName, Library
from netweave.extension.standalone.limits import Limits
from netweave.extension.masks import MaskError, MaskStore, UnreadableMask
from netweave.extension.standalone.server import build_app, check_address
from netweave.network.cache import NetworkCache
from netweave.network.files import (MAX_HEADER_BYTES, NetworkFileError, checkpoint_files,
                                    content_stamp, open_safetensors)
from netweave.network.keymap import KeyMap
from netweave.network.loader import load_checkpoint, load_network
from netweave.parser.names import mask_name_problem, network_name_problem

from helpers import standalone_host


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    host, library, masks = standalone_host(root)
    return host, library, masks, root


@pytest.fixture(scope="module")
def client(setup):
    host, library, masks, _ = setup
    return TestClient(build_app(host, library, masks, ui=False))


def png_bytes(w=64, h=64) -> bytes:
    buf = io.BytesIO()
    a = np.zeros((h, w), np.uint8)
    a[:, : w // 2] = 255
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def lora_path(setup, name="demo_style"):
    return os.path.join(setup[1].lora_dirs[0], name + ".safetensors")


def variant(setup, name, change):
    """A copy of demo_style with `change(tensors)` applied, in the LoRA folder."""
    tensors = load_file(lora_path(setup))
    change(tensors)
    save_file(tensors, lora_path(setup, name))
    return name


def info(response):
    assert response.status_code == 200, response.text
    return json.loads(response.json()["info"])["netweave"]


def generate(client, prompt, **kw):
    return client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 2, "seed": 1,
                                                   "width": 64, "height": 64, **kw})


# ---- 1. files that change under us ----------------------------------------------------------
def test_a_file_truncated_after_opening_is_an_error_not_sigbus(setup, tmp_path):
    path = tmp_path / "net.safetensors"
    shutil.copy(lora_path(setup), path)
    f = open_safetensors(path)
    key = f.keys()[-1]
    with open(path, "r+b") as raw:  # in place: a memory map of it would now kill the process
        raw.truncate(100)
    with pytest.raises(NetworkFileError, match="changed on disk"):
        f.get(key)
    f.close()


def test_a_file_replaced_after_opening_still_reads_as_it_was(setup, tmp_path):
    path = tmp_path / "net.safetensors"
    shutil.copy(lora_path(setup), path)
    f = open_safetensors(path)
    key = f.keys()[0]
    before = f.get(key).clone()
    tmp = tmp_path / "new.safetensors"
    save_file({"x": torch.zeros(3)}, tmp)
    os.replace(tmp, path)  # how downloads and trainers write
    assert torch.equal(f.get(key), before)
    f.close()


def test_a_changed_component_file_is_read_again(setup):
    folder = os.path.join(setup[1].model_dirs[0], "demo_blend")
    stamp = content_stamp(folder)
    assert stamp and all(f.startswith(folder) for f, *_ in stamp)
    unet = checkpoint_files(folder)[0][0]
    cache, loads = NetworkCache(2 ** 30), []

    def load(p):
        loads.append(p)
        return p
    cache.get(folder, load, lambda v: 1)
    cache.get(folder, load, lambda v: 1)
    assert len(loads) == 1
    os.utime(unet, ns=(time.time_ns(), time.time_ns() + 10 ** 9))  # the component, not the folder
    cache.get(folder, load, lambda v: 1)
    assert len(loads) == 2


def test_a_checkpoint_truncated_mid_generation_fails_only_its_tag(setup, client, tmp_path):
    host, library = setup[0], setup[1]
    models = library.model_dirs[0]
    shutil.copytree(os.path.join(models, "demo_blend"), os.path.join(models, "shrinking"))
    unet = checkpoint_files(os.path.join(models, "shrinking"))[0][0]
    original = host.engine.set_step

    def set_step(k, phase="base"):  # the blend changes at step 2: its layers are read then
        if k == 1:
            with open(unet, "r+b") as raw:
                raw.truncate(os.path.getsize(unet) // 2)
        original(k, phase)
    host.engine.set_step = set_step
    try:
        r = generate(client, "a <model:shrinking:0@0,1@2> <lora:demo_style:0.5>", steps=4)
    finally:
        host.engine.set_step = original
    nw = info(r)
    assert len(r.json()["images"]) == 1
    assert any("shrinking" in e and "changed on disk" in e for e in nw["errors"]), nw["errors"]
    assert any("model:shrinking" in e and "truncated" in e for e in nw["errors"]), nw["errors"]


# ---- 2. nothing outside the configured folders ---------------------------------------------
def test_symlinks_in_a_model_folder_are_refused(setup, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(os.path.join(setup[1].model_dirs[0], "demo_blend"), outside)
    for linked in ("file", "folder"):
        model = tmp_path / f"m_{linked}"
        (model / "unet").mkdir(parents=True)
        if linked == "file":
            os.symlink(outside / "unet" / "diffusion_pytorch_model.safetensors",
                       model / "unet" / "diffusion_pytorch_model.safetensors")
        else:
            os.rmdir(model / "unet")
            os.symlink(outside / "unet", model / "unet")
        with pytest.raises(NetworkFileError, match="symlink leading out"):
            checkpoint_files(str(model))
        assert content_stamp(str(model)) is None


def test_symlinks_in_the_mask_folder_are_not_followed(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    store = MaskStore(str(tmp_path / "masks"))
    os.symlink(secret, tmp_path / "masks" / "leak.png")
    assert list(store) == []
    with pytest.raises(UnreadableMask, match="symlinks"):
        store["leak"]
    os.symlink(tmp_path / "elsewhere.png", tmp_path / "masks" / "plant.png")
    store.put("plant", png_bytes())  # replaces the link, writes nothing outside
    assert not (tmp_path / "elsewhere.png").exists()
    store.delete("leak")
    assert secret.exists()


def test_the_page_cannot_change_a_folder(setup):
    from netweave.extension.standalone.server import page
    from netweave.extension.settings import Settings
    blocks = page(setup[0], setup[1])
    labels = {getattr(b, "label", None) for b in blocks.blocks.values()}
    assert Settings.LABELS["enabled"] in labels
    assert not labels & {Settings.LABELS[f] for f in Settings.HOST_ONLY}
    from netweave.extension.standalone.sdapi import MAX_QUEUED
    assert blocks._queue.max_size == MAX_QUEUED  # the page's queue is bounded as the API's is


def test_api_auth_guards_everything_and_is_needed_beyond_loopback(setup):
    host, library, masks, _ = setup
    c = TestClient(build_app(host, library, masks, ui=False, auth=["ann:s3cret"]))
    for method, url in (("get", "/netweave/v1/masks"), ("post", "/sdapi/v1/interrupt"),
                        ("put", "/netweave/v1/masks/x")):
        assert getattr(c, method)(url).status_code == 401
    assert c.get("/netweave/v1/masks", auth=("ann", "wrong")).status_code == 401
    assert c.get("/netweave/v1/masks", auth=("ann", "s3cret")).status_code == 200
    check_address("127.0.0.1", [])
    check_address("::1", [])
    for address in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(ValueError, match="api-auth"):
            check_address(address, [])
    check_address("0.0.0.0", ["ann:s3cret"])
    assert main(["serve", "--listen"]) == 2
    assert main(["serve", "--host", "0.0.0.0", "--api-auth", "nopassword"]) == 2


# ---- 3. every request bounded before it costs anything -------------------------------------
def asgi_post(app, path, length, body_chunks=(), method="POST"):
    """A request through the ASGI interface; returns (status, body chunks the app pulled)."""
    pulled, sent = [], []
    chunks = list(body_chunks)

    async def receive():
        if chunks:
            chunk = chunks.pop(0)
            pulled.append(len(chunk))
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": headers, "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
             "root_path": ""}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], pulled, b"".join(m.get("body", b"") for m in sent)


def test_bodies_over_the_limit_are_refused_before_they_are_read(setup):
    host, library, masks, _ = setup
    app = build_app(host, library, masks, ui=False)
    t = time.perf_counter()
    status, pulled, body = asgi_post(app, "/sdapi/v1/txt2img", 300 * 2 ** 20,
                                     [b"x" * 2 ** 20] * 3)
    assert (status, pulled) == (413, [])  # from Content-Length: not one byte read
    assert b"Too Large" in body and time.perf_counter() - t < 1
    # no length given: refused while streaming, as soon as the limit is passed
    limit = host.limits.max_body_bytes
    status, pulled, _ = asgi_post(app, "/sdapi/v1/txt2img", None, [b" " * 2 ** 20] * 100)
    assert status == 413 and sum(pulled) <= limit + 2 ** 20 < 100 * 2 ** 20
    status, pulled, _ = asgi_post(app, "/netweave/v1/masks/big", 30 * 2 ** 20, [b"x"], "PUT")
    assert (status, pulled) == (413, [])  # a mask route's own, lower limit


def test_netweaves_routes_bound_a_body_on_a_webuis_older_fastapi(setup, monkeypatch):
    """The WebUIs' FastAPI (0.94–0.124) has no route max_body_size (SD.Next refused the
    argument: every /netweave/v1 route was missing there). Without it the mask route still
    refuses an oversized body: from its length unread, else once the stream passes it."""
    from fastapi import FastAPI

    from netweave.extension import api
    host, library, masks, _ = setup
    monkeypatch.setattr(api, "ROUTE_LIMIT", {})  # the router as a WebUI's FastAPI builds it
    app = FastAPI()
    app.include_router(api.netweave_router(masks, library, lambda: "sd1"))
    status, pulled, body = asgi_post(app, "/netweave/v1/masks/big", 30 * 2 ** 20, [b"x"], "PUT")
    assert (status, pulled) == (413, []) and b"limit" in body
    status, pulled, _ = asgi_post(app, "/netweave/v1/masks/big", None, [b" " * 2 ** 20] * 40,
                                  "PUT")
    assert status == 413 and sum(pulled) <= api.MASK_BODY + 2 ** 20 < 40 * 2 ** 20
    assert "big" not in masks


def test_unknown_fields_are_not_echoed(client):
    r = generate(client, "x", styles=["kept: A1111 knows it"], evil="<script>" * 100)
    assert r.status_code == 200
    params = r.json()["parameters"]
    assert "evil" not in params and params["styles"] == ["kept: A1111 knows it"]


def test_work_has_a_budget(setup, client):
    t = time.perf_counter()
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 500, "width": 4096,
                                               "height": 4096, "batch_size": 16, "n_iter": 100})
    assert r.status_code == 422 and "megapixel-steps" in r.text and "--max-work" in r.text
    assert time.perf_counter() - t < 1
    host = setup[0]
    saved = host.limits
    host.limits = Limits(max_work=0.02)  # 64×64 × 2 steps × 2 images = 0.016
    try:
        assert generate(client, "x", batch_size=2).status_code == 200
        assert generate(client, "x", batch_size=2, n_iter=2).status_code == 422
    finally:
        host.limits = saved


def test_an_interrupt_is_answered_at_once_with_forty_generations_queued(setup):
    host, library, masks, _ = setup
    done, answered = [], []
    with TestClient(build_app(host, library, masks, ui=False)) as c:
        def probe():
            t0 = time.perf_counter()
            answered.append(c.post("/sdapi/v1/interrupt").status_code)
            answered.append(c.get("/sdapi/v1/progress").status_code)
            answered.append(c.get("/netweave/v1/masks").status_code)
            answered.append(time.perf_counter() - t0)
        host.lock.acquire()  # the model is busy: every generation below waits
        try:
            threads = [threading.Thread(target=lambda: done.append(
                generate(c, "x", steps=1).status_code)) for _ in range(40)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            asking = threading.Thread(target=probe)
            asking.start()
            asking.join(5)  # queued behind the generations, it would wait for the lock
        finally:
            host.lock.release()
        for t in threads + [asking]:
            t.join(60)
    assert answered[:3] == [200, 200, 200] and answered[3] < 1.0, answered
    assert done.count(200) == 40


def test_absurd_headers_are_refused_quickly(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}")
    many = tmp_path / "many.safetensors"
    entry = '"t%d": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'
    header = ("{" + ",".join(entry % i for i in range(100_001)) + "}").encode()
    many.write_bytes(len(header).to_bytes(8, "little") + header)
    for path, words in ((huge, "the limit is"), (many, "100001 tensors")):
        t = time.perf_counter()
        with pytest.raises(NetworkFileError, match=words):
            open_safetensors(path)
        assert time.perf_counter() - t < 2


def test_network_listings_read_each_header_once_until_it_changes(setup, monkeypatch):
    import netweave.extension.library as lib_module
    library = Library(setup[1].lora_dirs, setup[1].model_dirs)
    opened = []
    real = lib_module.open_safetensors
    monkeypatch.setattr(lib_module, "open_safetensors", lambda p: opened.append(p) or real(p))
    first = library.describe("lora", "demo_style")
    assert library.describe("lora", "demo_style") == first and len(opened) == 1
    os.utime(lora_path(setup), ns=(time.time_ns(), time.time_ns() + 2 * 10 ** 9))
    library.describe("lora", "demo_style")
    assert len(opened) == 2


# ---- 4. bad networks skipped, never fatal, never merged --------------------------------------
@pytest.mark.parametrize("name, change, words", [
    ("rank0", lambda t: t.update({k: v[:0] for k, v in t.items() if "lora_down" in k}), "empty"),
    ("nan", lambda t: next(v for k, v in t.items() if "lora_up" in k).view(-1).__setitem__(0, float("nan")), "NaN"),
    ("huge", lambda t: next(v for k, v in t.items() if "lora_up" in k).mul_(1e6), "far beyond"),
])
def test_bad_networks_are_skipped_by_name_beside_good_ones(setup, client, name, change, words):
    variant(setup, name, change)
    nw = info(generate(client, f"a <lora:{name}:1> <lora:demo_style:0.5>"))
    bad = [e for e in nw["errors"] if f"lora:{name}" in e]
    assert bad and words in bad[0] and f"{name}.safetensors" in bad[0] and "tensor '" in bad[0]
    assert [n["name"] for n in nw["plan"]["networks"]] == [name, "demo_style"]


def test_a_checkpoint_with_nan_is_refused_naming_file_and_tensor(setup, client):
    models = setup[1].model_dirs[0]
    shutil.copytree(os.path.join(models, "demo_blend"), os.path.join(models, "poisoned"))
    unet = checkpoint_files(os.path.join(models, "poisoned"))[0][0]
    tensors = load_file(unet)
    key = next(k for k in tensors if k.endswith("proj_in.weight"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, unet)
    nw = info(generate(client, "a <model:poisoned:1>"))
    assert any("model:poisoned" in e and key in e and "infinite" in e for e in nw["errors"])
    host = setup[0]
    with pytest.raises(NetworkFileError, match=key):
        load_checkpoint(os.path.join(models, "poisoned"), KeyMap(host.model.trees()), "sd1")


# ---- 5. one bad mask file breaks nothing else ----------------------------------------------
def test_an_unreadable_mask_fails_only_its_tags(setup, client):
    masks = setup[2]
    masks.put("good", png_bytes())
    with open(os.path.join(masks.folder, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    listing = client.get("/netweave/v1/masks").json()["masks"]
    assert {m["name"] for m in listing} >= {"good", "broken"}
    assert "error" in next(m for m in listing if m["name"] == "broken")
    assert client.get("/netweave/v1/masks/broken").status_code == 409
    nw = info(generate(client, "a <lora:demo_style:region=broken> <lora:demo_texture:region=good>"))
    assert len(nw["errors"]) == 1 and "mask 'broken'" in nw["errors"][0], nw["errors"]
    os.remove(os.path.join(masks.folder, "broken.png"))


# ---- 6. each response its own plan and errors ------------------------------------------------
def test_each_response_carries_its_own_plan_and_errors(setup):
    host, library, masks, _ = setup
    got = {}
    with TestClient(build_app(host, library, masks, ui=False)) as c:
        def post(i):
            got[i] = info(generate(c, f"a <lora:demo_style:0.{i + 1}> <lora:missing{i}>", seed=i))
        host.lock.acquire()  # queue them all, then let them run back to back
        threads = [threading.Thread(target=post, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        host.lock.release()
        for t in threads:
            t.join(60)
    for i in range(6):
        assert got[i]["plan"]["networks"][0]["strength"]["unet"][0] == pytest.approx((i + 1) / 10)
        assert [e for e in got[i]["errors"] if "missing" in e][0].count(f"missing{i}") >= 1


# ---- 7. malformed input is a 4xx that says what and where ------------------------------------
MASK = base64.b64encode(png_bytes()).decode()


@pytest.mark.parametrize("raw, words", [
    ('{"prompt": "x", "cfg_scale": NaN}', "cfg_scale"),
    ('{"prompt": "x", "cfg_scale": Infinity}', "cfg_scale"),
    ('{"prompt": "x\\ud800"}', "Unicode"),
    ('{"prompt": "x", "comments": "\\udfff"}', "comments"),
    ('{"prompt": "x", "eta": NaN}', "eta"),
    ('{"prompt": "x", "seed": 18446744073709551616}', "seed"),
    ('{"prompt": "x", "seed": "abc"}', "seed"),
    ('{"prompt": "x", "width": [64]}', "width"),
    ('{"prompt": "x", "steps": 1e400}', "steps"),
    ('[1, 2]', "body"),
    ('{"prompt": "x", "alwayson_scripts": {"NetWeave": 5}}', "alwayson_scripts.NetWeave"),
    ('{"prompt": "x", "alwayson_scripts": {"NetWeave": {"args": 5}}}', "args must be a list"),
    ('{"prompt": "x", "alwayson_scripts": {"NetWeave": {"args": [[1]]}}}', "args[0]"),
    ('{"prompt": "x", "alwayson_scripts": {"NetWeave": {"args": [{"masks": 5}]}}}', "['masks']"),
    ('{"prompt": "x", "alwayson_scripts": {"NetWeave": {"args": [{"masks": {"m": 5}}]}}}', "['m']"),
    ('{"prompt": "x", "alwayson_scripts": {"NetWeave": {"args": [true, {"masks": {"m\\ud800": "%s"}}]}}}' % MASK, "Unicode"),
    ('{"prompt": "x", "alwayson_scripts": {"NetWeave": {"args": [{"masks": {"a/../b": "%s"}}]}}}' % MASK, "mask name"),
    ('{"prompt": "x", "alwayson_scripts": 7}', "alwayson_scripts"),
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", ""),
    ('{"prompt": "\xff\xfe"}', ""),
])
def test_malformed_txt2img_is_a_4xx_never_a_500(client, raw, words):
    data = raw.encode("utf-8", "surrogateescape") if "\xff" not in raw else b'{"prompt": "\xff\xfe"}'
    r = client.post("/sdapi/v1/txt2img", content=data, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert words in r.text, r.text[:300]


def test_malformed_input_on_netweave_routes_is_a_4xx(client):
    for method, url, kw in (
            ("post", "/netweave/v1/parse", {"content": b'{"prompt": "\\ud800"}'}),
            ("post", "/netweave/v1/parse", {"json": {"prompt": "x", "steps": 10 ** 6}}),
            ("post", "/netweave/v1/parse", {"json": {"prompt": "x", "arch": "sd9"}}),
            ("put", "/netweave/v1/masks/m", {"json": {"image": 5}}),
            ("put", "/netweave/v1/masks/a..b", {"content": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"}),
            ("get", "/netweave/v1/masks/..%2Fsecret", {}),
            ("delete", "/netweave/v1/masks/%00", {})):
        r = getattr(client, method)(url, headers={"content-type": "application/json"}
                                    if "content" in kw and b"{" in kw["content"] else None, **kw)
        assert 400 <= r.status_code < 500, (url, r.status_code, r.text[:200])


def test_mask_uploads_decode_pixels_only(tmp_path):
    store = MaskStore(str(tmp_path))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(MaskError, match="PNG, JPEG, WEBP"):
        store.put("m", eps)
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"):
        buf = io.BytesIO()
        Image.new("L", (8, 8), 255).save(buf, format=fmt)
        assert store.put("m", buf.getvalue()).size == (8, 8)


def test_one_rule_for_names():
    for bad in ("", "..", "a/../b", "/etc/x", "~/x", "C:/x", "a\x00b", "a\x1fb", "a//b", "x\ud800"):
        assert network_name_problem(bad), bad
        with pytest.raises(BadName):
            Library(["/nonexistent"]).find("lora", bad)
    for good in ("style/water color", "a.b", "ünï"):
        assert network_name_problem(good) is None
    for bad in ("", ".hidden", "-x", "a/b", "a b", "x" * 65, "x\ud800"):
        assert mask_name_problem(bad), bad
    for good in ("mask1", "a.b", "left_2", "x" * 64):
        assert mask_name_problem(good) is None


# ---- 8. the command line bounds what it is asked ----------------------------------------------
def test_the_cli_refuses_what_it_cannot_bound(tmp_path, capsys):
    binary = tmp_path / "presets.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    big = tmp_path / "big.txt"
    big.write_bytes(b"A:1\n" * 300_000)
    for args in (["explain", "x", "--steps", "1000000000"],
                 ["explain", "x", "--steps", "20", "--hires-steps", "99999999"],
                 ["explain", "x" * 100_001, "--steps", "20"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
    for presets in (binary, big, tmp_path, tmp_path / "missing.txt"):
        assert main(["explain", "x", "--steps", "20", "--presets", str(presets)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not UTF-8" in err and "larger than" in err
