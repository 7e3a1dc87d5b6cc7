"""The standalone host end to end on the tiny default model: the generate command, the
A1111-shaped API with every kind of tag, NetWeave's routes, serialized requests."""
import base64
import dataclasses
import io
import json
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from netweave.extension.standalone.cli import main
from netweave.extension.standalone.host import DiffusersHost
from netweave.extension.library import Library
from netweave.extension.masks import MaskStore
from netweave.extension.standalone.server import build_app

from helpers import standalone_host


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("standalone")
    return (*standalone_host(root), root)


@pytest.fixture(scope="module")
def client(setup):
    host, library, masks, _ = setup
    return TestClient(build_app(host, library, masks, ui=False))


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def left_half(w=64, h=64) -> bytes:
    a = np.zeros((h, w), np.uint8)
    a[:, : w // 2] = 255
    return png(a)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def spy_steps(host, target_key):
    """Record, at every step the engine is moved to, what acts on one layer."""
    engine = host.engine
    (target,) = engine.keymap.lookup(target_key)
    seen = []
    original = engine.set_step

    def set_step(k, phase="base"):
        original(k, phase)
        seen.append((k, engine.strengths(target)))
    engine.set_step = set_step
    return seen, lambda: setattr(engine, "set_step", original)


# ---- the A1111-shaped API -------------------------------------------------------------
def test_txt2img_with_every_kind_of_tag(setup, client):
    host = setup[0]
    prompt = ("a fox <lora:demo_style:te=0.2:unet=0@0,1@0.5:region=leftmask> "
              "<lora:demo_texture:0.7:in=0:mid=1:out=0.5> <model:demo_blend:0.5>")
    seen, undo = spy_steps(host, "lora_unet_up_blocks_1_attentions_0_proj_in")  # OUT03
    try:
        r = client.post("/sdapi/v1/txt2img", json={
            "prompt": prompt, "steps": 6, "seed": 5, "width": 64, "height": 64,
            "alwayson_scripts": {"NetWeave": {"args": [{"masks": {
                "leftmask": base64.b64encode(left_half()).decode()}}]}}})
    finally:
        undo()
    assert r.status_code == 200, r.text
    body = r.json()
    assert decode(body["images"][0]).size == (64, 64)
    info = json.loads(body["info"])
    assert info["netweave"]["errors"] == []
    nets = info["netweave"]["plan"]["networks"]
    assert [n["name"] for n in nets] == ["demo_style", "demo_texture", "demo_blend"]
    assert nets[0]["region"] == "leftmask"
    # the engine saw the plan, step by step: demo_style (0) off then on (a regional bypass),
    # demo_texture (1) at 0.7 × out 0.5, demo_blend (2) at 0.5, on an OUT block layer
    assert [k for k, _ in seen] == [0, 1, 2, 3, 4, 5]
    for k, now in seen:
        assert now.get(0, 0.0) == (0.0 if k < 3 else 1.0)
        assert now[1] == pytest.approx(0.35) and now[2] == pytest.approx(0.5)
    assert "NetWeave masks: \"leftmask:" in info["infotexts"][0]
    assert host.engine.runtime.maps.canvas(0)[:, :32].min() == 1.0


def test_block_weights_reach_only_their_blocks(setup, client):
    host = setup[0]
    seen, undo = spy_steps(host, "lora_unet_down_blocks_0_attentions_0_proj_in")  # IN01
    try:
        r = client.post("/sdapi/v1/txt2img", json={
            "prompt": "<lora:demo_texture:1:in=0>", "steps": 2, "width": 64, "height": 64})
    finally:
        undo()
    assert r.status_code == 200
    assert all(now == {} for _, now in seen)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_the_host_gives_its_pipelines_sigmas_so_noise_level_positions_land(setup, sampler):
    """start=s… between the second and third step's sigma: on from the third step, as the
    pipeline's own scheduler (after it set its timesteps) sees the noise fall."""
    from netweave.extension.standalone.host import Request
    from netweave.extension.standalone.samplers import Sampler, scheduler_for, step_sigmas

    host = setup[0]
    sigmas = step_sigmas(scheduler_for(Sampler(sampler), host.scheduler_config), 4)
    assert sigmas is not None and list(sigmas) == sorted(sigmas, reverse=True)
    between = (sigmas[1] + sigmas[2]) / 2
    seen, undo = spy_steps(host, "lora_unet_up_blocks_1_attentions_0_proj_in")  # OUT03
    try:
        result = host.txt2img(Request(prompt=f"a fox <lora:demo_texture:1:start=s{between:.6f}>",
                                      steps=4, seed=3, width=64, height=64,
                                      sampler=Sampler(sampler)))
    finally:
        undo()
    assert result.errors == []  # no "the host gave no sigmas"
    assert result.plan.sigmas == pytest.approx(sigmas)
    pipe_scheduler = host.model.pipe.scheduler
    if sampler == "Euler":  # the very values the pipeline sampled with
        assert [float(s) for s in pipe_scheduler.sigmas[:4]] == pytest.approx(sigmas)
    else:  # DDIM keeps ᾱ: sigma at each timestep it ran
        a = pipe_scheduler.alphas_cumprod[pipe_scheduler.timesteps.long()]
        assert [float(s) for s in ((1 - a) / a).sqrt()] == pytest.approx(sigmas)
    assert [now.get(0, 0.0) for _, now in seen] == [0.0, 0.0, 1.0, 1.0]


def test_an_a1111_client_request_round_trips(client):
    request = {"prompt": "a fox <lora:demo_style:0.8>", "negative_prompt": "blurry",
               "styles": [], "seed": 42, "subseed": -1, "sampler_name": "Euler",
               "batch_size": 2, "n_iter": 1, "steps": 3, "cfg_scale": 6.5, "width": 64,
               "height": 48, "restore_faces": False, "tiling": False, "override_settings": {},
               "script_args": [], "send_images": True, "save_images": False,
               "alwayson_scripts": {}}
    r = client.post("/sdapi/v1/txt2img", json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"}
    assert len(body["images"]) == 2 and decode(body["images"][1]).size == (64, 48)
    for key, value in request.items():
        assert body["parameters"][key] == value
    info = json.loads(body["info"])
    assert info["seed"] == 42 and info["all_seeds"] == [42, 43]
    assert info["infotexts"][0].startswith("a fox <lora:demo_style:0.8>\nNegative prompt: blurry\n")
    assert "Seed: 42" in info["infotexts"][0] and "Size: 64x48" in info["infotexts"][0]


def test_same_seed_same_image_and_tags_change_it(client):
    def image(prompt):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 3, "seed": 7,
                                                    "width": 64, "height": 64})
        return np.asarray(decode(r.json()["images"][0]), dtype=np.int16)
    plain = image("a fox")
    assert np.array_equal(plain, image("a fox"))
    assert np.array_equal(plain, image("a fox <model:demo_blend:0>"))  # strength 0 is the base
    assert not np.array_equal(plain, image("a fox <lora:demo_style:1>"))


