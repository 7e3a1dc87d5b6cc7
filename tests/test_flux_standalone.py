"""The standalone host on Flux and Chroma (issue 18): tiny FluxPipeline and ChromaPipeline
diffusers folders written here (transformers like tinymodels.flux_transformer, over a tiny
VAE's 4 latent channels; CLIP and T5 with tokenizers built offline), loaded the way a user's
folder is, generating with and without tags: a kohya-Flux LoRA, a regional one, a schedule by
noise level, Chroma's negative rows; the CLI and the A1111-shaped API on them; single files."""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from netweave.extension.library import Library
from netweave.extension.masks import MaskStore
from netweave.extension.standalone.cli import main
from netweave.extension.standalone.host import DiffusersHost, Request
from netweave.extension.standalone.models import load_model
from netweave.extension.standalone.server import build_app

LATENT_CHANNELS = 4
HIDDEN = 16  # 2 heads × 8
WORDS = "a an red blue green square circle triangle on white black background".split()
STEPS = 4


def tiny_transformer(arch, in_channels=4 * LATENT_CHANNELS):
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel
    torch.manual_seed(3)
    common = dict(patch_size=1, in_channels=in_channels, num_layers=2, num_single_layers=2,
                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                  axes_dims_rope=(2, 2, 4))
    if arch == "chroma":
        model = ChromaTransformer2DModel(approximator_num_channels=8, approximator_hidden_dim=16,
                                         approximator_layers=2, **common)
    else:
        model = FluxTransformer2DModel(pooled_projection_dim=32, guidance_embeds=True, **common)
    with torch.no_grad():  # zero-initialised output layers would hide every change
        for p in model.parameters():
            if float(p.abs().max()) == 0.0:
                p.normal_(0, 0.05)
    return model


def write_pipeline(folder, arch):
    """A FluxPipeline (CLIP-L + T5, distilled guidance) or ChromaPipeline (T5) folder."""
    from diffusers import (AutoencoderKL, ChromaPipeline, FlowMatchEulerDiscreteScheduler,
                           FluxPipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from netweave.extension.tokenizer import clip_tokenizer, t5_tokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                        layers_per_block=1, block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, shift_factor=0.1,
                        scaling_factor=1.5)
    t5_tok = t5_tokenizer(WORDS, max_length=16)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=24, d_kv=8, d_ff=32,
                                 num_layers=2, num_heads=3, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    if arch == "flux":
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                            tokenizer=clip_tokenizer(), text_encoder_2=t5, tokenizer_2=t5_tok,
                            transformer=tiny_transformer("flux"))
    else:
        pipe = ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=t5, tokenizer=t5_tok,
                              transformer=tiny_transformer("chroma"))
    pipe.save_pretrained(str(folder))
    return folder


def kohya_flux_lora(path, double=2, single=2, seed=5, scale=0.4, only=None):
    """A kohya sd-scripts Flux LoRA (BFL layer names, fused qkv and linear1, alpha) on every
    attention and MLP layer of the tiny transformer; `only`: a name filter."""
    h = HIDDEN
    layers = {}
    for i in range(double):
        for s in ("img", "txt"):
            layers[f"double_blocks_{i}_{s}_attn_qkv"] = (3 * h, h)
            layers[f"double_blocks_{i}_{s}_attn_proj"] = (h, h)
            layers[f"double_blocks_{i}_{s}_mlp_0"] = (4 * h, h)
            layers[f"double_blocks_{i}_{s}_mlp_2"] = (h, 4 * h)
    for i in range(single):
        layers[f"single_blocks_{i}_linear1"] = (7 * h, h)
        layers[f"single_blocks_{i}_linear2"] = (h, 5 * h)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inp) in layers.items():
        if only is not None and not only(name):
            continue
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(4, inp, generator=g) * scale
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, 4, generator=g) * scale
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path))


