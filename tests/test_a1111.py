"""The A1111 adapter in stand-ins of A1111's host modules (tests/a1111_host, after hosts.md and
the v1.10.1 source), driving the real LDM UNet (`stable-diffusion-sdkit`) and a CLIP text
encoder through real sampling steps."""
import os
import sys

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "a1111_host"))

from modules import extra_networks, paths, processing, script_callbacks, scripts, shared  # noqa: E402

import builtin_lora  # noqa: E402
from netweave.devtools.synthetic import write_network  # noqa: E402
from tinymodels import TE1_WIDTH, TE2_WIDTH, OpenCLIPText, Wrapper, ldm_unet  # noqa: E402

sys.modules.setdefault("networks", builtin_lora.networks)  # the built-in's module name


def _clip_l():
    """A CLIP-L-like text model at toy width with CLIP's real vocabulary and 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=TE1_WIDTH,
                                        intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407,
                                        pad_token_id=49407))


def _wake(model):
    """LDM zero-initialises output layers: make every layer matter."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _token_ids(tokenizer, texts):
    return tokenizer(list(texts), padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids


class SDModel(torch.nn.Module):
    """A1111's LatentDiffusion as NetWeave sees it: model.diffusion_model, cond_stage_model,
    get_learned_conditioning, apply_model."""

    def __init__(self):
        super().__init__()
        from netweave.extension.tokenizer import clip_tokenizer
        self.model = Wrapper(diffusion_model=ldm_unet("sd1"))
        torch.manual_seed(1)
        self.cond_stage_model = Wrapper(transformer=_clip_l())
        self.tokenizer = clip_tokenizer()
        self.is_sdxl = self.is_sd2 = False
        _wake(self.model)

    def get_learned_conditioning(self, texts):
        with torch.no_grad():
            ids = _token_ids(self.tokenizer, texts)
            return self.cond_stage_model.transformer(ids).last_hidden_state

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, context=cond)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    root = tmp_path_factory.mktemp("a1111")
    shared.sd_model = SDModel()
    shared.cmd_opts.lora_dir = str(root / "Lora")
    shared.cmd_opts.data_dir = str(root)
    paths.models_path = str(root)
    os.makedirs(shared.cmd_opts.lora_dir)
    trees = {"unet": shared.sd_model.model.diffusion_model, "te1": shared.sd_model.cond_stage_model}
    spatial = lambda t: "time_embedding" not in t.name  # noqa: E731
    write_network(root / "Lora" / "style.safetensors", trees, "lora", "kohya", "sd1", seed=1,
                  scale=0.2, select=spatial)
    write_network(root / "Lora" / "texture.safetensors", trees, "loha", "kohya", "sd1", seed=2,
                  scale=0.2, select=spatial)
    write_network(root / "Lora" / "words.safetensors", trees, "lora", "kohya", "sd1", seed=3,
                  scale=0.5, components=("te1",))
    # A1111's start-up: scripts load (our callbacks register), then the registry is cleared
    # and the built-in registers "lora" in before_ui
    from netweave.extension.webui import a1111
    extra_networks.initialize()
    builtin = builtin_lora.ExtraNetworkLora()
    script_callbacks.on_before_ui(lambda: extra_networks.register_extra_network(builtin))
    script_callbacks.before_ui_callback()
    return a1111, builtin, root


def generate(prompt, enabled=True, options="", record=None, **kw):
    from netweave.extension.webui import a1111
    runner = scripts.ScriptRunner([a1111.NetWeaveScript()])
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=prompt, script_args=[enabled, options], scripts=runner, **kw)
    seen = []

    def recorder(params):
        e = a1111.ADAPTER.engine
        seen.append((params.denoiser.step, params.denoiser.p.is_hr_pass,
                     dict(e.strengths(record)) if record is not None and e.plan else None,
                     _clone(params.text_cond), _clone(params.text_uncond)))
    script_callbacks.on_cfg_denoiser(recorder)
    try:
        return processing.process_images(p), seen
    finally:
        script_callbacks.callback_map["cfg_denoiser"].remove(recorder)