def test_bad_tags_never_stop_a_generation(client):
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a fox <lora:nope:1> <lora:demo_style:0.5:regio=left> <lora:demo_style:abc>",
        "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 200
    errors = json.loads(r.json()["info"])["netweave"]["errors"]
    assert any("no lora named 'nope'" in e for e in errors)
    assert any("did you mean 'region'" in e for e in errors)
    assert len(r.json()["images"]) == 1


def test_the_infotext_has_hashes_and_never_a_server_folder(setup, client):
    """Issue 16 items 2 and 5: `Lora hashes` (A1111's: the file's tensor data, 12 digits) and
    NetWeave's model hashes in the infotext; folders relative, in every answer."""
    import hashlib
    host, library, masks, root = setup
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a fox <lora:demo_style:0.5> <model:demo_blend:0.3> <lora:nope:1>",
        "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 200
    data = open(library.find("lora", "demo_style"), "rb").read()
    n = int.from_bytes(data[:8], "little")
    style = hashlib.sha256(data[8 + n:]).hexdigest()[:12]
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert f'Lora hashes: "demo_style: {style}"' in text and 'NetWeave models: "demo_blend: ' in text
    assert "error: lora:nope: no lora named 'nope' in demo/" in text, text
    for answer in (r.text, client.get("/sdapi/v1/loras").text,
                   client.get("/netweave/v1/networks").text):
        assert str(root) not in answer


