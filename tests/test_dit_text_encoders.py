"""The text encoders of the newer transformers (issue 19): Z-Image's Qwen3, Qwen-Image's
Qwen2.5-VL language model, SD3.5's T5-XXL (te3) and Wan 2.2's umT5, each a real transformers
class in a tiny configuration beside its model's tiny transformer. Every published key format
merges exactly the ΔW a hand merge adds (LoRA everywhere, LoKr and LoHa once each), restore
is bit-exact, blocks and `te=` reach the encoder, detection tells each model from its text
encoder's keys alone, and `inspect` maps real-size files onto the published encoders on the
meta device (network/te_keys.py, lm_keys.py, t5_keys.py; docs/design.md §3, §5)."""
import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from engine_helpers import assert_pristine, make_engine, plan, snapshot
from tinydits import qwen_transformer, sd3_transformer, wan_transformer, zimage_transformer

from netweave.network.blocks import BLOCKS
from netweave.network.detect import detect_architecture
from netweave.network.explain import explain_table
from netweave.network.keymap import KeyMap

RANK, ALPHA = 2, 3.0
IDS = torch.tensor([[3, 7, 9, 11, 1], [5, 2, 8, 4, 1]])


def qwen3(causal=True, width=32):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model
    torch.manual_seed(7)
    config = Qwen3Config(vocab_size=64, hidden_size=width, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return (Qwen3ForCausalLM if causal else Qwen3Model)(config).eval()


def qwen25_vl(width=32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(7)
    section = [1, 1, width // 8 - 2]  # a quarter of the head (4 heads): half its rotary pairs
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=width, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": section}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2,
                           out_hidden_size=width, fullatt_block_indexes=[0]))).eval()


def t5(umt5=False, width=32):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel
    torch.manual_seed(7)
    kw = dict(vocab_size=64, d_model=width, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return (UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))).eval()


def encode(te):
    with torch.no_grad():
        out = te(input_ids=IDS, output_hidden_states=True)
    return out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state


# Where the decoder sits in each host class (what a file writes before `layers.N`, or T5's
# `encoder.block.N`), written out by hand from the classes, never from NetWeave's tables.
def lm_paths(te):
    return {n[n.index("layers."):]: n for n, m in te.named_modules()
            if isinstance(m, nn.Linear) and ("." + n).count(".layers.") and "visual" not in n}


def t5_paths(te):
    return {n: n for n, m in te.named_modules() if isinstance(m, nn.Linear)}


def us(name):
    return name.replace(".", "_")


# (architecture, component, block, the encoder, its transformer, {format: layer key of a
# canonical layer, kohya style (lora_down/up + alpha) or PEFT (lora_A/B, alpha baked)}).
CASES = {
    "zimage": ("zimage", "te1", "QWEN3", qwen3, zimage_transformer, lm_paths, {
        "comfy": lambda n: f"text_encoders.qwen3_4b.transformer.model.{n}",
        "diffusers": lambda n: f"text_encoder.model.{n}",
        "diffsynth": lambda n: f"model.{n}",  # its wrapper holds a Qwen3Model as `model`
        "kohya": lambda n: f"lora_te_model_{us(n)}",
    }),
    "zimage-qwen3model": ("zimage", "te1", "QWEN3", lambda: qwen3(causal=False),
                          zimage_transformer, lm_paths, {
        "diffusers": lambda n: f"text_encoder.{n}",
        "kohya": lambda n: f"lora_te1_{us(n)}",
    }),
    "qwenimage": ("qwenimage", "te1", "QWENVL", qwen25_vl, qwen_transformer, lm_paths, {
        "comfy": lambda n: f"text_encoders.qwen25_7b.transformer.model.{n}",
        "diffusers": lambda n: f"text_encoder.model.language_model.{n}",
        "diffusers-old": lambda n: f"text_encoder.model.{n}",  # transformers before 4.52
        "diffsynth": lambda n: f"model.language_model.{n}",
        "kohya": lambda n: f"lora_te1_model_language_model_{us(n)}",
    }),
    "sd3": ("sd3", "te3", "T5", t5, sd3_transformer, t5_paths, {
        "kohya": lambda n: f"lora_te3_{us(n)}",  # sd-scripts and OneTrainer
        "comfy": lambda n: f"text_encoders.t5xxl.transformer.{n}",
        "diffusers": lambda n: f"text_encoder_3.{n}",
    }),
    "wan22": ("wan22", "te1", "UMT5", lambda: t5(umt5=True), wan_transformer, t5_paths, {
        "comfy": lambda n: f"text_encoders.umt5xxl.transformer.{n}",
        "diffusers": lambda n: f"text_encoder.{n}",
        "kohya": lambda n: f"lora_te1_{us(n)}",
    }),
}
FORMATS = [(case, fmt) for case, spec in CASES.items() for fmt in spec[6]]


