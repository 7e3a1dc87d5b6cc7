"""SD3.5 (MMDiT): both trees a host may hold (diffusers' split q/k/v, Stability's and
ComfyUI's fused qkv with the two-chunk modulations' halves swapped), Medium's second image
attention, every published LoRA key format, LoKr/LoHa across fused and split layers, CLIP-L
and CLIP-G keys, blocks, regions on the image stream and a blended start, `<model:>`,
detection and inspect (tests/dit_contract.py says how each is checked); the other published
layouts (SD3 Medium: no qk norms, no second attention; SD3.5 Large: no second attention)
get every format detected with each key reaching a layer, formats split and fused on both
trees, and `<model:>` from either tree's checkpoint."""
import functools

import pytest
import torch

import dit_contract as dc
from engine_helpers import make_engine, plan
from tinydits import (SD3_LAYOUTS, SD3_POOLED, SD3_TEXT, sd3_native, sd3_to_native,
                      sd3_transformer)
from tinymodels import TE1_WIDTH, TE2_WIDTH, hf_text

from netweave.network.detect import detect_architecture
from netweave.network.keymap import KeyMap
from netweave.network.sd3_keys import tokens_of

H, W, TXT = 8, 12, 5  # latent (4×6 patches), text tokens
# ai-toolkit writes SD3 in diffusers' names under `transformer.` (the "diffusers" format)
FORMATS = tuple(f for f in dc.FORMATS if f != "aitoolkit")


def inputs(batch=2):
    torch.manual_seed(11)
    return dict(hidden_states=torch.randn(batch, 4, H, W),
                encoder_hidden_states=torch.randn(batch, TXT, SD3_TEXT),
                pooled_projections=torch.randn(batch, SD3_POOLED), timestep=torch.full((batch,), 600.0))


def run(model, x):
    with torch.no_grad():
        return model(**x).sample


@pytest.fixture(scope="module")
def case():
    return dc.Case("sd3", sd3_transformer, sd3_native, sd3_to_native, inputs, run)


@pytest.fixture(scope="module", params=[name for name in SD3_LAYOUTS if name != "sd3.5-medium"])
def layout_case(request):
    """The case for SD3 Medium's or SD3.5 Large's layout (`case` is SD3.5 Medium's)."""
    return dc.Case("sd3", functools.partial(sd3_transformer, request.param), sd3_native,
                   sd3_to_native, inputs, run)