def test_a_network_that_only_partly_fits_says_so(setup, client):
    """A file with layers this model lacks acts on the layers it has, with a warning saying
    how many it left (the real WebUIs applied such a file silently)."""
    import os

    from safetensors.torch import load_file, save_file
    host, library, masks, root = setup
    tensors = load_file(library.find("lora", "demo_style"))
    tensors.update({"lora_unet_no_such_block_proj.lora_down.weight": torch.zeros(4, 8),
                    "lora_unet_no_such_block_proj.lora_up.weight": torch.zeros(8, 4),
                    "lora_unet_no_such_block_proj.alpha": torch.tensor(4.0)})
    path = os.path.join(library.lora_dirs[0], "demo_partly.safetensors")
    save_file(tensors, path)
    try:
        body = {"steps": 2, "width": 64, "height": 64, "seed": 3}
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox <lora:demo_partly:1>", **body})
        plain = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox", **body})
        full = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox <lora:demo_style:1>", **body})
    finally:
        os.remove(path)
    info = json.loads(r.json()["info"])
    assert any(e.startswith("warning: lora:demo_partly: 1 of its layers name no layer of this "
                            "model (first: lora_unet_no_such_block_proj)")
               for e in info["netweave"]["errors"]), info["netweave"]["errors"]
    assert r.json()["images"][0] == full.json()["images"][0] != plain.json()["images"][0]


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "width": 63}, "multiple of 8"),
    ({"prompt": "x", "steps": 0}, "steps must be"),
    ({"prompt": "x", "alwayson_scripts": {"netweave": {"args": [{"masks": {"m": "%%%"}}]}}},
     "not valid base64"),
    ({"prompt": "x", "alwayson_scripts": {"NetWeave": {"args": ["oops"]}}}, "args[0] must be"),
    ({"prompt": "x", "alwayson_scripts": {"NetWeave": {"args": [{"masks": {"../x": ""}}]}}},
     "not a valid mask name"),
    ({"prompt": ["not", "text"]}, "prompt"),
    ({"prompt": "x", "n_iter": 10**9}, "n_iter"),
])
def test_bad_requests_get_a_4xx_with_a_message(client, body, message):
    r = client.post("/sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64, **body})
    assert r.status_code == 422 and message in r.text


def test_loras_and_progress(client):
    loras = client.get("/sdapi/v1/loras").json()
    assert [x["name"] for x in loras] == ["demo_style", "demo_texture"]
    p = client.get("/sdapi/v1/progress").json()
    assert p["progress"] == 0.0 and p["state"]["job_count"] == 0


def test_requests_are_serialized_each_with_its_own_plan(setup, client):
    host = setup[0]
    inside, overlaps = [0], []
    original = host._generate

    def generate(req):
        inside[0] += 1
        overlaps.append(inside[0])
        try:
            return original(req)
        finally:
            inside[0] -= 1
    host._generate = generate
    results = {}

    def post(i, prompt):
        r = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 4, "seed": i,
                                                    "width": 64, "height": 64})
        results[i] = json.loads(r.json()["info"])["netweave"]["plan"]["networks"]
    prompts = ["<lora:demo_style:0.3>", "<lora:demo_texture:0.9:region=right>",
               "<model:demo_blend:0.2>", "plain"]
    try:
        threads = [threading.Thread(target=post, args=(i, p)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        host._generate = original
    assert max(overlaps) == 1  # never two generations at once
    assert [len(results[i]) for i in range(4)] == [1, 1, 1, 0]
    assert results[1][0]["region"] == "right" and results[2][0]["kind"] == "model"


# ---- NetWeave's own routes ---------------------------------------------------------------
def test_mask_routes(client):
    assert client.put("/netweave/v1/masks/half", content=left_half(),
                      headers={"content-type": "image/png"}).status_code == 200
    b64 = base64.b64encode(png(np.full((8, 8), 128))).decode()
    r = client.put("/netweave/v1/masks/grey", json={"image": b64})
    assert r.status_code == 200 and r.json()["width"] == 8
    names = [m["name"] for m in client.get("/netweave/v1/masks").json()["masks"]]
    assert {"half", "grey"} <= set(names)
    got = Image.open(io.BytesIO(client.get("/netweave/v1/masks/half").content))
    assert got.mode == "L" and got.getpixel((0, 0)) == 255 and got.getpixel((63, 0)) == 0
    assert client.delete("/netweave/v1/masks/grey").status_code == 200
    assert client.get("/netweave/v1/masks/grey").status_code == 404
    assert client.delete("/netweave/v1/masks/grey").status_code == 404
    for name, data, status in (("bad name!", left_half(), 400), ("left", left_half(), 400),
                               ("notimage", b"hello", 400)):
        r = client.put(f"/netweave/v1/masks/{name}", content=data)
        assert r.status_code == status and r.json()["detail"]
    r = client.put("/netweave/v1/masks/j", json={"picture": "x"})
    assert r.status_code == 400


def test_a_stored_mask_drives_a_region(client):
    client.put("/netweave/v1/masks/stored", content=left_half())
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "<lora:demo_style:1:region=stored>", "steps": 2, "width": 64, "height": 64})
    assert json.loads(r.json()["info"])["netweave"]["errors"] == []
    r = client.post("/sdapi/v1/txt2img", json={
        "prompt": "<lora:demo_style:1:region=missing>", "steps": 2, "width": 64, "height": 64})
    assert any("no mask named 'missing'" in e
               for e in json.loads(r.json()["info"])["netweave"]["errors"])