def _clone(cond):
    return {k: v.clone() for k, v in cond.items()} if isinstance(cond, dict) else cond.clone()


def target(a1111, key):
    (t,) = a1111.ADAPTER.engine.keymap.lookup(key)
    return t


@pytest.mark.parametrize("sampler, calls", [("Euler", [0, 1, 2, 3]),
                                            ("Heun", [0, 0, 1, 1, 2, 2, 3])])
def test_strengths_follow_the_steps_for_first_and_second_order_samplers(host, sampler, calls):
    a1111, builtin, _ = host
    generate("warm up <lora:style:0.1>")
    key = "lora_unet_output_blocks_3_1_proj_in"  # OUT03
    t = target(a1111, key)
    out, seen = generate("a fox <lora:style:0@0,1@0.5> <lora:texture:0.5:out=0.5>", steps=4,
                         sampler_name=sampler, record=t)
    assert len(out.images) == 1 and "NetWeave errors" not in out.infotexts[0]
    from netweave.extension.webui.ldm import current_step
    steps = [current_step(type("D", (), {"step": s, "sampler": type(
        "S", (), {"config": processing.SamplerConfig(sampler)})(), "steps": 4})(), 4)
        for s, *_ in seen]
    assert steps == calls
    for step, (_, hr, now, *_) in zip(steps, seen):
        assert now.get(0, 0.0) == (0.0 if step < 2 else 1.0)
        assert now[1] == pytest.approx(0.25)


def test_the_builtin_never_sees_our_tags_and_gets_them_back_when_disabled(host):
    a1111, builtin, _ = host
    builtin.seen.clear()
    out, _ = generate("a <lora:style:0@0,1@0.5:region=left> <lyco:texture:0.5>")
    assert all(items == [] for items in builtin.seen)  # told to load nothing, every time
    assert extra_networks.extra_network_registry["lora"] is a1111.ADAPTER.names.ours["lora"]
    builtin.seen.clear()
    generate("a <lora:style:0.5>", enabled=False)
    assert extra_networks.extra_network_registry["lora"] is builtin
    assert builtin.seen[0] == [["style", "0.5"]]  # the built-in has its tags again
    assert a1111.ADAPTER.engine.plan is None  # and NetWeave changed nothing


def test_a_bad_tag_never_stops_a_generation(host, capsys):
    out, _ = generate("a <lora:nope:1> <lora:style:0.5:regio=left> <lora:style:x>")
    assert len(out.images) == 1
    info = out.infotexts[0]
    assert info.startswith("a <lora:nope:1>")  # the tags stay in the prompt
    assert "NetWeave errors:" in info and "no lora named 'nope'" in info and "regio" in info
    console = capsys.readouterr().err.splitlines()  # and each problem reaches the console
    assert any(line.startswith("NetWeave: ") and "no lora named 'nope'" in line
               for line in console)
    assert any("'x' is not a strength" in line for line in console)


def test_hires_pass_uses_its_own_steps_and_hr_strengths(host):
    a1111 = host[0]
    t = target(a1111, "lora_unet_output_blocks_3_1_proj_in")
    out, seen = generate("a <lora:style:1:hr=0.25>", steps=3, enable_hr=True,
                         hr_second_pass_steps=2, record=t)
    base = [now for _, hr, now, *_ in seen if not hr]
    hires = [now for _, hr, now, *_ in seen if hr]
    assert len(base) == 3 and len(hires) == 2
    assert all(now == {0: 1.0} for now in base) and all(now == {0: 0.25} for now in hires)