def text_lora(path, seed=8, scale=1.5):
    """A kohya-Flux LoRA on the text encoders only: T5's first attention (te3 in kohya's
    Flux files) and CLIP-L's (te1)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, width in (("lora_te3_encoder_block_0_layer_0_SelfAttention_q", 24),
                       ("lora_te3_encoder_block_1_layer_1_DenseReluDense_wo", None),
                       ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32)):
        inp, out = (32, 24) if width is None else (width, width)
        sd[f"{key}.lora_down.weight"] = torch.randn(4, inp, generator=g) * scale
        sd[f"{key}.lora_up.weight"] = torch.randn(out, 4, generator=g) * scale
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux_standalone")
    loras = root / "loras"
    loras.mkdir()
    kohya_flux_lora(loras / "kflux.safetensors")
    kohya_flux_lora(loras / "kflux_single.safetensors", seed=6,
                    only=lambda n: n.startswith("single"))
    text_lora(loras / "kwords.safetensors")
    return {"flux": write_pipeline(root / "tinyflux", "flux"),
            "chroma": write_pipeline(root / "tinychroma", "chroma"), "root": root,
            "loras": loras}


def make_host(folders, arch):
    root = folders["root"]
    library = Library([str(folders["loras"])], [], base=str(root))
    masks = MaskStore(str(root / "masks"))
    return DiffusersHost(load_model(str(folders[arch])), library, masks), library, masks


@pytest.fixture(scope="module")
def flux(folders):
    return make_host(folders, "flux")


@pytest.fixture(scope="module")
def chroma(folders):
    return make_host(folders, "chroma")


def snapshot(host):
    return {c: {k: v.clone() for k, v in t.state_dict().items()}
            for c, t in host.model.trees().items()}


def assert_pristine(host, before):
    for c, t in host.model.trees().items():
        for k, v in t.state_dict().items():
            assert torch.equal(v, before[c][k]), (c, k)


@contextlib.contextmanager
def recorded(engine, method, what):
    """While inside: after each call of engine.<method>, what(its arguments) is recorded."""
    original, seen = getattr(engine, method), []

    def spy(*args, **kwargs):
        original(*args, **kwargs)
        seen.append(what(*args, **kwargs))
    setattr(engine, method, spy)
    try:
        yield seen
    finally:
        setattr(engine, method, original)


def image(host, prompt, **kw):
    req = dict(prompt=prompt, steps=STEPS, seed=7, width=64, height=64,
               cfg_scale=host.model.default_cfg)
    req.update(kw)
    result = host.txt2img(Request(**req))
    return np.asarray(result.images[0], dtype=np.float64), result


# ---- loading ---------------------------------------------------------------------------
def test_a_flux_and_a_chroma_folder_load_with_their_trees(flux, chroma):
    model = flux[0].model
    assert model.arch == "flux" and model.flow and model.distilled
    trees = model.trees()
    assert set(trees) == {"unet", "te1", "te2"}
    assert trees["unet"] is model.pipe.transformer and trees["te2"] is model.pipe.text_encoder_2
    # 2×2 patches of an 8× VAE: pictures go by 16 px; the pipeline's default sample size
    assert model.vae_scale == 16 and model.size == 128 * 8 and model.latent(64, 48) == (8, 6)
    assert model.default_cfg == 3.5
    c = chroma[0].model
    assert c.arch == "chroma" and not c.distilled and set(c.trees()) == {"unet", "te2"}
    assert c.trees()["te2"] is c.pipe.text_encoder and c.default_cfg == 5.0


def test_a_missing_tokenizer_is_named(folders, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(folders["flux"], broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ValueError, match=r"tokenizer_2/ \(T5-XXL's tokenizer .*cannot be "
                                         "downloaded here"):
        load_model(str(broken))


# ---- generating --------------------------------------------------------------------------
def test_flux_tags_change_the_image_and_the_weights_come_back_bit_exact(flux):
    host = flux[0]
    before = snapshot(host)
    base, result = image(host, "a red square")
    assert result.errors == []
    assert "CFG scale: 1, Distilled CFG Scale: 3.5, Shift: " in result.infotexts[0]
    same, _ = image(host, "a red square")
    assert np.array_equal(base, same)
    lora, result = image(host, "a red square <lora:kflux:1>")
    assert result.errors == [] and np.abs(lora - base).mean() > 1.0
    assert 'Lora hashes: "kflux: ' in result.infotexts[0]
    zero, _ = image(host, "a red square <lora:kflux:0>")  # weight 0 is the model itself
    assert np.array_equal(zero, base)
    host.engine.deactivate()
    assert_pristine(host, before)
    again, _ = image(host, "a red square")
    assert np.array_equal(again, base)


def test_flux_guidance_is_the_cfg_field_and_neg_warns(flux):
    host = flux[0]
    low, _ = image(host, "a red square", cfg_scale=1.0)
    high, result = image(host, "a red square <lora:kflux:0.5:neg=0>", cfg_scale=6.0)
    assert any("no negative prompt rows" in e for e in result.errors), result.errors
    base, _ = image(host, "a red square", cfg_scale=6.0)
    assert not np.array_equal(low, base)


def test_a_regional_flux_lora_changes_its_half_most(flux):
    """On the image tokens of the left half (8×8 packed patches at 128 px); attention carries
    some of it to the right."""
    host = flux[0]
    size = dict(width=128, height=128)
    base, _ = image(host, "a red square", **size)
    whole, _ = image(host, "a red square <lora:kflux_single:1>", **size)
    left, result = image(host, "a red square <lora:kflux_single:1:region=left>", **size)
    assert not any(e.startswith("error") for e in result.errors), result.errors
    d = np.abs(left - base).mean(axis=2)
    assert d[:, :64].mean() > 2 * d[:, 64:].mean(), (d[:, :64].mean(), d[:, 64:].mean())
    # the left half comes near the network on the whole picture there
    assert np.abs(left - whole)[:, :64].mean() < np.abs(base - whole)[:, :64].mean()


def test_a_regional_text_encoder_lora_runs_as_its_own_stream_on_its_half(flux):
    """T5 and CLIP-L encode the prompt once more with the network; the transformer runs that
    stream beside the prompt's in one call per step, and its prediction counts inside the
    region only (network/blend.py)."""
    host = flux[0]
    size = dict(width=128, height=128)
    calls = []
    hook = host.model.pipe.transformer.x_embedder.register_forward_hook(  # inside the model
        lambda m, a, out: calls.append(a[0].shape[0]))
    try:
        base, _ = image(host, "a red square", **size)
        whole, _ = image(host, "a red square <lora:kwords:1>", **size)
        calls.clear()
        left, result = image(host, "a red square <lora:kwords:1:region=left>", **size)
    finally:
        hook.remove()
    assert result.errors == [], result.errors
    assert calls == [2] * STEPS  # one call per step: the picture's row and the stream's
    d_base, d_whole = np.abs(left - base).mean(axis=2), np.abs(left - whole).mean(axis=2)
    assert np.abs(whole - base).mean() > 1.0  # the network changes the picture
    # inside: the whole-picture network's image; outside: the model's own, both nearly
    assert d_whole[:, :56].mean() < 0.5 * d_base[:, :56].mean(), (d_whole[:, :56].mean(),
                                                                  d_base[:, :56].mean())
    assert d_base[:, 72:].mean() < 0.5 * d_whole[:, 72:].mean(), (d_base[:, 72:].mean(),
                                                                  d_whole[:, 72:].mean())


def test_the_plan_gets_the_pipelines_sigmas_and_sigma_positions_land(flux):
    from netweave.extension.flow_run import flow_schedule
    host = flux[0]
    sigmas, shift = flow_schedule(host.model.pipe, STEPS, (8, 8))
    between = (sigmas[1] + sigmas[2]) / 2
    engine = host.engine
    target = engine.keymap.pieces("lora_unet_single_blocks_0_linear2")[0].target
    with recorded(engine, "set_step", lambda k, phase="base": engine.strengths(target)) as seen:
        _, result = image(host, f"a red square <lora:kflux:1:start=s{between:.6f}>")
    assert result.errors == []  # no "the host gave no sigmas"
    ran = [float(s) for s in host.model.pipe.scheduler.sigmas[:STEPS]]
    assert result.plan.sigmas == pytest.approx(ran) and list(sigmas) == pytest.approx(ran)
    # dynamic shifting: mu from the 4×4 packed tokens, as the pipeline computes it
    assert shift == pytest.approx(np.exp(0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)))
    assert [now.get(0, 0.0) for now in seen] == [0.0, 0.0, 1.0, 1.0]
    # a schedule from a noise level changes less than the network all the way
    base, _ = image(host, "a red square")
    late, _ = image(host, f"a red square <lora:kflux:1:start=s{between:.6f}>")
    full, _ = image(host, "a red square <lora:kflux:1>")
    assert 0 < np.abs(late - base).mean() < np.abs(full - base).mean()


def test_chroma_runs_true_cfg_with_negative_rows(chroma):
    host = chroma[0]
    before = snapshot(host)
    with recorded(host.engine, "set_rows", lambda prompts, uncond: tuple(uncond)) as rows:
        base, result = image(host, "a red square", negative_prompt="blue", cfg_scale=4.0)
    assert result.errors == [] and "CFG scale: 4.0, Shift: " in result.infotexts[0]
    # one call of the prompt's rows, then one of the negative prompt's, at every step
    assert rows[1:] == [(False,), (True,)] * STEPS
    lora, _ = image(host, "a red square <lora:kflux:1>", negative_prompt="blue", cfg_scale=4.0)
    neg0, result = image(host, "a red square <lora:kflux:1:neg=0>", negative_prompt="blue",
                         cfg_scale=4.0)
    assert result.errors == []
    assert np.abs(lora - base).mean() > 1.0 and not np.array_equal(neg0, lora)
    one, _ = image(host, "a red square", negative_prompt="blue", cfg_scale=1.0)  # no negative pass
    assert not np.array_equal(one, base)
    host.engine.deactivate()
    assert_pristine(host, before)


def test_a_flow_model_refuses_what_its_pipeline_cannot_run(flux):
    from netweave.extension.standalone.samplers import Sampler
    host = flux[0]
    assert host.samplers() == [Sampler.EULER]
    with pytest.raises(ValueError, match="multiples of 16 for this flux model"):
        host.txt2img(Request(prompt="x", steps=2, width=72, height=64))
    with pytest.raises(ValueError, match="samples with Euler"):
        host.txt2img(Request(prompt="x", steps=2, width=64, height=64, sampler=Sampler.DDIM))


# ---- the CLI and the API -------------------------------------------------------------------
def test_generate_and_explain_on_a_flux_folder(folders, tmp_path, capsys):
    out = tmp_path / "flux.png"
    assert main(["generate", "--prompt", "a red square <lora:kflux:0.5:double=0>", "--steps", "3",
                 "--width", "64", "--height", "64", "--out", str(out), "--checkpoint",
                 str(folders["flux"]), "--lora-dir", str(folders["loras"]),
                 "--mask-dir", str(tmp_path / "masks")]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "Distilled CFG Scale: 3.5" in text and "Model: tinyflux" in text
    assert main(["explain", "<lora:x:1@0,0@s0.5>", "--steps", "4", "--arch", "flux",
                 "--shift", "3"]) == 0


def test_the_api_and_page_on_chroma(chroma):
    host, library, masks = chroma
    client = TestClient(build_app(host, library, masks, ui=False))
    assert [s["name"] for s in client.get("/sdapi/v1/samplers").json()] == ["Euler"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red square <lora:kflux:1>",
                                                "negative_prompt": "blue", "steps": 2,
                                                "width": 64, "height": 64, "cfg_scale": 3})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["netweave"]["errors"] == [] and "Shift: " in info["infotexts"][0]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 72,
                                                "height": 64})
    assert r.status_code == 422 and "multiples of 16" in r.text


def test_forge_clients_guidance_field_on_flux_dev(flux):
    host, library, masks = flux
    client = TestClient(build_app(host, library, masks, ui=False))
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red square", "steps": 2, "width": 64,
                                                "height": 64, "cfg_scale": 1,
                                                "distilled_cfg_scale": 2.5})
    assert r.status_code == 200
    assert "Distilled CFG Scale: 2.5" in json.loads(r.json()["info"])["infotexts"][0]


# ---- single files ------------------------------------------------------------------------
def bfl_file(path, model, prefix="model.diffusion_model."):
    from flux_bfl import bfl_state_dict
    cfg = model.config
    sd = bfl_state_dict(model.state_dict(), cfg.num_layers, cfg.num_single_layers)
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_a_single_file_without_components_or_of_another_width_says_what_is_missing(
        folders, tmp_path):
    path = bfl_file(tmp_path / "tiny.safetensors", tiny_transformer("flux"))
    with pytest.raises(ValueError, match=r"Flux transformer only: its text encoders "
                                         r"\(CLIP-L and T5-XXL\).*--components FOLDER"):
        load_model(str(path))
    with pytest.raises(ValueError, match="not a Flux pipeline folder"):
        load_model(str(path), components=str(folders["chroma"]))
    with pytest.raises(ValueError, match=r"16 wide .*published width \(3072"):
        load_model(str(path), components=str(folders["flux"]))
    chroma = tmp_path / "chroma.safetensors"  # what detection reads: BFL blocks, the approximator
    save_file({f"diffusion_model.{k}": torch.zeros(2, 2) for k in (
        "img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight",
        "single_blocks.0.linear1.weight", "distilled_guidance_layer.in_proj.weight")}, str(chroma))
    with pytest.raises(ValueError, match=r"Chroma transformer only: its text encoders \(T5-XXL\)"):
        load_model(str(chroma))


def test_the_single_file_config_is_the_published_one_with_the_files_counts():
    """The config written for a BFL file at the published width builds the reference Flux.1
    dev tree's shapes; counts, widths and the guidance layer come from the file."""
    from diffusers import FluxTransformer2DModel

    from netweave.extension.standalone.flow_models import config_folder, transformer_config
    from netweave.network.reference import reference_trees
    shapes = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
              "vector_in.in_layer.weight": (3072, 768), "guidance_in.in_layer.weight": (3072, 256),
              "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
              "double_blocks.0.img_mlp.0.weight": (4 * 3072, 3072),
              **{f"double_blocks.{i}.img_attn.qkv.weight": (9216, 3072) for i in range(19)},
              **{f"single_blocks.{i}.linear1.weight": (21504, 3072) for i in range(38)}}
    config = transformer_config(shapes, "flux", "dev.safetensors")
    assert config == dict(in_channels=64, num_layers=19, num_single_layers=38,
                          joint_attention_dim=4096, guidance_embeds=True,
                          pooled_projection_dim=768)
    folder = config_folder("flux", config)
    with torch.device("meta"):
        built = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(os.path.join(folder, "transformer")))
    assert {k: v.shape for k, v in built.state_dict().items()} == \
        {k: v.shape for k, v in reference_trees("flux")["unet"].state_dict().items()}
    del shapes["guidance_in.in_layer.weight"]  # schnell
    assert transformer_config(shapes, "flux", "schnell")["guidance_embeds"] is False