def test_parse_route(client):
    r = client.post("/netweave/v1/parse", json={
        "prompt": "a <lora:demo_style:0.5@0,1@0.5> <lora:demo_style:te=>", "steps": 4})
    assert r.status_code == 200
    plan = r.json()
    assert plan["networks"][0]["strength"]["unet"] == [0.5, 0.5, 1.0, 1.0]
    assert plan["errors"] and plan["errors"][0]["column"] > 20
    # names the host does not have, said while typing (issue 16 item 10)
    r = client.post("/netweave/v1/parse", json={
        "prompt": "<lora:demo_styel:1> <model:demo_blnd:0.5> <lora:demo_style:region=lefty>"})
    messages = [e["message"] for e in r.json()["errors"]]
    assert "did you mean 'demo_style'?" in messages[0] and "did you mean 'demo_blend'?" in messages[1]
    assert "no mask named 'lefty'" in messages[2]
    assert client.post("/netweave/v1/parse", json={"prompt": "x", "arch": "sd9"}).status_code == 400
    assert client.post("/netweave/v1/parse", json={"steps": 3}).status_code == 422


def test_vocabulary_route_names_each_key_once(client):
    vocabulary = client.get("/netweave/v1/vocabulary").json()
    keys = vocabulary["keys"]
    assert len(keys) == len(set(keys)) and {"te", "BASE", "IN00", "M00", "OUT11"} <= set(keys)
    assert not {"T5", "CLIP", "QWEN3", "D00", "S00"} & set(keys)  # other models' blocks


@pytest.mark.parametrize("arch, has, lacks", [
    ("flux", {"CLIP", "T5", "D00", "S37", "te2", "double"}, {"BASE", "IN00", "QWEN3", "IN"}),
    ("chroma", {"T5", "D18"}, {"CLIP", "BASE"}),  # Chroma has Flux's T5 and no CLIP-L
    ("sd3", {"BASE", "T5", "te3"}, {"CLIP", "UMT5"}),
    ("zimage", {"QWEN3", "NR00", "CR01", "S29"}, {"T5", "BASE"}),
])
def test_the_prompt_box_completes_the_blocks_of_the_model_it_runs(arch, has, lacks):
    from netweave.extension.api import completion_keys
    keys = completion_keys(arch)
    assert len(keys) == len(set(k.lower() for k in keys)) and has <= set(keys), keys
    assert not lacks & set(keys), lacks & set(keys)