def test_text_encoder_schedules_swap_the_conditioning(host):
    out, seen = generate("a fox <lora:words:te=0@0,1@0.5:unet=0>", steps=4)
    conds = [c for *_, c, _ in seen]
    assert torch.equal(conds[0], conds[1]) and torch.equal(conds[2], conds[3])
    assert not torch.equal(conds[1], conds[2])
    plain, seen_plain = generate("a fox", steps=4)
    assert torch.equal(seen_plain[0][3], conds[0])  # te = 0: the plain encoding


def test_weights_the_builtin_merged_are_released_before_netweave_copies_them(host):
    a1111 = host[0]
    layer = shared.sd_model.model.diffusion_model.input_blocks[1][1].proj_in
    pristine = layer.weight.detach().clone()
    with torch.no_grad():
        layer.network_weights_backup = pristine.clone()
        layer.weight.add_(1.0)  # the built-in's merge from an earlier generation
        layer.network_current_names = (("old", 1.0, 1.0, None),)
    a1111.ADAPTER.off()
    generate("a <lora:style:1>")
    assert layer.network_current_names == ()
    a1111.ADAPTER.off()  # NetWeave restores its pristine copy: the built-in's original
    assert torch.equal(layer.weight.detach(), pristine)


def test_ui_twice_and_api_inline_masks(host):
    import base64
    import io

    import numpy as np
    from PIL import Image
    a1111 = host[0]
    runner_a = scripts.ScriptRunner([a1111.NetWeaveScript()])
    runner_b = scripts.ScriptRunner([a1111.NetWeaveScript()])  # the API builds ui() again
    assert len(runner_a.inputs) == len(runner_b.inputs) == 2
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.array([255, 0], np.uint8).repeat(32), (64, 1))).save(buf, "PNG")
    options = {"masks": {"half": base64.b64encode(buf.getvalue()).decode()}}
    out, _ = generate("a <lora:style:1:region=half>", options=options)
    assert "NetWeave masks: \"half:" in out.infotexts[0] and "NetWeave errors" not in out.infotexts[0]
    out, _ = generate("a <lora:style:1:region=half>", options={"masks": {"../x": "AAAA"}})
    assert "NetWeave errors: \"error: masks:" in out.infotexts[0] and len(out.images) == 1


def test_routes_are_added_when_the_app_starts(host):
    app = FastAPI()
    script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    assert client.get("/netweave/v1/masks").status_code == 200
    plan = client.post("/netweave/v1/parse", json={"prompt": "<lora:style:0@0,1@0.5>", "steps": 4}).json()
    assert plan["arch"] == "sd1" and plan["networks"][0]["strength"]["unet"] == [0, 0, 1, 1]
    names = {n["name"] for n in client.get("/netweave/v1/networks").json()["networks"]}
    assert names == {"style", "texture", "words"}
    assert client.put("/netweave/v1/masks/bad name", content=b"x").status_code == 400


def test_a_batch_of_different_prompts_gets_per_row_networks(host):
    a1111 = host[0]
    out, _ = generate(["a <lora:style:1>", "b <lora:texture:1> <lora:style:1>"], batch_size=2)
    assert len(out.images) == 2
    entries = a1111.ADAPTER.engine.entries
    assert [(e.net.name, e.owner) for e in entries] == [("style", None), ("texture", 1)]