@pytest.mark.skipif(not os.environ.get("NETWEAVE_BIG_TESTS"),
                    reason="writes a 1 GB transformer at the published width (NETWEAVE_BIG_TESTS=1)")
def test_a_published_width_single_file_runs_with_components(folders, tmp_path):
    """One double and one single block at Flux.1's width (3072, heads of 128) with the tiny
    folder's VAE and text encoders (T5 width 24 → joint dim 24, CLIP pooled 32): diffusers'
    converter reads it, and the host draws with a LoRA on it."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1,
                                   joint_attention_dim=24, pooled_projection_dim=32,
                                   guidance_embeds=True).to(torch.bfloat16)
    path = bfl_file(tmp_path / "flux-1x1.safetensors", model)
    loaded = load_model(str(path), components=str(folders["flux"]))
    assert loaded.arch == "flux" and loaded.pipe.transformer.config.num_layers == 1
    for (k, v), w in zip(model.state_dict().items(), loaded.pipe.transformer.state_dict().values()):
        assert torch.equal(v.float(), w.float()), k
    host = DiffusersHost(loaded, Library([str(folders["loras"])], []), {})
    base, _ = image(host, "a red square", steps=2)
    assert base.shape == (64, 64, 3)


def test_the_page_on_flux_dev_calls_its_cfg_field_guidance(flux):
    host, library, masks = flux
    page = TestClient(build_app(host, library, masks, ui=True)).get("/")
    assert page.status_code == 200 and "Distilled CFG scale (guidance)" in page.text
