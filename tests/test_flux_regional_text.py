"""Regional text-encoder networks on joint attention (network/blend.py's streams, issue 18).

Joint attention has no cross-attention to re-run per region, so a regional network acting on
Flux's text encoders gets a stream of its own in the same forward: the host's rows again with
the prompt encoded with the network (T5 and CLIP-L's pooled vector), its prediction put in by
the region. The reference is two passes of the plain model: one with the text encoded by the
encoders as they are, one with the network merged into copies of them by hand; per token, the
image inside the region is the second pass's and outside it the first's.
"""
import copy

import pytest
import torch
from safetensors.torch import save_file

from engine_helpers import assert_pristine, make_engine, plan, snapshot
from test_flux import H, W, inputs, random_network, run, write_format
from tinymodels import FLUX_CONTEXT, TE1_WIDTH, flux_trees

RANK, ALPHA = 4, 2.0
T5_LAYER = "encoder.block.0.layer.0.SelfAttention.q"
CLIP_LAYER = "encoder.layers.0.self_attn.q_proj"
TEXT_KEYS = {"lora_te3_encoder_block_0_layer_0_SelfAttention_q": ("te2", T5_LAYER, FLUX_CONTEXT),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
                 ("te1", CLIP_LAYER, TE1_WIDTH)}