def test_the_entry_script_exposes_the_script_to_a1111(host, repo_root):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "netweave_entry_test", os.path.join(repo_root, "scripts", "netweave_entry.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert issubclass(module.NetWeaveScript, scripts.Script)
    assert module.NetWeaveScript().title() == "NetWeave"


def test_settings_and_the_tab(host):
    a1111 = host[0]
    script_callbacks.ui_settings_callback()
    labels = shared.opts.data_labels
    assert {"netweave_enabled", "netweave_cache_mb", "netweave_pristine", "netweave_interp",
            "netweave_strict", "netweave_mask_dir"} <= set(labels)
    assert labels["netweave_interp"].section == ("netweave", "NetWeave")
    ((blocks, title, elem_id),) = script_callbacks.ui_tabs_callback()
    assert title == "NetWeave" and elem_id == "netweave"
    try:  # off in the settings: the built-in gets its names back, NetWeave changes nothing
        shared.opts.data["netweave_enabled"] = False
        generate("a <lora:style:0.5>")
        assert extra_networks.extra_network_registry["lora"] is host[1]
        assert a1111.ADAPTER.engine is None or a1111.ADAPTER.engine.plan is None
        shared.opts.data.update(netweave_enabled=True, netweave_strict=True,
                                netweave_interp="linear", netweave_cache_mb=7,
                                netweave_pristine="CPU memory")
        out, _ = generate("a <lora:style:0@0,1@1:regio=x>")
        assert "unknown key 'regio'" in out.infotexts[0]  # strict: an error, the tag skipped
        assert a1111.ADAPTER.engine.cache.max_bytes == 7 * 2 ** 20
        assert a1111.ADAPTER.engine.pristine_on_cpu
        ctx = a1111.ADAPTER.context(4)
        assert ctx.strict and ctx.default_interp == "linear"
        # the mask folder: a setting the store follows at once (the routes use the same store)
        default = a1111.ADAPTER.masks.folder
        assert default.endswith("netweave-masks")
        elsewhere = os.path.join(os.path.dirname(default), "my masks")
        shared.opts.data["netweave_mask_dir"] = elsewhere
        a1111.ADAPTER.masks.put("moved", Image.new("L", (4, 4), 255))
        assert os.listdir(elsewhere) == ["moved.png"] and "moved" in a1111.ADAPTER.masks
        shared.opts.data["netweave_mask_dir"] = ""
        assert a1111.ADAPTER.masks.folder == default and "moved" not in a1111.ADAPTER.masks
    finally:
        for key in list(shared.opts.data):
            if key.startswith("netweave_"):
                shared.opts.data[key] = labels[key].default


# ---- the conditioning NetWeave makes is the host's own ------------------------------------
def _rows(seen, hr=False):
    """(cond, uncond) of each base (or hires) model evaluation."""
    return [(c, u) for _, h, _, c, u in seen if h == hr]


@pytest.mark.slow
def test_swapped_conditioning_keeps_prompt_editing_and_the_hires_prompt(host):
    # [cat:dog:2]: "cat" up to the denoiser's call 2, "dog" after; the TE network is on from
    # step 2. NetWeave's rows must be the host's own rows for the same text and weights.
    prompt = "a [cat:dog:2] <lora:words:te=0@0,1@0.5:unet=0>"
    _, seen = generate(prompt, steps=4)
    _, off = generate("a [cat:dog:2] <lora:words:te=0:unet=0>", steps=4)
    _, on = generate("a [cat:dog:2] <lora:words:te=1:unet=0>", steps=4)
    rows, off, on = _rows(seen), _rows(off), _rows(on)
    assert not torch.equal(off[2][0], off[3][0])  # the edit itself shows
    for k, expected in enumerate([off[0], off[1], on[2], on[3]]):
        assert torch.allclose(rows[k][0], expected[0], atol=1e-6), k
        assert torch.allclose(rows[k][1], expected[1], atol=1e-6), k
    # AND: the host's rows per sub-prompt, in its order, each with the right weights
    _, seen = generate("a fox AND a cat:0.5 <lora:words:te=0@0,1@0.5:unet=0>", steps=4)
    _, on = generate("a fox AND a cat:0.5 <lora:words:te=1:unet=0>", steps=4)
    rows, on = _rows(seen), _rows(on)
    assert rows[3][0].shape[0] == 2 and torch.allclose(rows[3][0], on[3][0], atol=1e-6)
    assert not torch.allclose(rows[0][0], on[0][0], atol=1e-4)  # step 0: without it
    # the hires pass encodes its own prompt
    kw = dict(steps=2, enable_hr=True, hr_second_pass_steps=2, hr_prompt="a cat")
    out, seen = generate("a fox <lora:words:te=0@0,1@0.5:hrte=1:unet=0>", **kw)
    assert "NetWeave errors" not in out.infotexts[0]
    _, ref = generate("a fox <lora:words:te=1:hrte=1:unet=0>", **kw)
    hires, ref_hires = _rows(seen, hr=True), _rows(ref, hr=True)
    assert len(hires) == 2 and torch.allclose(hires[0][0], ref_hires[0][0], atol=1e-6)
    assert not torch.allclose(hires[0][0], _rows(ref)[0][0], atol=1e-3)  # "a cat", not "a fox"


class SDXLModel(torch.nn.Module):
    """A1111's SDXL DiffusionEngine as NetWeave sees it: model.diffusion_model (with sgm's
    label_emb for the "vector" cond), conditioner.embedders (CLIP-L as `.transformer`,
    OpenCLIP-G as `.model`) and get_learned_conditioning(SdConditioning) -> {"crossattn",
    "vector"}, both penultimate layers, the pooled G row and the size embedding in the
    vector, all zero for an empty negative prompt (force_zero_embeddings)."""

    SIZE_DIM = 8  # sgm: 256 per number; six numbers (original size, crop, target size)

    def __init__(self):
        super().__init__()
        from ldm.modules.diffusionmodules.util import timestep_embedding

        from netweave.extension.tokenizer import clip_tokenizer
        unet = ldm_unet("sdxl")
        width = unet.model_channels * 4
        torch.manual_seed(3)
        unet.num_classes = "sequential"
        unet.label_emb = torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Linear(TE2_WIDTH + 6 * self.SIZE_DIM, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width)))
        self.model = Wrapper(diffusion_model=unet)
        self.conditioner = Wrapper(embedders=torch.nn.ModuleList([
            Wrapper(transformer=_clip_l()),
            Wrapper(model=OpenCLIPText(TE2_WIDTH, vocab=49408, context=77))]))
        self.tokenizer, self.timestep_embedding = clip_tokenizer(), timestep_embedding
        self.is_sdxl, self.is_sd2 = True, False
        _wake(self.model)

    def get_learned_conditioning(self, batch):
        with torch.no_grad():
            ids = _token_ids(self.tokenizer, batch)
            l_states = self.conditioner.embedders[0].transformer(
                ids, output_hidden_states=True).hidden_states[-2]
            g_states, pooled = self.conditioner.embedders[1].model.encode(ids)
        crossattn = torch.cat([l_states, g_states], dim=-1)
        if getattr(batch, "is_negative_prompt", False) and all(x == "" for x in batch):
            crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
        h, w = (getattr(batch, "height", None) or 1024), (getattr(batch, "width", None) or 1024)
        sizes = torch.tensor([[h, w, 0, 0, h, w]] * len(batch), dtype=torch.float32)
        size_emb = self.timestep_embedding(sizes.flatten(), self.SIZE_DIM).view(len(batch), -1)
        return {"crossattn": crossattn, "vector": torch.cat([pooled, size_emb], dim=-1)}

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, context=cond["crossattn"], y=cond["vector"])