def test_networks_route(client):
    nets = client.get("/netweave/v1/networks").json()["networks"]
    assert {(n["kind"], n["name"]) for n in nets} == {
        ("lora", "demo_style"), ("lora", "demo_texture"), ("model", "demo_blend")}
    assert all(n["error"] is None for n in nets), nets


def test_the_page_is_served(setup):
    host, library, masks, _ = setup
    page = TestClient(build_app(host, library, masks, ui=True)).get("/")
    assert page.status_code == 200 and "gradio" in page.text.lower()


# ---- the command line -----------------------------------------------------------------------
def test_generate_command_on_the_default_model(tmp_path, capsys):
    mask = tmp_path / "m.png"
    mask.write_bytes(left_half(16, 16))
    out = tmp_path / "fox.png"
    code = main(["generate", "--prompt", "a fox <lora:demo_sunset:te=0.2@0,1@0.5:in=0:region=m> "
                 "<lyco:demo_boxy:0.5:lbw=MIDD> <model:demo_pastel:0.5> <lora:typo:1>",
                 "--steps", "4", "--mask", f"m={mask}", "--mask-dir", str(tmp_path / "masks"),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    img = Image.open(out)
    assert img.size == (64, 64)
    assert img.text["parameters"].startswith("a fox <lora:demo_sunset")
    assert "no lora named 'typo'" in captured.err and "wrote" in captured.out
    assert main(["generate", "--prompt", "x", "--out", str(out), "--mask", "m"]) == 2
    assert main(["generate", "--prompt", "x", "--out", str(out),
                 "--checkpoint", str(tmp_path / "nothing.ckpt")]) == 1


@pytest.mark.slow
def test_generate_shows_the_samplers_progress_on_a_terminal(tmp_path):
    """Issue 16 item 15: on a terminal, `generate` draws the sampling progress bar; the
    sampler asked for is the one used, and the PNG says so."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios
    out = tmp_path / "fox.png"
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal
    proc = subprocess.Popen([sys.executable, "-m", "netweave", "generate", "--prompt", "a fox",
                             "--steps", "3", "--sampler", "DPM++ 2M", "--mask-dir",
                             str(tmp_path / "masks"), "--out", str(out)],
                            stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    said = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        said += chunk
    assert proc.wait(timeout=300) == 0, said.decode(errors="replace")
    text = said.decode(errors="replace")
    assert "sampling:" in text and "/3 [" in text, text  # the bar, counting to 3 steps
    assert "Sampler: DPM++ 2M" in Image.open(out).text["parameters"]


# ---- SDXL: a diffusers folder, loaded offline ------------------------------------------------
def tiny_xl_folder(path):
    """A tiny SDXL-architecture pipeline saved as a diffusers folder (tokenizers included)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from netweave.extension.tokenizer import clip_tokenizer
    torch.manual_seed(0)

    def clip(cls):
        return cls(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=77, projection_dim=32,
                                  bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = AutoencoderKL(latent_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16, 16),
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip(CLIPTextModel),
        text_encoder_2=clip(CLIPTextModelWithProjection), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer("!"), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                         beta_end=0.012, steps_offset=1))
    pipe.save_pretrained(path)
    return path


def test_sdxl_folder_with_scheduled_regional_and_te2_tags(tmp_path):
    from netweave.extension.standalone.models import load_model
    from netweave.devtools.synthetic import write_network

    model = load_model(tiny_xl_folder(str(tmp_path / "xl")))
    assert model.arch == "sdxl" and set(model.trees()) == {"unet", "te1", "te2"}
    loras = tmp_path / "loras"
    loras.mkdir()
    write_network(loras / "xl.safetensors", model.trees(), "lora", "kohya", "sdxl", seed=4,
                  scale=0.3, select=lambda t: "time_embedding" not in t.name
                  and "add_embedding" not in t.name)
    host = DiffusersHost(model, Library([str(loras)]), MaskStore(str(tmp_path / "masks")))
    client = TestClient(build_app(host, host.library, host.masks, ui=False))
    seen, undo = spy_steps(host, "lora_unet_output_blocks_0_1_proj_in")
    try:
        r = client.post("/sdapi/v1/txt2img", json={
            "prompt": "a fox <lora:xl:te1=0.5:te2=0@0,1@0.5:unet=1:region=left>", "steps": 4,
            "seed": 3, "width": 64, "height": 64})
    finally:
        undo()
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["netweave"]["errors"] == [] and len(r.json()["images"]) == 1
    assert [now.get(0) for _, now in seen] == [1.0] * 4
    segments = host.engine.te_segments()
    assert [(s.start, s.stop, s.variants) for s in segments] == [(0, 2, (0,)), (2, 4, (0,))]


def test_interrupt_mid_generation_restores_every_weight(setup, client):
    host = setup[0]
    trees = host.model.trees()
    before = {(c, k): v.detach().clone() for c, t in trees.items() for k, v in t.state_dict().items()}
    engine = host.engine
    original = engine.set_step
    progress = []

    def set_step(k, phase="base"):
        original(k, phase)
        progress.append(client.get("/sdapi/v1/progress").json())
        if k == 2:
            client.post("/sdapi/v1/interrupt")
    engine.set_step = set_step
    try:
        r = client.post("/sdapi/v1/txt2img", json={
            "prompt": "<lora:demo_style:0@0,1@0.5> <lora:demo_texture:1:region=left>",
            "steps": 6, "width": 64, "height": 64})
    finally:
        engine.set_step = original
    assert r.status_code == 200 and r.json()["images"] == []
    assert progress[2]["state"]["sampling_steps"] == 6 and 0 < progress[2]["progress"] < 1
    for (c, k), v in before.items():
        assert torch.equal(trees[c].state_dict()[k], v), (c, k)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "again", "steps": 2, "width": 64,
                                               "height": 64})
    assert len(r.json()["images"]) == 1  # the next request runs normally


