"""Wan 2.2 A14B: one expert (its two experts share this shape) on both trees (diffusers'
`attn1`/`attn2`, the original `self_attn`/`cross_attn`), every published LoRA key format, blocks, regions on the video's patches (every frame) with
cross-attention's text side left alone and a blended start, `<model:>`, detection and
inspect (tests/dit_contract.py says how each is checked); and one tag on both experts, each
with its own strength (a plan per expert)."""

import pytest
import torch

import dit_contract as dc
from engine_helpers import make_engine, plan
from tinydits import WAN_TEXT, wan_native, wan_to_native, wan_transformer

from netweave.network.detect import detect_architecture
from netweave.network.keymap import KeyMap
from netweave.network.wan_keys import tokens_of

F, H, W, TXT = 2, 8, 12, 5  # frames, latent (4×6 patches a frame), text tokens
# musubi-tuner and ComfyUI write the original names; diffusers, OneTrainer and SimpleTuner
# diffusers' (ai-toolkit's ComfyUI export is the "comfy" format here)
FORMATS = tuple(f for f in dc.FORMATS if f != "aitoolkit")


def inputs(batch=2):
    torch.manual_seed(11)
    return dict(hidden_states=torch.randn(batch, 4, F, H, W),
                encoder_hidden_states=torch.randn(batch, TXT, WAN_TEXT),
                timestep=torch.full((batch,), 600.0))


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


