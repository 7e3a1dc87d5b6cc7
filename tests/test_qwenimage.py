"""Qwen-Image: its one tree (the original release is in diffusers' names, as ComfyUI's),
every published LoRA key format, blocks, regions on its image stream, a blended start,
`<model:>`, detection and inspect (tests/dit_contract.py says how each is checked)."""
import copy

import pytest
import torch
from safetensors.torch import save_file

import dit_contract as dc
from engine_helpers import make_engine, plan
from tinydits import QWEN_TEXT, qwen_transformer

from netweave.network.detect import detect_architecture
from netweave.network.keymap import KeyMap
from netweave.network.qwen_keys import tokens_of

H, W, TXT = 4, 6, 5  # patch grid, text tokens


def inputs(batch=2):
    torch.manual_seed(11)
    return dict(hidden_states=torch.randn(batch, H * W, 16),
                encoder_hidden_states=torch.randn(batch, TXT, QWEN_TEXT),
                encoder_hidden_states_mask=torch.ones(batch, TXT, dtype=torch.long),
                timestep=torch.full((batch,), 0.6), img_shapes=[[(1, H, W)]] * batch)


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


@pytest.fixture(scope="module")
def case():  # one tree: the original is diffusers' (a copy stands for it)
    return dc.Case("qwenimage", qwen_transformer, copy.deepcopy, lambda path: None, inputs, run)


@pytest.fixture(scope="module")
def base(case):
    return case.model, case.parts


@pytest.mark.parametrize("fmt", dc.FORMATS)
def test_every_format_matches_merging_the_full_delta(fmt, case, tmp_path):
    dc.check_format_on_diffusers(case, fmt, tmp_path)


def test_lycoris_loha_and_a_schedule_beside_the_layers(base, tmp_path):
    model, parts = base
    g = torch.Generator().manual_seed(7)
    sd, deltas = {}, {}
    for name, m in dc.canonical_layers(model).items():
        w = [torch.randn(m.out_features if i % 2 == 0 else 2, 2 if i % 2 == 0 else m.in_features,
                         generator=g) * 0.3 for i in range(4)]
        sd.update({f"lycoris_{dc.us(name)}.hada_w{j}_{ab}": w[2 * (j - 1) + (ab == 'b')]
                   for j in (1, 2) for ab in "ab"})
        deltas[name] = (w[0] @ w[1]) * (w[2] @ w[3])
    save_file(sd, str(tmp_path / "hada.safetensors"))
    x = inputs()
    expected = run(dc.merged_diffusers(model, {n: 0.5 * d for n, d in deltas.items()}, parts), x)
    trees = {"unet": copy.deepcopy(model)}
    engine = make_engine(trees, "qwenimage", tmp_path, strategy="bypass")
    assert engine.activate(plan("<lyco:hada:0@0,0.5@1>", "qwenimage", steps=2)) == []
    engine.set_step(1)
    assert torch.allclose(run(trees["unet"], x), expected, atol=1e-4)
    engine.deactivate()


def test_blocks_and_groups(base, tmp_path):
    model, parts = base
    blocks = {t.name: t.block for t in KeyMap({"unet": model}).targets}
    assert (blocks["img_in"], blocks["txt_in"], blocks["time_text_embed.timestep_embedder.linear_1"],
            blocks["transformer_blocks.1.txt_mlp.net.2"], blocks["norm_out.linear"],
            blocks["proj_out"]) == ("IN", "IN", "IN", "D01", "OUT", "OUT")
    deltas = dc.write_format(tmp_path / "net.safetensors", dc.random_network(model), "musubi", parts)
    x = inputs()
    only = {n: d for n, d in deltas.items() if n.startswith("transformer_blocks.1.")}
    lbw = ",".join(["0", "0", "0", "1"] + ["0"] * 59)  # QWENVL, IN, D00–D59, OUT: D01 only
    for tag in ("<lora:net:1:in=0:out=0:D00=0>", f"<lora:net:1:lbw={lbw}>"):
        trees = {"unet": copy.deepcopy(model)}
        engine = make_engine(trees, "qwenimage", tmp_path)
        assert engine.activate(plan(tag, "qwenimage", steps=2)) == []
        engine.set_step(0)
        assert torch.allclose(run(trees["unet"], x), run(dc.merged_diffusers(model, only, parts), x),
                              atol=1e-4), tag
        engine.deactivate()


def test_a_region_acts_on_the_image_stream_exactly_and_a_blended_start_keeps_the_rest(case, tmp_path):
    left = torch.zeros(H, W, dtype=torch.bool)
    left[:, :W // 2] = True
    left = left.reshape(-1)  # the packed patches, row by row
    dc.check_regions(case, tmp_path, (2 * H, 2 * W), tokens_of, lambda n: slice(0, n),
                     lambda out: (out[:, left], out[:, ~left]))


@pytest.mark.parametrize("source", ["diffusers", "native"])
def test_model_blend_from_a_comfy_single_file_and_a_diffusers_folder(source, case, tmp_path):
    dc.check_model_blend(case, source, tmp_path)


def test_detection(case, tmp_path):
    dc.check_formats_detected(case, dc.FORMATS, tmp_path)
    shape = lambda k: (4, 3072)  # noqa: E731
    assert detect_architecture(["transformer_blocks.0.img_mod.1.weight", "txt_norm.weight"],
                               shape)[0] == "qwenimage"
    # attention only, in diffusers' names: a block past SD3's 38 says Qwen-Image; else it
    # fits Flux and Qwen-Image alike and is refused by neither
    assert detect_architecture(["transformer.transformer_blocks.45.attn.to_q.lora_A.weight"],
                               shape)[0] == "qwenimage"
    assert detect_architecture(["transformer.transformer_blocks.3.attn.add_q_proj.lora_A.weight"],
                               shape)[0] is None


def test_inspect_maps_a_real_size_file_onto_the_real_tree(tmp_path):
    dc.check_inspect(tmp_path, {
        "lora_unet_transformer_blocks_59_img_mlp_net_0_proj.lora_down.weight": (1, 3072),
        "lora_unet_transformer_blocks_59_img_mlp_net_0_proj.lora_up.weight": (12288, 1),
        "diffusion_model.txt_in.lora_A.weight": (1, 3584),
        "diffusion_model.txt_in.lora_B.weight": (3072, 1)}, "qwenimage", 2)