@pytest.fixture(scope="module")
def base(case):
    return case.model, case.parts


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_on_the_diffusers_tree_matches_merging_the_full_delta(fmt, case, tmp_path):
    dc.check_format_on_diffusers(case, fmt, tmp_path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_on_the_original_tree_adds_the_full_delta(fmt, case, tmp_path):
    dc.check_format_on_native(case, fmt, tmp_path)


@pytest.mark.parametrize("layout", ["diffusers", "native"])
def test_lokr_on_fused_qkv_and_loha_on_split_parts_reach_either_tree(layout, case, tmp_path):
    dc.check_kron_and_hada(case, layout, tmp_path)


def test_the_other_layouts_take_every_format_on_both_trees_and_a_model_blend(layout_case, tmp_path):
    """Without the second image attention (and, on SD3 Medium, without qk norms) every format
    is detected with every key reaching a layer; fused names on diffusers' tree and split
    names on the original add their full ΔW; a checkpoint in the other tree's names blends
    in on both."""
    model = layout_case.model
    assert not any(".attn2." in n for n, _ in model.named_modules())
    assert any(".norm_q" in n for n, _ in model.named_modules()) == \
        (model.config.qk_norm is not None)
    dc.check_formats_detected(layout_case, FORMATS, tmp_path)
    for fmt in ("kohya", "comfy"):
        dc.check_format_on_diffusers(layout_case, fmt, tmp_path)
    for fmt in ("diffusers", "onetrainer"):
        dc.check_format_on_native(layout_case, fmt, tmp_path)
    for host in ("diffusers", "native"):
        dc.check_model_blend(layout_case, host, tmp_path)


def test_clip_l_and_clip_g_keys_reach_their_encoders():
    trees = {"unet": sd3_transformer(), "te1": hf_text(TE1_WIDTH, projection=True),
             "te2": hf_text(TE2_WIDTH, projection=True)}
    km = KeyMap(trees)
    for key, component in (("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "te1"),
                           ("lora_te2_text_model_encoder_layers_1_mlp_fc1", "te2"),
                           ("text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc2", "te2"),
                           ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc2", "te1")):
        (piece,) = km.pieces(key)
        assert piece.target.component == component and piece.target.block == "BASE", key


def test_blocks_and_groups_name_the_models_own_structure(base, tmp_path):
    model, parts = base
    blocks = {t.name: t.block for t in KeyMap({"unet": model}).targets}
    assert (blocks["pos_embed.proj"], blocks["time_text_embed.text_embedder.linear_2"],
            blocks["transformer_blocks.0.attn2.to_v"], blocks["transformer_blocks.1.norm1_context.linear"],
            blocks["norm_out.linear"]) == ("IN", "IN", "D00", "D01", "OUT")
    native = sd3_native(model)
    deltas = dc.write_format(tmp_path / "net.safetensors", dc.random_network(native), "kohya", parts)
    lbw = ",".join(["1", "1", "0", "1"] + ["0"] * 37 + ["1"])  # BASE, T5, IN, D00–D37, OUT
    for tag, kept in (("<lora:net:1:double=0>", ("x_embedder", "context_embedder", "t_embedder",
                                                 "y_embedder", "final_layer")),
                      (f"<lora:net:1:lbw={lbw}>", ("joint_blocks.0.", "final_layer")),
                      ("<lora:net:1:in=0:out=0:D00=0>", ("joint_blocks.1.",))):
        host = sd3_native(model)
        engine = make_engine({"unet": host}, "sd3", tmp_path)
        assert engine.activate(plan(tag, "sd3", steps=2)) == []
        engine.set_step(0)
        dc.assert_native_weights(host, dc.weights(native), {n: d for n, d in deltas.items()
                                                              if n.startswith(kept)})
        engine.deactivate()


def test_a_region_acts_on_the_image_stream_exactly_and_a_blended_start_keeps_the_rest(case, tmp_path):
    dc.check_regions(case, tmp_path, (H, W), tokens_of, lambda n: slice(0, n),
                     lambda out: (out[..., :W // 2], out[..., W // 2:]))


@pytest.mark.parametrize("host", ["diffusers", "native"])
def test_model_blend_from_a_checkpoint_in_the_other_layout(host, case, tmp_path):
    dc.check_model_blend(case, host, tmp_path)


def test_detection_of_every_format_and_of_checkpoints(case, tmp_path):
    dc.check_formats_detected(case, FORMATS, tmp_path)
    # attention only, in diffusers' names: the width tells it from Flux and Qwen-Image (1536:
    # SD3 Medium and SD3.5 Medium, 2432: SD3.5 Large)
    for width in (1536, 2432):
        assert detect_architecture(["transformer.transformer_blocks.3.attn.to_q.lora_A.weight"],
                                   lambda k: (4, width))[0] == "sd3"
    assert detect_architecture(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"],
                               lambda k: (4, 16))[0] == "sd3"


def test_inspect_maps_a_real_size_file_onto_the_real_trees(tmp_path):
    dc.check_inspect(tmp_path, {  # SD3.5 Large: the last block's text qkv, an MLP, CLIP-G
        "lora_unet_joint_blocks_37_context_block_attn_qkv.lora_down.weight": (1, 2432),
        "lora_unet_joint_blocks_37_context_block_attn_qkv.lora_up.weight": (7296, 1),
        "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight": (1, 2432),
        "transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight": (9728, 1),
        "lora_te2_text_model_encoder_layers_31_mlp_fc1.lora_down.weight": (1, 1280),
        "lora_te2_text_model_encoder_layers_31_mlp_fc1.lora_up.weight": (5120, 1)}, "sd3", 3 + 1 + 1)


def test_inspect_maps_a_medium_file_onto_the_medium_tree(tmp_path):
    """SD3.5 Medium is 1536 wide with 24 blocks and a second image attention up front: its
    files fit the Medium reference tree where the Large one refuses their shapes."""
    dc.check_inspect(tmp_path, {
        "transformer.transformer_blocks.23.attn.add_k_proj.lora_A.weight": (1, 1536),
        "transformer.transformer_blocks.23.attn.add_k_proj.lora_B.weight": (1536, 1),
        "lora_unet_joint_blocks_12_x_block_attn2_qkv.lora_down.weight": (1, 1536),
        "lora_unet_joint_blocks_12_x_block_attn2_qkv.lora_up.weight": (4608, 1)}, "sd3", 1 + 3)