# ---- single-file checkpoints (A1111's format), loaded offline ---------------------------------
def tiny_single_file(path):
    """A tiny SD1 checkpoint in A1111's single-file layout (LDM UNet and VAE from the `ldm`
    package, CLIP under cond_stage_model.transformer) and the diffusers configs of its shapes."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from netweave.extension.standalone.models import SCHEDULER, write_config_folder
    from tinymodels import diffusers_unet, ldm_unet

    torch.manual_seed(0)
    dd = dict(ch=32, out_ch=3, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(),
              in_channels=3, resolution=64, z_channels=4, double_z=True)
    parts = {"model.diffusion_model.": ldm_unet("sd1"), "first_stage_model.encoder.": Encoder(**dd),
             "first_stage_model.decoder.": Decoder(**dd),
             "first_stage_model.quant_conv.": torch.nn.Conv2d(8, 8, 1),
             "first_stage_model.post_quant_conv.": torch.nn.Conv2d(4, 4, 1)}
    text_config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=77, bos_token_id=49406,
                                 eos_token_id=49407, pad_token_id=49407)
    text = CLIPTextModel(text_config)
    state = {p + k: v.contiguous() for p, m in parts.items() for k, v in m.state_dict().items()}
    state.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."):
                  v.contiguous() for k, v in text.state_dict().items()})
    save_file(state, str(path / "tiny.safetensors"))
    vae = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32,
                        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    config = write_config_folder(str(path / "config"), "sd1", diffusers_unet("sd1"), vae,
                                 {"text_encoder": text_config}, EulerDiscreteScheduler(**SCHEDULER))
    return str(path / "tiny.safetensors"), config, parts, text


def test_single_file_checkpoint_loads_offline_and_generates(tmp_path):
    from netweave.extension.standalone.models import load_single_file

    path, config, parts, text = tiny_single_file(tmp_path)
    model = load_single_file(path, config=config, arch="sd1")
    pipe = model.pipe
    ldm = parts["model.diffusion_model."]
    assert torch.equal(pipe.unet.conv_in.weight, ldm.input_blocks[0][0].weight)
    assert torch.equal(pipe.unet.down_blocks[0].attentions[0].proj_in.weight,
                       ldm.input_blocks[1][1].proj_in.weight)
    assert torch.equal(pipe.vae.encoder.conv_in.weight, parts["first_stage_model.encoder."].conv_in.weight)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight,
                       text.get_input_embeddings().weight)
    host = DiffusersHost(model, Library([]), MaskStore(str(tmp_path / "masks")))
    r = TestClient(build_app(host, host.library, host.masks, ui=False)).post(
        "/sdapi/v1/txt2img", json={"prompt": "a fox", "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 200 and decode(r.json()["images"][0]).size == (64, 64)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_published_configs_build_the_real_shapes(arch):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from netweave.extension.standalone.models import reference_config
    from netweave.network.reference import reference_trees

    folder = reference_config(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
    ref = reference_trees(arch)["unet"]
    assert {k: v.shape for k, v in unet.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4
    te = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")
    assert te.hidden_size == 768 and te.vocab_size == 49408


def test_the_pages_generate_button_reports_progress(setup):
    """The page has what an A1111 user reaches for first (issue 16 item 15): sampler, CFG,
    batch count and size, and the network list whose rows put their tag in the prompt."""
    from types import SimpleNamespace

    from netweave.extension.standalone.server import page
    host, library = setup[0], setup[1]
    blocks = page(host, library)
    fns = {getattr(d.fn, "__name__", ""): d.fn for d in blocks.fns.values()}
    calls = []
    images, info, problems = fns["generate"](
        "a fox <lora:demo_style:1> <lora:typo:1>", "blurry", "DPM++ 2M", 3, 5.5, 1, 64, 64, 2, 2,
        progress=lambda *a, **k: calls.append((a, k)))
    assert len(images) == 4 and "no lora named 'typo'" in problems
    assert len([line for line in problems.splitlines() if "typo" in line]) == 1  # said once
    seeds = [line.split("Seed: ")[1].split(",")[0] for line in info.splitlines() if "Seed: " in line]
    assert seeds == ["1", "2", "3", "4"] and "Sampler: DPM++ 2M" in info and "CFG scale: 5.5" in info
    assert "Negative prompt: blurry" in info
    assert calls and all(0.0 <= a[0] <= 1.0 for a, _ in calls)
    rows = fns["networks"]()
    assert [r[:2] for r in rows] == [["lora", "demo_style"], ["lora", "demo_texture"],
                                     ["model", "demo_blend"]]
    assert fns["insert"]("a fox", rows, SimpleNamespace(index=(2, 1))) == \
        "a fox <model:demo_blend:0.5>"
    assert fns["insert"]("", rows, SimpleNamespace(index=(0, 0))) == "<lora:demo_style:1>"


def test_settings_switch_netweave_off_and_make_tags_strict(setup, client):
    host = setup[0]
    saved = dataclasses.replace(host.settings)
    try:
        host.settings.enabled = False
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a <lora:demo_style:1>", "steps": 2,
                                                    "width": 64, "height": 64})
        assert json.loads(r.json()["info"])["netweave"]["plan"]["networks"] == []
        assert host.engine.plan is not None and host.engine._slots == {}  # nothing patched
        host.settings.enabled, host.settings.strict = True, True
        host.settings.cache_mb = 3
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "a <lora:demo_style:1:regio=x>",
                                                    "steps": 2, "width": 64, "height": 64})
        info = json.loads(r.json()["info"])["netweave"]
        assert info["plan"]["networks"] == [] and any("regio" in e for e in info["errors"])
        assert host.engine.cache.max_bytes == 3 * 2 ** 20
    finally:
        for f in dataclasses.fields(saved):
            setattr(host.settings, f.name, getattr(saved, f.name))
