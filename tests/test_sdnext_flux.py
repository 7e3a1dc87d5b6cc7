"""SD.Next's Flux.1 and Chroma pipelines through the SD.Next adapter, in the stand-ins of
SD.Next's host modules (tests/sdnext_host: the Flux text path, sd_hijack_te's prompt cache,
true_cfg_scale), on tiny FluxPipeline and ChromaPipeline models loaded from folders as SD.Next
loads them (test_flux_standalone writes them; T5 padded to 512 tokens, as SD.Next encodes)."""
import numpy as np
import pytest
import torch

from test_flux_standalone import STEPS, kohya_flux_lora, write_pipeline
from test_sdnext import generate, same, sdnext_host

TYPES = {"flux": "f1", "chroma": "chroma"}  # SD.Next's shared.sd_model_type
PROMPT = "a red square"


def load(arch):
    """The pipeline as SD.Next's loader leaves it: its encode_prompt hijacked (model_flux.py,
    model_chroma.py call sd_hijack_te.init_hijack); kohya Flux LoRAs and a T5-only network."""
    def make(root):
        from diffusers import ChromaPipeline, FluxPipeline
        from modules import sd_hijack_te
        folder = write_pipeline(root / f"tiny{arch}", arch)
        pipe = (FluxPipeline if arch == "flux" else ChromaPipeline).from_pretrained(str(folder))
        (pipe.tokenizer_2 if arch == "flux" else pipe.tokenizer).model_max_length = 512
        sd_hijack_te.init_hijack(pipe)
        kohya_flux_lora(root / "Lora" / "kflux.safetensors")
        kohya_flux_lora(root / "Lora" / "kflux_single.safetensors", seed=6,
                        only=lambda n: n.startswith("single"))
        t5_lora(root / "Lora" / "t5net.safetensors",
                pipe.text_encoder_2 if arch == "flux" else pipe.text_encoder)
        return pipe
    return make


def t5_lora(path, t5, seed=3, scale=0.5, prefix="lora_te3_",
            only=lambda name: name.startswith("encoder.")):
    """A kohya LoRA on every linear layer of T5 (`lora_te3_encoder_block_…`, as sd-scripts
    names the Flux T5's layers), or of another text encoder's layers that `only` keeps, under
    `prefix`."""
    from safetensors.torch import save_file
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, m in t5.named_modules():
        if isinstance(m, torch.nn.Linear) and only(name):
            key = prefix + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(4, m.in_features, generator=g) * scale
            sd[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=g) * scale
            sd[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path))


@pytest.fixture(scope="module", params=["flux", "chroma"])
def host(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"sdnext_{arch}")
    with sdnext_host(root, load(arch), TYPES[arch]) as (adapter, builtin):
        yield arch, adapter, builtin


def draw(adapter, arch, prompt, **kw):
    kw.setdefault("cfg_scale", 3.5 if arch == "flux" else 4.0)
    kw.setdefault("negative_prompt", "" if arch == "flux" else "blue")
    kw = dict(dict(steps=STEPS, width=64, height=64), **kw)
    out, p = generate(adapter, prompt, **kw)
    return np.asarray(out.images[0], dtype=np.float64), out, p


def weights():
    """Every transformer and text encoder of the pipeline (Wan 2.2: both experts)."""
    from modules import shared
    pipe = shared.sd_model
    parts = [getattr(pipe, n, None) for n in ("transformer", "transformer_2", "text_encoder",
                                             "text_encoder_2", "text_encoder_3")]
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in parts if m is not None]


def test_trees_and_architecture_from_sdnexts_pipeline(host):
    arch, adapter, _ = host
    engine, pipe = engine_of_a_generation(adapter, arch)
    if arch == "flux":
        assert engine.trees["te1"] is pipe.text_encoder
        assert engine.trees["te2"] is pipe.text_encoder_2
    else:
        assert set(engine.trees) == {"unet", "te2"} and engine.trees["te2"] is pipe.text_encoder


