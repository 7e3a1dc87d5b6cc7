"""The standalone host on Z-Image, Qwen-Image, SD3 and Wan 2.2 (issue 19): tiny pipelines of
the real diffusers classes (tinypipes.py) saved as folders and loaded the way a user's are,
generating through FlowRun with the family table (extension/flow_families.py): a LoRA changes
the picture and leaves every weight as it was, the pipeline's own sigmas reach the plan, each
transformer call's rows are told apart (SD3: negative rows first in one call; Z-Image: a list,
the prompt's first; Qwen-Image and Wan: a call each), a text-encoder schedule swaps SD3's text
mid-run; Wan 2.2's two experts each with their own strength, steps counted across the run."""
import contextlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from test_sdnext_flux import t5_lora
from tinypipes import FAMILIES, write_pipeline

from netweave.extension.flow_run import flow_schedule, high_noise_steps
from netweave.extension.library import Library
from netweave.extension.masks import MaskStore
from netweave.extension.standalone.host import DiffusersHost, Request
from netweave.extension.standalone.models import load_model

STEPS = 4
BLOCKS = ("layers.", "transformer_blocks.", "blocks.")  # each family's block list


def transformer_lora(path, transformer, seed=5, scale=0.3):
    """A diffusers/PEFT LoRA (`transformer.<layer>.lora_A/B`, as diffusers and ai-toolkit save
    them) on every linear layer of the transformer's blocks; returns ΔW per layer."""
    g, sd, deltas = torch.Generator().manual_seed(seed), {}, {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(BLOCKS):
            down = torch.randn(4, m.in_features, generator=g) * scale
            up = torch.randn(m.out_features, 4, generator=g) * scale
            sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = down, up
            deltas[name] = up @ down
    save_file(sd, str(path))
    return deltas


def clip_lora(path, clip):
    """A kohya LoRA on CLIP-L's attention (`lora_te1_…`)."""
    t5_lora(path, clip, seed=8, scale=1.0, prefix="lora_te1_", only=lambda n: ".self_attn." in n)


@pytest.fixture(scope="module", params=FAMILIES)
def host(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    folder = write_pipeline(root / f"tiny{arch}", arch)
    (root / "loras").mkdir()
    model = load_model(str(folder))
    deltas = transformer_lora(root / "loras" / "dit.safetensors", model.pipe.transformer)
    if arch == "sd3":
        clip_lora(root / "loras" / "clipl.safetensors", model.pipe.text_encoder)
    encoder_lora(root / "loras" / "te.safetensors", model.pipe.text_encoder)
    library = Library([str(root / "loras")], [], base=str(root))
    return DiffusersHost(model, library, MaskStore(str(root / "masks"))), deltas


def encoder_lora(path, encoder, seed=8, scale=1.0):
    """A diffusers/PEFT LoRA (`text_encoder.<layer>.lora_A/B`, the pipeline's names) on every
    linear layer of the first text encoder's blocks (CLIP-L, Qwen3, Qwen2.5-VL's language model,
    umT5)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, m in encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and ("layers." in name or "block." in name) \
                and "visual" not in name:
            sd[f"text_encoder.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * scale
            sd[f"text_encoder.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * scale
    save_file(sd, str(path))


def image(host, prompt, **kw):
    req = dict(prompt=prompt, steps=STEPS, seed=7, width=64, height=64,
               cfg_scale=host.model.default_cfg, negative_prompt="blue")
    req.update(kw)
    result = host.txt2img(Request(**req))
    return np.asarray(result.images[0], dtype=np.float64), result


def snapshot(host):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules(host)]


def modules(host):
    pipe = host.model.pipe
    return [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None),
                        *host.model.trees().values()) if m is not None]


def assert_pristine(host, before):
    for b, m in zip(before, modules(host)):
        assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items())


@contextlib.contextmanager
def calls(modules_):
    """Each transformer call's (module index, its rows' uncond flags as the engine has them)."""
    seen, handles = [], []
    for i, m in enumerate(modules_):
        def hook(module, args, kwargs, i=i):
            seen.append((i, args, kwargs))
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def test_a_folder_loads_with_its_family(host):
    h, _ = host
    m = h.model
    assert m.flow and m.family.arch == m.arch and m.trees()["unet"] is m.pipe.transformer
    assert m.vae_scale == 16 and m.latent(64, 48) == (8, 6)
    expected = {"zimage": 5.0, "qwenimage": 4.0, "sd3": 7.0, "wan22": 5.0}[m.arch]
    assert m.default_cfg == expected  # Qwen-Image's is true_cfg_scale's
    if m.arch == "sd3":
        assert m.trees()["te1"] is m.pipe.text_encoder and m.trees()["te2"] is m.pipe.text_encoder_2


def test_a_lora_changes_the_picture_and_every_weight_comes_back(host):
    h, _ = host
    before = snapshot(h)
    fresh, _ = image(h, "a red square")
    lora, result = image(h, "a red square <lora:dit:1>")
    assert not [e for e in result.errors if "dit" in e], result.errors
    assert "Lora hashes" in result.infotexts[0] and "Shift: " in result.infotexts[0]
    assert np.abs(lora - fresh).mean() > 0.5
    zero, _ = image(h, "a red square <lora:dit:0>")
    again, _ = image(h, "a red square")
    assert np.array_equal(zero, fresh) and np.array_equal(again, fresh)
    assert_pristine(h, before)  # a generation without networks runs on the pristine weights
    image(h, "a red square <lora:dit:0.7>")
    h.engine.deactivate()
    assert_pristine(h, before)


def test_the_plan_gets_the_sigmas_the_pipeline_samples_with(host):
    h, _ = host
    pipe = h.model.pipe
    _, result = image(h, "a red square <lora:dit:0@0,1@s0.5>")
    sigmas, _ = flow_schedule(pipe, STEPS, h.model.latent(64, 64))
    assert np.allclose(sigmas, pipe.scheduler.sigmas[:STEPS].numpy(), atol=1e-6)
    assert result.plan.networks[0].base.landed  # the position landed on a step
    assert not [e for e in result.errors if "sigma" in e.lower()]


def test_each_call_tells_the_prompts_rows_from_the_negative_prompts(host):
    """`neg` acts on the negative prompt's rows alone, however the pipeline lays them out."""
    h, _ = host
    arch, b = h.model.arch, 2
    with calls([h.model.pipe.transformer]) as seen, \
            recorded(h.engine, "set_rows") as rows:
        image(h, "a red square <lora:dit:1:neg=0>", batch_size=b)
    per_call = {"sd3": [[True] * b + [False] * b], "zimage": [[False] * b + [True] * b],
                "qwenimage": [[False] * b, [True] * b], "wan22": [[False] * b, [True] * b]}[arch]
    assert rows[-len(per_call):] == per_call and len(seen) >= len(per_call)


@contextlib.contextmanager
def recorded(engine, method):
    target = getattr(engine, "engines", {"one": engine})
    first = next(iter(target.values()))
    original, seen = getattr(first, method), []

    def spy(prompts, uncond):
        original(prompts, uncond)
        seen.append(list(uncond))
    setattr(first, method, spy)
    try:
        yield seen
    finally:
        delattr(first, method)


def test_a_text_encoder_schedule_swaps_the_text_mid_run(host):
    """`te=0@0,1@0.5`: the first text encoder's network from the third step (of 4), encoded
    through the pipeline's own encode_prompt and put into each call (SD3: its pooled vector
    too; Wan: the low-noise expert's calls too, with no warning from its engine)."""
    h, _ = host
    arg, pipe = h.model.family.text_arg, h.model.pipe
    before = snapshot(h)
    with calls([m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m]) as seen:
        swapped, result = image(h, "a red square <lora:te:te=0@0,1@0.5>", cfg_scale=0.0
                                if h.model.arch == "zimage" else 1.0)
    assert not result.errors, result.errors
    text = [kw[arg] if arg in kw else args[h.model.family.text_position] for _, args, kw in seen]
    first = [t[0] if isinstance(t, list) else t for t in text]
    assert len(first) == STEPS and torch.equal(first[0], first[1])
    assert not torch.equal(first[1], first[2]) and torch.equal(first[2], first[3])
    if h.model.arch == "sd3":
        pooled = [kw["pooled_projections"] for _, _, kw in seen]
        assert not torch.equal(pooled[1], pooled[2])
    plain, _ = image(h, "a red square")
    assert not np.array_equal(swapped, plain)
    assert_pristine(h, before)  # the text encoders too


# ---- Wan 2.2: two experts ------------------------------------------------------------------
WAN_STEPS = 6


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_experts")
    model = load_model(str(write_pipeline(root / "tinywan", "wan22")))
    (root / "loras").mkdir()
    deltas = transformer_lora(root / "loras" / "w.safetensors", model.pipe.transformer)
    library = Library([str(root / "loras")], [], base=str(root))
    return DiffusersHost(model, library, MaskStore(str(root / "masks"))), deltas


def strengths_per_call(h, deltas, prompt, **kw):
    """(expert 0/1, strength of the LoRA on that expert's layer) at each transformer call,
    read from the layer's weight while the call runs (a merged network)."""
    h.engine.deactivate()  # the host keeps a generation's merge until the next one
    pipe, name = h.model.pipe, "blocks.0.ffn.net.2"
    experts = [pipe.transformer, pipe.transformer_2]
    layers = [dict(m.named_modules())[name] for m in experts]
    pristine = [layer.weight.detach().clone() for layer in layers]
    delta, found, handles = deltas[name], [], []
    for i, m in enumerate(experts):
        def hook(module, args, i=i):
            d = layers[i].weight.detach() - pristine[i]
            other = layers[1 - i].weight.detach() - pristine[1 - i]
            found.append((i, round(float((d * delta).sum() / (delta * delta).sum()), 4),
                          round(float((other * delta).sum() / (delta * delta).sum()), 4)))
        handles.append(m.register_forward_pre_hook(hook))
    try:
        _, result = image(h, prompt, steps=WAN_STEPS, cfg_scale=1.0, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return found, result


def test_wan_runs_both_experts_each_with_its_strength(wan):
    h, deltas = wan
    pipe = h.model.pipe
    high = high_noise_steps(pipe, WAN_STEPS, h.model.latent(64, 64))
    assert 1 <= high < WAN_STEPS  # both experts run
    before = snapshot(h)
    found, result = strengths_per_call(h, deltas, "a red square <lora:w:0.8:high=1:low=0.5>")
    assert not result.errors, result.errors
    assert [i for i, _, _ in found] == [0] * high + [1] * (WAN_STEPS - high)
    assert {s for _, s, _ in found} == {0.8, 0.4} or high == WAN_STEPS
    assert all(s == (0.8 if i == 0 else 0.4) for i, s, _ in found)
    assert all(o == (0.4 if i == 0 else 0.8) for i, _, o in found)  # the idle one is ready
    assert f'Experts: "high 1-{high}, low {high + 1}-{WAN_STEPS}"' in result.infotexts[0]
    h.engine.deactivate()
    assert_pristine(h, before)
    found, _ = strengths_per_call(h, deltas, "a red square <lora:w:1:high>")  # SD.Next's form
    assert [s for _, s, _ in found] == [1.0] * high + [0.0] * (WAN_STEPS - high)
    h.engine.deactivate()
    assert_pristine(h, before)


def test_wan_explain_compiles_for_the_first_expert(wan):
    """The tab's explain on a two-expert model: the high-noise expert's plan, no warning that
    the model runs one denoiser."""
    from netweave.network.plan import compile_prompt
    h, _ = wan
    ctx = h.context(WAN_STEPS)
    assert ctx.expert == "high"
    plan = compile_prompt("<lora:w:1:high=0.5:low=1>", ctx)
    assert not plan.errors and list(plan.networks[0].base.strength["unet"]) == [0.5] * WAN_STEPS


def test_wan_counts_a_schedule_across_both_experts(wan):
    """A schedule by step number means the run's step on either expert: the low-noise expert's
    first step is not its step 1."""
    h, deltas = wan
    high = high_noise_steps(h.model.pipe, WAN_STEPS, h.model.latent(64, 64))
    found, _ = strengths_per_call(h, deltas, "a red square <lora:w:0.5@1,1@4>")
    assert [s for _, s, _ in found] == [0.5] * 3 + [1.0] * (WAN_STEPS - 3)
    assert high < 3  # the low-noise expert runs steps on both sides of step 4


def test_wan2gps_per_expert_values_step_through_each_experts_own_steps(wan):
    """`<lora:w:1,0.5;0.8>` (Wan2GP): the high-noise expert's two values over its own steps,
    the low-noise expert's one over its; the host says where the experts switch."""
    h, deltas = wan
    high = high_noise_steps(h.model.pipe, WAN_STEPS, h.model.latent(64, 64))
    assert high == 2
    found, result = strengths_per_call(h, deltas, "a red square <lora:w:1,0.5;0.8>")
    assert not result.errors, result.errors
    assert [s for _, s, _ in found] == [1.0, 0.5] + [0.8] * (WAN_STEPS - 2)


def test_wan_frames_come_back_as_pictures(wan):
    h, _ = wan
    _, result = image(h, "a red square <lora:w:1>", frames=5, batch_size=2, steps=2)
    assert len(result.images) == 10 and "Frames: 5" in result.infotexts[0]
    assert result.infotexts[5].count(f"Seed: {result.seed + 1}") == 1
    with pytest.raises(ValueError, match="4k\\+1"):
        image(h, "a red square", frames=4)


def test_wan_frames_through_the_api(wan):
    """A1111's txt2img route with NetWeave's `frames`: every frame an image, the video's seed."""
    import base64
    import io
    import json

    from fastapi.testclient import TestClient
    from PIL import Image

    from netweave.extension.standalone.server import build_app
    h, _ = wan
    client = TestClient(build_app(h, h.library, h.masks, ui=False))
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red square <lora:w:1>", "steps": 2,
                                               "width": 64, "height": 64, "frames": 5,
                                               "cfg_scale": 1, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 5 and json.loads(body["info"])["all_seeds"] == [3] * 5
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][4]))).size == (64, 64)