def a1111_engine():
    from netweave.extension.webui import a1111
    return a1111.ADAPTER.engine


def _addnet_hash(path) -> str:
    """A1111's `Lora hashes` entry, computed here from its definition: SHA-256 of the bytes
    after the safetensors header, first 12 hex digits."""
    import hashlib
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


@pytest.mark.slow
def test_the_hires_prompt_brings_its_own_networks(host):
    """Issue 16 item 1: tags in the hires prompt drive the hires pass, as the host's own Lora
    does; a main-prompt tag's hr keys still say its hires strength."""
    kw = dict(steps=2, enable_hr=True, hr_second_pass_steps=2)
    tagged, seen = generate("a fox", hr_prompt="a fox <lora:style:1>", **kw)
    plain, seen_plain = generate("a fox", hr_prompt="a fox", **kw)
    by_key, _ = generate("a fox <lora:style:0:hr=1>", **kw)  # empty hires prompt: the prompt
    assert "NetWeave errors" not in tagged.infotexts[0]
    # the hires conds are encoded with the network's text-encoder part, the base ones without
    assert torch.equal(_rows(seen)[0][0], _rows(seen_plain)[0][0])
    assert not torch.allclose(_rows(seen, hr=True)[0][0], _rows(seen_plain, hr=True)[0][0],
                              atol=1e-4)
    assert not torch.allclose(tagged.images[0], plain.images[0], atol=1e-4)
    assert torch.allclose(tagged.images[0], by_key.images[0], atol=1e-5)
    # a hires prompt without tags ends the main prompt's networks after the base pass, unless
    # their own hr keys say otherwise
    base_only, _ = generate("a fox <lora:style:1>", hr_prompt="a fox", **kw)
    kept, _ = generate("a fox <lora:style:1:hr=1>", hr_prompt="a fox", **kw)
    everywhere, _ = generate("a fox <lora:style:1>", **kw)
    assert not torch.allclose(base_only.images[0], everywhere.images[0], atol=1e-4)
    assert torch.allclose(kept.images[0], everywhere.images[0], atol=1e-5)
    # its problems are said, as the hires prompt's
    bad, _ = generate("a fox", hr_prompt="a fox <lora:nope:1>", **kw)
    assert "hires prompt" not in bad.infotexts[0]  # a missing file is the engine's to say
    assert "no lora named 'nope'" in bad.infotexts[0]