def engine_of_a_generation(adapter, arch):
    """(the adapter's engine, the pipeline) after a generation: the architecture SD.Next's
    model type names, the transformer as the engine's "unet"."""
    from modules import shared
    pipe = shared.sd_model
    draw(adapter, arch, PROMPT)
    engine = adapter.ADAPTER.engine_for()
    assert adapter.Adapter.arch() == engine.arch == arch
    assert engine.trees["unet"] is pipe.transformer
    return engine, pipe


def test_a_kohya_lora_changes_the_image_and_no_tags_is_sdnexts_own(host):
    arch, adapter, _ = host
    check_a_lora_and_no_tags(adapter, arch, "kflux")


def check_a_lora_and_no_tags(adapter, arch, name):
    """Without tags SD.Next's own picture (NetWeave hands nothing in); with the LoRA
    NetWeave's text in p.task_args and another picture; at 0 and after it, SD.Next's picture
    again and every weight as before."""
    before = weights()
    off, _, _ = draw(adapter, arch, PROMPT, enabled=False)
    fresh, out, p = draw(adapter, arch, PROMPT)
    assert same(fresh, off) and "prompt_embeds" not in p.task_args  # NetWeave left it alone
    lora, out, p = draw(adapter, arch, f"{PROMPT} <lora:{name}:1>")
    assert "NetWeave errors" not in out.extra_generation_params, out.extra_generation_params
    assert out.extra_generation_params["Lora hashes"].startswith(f"{name}: ")
    assert p.task_args["prompt"] is None and p.task_args["prompt_embeds"] is not None
    assert np.abs(lora - fresh).mean() > 1e-3
    zero, _, _ = draw(adapter, arch, f"{PROMPT} <lora:{name}:0>")  # NetWeave's text, no change
    assert same(zero, fresh)
    again, _, _ = draw(adapter, arch, PROMPT)
    assert same(again, fresh)
    for b, a in zip(before, weights()):  # restored bit for bit
        assert all(torch.equal(b[k], a[k]) for k in b)


def test_the_builtins_fused_lora_is_released(host):
    arch, adapter, builtin = host
    fresh, _, _ = draw(adapter, arch, PROMPT)
    draw(adapter, arch, f"{PROMPT} <lora:kflux:1>", enabled=False)
    assert builtin.fused["transformer"] == ["kflux"]
    out, _, _ = draw(adapter, arch, PROMPT)
    assert builtin.fused["transformer"] == [] and same(out, fresh)


def test_a_text_encoder_network_never_reaches_sdnexts_prompt_caches(host):
    """SD.Next's Flux/Chroma encode_prompt caches by the prompt text alone (sd_hijack_te):
    NetWeave encodes with its weights itself, so no later generation gets that encoding."""
    arch, adapter, _ = host
    from modules import sd_hijack_te
    fresh, _, _ = draw(adapter, arch, PROMPT)
    sd_hijack_te.calls.clear()
    t5, out, _ = draw(adapter, arch, f"{PROMPT} <lora:t5net:1>")
    assert all(c is None for c in sd_hijack_te.calls)  # the pipeline's own pass-through only
    assert "NetWeave errors" not in out.extra_generation_params
    assert np.abs(t5 - fresh).mean() > 1e-3
    assert same(draw(adapter, arch, PROMPT, enabled=False)[0], fresh)
    assert same(draw(adapter, arch, PROMPT)[0], fresh)
    assert same(draw(adapter, arch, f"{PROMPT} <lora:t5net:1>")[0], t5)


def test_a_text_encoder_schedule_swaps_the_text_mid_run(host):
    arch, adapter, _ = host
    swapped = []
    original = adapter.FlowRun._before_call

    def spy(self, module, args, kwargs):
        out = original(self, module, args, kwargs)
        swapped.append(out is not None)
        return out
    adapter.FlowRun._before_call = spy
    try:
        draw(adapter, arch, f"{PROMPT} <lora:t5net:te=0@0,1@0.5>")
    finally:
        adapter.FlowRun._before_call = original
    calls = 1 if arch == "flux" else 2  # Chroma: the prompt's rows, then the negative's
    assert swapped == [False] * 2 * calls + [True] * 2 * calls