def text_network(path, seed=21):
    """A kohya-Flux LoRA on one T5 and one CLIP-L layer: {(component, layer): ΔW at 1}."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for key, (component, layer, width) in TEXT_KEYS.items():
        down = torch.randn(RANK, width, generator=g) * 0.5
        up = torch.randn(width, RANK, generator=g) * 0.5
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                   f"{key}.alpha": torch.tensor(ALPHA)})
        deltas[component, layer] = up @ down * (ALPHA / RANK)
    save_file(sd, str(path))
    return deltas


def encode(trees, deltas=None, strength=1.0):
    """(T5's tokens, CLIP-L's pooled vector) for two prompts; with `deltas` merged into copies
    of the encoders by hand."""
    out = []
    for component in ("te2", "te1"):
        te = trees[component].eval()  # a fresh T5 is in training mode: dropout
        if deltas:
            te = copy.deepcopy(te)
            for (c, layer), dw in deltas.items():
                if c == component:
                    with torch.no_grad():
                        te.get_submodule(layer).weight += strength * dw
        ids = torch.tensor([[3, 7, 9, 11, 1], [5, 2, 8, 4, 1]])
        with torch.no_grad():
            result = te(input_ids=ids)
        out.append(result.last_hidden_state if component == "te2" else result.pooler_output)
    return tuple(out)


def engine_encodings(engine, trees):
    """What a host does (extension/flow_run.py): each segment encoded, and once more with
    each regional network; the engine is told both."""
    seg = engine.segment_at(0)
    engine.apply_te(seg)
    t5, pooled = encode(trees)
    variants = {}
    for j in seg.variants:
        engine.apply_te(seg, variant=j)
        variants[j] = encode(trees)
    engine.apply_te(seg)
    engine.set_text_variants(t5, {j: v[0] for j, v in variants.items()}, pooled,
                             {j: v[1] for j, v in variants.items()})
    return t5, pooled, seg


def left_tokens():
    left = torch.zeros(H, W, dtype=torch.bool)
    left[:, :W // 2] = True
    return left.reshape(-1)


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_a_regional_text_encoder_network_conditions_the_tokens_inside_its_region(layout, tmp_path):
    trees = flux_trees("flux", layout)
    before = snapshot(trees)
    deltas = text_network(tmp_path / "words.safetensors")
    x = inputs()
    plain, with_net = encode(trees), encode(trees, deltas, 0.8)
    ref_base = run(trees["unet"], dict(x, txt=plain[0], pooled=plain[1]))
    ref_net = run(trees["unet"], dict(x, txt=with_net[0], pooled=with_net[1]))
    assert not torch.allclose(ref_base, ref_net, atol=1e-3)  # the network changes the text
    masks = {"none": torch.zeros(2 * H * 8, 2 * W * 8).numpy()}
    outs = {}
    for region in ("full", "none", "left"):
        engine = make_engine(trees, "flux", tmp_path, latent=(2 * H, 2 * W), masks=masks)
        assert engine.activate(plan(f"<lora:words:0.8:region={region}>", "flux", steps=2)) == []
        assert not engine.warnings, engine.warnings  # nothing of it is left out
        t5, pooled, seg = engine_encodings(engine, trees)
        assert seg.variants == (0,)
        torch.testing.assert_close(t5, plain[0])  # the prompt's own encoding has no network
        engine.set_step(0)
        outs[region] = run(trees["unet"], dict(x, txt=t5, pooled=pooled))
        assert engine.errors == []
        engine.deactivate()
    assert_pristine(trees, before)
    torch.testing.assert_close(outs["full"], ref_net, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["none"], ref_base, atol=1e-5, rtol=1e-5)
    left = left_tokens()
    torch.testing.assert_close(outs["left"][:, left], ref_net[:, left], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["left"][:, ~left], ref_base[:, ~left], atol=1e-5, rtol=1e-5)


def test_two_regional_text_networks_each_get_their_stream_beside_a_blended_start(tmp_path):
    """Two regional text networks on two halves beside a regional transformer network with a
    blended start: one forward of 4 streams (without, main, one per text network). Each half
    is a pass with its own text network's encoding, the transformer network as one pass has
    it (its blend acts on the main stream; the text streams replace it in their regions)."""
    trees = flux_trees("flux")
    from flux_bfl import from_diffusers
    write_format(tmp_path / "img.safetensors", random_network(from_diffusers(trees["unet"])),
                 "kohya")
    d_a = text_network(tmp_path / "a.safetensors", seed=21)
    d_b = text_network(tmp_path / "b.safetensors", seed=22)
    x = inputs()
    engine = make_engine(trees, "flux", tmp_path, latent=(2 * H, 2 * W))
    tag = ("<lora:a:1:region=left:blend=1> <lora:b:1:region=right> "
           "<lora:img:0.7:region=left:blend=1>")
    assert engine.activate(plan(tag, "flux", steps=2)) == []
    calls = []  # after the engine's hooks: what the model itself is called with
    hook = trees["unet"].register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    t5, pooled, seg = engine_encodings(engine, trees)
    assert seg.variants == (0, 1)
    engine.set_step(0)
    out = run(trees["unet"], dict(x, txt=t5, pooled=pooled))
    engine.deactivate()
    hook.remove()
    assert calls == [4 * 2] and out.shape[0] == 2  # one forward; the host sees its own rows
    engine = make_engine(trees, "flux", tmp_path, latent=(2 * H, 2 * W))
    assert engine.activate(plan("<lora:img:0.7:region=left>", "flux", steps=2)) == []
    engine.set_step(0)
    refs = [run(trees["unet"], dict(x, txt=e[0], pooled=e[1]))
            for e in (encode(trees, d_a), encode(trees, d_b))]
    engine.deactivate()
    left = left_tokens()
    torch.testing.assert_close(out[:, left], refs[0][:, left], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, ~left], refs[1][:, ~left], atol=1e-5, rtol=1e-5)


def test_a_host_that_gives_no_encoding_is_told_and_nothing_else_changes(tmp_path):
    trees = flux_trees("flux")
    text_network(tmp_path / "words.safetensors")
    x = inputs()
    base = run(trees["unet"], x)
    engine = make_engine(trees, "flux", tmp_path, latent=(2 * H, 2 * W))
    assert engine.activate(plan("<lora:words:1:region=left>", "flux", steps=2)) == []
    engine.set_step(0)
    out = run(trees["unet"], x)
    engine.deactivate()
    assert torch.equal(out, base)
    assert any("gave no encoding with it" in e for e in engine.errors), engine.errors


def test_explain_says_which_regional_networks_run_a_text_stream():
    from netweave.network.explain import explain_table
    text = explain_table(plan("<lora:a:1:region=left> <lora:b:1:te=0:unet=1:region=right>",
                              "flux", steps=4))
    a, b = text.split("#2")
    assert "a text stream of its own" in a and "a text stream" not in b
    assert "a text stream" not in explain_table(plan("<lora:a:1:region=left>", "sd1", steps=4))