def test_the_infotext_has_lora_hashes_as_a1111_writes_them(host):
    """Issue 16 item 2: `Lora hashes: "name: addnet12, …"` for the networks applied."""
    a1111, _, root = host
    out, _ = generate("a fox <lora:style:0.5> <lora:texture:0.3> <lora:nope:1>")
    style, texture = (_addnet_hash(root / "Lora" / f"{n}.safetensors") for n in ("style", "texture"))
    assert f'Lora hashes: "style: {style}, texture: {texture}"' in out.infotexts[0]
    none, _ = generate("a fox")
    assert "Lora hashes" not in none.infotexts[0]


def test_a_problem_found_while_sampling_reaches_the_infotext(host, capsys):
    """Issue 16 item 4: a regional network on the time-embedding MLP (no image grid) is left
    out there at the first UNet call; the user is told, in the infotext and the console."""
    a1111, _, root = host
    trees = {"unet": shared.sd_model.model.diffusion_model}
    write_network(root / "Lora" / "timed.safetensors", trees, "lora", "kohya", "sd1", seed=4,
                  scale=0.2, components=("unet",),
                  select=lambda t: "time_embed" in t.path or "attn2.to_q" in t.name)
    out, _ = generate("a fox <lora:timed:1:region=left>")
    assert "no image grid" in out.infotexts[0], out.infotexts[0]
    assert any("no image grid" in line for line in capsys.readouterr().err.splitlines())


@pytest.mark.slow
def test_the_hires_pass_finds_its_regions_on_the_upscaled_latent(host):
    """Issue 16 item 4 as the real A1111 showed it: the hires pass samples a latent twice the
    size; a regional network must find its grid there on every layer, not be left out."""
    out, seen = generate("a fox <lora:style:1:region=left>", steps=2, enable_hr=True,
                         hr_second_pass_steps=2)
    assert "NetWeave errors" not in out.infotexts[0], out.infotexts[0]
    assert any(hr for _, hr, *_ in seen)
    assert a1111_engine().latent == (16, 16)  # 64 px × hr_scale 2 / 8