def test_a_regional_lora_changes_its_half_most(host):
    arch, adapter, _ = host
    size = dict(width=128, height=128)
    base, _, _ = draw(adapter, arch, PROMPT, **size)
    left, out, _ = draw(adapter, arch, f"{PROMPT} <lora:kflux_single:1:region=left>", **size)
    assert "NetWeave errors" not in out.extra_generation_params
    d = np.abs(left - base).mean(axis=2)
    assert d[:, :64].mean() > 2 * d[:, 64:].mean(), (d[:, :64].mean(), d[:, 64:].mean())


def test_sigma_positions_land_on_the_pipelines_sigmas(host):
    arch, adapter, _ = host
    from modules import shared
    from netweave.extension.flow_run import flow_schedule
    sigmas, _ = flow_schedule(shared.sd_model, STEPS, (16, 16))  # 64 px: a 16×16 VAE latent
    between = (sigmas[1] + sigmas[2]) / 2
    engine = adapter.ADAPTER.engine_for()
    target = engine.keymap.pieces("lora_unet_single_blocks_0_linear2")[0].target
    seen, original = [], engine.set_step

    def set_step(k, phase="base"):
        original(k, phase)
        seen.append(engine.strengths(target).get(0, 0.0))
    engine.set_step = set_step
    try:
        _, out, _ = draw(adapter, arch, f"{PROMPT} <lora:kflux:1:start=s{between:.6f}>")
    finally:
        engine.set_step = original
    assert "NetWeave errors" not in out.extra_generation_params  # the sigmas were given
    plan, = adapter.ADAPTER.session.plans
    ran = [float(s) for s in shared.sd_model.scheduler.sigmas[:STEPS]]
    assert plan.sigmas == pytest.approx(ran)
    assert seen == [0.0, 0.0, 1.0, 1.0]


def test_negative_rows_chroma_runs_them_flux_dev_has_none(host):
    arch, adapter, _ = host
    engine = adapter.ADAPTER.engine_for()
    rows, original = [], engine.set_rows

    def set_rows(prompts, uncond):
        rows.append(tuple(uncond))
        original(prompts, uncond)
    engine.set_rows = set_rows
    try:
        lora, _, _ = draw(adapter, arch, f"{PROMPT} <lora:kflux:1>")
        neg0, out, _ = draw(adapter, arch, f"{PROMPT} <lora:kflux:1:neg=0>")
    finally:
        engine.set_rows = original
    errors = out.extra_generation_params.get("NetWeave errors", "")
    if arch == "chroma":  # true CFG: the prompt's rows, then the negative prompt's, each step
        assert rows[-2 * STEPS:] == [(False,), (True,)] * STEPS
        assert errors == "" and not same(neg0, lora)
    else:  # guidance-distilled: one call of the prompt's rows a step; neg= warns
        assert rows[-STEPS:] == [(False,)] * STEPS
        assert "neg" in errors and same(neg0, lora)
        true_cfg, _, _ = draw(adapter, arch, f"{PROMPT} <lora:kflux:1>", cfg_true=2.0,
                              negative_prompt="blue")
        assert not same(true_cfg, lora)


def test_the_hires_pass_keeps_the_base_pass_last_step(host):
    arch, adapter, _ = host
    engine = adapter.ADAPTER.engine_for()
    seen, original = [], engine.set_step

    def set_step(k, phase="base"):
        original(k, phase)
        seen.append((phase, k))
    engine.set_step = set_step
    try:
        _, out, _ = draw(adapter, arch, f"{PROMPT} <lora:kflux:1:hr=0.5>", enable_hr=True,
                         hr_second_pass_steps=2)
    finally:
        engine.set_step = original
    assert seen == [("base", k) for k in range(STEPS)]
    assert "keeps the base pass's last step" in out.extra_generation_params["NetWeave errors"]
    _, out, _ = draw(adapter, arch, PROMPT, enable_hr=True, hr_second_pass_steps=2)
    assert "NetWeave errors" not in out.extra_generation_params