# ---- single files --------------------------------------------------------------------------
_WAN_ORIGINAL = (  # diffusers' convert_wan_transformer_to_diffusers, read the other way
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"), (".attn2.", ".cross_attn."),
    (".attn1.", ".self_attn."), (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."),
    (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"), (".norm2.", ".norm_x."), (".norm3.", ".norm2."),
    (".norm_x.", ".norm3."))


def wan_original_file(path, transformer):
    """The transformer in the original release's names, as Wan's single files are published."""
    sd = {}
    for key, value in transformer.state_dict().items():
        name = key
        for a, b in _WAN_ORIGINAL:
            name = name.replace(a, b)
        name = "head.modulation" if name == "scale_shift_table" else \
            name.replace(".scale_shift_table", ".modulation")
        sd["model.diffusion_model." + name] = value.clone().contiguous()
    save_file(sd, str(path))


def test_a_single_file_wan_expert_with_its_components(tmp_path):
    """diffusers' converter reads the original names back onto the components' config; a
    folder of two experts is refused (A14B's experts are two files)."""
    one = write_pipeline(tmp_path / "wan1", "wan22")
    import tinypipes
    tinypipes.wan_pipeline(experts=1).save_pretrained(str(tmp_path / "wan21"))
    source = load_model(str(tmp_path / "wan21")).pipe.transformer
    wan_original_file(tmp_path / "expert.safetensors", source)
    model = load_model(str(tmp_path / "expert.safetensors"), components=str(tmp_path / "wan21"))
    assert model.arch == "wan22" and model.name == "expert"
    loaded = model.pipe.transformer.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match="two experts"):
        load_model(str(tmp_path / "expert.safetensors"), components=str(one))
    with pytest.raises(ValueError, match="--components"):
        load_model(str(tmp_path / "expert.safetensors"))


def test_a_regional_text_encoder_network_on_sd3_runs_as_a_text_stream(host):
    """SD3's one call holds [negative; prompt] rows: FlowRun gives the engine the prompt's
    encoding with the network (and its pooled vector) in that layout, so the network runs as a
    text stream of its own (network/blend.py): a second set of rows in the same call, and the
    picture changes inside the region far more than outside."""
    h, _ = host
    if h.model.arch != "sd3":
        pytest.skip("the CLIP-L network is written for SD3 alone")
    size = dict(width=128, height=128)
    plain, _ = image(h, "a red square", **size)
    with calls([h.model.pipe.transformer.transformer_blocks[0]]) as seen:
        left, result = image(h, "a red square <lora:clipl:1:region=left>", **size)
    assert not [e for e in result.errors if "gave no encoding" in e], result.errors
    assert {int(kw["hidden_states"].shape[0]) for _, _, kw in seen} == {4}  # 2 rows, 2 more
    d = np.abs(left - plain).mean(axis=2)
    assert d[:, :64].mean() > 2 * d[:, 64:].mean()