def test_messages_never_carry_the_servers_folders(host):
    """Issue 16 item 5: folders are named relative to the WebUI (or by their kind)."""
    a1111, _, root = host
    out, _ = generate("a fox <lora:nope:1>")
    assert "no lora named 'nope'" in out.infotexts[0]
    assert str(root) not in out.infotexts[0] and os.path.realpath(root) not in out.infotexts[0]
    saved = getattr(paths, "script_path", None)
    paths.script_path = str(root)  # the WebUI's folder: the Lora folder inside it
    try:
        out, _ = generate("a fox <lora:nope:1>")
    finally:
        paths.script_path = saved
    assert "in Lora" in out.infotexts[0] and str(root) not in out.infotexts[0]


def test_strict_tags_make_a_warning_an_error_the_user_sees(host):
    """Issue 16 item 6: with strict tags an unknown key is an error: the tag is not applied,
    and the infotext says `error:`; without, a warning and the tag applies."""
    plain, _ = generate("a fox")
    saved = dict(shared.opts.data)
    try:
        shared.opts.data["netweave_strict"] = True
        strict, _ = generate("a fox <lora:style:1:fooo=1>")
    finally:
        shared.opts.data.clear()
        shared.opts.data.update(saved)
    lenient, _ = generate("a fox <lora:style:1:fooo=1>")
    assert torch.equal(strict.images[0], plain.images[0])
    assert "error: unknown key 'fooo'" in strict.infotexts[0]
    assert "the tag is not applied" in strict.infotexts[0]  # not "is ignored": it was not
    assert "is ignored" not in strict.infotexts[0]
    assert not torch.allclose(lenient.images[0], plain.images[0], atol=1e-4)
    assert "warning: unknown key 'fooo'" in lenient.infotexts[0]


@pytest.fixture(scope="module")
def sdxl(host):
    a1111, _, root = host
    before = shared.sd_model
    shared.sd_model = model = SDXLModel()
    embedders = model.conditioner.embedders
    trees = {"unet": model.model.diffusion_model, "te1": embedders[0], "te2": embedders[1]}
    files = [root / "Lora" / f"xl_{n}.safetensors" for n in ("words", "style")]
    write_network(files[0], trees, "lora", "kohya", "sdxl", seed=4, scale=0.5,
                  components=("te1", "te2"))
    write_network(files[1], trees, "lora", "kohya", "sdxl", seed=5, scale=0.2,
                  components=("unet",), select=lambda t: "time_embed" not in t.name)
    yield a1111
    for f in files:
        f.unlink()
    a1111.ADAPTER.off()
    shared.sd_model = before


def test_sdxl_text_encoder_schedules_swap_its_dict_conds(sdxl):
    kw = dict(steps=4, width=64, height=32)
    out, seen = generate("a fox <lora:xl_words:te=0@0,1@0.5:unet=0> <lora:xl_style:0.5>", **kw)
    assert "NetWeave errors" not in out.infotexts[0]
    _, off = generate("a fox <lora:xl_style:0.5>", **kw)
    _, on = generate("a fox <lora:xl_words:te=1:unet=0> <lora:xl_style:0.5>", **kw)
    rows, off, on = _rows(seen), _rows(off), _rows(on)
    assert not torch.allclose(off[0][0]["vector"], on[0][0]["vector"])  # G's pooled row moved
    for k, expected in enumerate([off[0], off[1], on[2], on[3]]):
        for key in ("crossattn", "vector"):
            assert torch.allclose(rows[k][0][key], expected[0][key], atol=1e-6), (k, key)
            assert torch.allclose(rows[k][1][key], expected[1][key], atol=1e-6), (k, key)
    # the empty negative prompt stays all zeros (encoded as the negative it is), the size
    # embedding (64 × 32, not SDXL's 1024 default) in every vector
    assert not rows[3][1]["crossattn"].any()
    assert torch.equal(rows[3][1]["vector"][:, TE2_WIDTH:], on[0][1]["vector"][:, TE2_WIDTH:])