@pytest.fixture(scope="module")
def case():
    return dc.Case("wan22", wan_transformer, wan_native, wan_to_native, inputs, run)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_on_the_diffusers_tree_matches_merging_the_full_delta(fmt, case, tmp_path):
    dc.check_format_on_diffusers(case, fmt, tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_on_the_original_tree_adds_the_full_delta(fmt, case, tmp_path):
    dc.check_format_on_native(case, fmt, tmp_path)


def test_blocks_and_groups(case, tmp_path):
    blocks = {t.name: t.block for t in KeyMap({"unet": case.model}).targets}
    assert (blocks["condition_embedder.time_proj"], blocks["blocks.1.attn2.to_k"],
            blocks["proj_out"]) == ("IN", "B01", "OUT")
    native = wan_native(case.model)
    deltas = dc.write_format(tmp_path / "net.safetensors", dc.random_network(native), "kohya", case.parts)
    host = wan_native(case.model)
    engine = make_engine({"unet": host}, "wan22", tmp_path)
    assert engine.activate(plan("<lora:net:1:in=0:B00=0.5:out=0>", "wan22", steps=2)) == []
    engine.set_step(0)
    dc.assert_native_weights(host, dc.weights(native), {
        n: (0.5 if n.startswith("blocks.0.") else 1.0) * d for n, d in deltas.items()
        if n.startswith("blocks.")})
    engine.deactivate()


def test_a_region_acts_on_every_frames_patches_and_a_blended_start_keeps_the_rest(case, tmp_path):
    """The same mask on each frame's patches; cross-attention's keys and values (the text
    side) and the embedders untouched."""
    dc.check_regions(case, tmp_path, (H, W), tokens_of, lambda n: slice(0, n),
                     lambda out: (out[..., :W // 2], out[..., W // 2:]))


@pytest.mark.parametrize("host", ["diffusers", "native"])
def test_model_blend_from_a_checkpoint_in_the_other_layout(host, case, tmp_path):
    dc.check_model_blend(case, host, tmp_path)


def test_detection(case, tmp_path):
    dc.check_formats_detected(case, FORMATS, tmp_path)
    shape = lambda k: (4, 5120)  # noqa: E731
    assert detect_architecture(["lora_unet__blocks_0_self_attn_q.lora_down.weight"], shape)[0] == "wan22"
    # an SD UNet's transformer_blocks.N.attn1 are no Wan blocks
    assert detect_architecture(["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
                                ".lora_down.weight"], shape)[0] != "wan22"


def test_inspect_maps_a_real_size_file_onto_the_real_tree(tmp_path):
    dc.check_inspect(tmp_path, {
        "diffusion_model.blocks.39.cross_attn.k.lora_A.weight": (1, 5120),
        "diffusion_model.blocks.39.cross_attn.k.lora_B.weight": (5120, 1),
        "lora_unet_blocks_0_ffn_0.lora_down.weight": (1, 5120),
        "lora_unet_blocks_0_ffn_0.lora_up.weight": (13824, 1)}, "wan22", 2)


# ---- two experts, one tag ----------------------------------------------------------------
@pytest.mark.parametrize("prompt, shown", [
    ("<lora:x:1:high>", "<lora:x:1:low=0>"),  # SD.Next: on the high-noise expert only
    ("<lora:x:1.0:low>", "<lora:x:1:high=0>"),
    ("<lora:x:1:module=transformer_2>", "<lora:x:1:high=0>"),
    ("<lora:x:0.8:high=1:low=0.5@0,1@0.9>", "<lora:x:0.8:high=1:low=0.5@0,1@0.9>"),
])
def test_the_expert_forms_parse_and_print_back(prompt, shown):
    from netweave.parser import format_tag, parse
    parsed = parse(prompt)
    assert not parsed.errors and format_tag(parsed.tags[0]) == shown
    assert parse(shown).tags[0] == parsed.tags[0]


def test_an_expert_that_names_no_expert_and_experts_on_a_one_denoiser_model_warn():
    from netweave.network.plan import CompileContext, compile_prompt
    from netweave.parser import parse
    assert "names no expert" in parse("<lora:x:1:module=unet>").errors[0].message
    p = compile_prompt("<lora:x:1:high>", CompileContext(arch="flux", steps=2))
    assert [e.severity for e in p.errors] == ["warning"] and "one denoiser" in p.errors[0].message
    assert list(p.networks[0].base.strength["unet"]) == [1.0, 1.0]


@pytest.mark.parametrize("name, high, low", [
    ("wan2.2_t2v_lightx2v_4steps_lora_v1_high_noise", 1.0, 0.0),  # published pairs' names
    ("Wan2.2-Lightning_T2V-A14B-4steps-lora_LOW_fp16", 0.0, 1.0),
    ("pairs/style_HighNoise", 1.0, 0.0),
    ("style", 1.0, 1.0), ("highres_detail", 1.0, 1.0), ("slow_motion", 1.0, 1.0),
    ("style_high_low", 1.0, 1.0),  # names both: says neither
])
def test_a_network_named_for_one_expert_runs_on_that_expert_only(name, high, low):
    """Wan 2.2 LoRAs are published in pairs named for their expert (…_high_noise and
    …_low_noise), and users put both tags in the prompt, as SD.Next reads them: a tag without
    expert items goes on the expert its name says, and on both where it names none."""
    from netweave.network.plan import CompileContext, compile_prompt
    for expert, want in (("high", high), ("low", low)):
        p = compile_prompt(f"<lora:{name}:0.8>", CompileContext(arch="wan22", steps=2,
                                                                 expert=expert))
        assert not p.errors
        assert list(p.networks[0].base.strength["unet"]) == pytest.approx([0.8 * want] * 2)
        assert list(p.networks[0].base.strength["te"]) == pytest.approx([0.8] * 2)
    said = compile_prompt(f"<lora:{name}:0.8:low=1>", CompileContext(arch="wan22", steps=2,
                                                                   expert="low"))
    assert list(said.networks[0].base.strength["unet"]) == pytest.approx([0.8] * 2)  # its own
    one = compile_prompt(f"<lora:{name}:0.8>", CompileContext(arch="wan22", steps=2))
    assert list(one.networks[0].base.strength["unet"]) == pytest.approx([0.8] * 2)


@pytest.mark.parametrize("tag, high, low", [("<lora:net:0.8:high=1:low=0.5>", 0.8, 0.4),
                                            ("<lora:net:1:high>", 1.0, 0.0),
                                            ("<lora:net:1:module=transformer_2>", 0.0, 1.0)])
def test_one_tag_gives_each_expert_its_own_strength(tag, high, low, case, tmp_path):
    """A host runs each expert with its own plan (CompileContext.expert): the tag's
    high=/low= multiply its strength on that expert."""
    from netweave.network.plan import CompileContext, compile_prompt
    native = wan_native(case.model)
    deltas = dc.write_format(tmp_path / "net.safetensors", dc.random_network(native), "comfy",
                             case.parts)
    for expert, s in (("high", high), ("low", low)):
        host = wan_native(case.model)
        engine = make_engine({"unet": host}, "wan22", tmp_path)
        assert engine.activate(compile_prompt(tag, CompileContext(arch="wan22", steps=2,
                                                                  expert=expert))) == []
        engine.set_step(0)
        dc.assert_native_weights(host, dc.weights(native), {n: s * d for n, d in deltas.items()})
        engine.deactivate()