def write_lora(path, te, paths, key, seed=3):
    """A LoRA on every linear layer of the encoder in one format: {host path: ΔW at 1}."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    kohya = key("x").startswith("lora_")
    for name, host in paths(te).items():
        w = te.get_submodule(host).weight
        down = torch.randn(RANK, w.shape[1], generator=g) * 0.3
        up = torch.randn(w.shape[0], RANK, generator=g) * 0.3
        layer = key(name)
        if kohya:
            sd.update({f"{layer}.lora_down.weight": down, f"{layer}.lora_up.weight": up,
                       f"{layer}.alpha": torch.tensor(ALPHA)})
        else:  # PEFT's adapter name kept, as DiffSynth and older savers write it
            tail = ".default" if key("x").startswith("model.") else ""
            sd.update({f"{layer}.lora_A{tail}.weight": down,
                       f"{layer}.lora_B{tail}.weight": up * (ALPHA / RANK)})
        deltas[host] = up @ down * (ALPHA / RANK)
    assert len(deltas) >= 8  # every projection of both tiny layers
    save_file(sd, str(path))
    return deltas


def hand_merged(te, deltas, strength):
    ref = copy.deepcopy(te)
    with torch.no_grad():
        for host, dw in deltas.items():
            ref.get_submodule(host).weight += strength * dw
    return ref


def trees_of(case):
    arch, component, _, encoder, transformer, _, _ = CASES[case]
    return arch, component, {"unet": transformer(), component: encoder()}


def apply_text(engine, tag, arch):
    assert engine.activate(plan(tag, arch, steps=2)) == []
    engine.apply_te(engine.segment_at(0))


@pytest.mark.parametrize("case,fmt", FORMATS)
def test_every_format_merges_the_hand_merged_delta_and_restores_exactly(case, fmt, tmp_path):
    arch, component, trees = trees_of(case)
    te, paths = trees[component], CASES[case][5]
    deltas = write_lora(tmp_path / "net.safetensors", te, paths, CASES[case][6][fmt])
    expected = hand_merged(te, deltas, 0.8)
    plain = encode(te)
    before = snapshot(trees)
    engine = make_engine(trees, arch, tmp_path)
    apply_text(engine, "<lora:net:0.8>", arch)
    for host in deltas:
        got, want = te.get_submodule(host).weight, expected.get_submodule(host).weight
        assert torch.allclose(got, want, atol=1e-6), (host, (got - want).abs().max())
    out = encode(te)
    assert not torch.allclose(out, plain, atol=1e-3)
    torch.testing.assert_close(out, encode(expected), atol=1e-5, rtol=1e-5)
    engine.deactivate()
    assert_pristine(trees, before)
    torch.testing.assert_close(encode(te), plain, atol=0, rtol=0)


def test_every_layer_key_reaches_one_encoder_layer_in_the_encoders_block(tmp_path):
    for case, (arch, component, block, _, _, paths, formats) in CASES.items():
        _, _, trees = trees_of(case)
        km = KeyMap(trees)
        layers = paths(trees[component])
        for key in formats.values():
            for name, host in layers.items():
                (piece,) = km.pieces(key(name))
                t = piece.target
                assert (t.component, t.path, t.block) == (component, host, block), (case, key(name))
                assert piece.whole


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lokr_on_qwen3_and_loha_on_t5_merge_their_full_delta(algo, tmp_path):
    case = "zimage" if algo == "lokr" else "sd3"
    arch, component, trees = trees_of(case)
    te = trees[component]
    key = CASES[case][6]["kohya"]
    g = torch.Generator().manual_seed(11)
    sd, deltas = {}, {}
    for name, host in CASES[case][5](te).items():
        rows, cols = te.get_submodule(host).weight.shape
        if algo == "lokr":
            w1 = torch.randn(2, 2, generator=g) * 0.5
            w2 = torch.randn(rows // 2, cols // 2, generator=g) * 0.3
            sd.update({f"{key(name)}.lokr_w1": w1, f"{key(name)}.lokr_w2": w2})
            deltas[host] = torch.kron(w1, w2)
        else:
            w = [torch.randn(*s, generator=g) * 0.3 for s in ((rows, 2), (2, cols)) * 2]
            sd.update({f"{key(name)}.hada_w1_a": w[0], f"{key(name)}.hada_w1_b": w[1],
                       f"{key(name)}.hada_w2_a": w[2], f"{key(name)}.hada_w2_b": w[3]})
            deltas[host] = (w[0] @ w[1]) * (w[2] @ w[3])
    save_file(sd, str(tmp_path / "lyco.safetensors"))
    expected = hand_merged(te, deltas, 0.6)
    before = snapshot(trees)
    engine = make_engine(trees, arch, tmp_path)
    apply_text(engine, "<lyco:lyco:0.6>", arch)
    for host in deltas:
        assert torch.allclose(te.get_submodule(host).weight, expected.get_submodule(host).weight,
                              atol=1e-6), host
    torch.testing.assert_close(encode(te), encode(expected), atol=1e-5, rtol=1e-5)
    engine.deactivate()
    assert_pristine(trees, before)


@pytest.mark.parametrize("case", ["zimage", "qwenimage", "sd3", "wan22"])
def test_te_and_the_encoders_block_set_its_strength_and_unet_leaves_it(case, tmp_path):
    arch, component, trees = trees_of(case)
    block = CASES[case][2]
    te = trees[component]
    deltas = write_lora(tmp_path / "net.safetensors", te, CASES[case][5], CASES[case][6]["comfy"])
    # lbw names every block in order, the text encoder's first (blocks.py)
    lbw = ",".join("0.25" if b == block else "1" for b in BLOCKS[arch])
    for tag, strength in (("<lora:net:te=0.5:unet=1>", 0.5), (f"<lora:net:1:lbw={lbw}>", 0.25),
                          ("<lora:net:0:unet=1>", 0.0)):
        expected = encode(hand_merged(te, deltas, strength))
        engine = make_engine(trees, arch, tmp_path)
        apply_text(engine, tag, arch)
        torch.testing.assert_close(encode(te), expected, atol=1e-5, rtol=1e-5)
        engine.deactivate()


def test_sd3s_t5_is_te3_which_te_and_te3_set_and_its_block_scales_while_te1_leaves_clip_l(tmp_path):
    from tinymodels import TE1_WIDTH, TE2_WIDTH, hf_text  # CLIP-L and CLIP-G in small
    arch, component, trees = trees_of("sd3")
    trees.update(te1=hf_text(TE1_WIDTH, projection=True), te2=hf_text(TE2_WIDTH, projection=True))
    te = trees["te3"]
    deltas = write_lora(tmp_path / "t5.safetensors", te, t5_paths, CASES["sd3"][6]["kohya"])
    with safe_open(str(tmp_path / "t5.safetensors"), "pt") as f:  # one CLIP-L layer beside
        sd = {k: f.get_tensor(k) for k in f.keys()}
    clip = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sd.update({f"{clip}.lora_down.weight": torch.ones(RANK, TE1_WIDTH),
               f"{clip}.lora_up.weight": torch.ones(TE1_WIDTH, RANK)})
    save_file(sd, str(tmp_path / "net.safetensors"))
    lbw = ",".join("0.5" if b == "T5" else "1" for b in BLOCKS["sd3"])
    expected, clip_l = encode(hand_merged(te, deltas, 0.4)), encode(trees["te1"])
    # the T5 at 0.4 each way: te= times its block's lbw value, te= times t5=, te3= alone
    for tag in (f"<lora:net:0.8:te1=0:lbw={lbw}>", "<lora:net:0.8:te1=0:t5=0.5>",
                "<lora:net:0:te1=0:te3=0.4>"):
        p = plan(tag, "sd3", steps=2)
        rows = {line.split()[0]: line.split()[1:] for line in explain_table(p).splitlines()
                if line.startswith("  ") and line.split()}
        assert (rows["te1"], rows["te3"]) == (["1–2:", "0"], ["1–2:", "0.4"]), (tag, rows)
        before = snapshot(trees)
        engine = make_engine(trees, "sd3", tmp_path)
        assert engine.activate(p) == []
        engine.apply_te(engine.segment_at(0))
        torch.testing.assert_close(encode(te), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encode(trees["te1"]), clip_l, atol=0, rtol=0)  # te1=0
        engine.deactivate()
        assert_pristine(trees, before)


@pytest.mark.parametrize("arch,block", [("zimage", "QWEN3"), ("qwenimage", "QWENVL"),
                                        ("wan22", "UMT5")])
def test_explain_shows_the_text_encoder_row_and_warns_for_a_second_one(arch, block):
    lbw = ",".join("0.5" if b == block else "1" for b in BLOCKS[arch])
    assert BLOCKS[arch][0] == block
    p = plan(f"<lora:n:te=0.3:unet=1:lbw={lbw}>", arch, steps=2)
    rows = {line.split()[0]: line.split()[1:] for line in explain_table(p).splitlines()[3:]
            if line.startswith("  ") and line.split()}
    assert rows["te1"] == ["1–2:", "0.15"], rows
    from netweave.network.plan import CompileContext, compile_prompt
    warned = compile_prompt("<lora:n:te2=0.5>", CompileContext(arch=arch, steps=2))
    assert any("te2" in e.message and e.severity == "warning" for e in warned.errors)


def test_detection_tells_each_model_from_its_text_encoder_keys_alone():
    width = {"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": (4, 2560),
             "text_encoder.model.layers.0.mlp.gate_proj.lora_A.weight": (4, 3584)}
    shape = lambda k: width.get(k, (4, 16))  # noqa: E731
    cases = {
        "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.lora_A.weight": "zimage",
        "lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": "zimage",  # 2560 wide
        "text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj.lora_A.weight": "qwenimage",
        "text_encoder.model.language_model.layers.0.self_attn.q_proj.lora_A.weight": "qwenimage",
        "text_encoder.model.layers.0.mlp.gate_proj.lora_A.weight": "qwenimage",  # 3584 wide
        "text_encoders.umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": "wan22",
        "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": "sd3",
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": "flux",  # OneTrainer
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": "flux",
    }
    for key, arch in cases.items():
        assert detect_architecture([key], shape)[0] == arch, key
    # kohya's third encoder: SD3's T5 beside CLIP-G; alone or beside CLIP-L, Flux's or SD3's
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"
    clip = "lora_te{}_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    assert detect_architecture([t5, clip.format(1), clip.format(2)], shape)[0] == "sd3"
    assert detect_architecture([t5, clip.format(1)], shape)[0] is None
    assert detect_architecture([t5], shape)[0] is None
    # a language model of another width, and a lone encoder's T5 (Chroma's or Wan's): undecided
    assert detect_architecture(["text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight"],
                               shape)[0] is None
    assert detect_architecture(["text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"],
                               shape)[0] is None
    # CLIP's encoder layers are no language model's
    assert detect_architecture(["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"],
                               lambda k: (4, 2560))[0] not in ("zimage", "qwenimage")


def test_a_file_for_one_models_encoder_is_refused_on_another(tmp_path):
    from netweave.network.files import NetworkFileError
    from netweave.network.loader import load_network
    arch, component, trees = trees_of("wan22")
    save_file({"text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.lora_A.weight":
               torch.zeros(2, 32),
               "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.lora_B.weight":
               torch.zeros(32, 2)}, str(tmp_path / "z.safetensors"))
    with pytest.raises(NetworkFileError, match="Z-Image.*Wan 2.2"):
        load_network(str(tmp_path / "z.safetensors"), KeyMap(trees), "wan22")


def real(key, rows, cols):
    return {f"{key}.lora_down.weight": (1, cols), f"{key}.lora_up.weight": (rows, 1)}


@pytest.mark.parametrize("arch,shapes,layers", [
    ("zimage", {**real("lora_te_model_layers_35_self_attn_q_proj", 4096, 2560),
                **real("lora_te_model_layers_0_self_attn_k_proj", 1024, 2560),
                **real("lora_te_model_layers_3_mlp_down_proj", 2560, 9728)}, 3),
    ("qwenimage", {**real("lora_te1_model_language_model_layers_27_self_attn_v_proj", 512, 3584),
                   **real("lora_te1_model_language_model_layers_0_mlp_gate_proj", 18944, 3584)}, 2),
    ("sd3", {**real("lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_0", 10240, 4096),
             **real("lora_te2_text_model_encoder_layers_31_self_attn_q_proj", 1280, 1280),
             **real("lora_unet_joint_blocks_37_x_block_attn_proj", 2432, 2432)}, 3),
    ("wan22", {**real("lora_te1_encoder_block_0_layer_0_SelfAttention_o", 4096, 4096),
               **{f"text_encoders.umt5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wo.{p}": s
                  for p, s in (("lora_A.weight", (1, 10240)), ("lora_B.weight", (4096, 1)))}}, 2),
])
def test_inspect_maps_real_size_files_onto_the_published_encoders(arch, shapes, layers, tmp_path):
    import dit_contract as dc
    dc.check_inspect(tmp_path, shapes, arch, layers)


# ---- regional text-encoder networks: a stream of their own (network/blend.py) -------------
def qwen_inputs(text):
    import test_qwenimage as q
    x = q.inputs()
    return dict(x, encoder_hidden_states=text), q.run, (2 * q.H, 2 * q.W), q.H, q.W


def zimage_inputs(text):
    import test_zimage as z
    x = z.inputs()
    return dict(x, cap=list(text)), z.run, (z.H, z.W), z.H // 2, z.W // 2


def wan_inputs(text):
    import test_wan as v
    x = v.inputs()
    return dict(x, encoder_hidden_states=text), v.run, (v.H, v.W), v.H // 2, v.W // 2


def left_of(out, arch, h, w):
    """The output's left half and the rest: Qwen-Image's packed patches row by row,
    Z-Image's and Wan's latents (…, height, width; Wan's every frame)."""
    if arch == "qwenimage":
        left = torch.zeros(h, w, dtype=torch.bool)
        left[:, :w // 2] = True
        left = left.reshape(-1)
        return out[:, left], out[:, ~left]
    return out[..., :out.shape[-1] // 2], out[..., out.shape[-1] // 2:]


@pytest.mark.parametrize("arch", ["qwenimage", "zimage", "wan22"])
def test_a_regional_text_encoder_network_conditions_the_tokens_inside_its_region(arch, tmp_path):
    """The host encodes its prompt, and once more with each regional network
    (apply_te(segment, variant=j)), and gives both to set_text_variants; the image inside
    the region is then the pass with the network's text, outside it the pass without (to
    float tolerance: the streams run as rows of one batch)."""
    from tinydits import QWEN_TEXT, WAN_TEXT, ZIMAGE_CAP
    te, unet, make = {
        "qwenimage": (lambda: qwen25_vl(QWEN_TEXT), qwen_transformer, qwen_inputs),
        "zimage": (lambda: qwen3(width=ZIMAGE_CAP), zimage_transformer, zimage_inputs),
        "wan22": (lambda: t5(umt5=True, width=WAN_TEXT), wan_transformer, wan_inputs)}[arch]
    te, unet = te(), unet()
    trees = {"unet": unet, "te1": te}
    deltas = write_lora(tmp_path / "words.safetensors", te, CASES[arch][5], CASES[arch][6]["comfy"])
    plain, with_net = encode(te), encode(hand_merged(te, deltas, 0.8))
    _, run, latent, h, w = make(plain)
    ref_base, ref_net = run(unet, make(plain)[0]), run(unet, make(with_net)[0])
    assert not torch.allclose(ref_base, ref_net, atol=1e-3)
    before = snapshot(trees)
    masks = {"none": torch.zeros(latent[0] * 8, latent[1] * 8).numpy()}
    outs = {}
    for region in ("full", "none", "left"):
        engine = make_engine(trees, arch, tmp_path, latent=latent, masks=masks)
        assert engine.activate(plan(f"<lora:words:0.8:unet=0:region={region}>", arch, steps=2)) == []
        seg = engine.segment_at(0)
        assert seg.variants == (0,)
        engine.apply_te(seg)
        text = encode(te)
        torch.testing.assert_close(text, plain, atol=0, rtol=0)  # no network in the prompt's own
        engine.apply_te(seg, variant=0)
        variant = encode(te)
        engine.apply_te(seg)
        engine.set_text_variants(text, {0: variant})
        engine.set_step(0)
        outs[region] = run(unet, make(text)[0])
        assert engine.errors == [], engine.errors
        engine.deactivate()
    assert_pristine(trees, before)
    torch.testing.assert_close(outs["full"], ref_net, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["none"], ref_base, atol=1e-5, rtol=1e-5)
    inside, outside = left_of(outs["left"], arch, h, w)
    torch.testing.assert_close(inside, left_of(ref_net, arch, h, w)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outside, left_of(ref_base, arch, h, w)[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key,arch", [
    ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "flux"),  # Flux's, Chroma's or SD3's
    # Chroma's pipeline name for its T5 (and Wan's for its umT5); on Flux it reaches the T5 too
    ("text_encoder.encoder.block.0.layer.0.SelfAttention.q", "flux"),
])
def test_inspect_names_the_first_architecture_an_undecided_t5_file_fits(key, arch, tmp_path):
    from netweave.network.inspect import inspect
    factors = ((".lora_down.weight", (1, 4096)), (".lora_up.weight", (4096, 1))) \
        if key.startswith("lora_") else ((".lora_A.weight", (1, 4096)), (".lora_B.weight", (4096, 1)))
    save_file({key + part: torch.zeros(s) for part, s in factors}, str(tmp_path / "t5.safetensors"))
    assert detect_architecture([key + factors[0][0]], lambda k: (1, 4096))[0] is None
    report = inspect(str(tmp_path / "t5.safetensors"))
    assert (report["error"], report["architecture"], report["layers"], report["unmatched_keys"]) == \
        (None, arch, 1, []), report


def test_chromas_t5_in_its_pipelines_diffusers_names_reaches_te2_on_chroma_and_flux():
    from tinymodels import flux_trees
    key = "text_encoder.encoder.block.1.layer.1.DenseReluDense.wo"
    for arch in ("chroma", "flux"):
        km = KeyMap(flux_trees(arch))
        (piece,) = km.pieces(key)
        assert (piece.target.component, piece.target.block) == ("te2", "T5"), arch
    # on Flux `text_encoder.` is CLIP-L: its layers keep reaching te1
    (piece,) = km.pieces("text_encoder.text_model.encoder.layers.0.self_attn.q_proj")
    assert piece.target.component == "te1"