@pytest.mark.slow
def test_sdxl_regional_text_encoder_network_and_neg(sdxl):
    import numpy as np
    from PIL import Image
    a1111 = sdxl
    a1111.ADAPTER.masks.put("xl_left", Image.fromarray(
        np.tile(np.array([255, 0], np.uint8).repeat(32), (64, 1))))
    prompt = "a fox <lora:xl_words:1:region=xl_left:unet=0> <lora:xl_style:0.5:neg=0>"
    out, seen = generate(prompt, negative_prompt="blurry", steps=2)
    assert len(out.images) == 1 and "NetWeave errors" not in out.infotexts[0]
    assert "NetWeave masks: \"xl_left:" in out.infotexts[0]
    # the cross-attention gets the host's crossattn rows outside the region and the network's
    # own encoding of the prompt inside it (the uncond rows are the negative's, unchanged)
    base, variants = a1111.ADAPTER.engine.runtime.text
    cond, uncond = _rows(seen)[-1]
    assert torch.equal(base, torch.cat([cond["crossattn"], uncond["crossattn"]]))
    (variant,) = variants.values()
    assert not torch.allclose(variant[:1], base[:1], atol=1e-4)
    assert torch.equal(variant[1:], base[1:])
    without, _ = generate("a fox <lora:xl_style:0.5:neg=0>", negative_prompt="blurry", steps=2)
    assert not torch.allclose(out.images[0], without.images[0], atol=1e-5)


def test_a_batch_reports_each_problem_once(host, capsys):
    out, _ = generate(["a <lora:nope:1>", "b <lora:nope:1>"], batch_size=2)
    info = out.infotexts[0]
    assert info.count("no lora named 'nope'") == 1, info
    console = [line for line in capsys.readouterr().err.splitlines() if "'nope'" in line]
    assert len(console) == 1, console


def test_an_invalid_setting_keeps_its_default_alone_and_says_so(host, capsys):
    saved = dict(shared.opts.data)
    try:
        shared.opts.data.update(netweave_enabled=False, netweave_cache_mb="lots",
                                netweave_interp="wobbly", netweave_strict=True)
        from netweave.extension.webui.common import settings
        s = settings()
        assert (s.enabled, s.strict) == (False, True)  # the valid ones apply
        assert (s.cache_mb, s.interp) == (1024, "by kind")  # the invalid ones: their defaults
        settings()  # read again: said once
        said = [line for line in capsys.readouterr().err.splitlines() if "netweave_" in line]
        assert len(said) == 2 and "netweave_cache_mb" in said[0] and "wobbly" in said[1], said
    finally:
        shared.opts.data.clear()
        shared.opts.data.update(saved)



def test_the_cond_cache_never_hands_one_sides_encoding_to_the_other(host):
    """A1111 (Forge, Neo alike) keeps the prompt's encoding across generations, keyed by the
    prompts, the steps and the extra networks' parameters, not by who applied the text
    encoders' networks: switching NetWeave on or off with the same prompt got the other
    side's encoding (the real Neo: its own text-only LoRA after NetWeave's run of the same
    tags drew NetWeave's picture). The cache is forgotten when the switch changes."""
    cache = processing.StableDiffusionProcessingTxt2Img
    prompt = "a <lora:style:0.5>"  # the built-in's stand-in changes no weight

    def cond(enabled, fresh=False):
        if fresh:
            cache.cached_c[0] = cache.cached_uc[0] = None
        _, seen = generate(prompt, enabled=enabled, steps=1)
        return seen[0][3]
    def same(a, b):  # SDXL's conditioning is a dict of tensors
        return all(torch.equal(a[k], b[k]) for k in a) if isinstance(a, dict) else \
            torch.equal(a, b)
    before, shared.sd_model = shared.sd_model, SDModel()  # the files' SD1
    try:
        ours, theirs = cond(True, fresh=True), cond(False, fresh=True)
        assert not same(ours, theirs)  # the two sides do encode it differently here
        for enabled in (True, True, False, False, True):
            assert same(cond(enabled), ours if enabled else theirs)
    finally:
        shared.sd_model = before
