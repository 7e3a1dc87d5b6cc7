"""Z-Image (Turbo): both trees a host may hold (diffusers' split q/k/v, the original fused
qkv), every published LoRA key format, LoKr/LoHa across fused and split layers, blocks,
regions on its image-first joint sequence, `<model:>`, detection and inspect
(tests/dit_contract.py says how each is checked)."""
import copy

import pytest
import torch

import dit_contract as dc
from engine_helpers import make_engine, plan
from tinydits import ZIMAGE_CAP, zimage_native, zimage_to_native, zimage_transformer

from netweave.network.detect import detect_architecture
from netweave.network.keymap import KeyMap
from netweave.network.zimage_keys import tokens_of

H, W, CAP = 8, 12, 5  # latent (4×6 patches: 24 image tokens, padded to 32), caption tokens


def inputs(batch=2):
    torch.manual_seed(11)
    return dict(x=[torch.randn(4, 1, H, W) for _ in range(batch)],
                cap=[torch.randn(CAP, ZIMAGE_CAP) for _ in range(batch)], t=torch.full((batch,), 0.6))


def run(model, x):
    with torch.no_grad():
        return torch.stack(model(x["x"], x["t"], x["cap"]).sample)


@pytest.fixture(scope="module")
def case():
    return dc.Case("zimage", zimage_transformer, zimage_native, zimage_to_native, inputs, run)


@pytest.fixture(scope="module")
def base(case):
    return case.model, case.parts


@pytest.mark.parametrize("fmt", dc.FORMATS)
def test_every_format_on_the_diffusers_tree_matches_merging_the_full_delta(fmt, case, tmp_path):
    dc.check_format_on_diffusers(case, fmt, tmp_path)


@pytest.mark.parametrize("fmt", dc.FORMATS)
def test_every_format_on_the_original_tree_adds_the_full_delta(fmt, case, tmp_path):
    dc.check_format_on_native(case, fmt, tmp_path)


@pytest.mark.parametrize("layout", ["diffusers", "native"])
def test_lokr_on_fused_qkv_and_loha_on_split_parts_reach_either_tree(layout, case, tmp_path):
    dc.check_kron_and_hada(case, layout, tmp_path)


def test_blocks_and_groups_name_the_models_own_structure(base, tmp_path):
    model, parts = base
    km = KeyMap({"unet": model})
    blocks = {t.name: t.block for t in km.targets}
    assert (blocks["all_x_embedder.2-1"], blocks["noise_refiner.1.attention.to_k"],
            blocks["context_refiner.0.feed_forward.w2"], blocks["layers.1.attention.to_out.0"],
            blocks["all_final_layer.2-1.linear"]) == ("IN", "NR01", "CR00", "S01", "OUT")
    native = zimage_native(model)
    deltas = dc.write_format(tmp_path / "net.safetensors", dc.random_network(native), "comfy", parts)
    for tag, kept in (("<lora:net:1:single=0:out=0>", ("noise_refiner", "context_refiner", "x_embedder",
                                                       "cap_embedder", "t_embedder")),
                      ("<lora:net:1:in=0:out=0:S01=0.5>", ("layers.",)),
                      ("<lora:net:1:NR00=0:CR01=0:S00=0:S01=0:in=1:out=0>",
                       ("noise_refiner.1", "context_refiner.0", "x_embedder", "cap_embedder", "t_embedder"))):
        host = zimage_native(model)
        engine = make_engine({"unet": host}, "zimage", tmp_path)
        assert engine.activate(plan(tag, "zimage", steps=2)) == []
        engine.set_step(0)
        scale = {n: (0.5 if "S01" in tag and n.startswith("layers.1.") else 1.0) for n in deltas}
        dc.assert_native_weights(host, dc.weights(native), {n: scale[n] * d for n, d in deltas.items()
                                                              if n.startswith(kept)})
        engine.deactivate()


def test_a_region_acts_on_the_image_tokens_of_the_joint_sequence_exactly(case, tmp_path):
    """diffusers joins [image (padded to 32), caption]: all ones is the network on the 24
    image tokens of every layer that sees them (the patch embedder, which runs on the whole
    batch's patches at once, left out), all zeros none at all."""
    cells = (H // 2) * (W // 2)
    dc.check_regions(case, tmp_path, (H, W), tokens_of, lambda n: slice(0, cells),
                     lambda out: (out[..., :W // 2], out[..., W // 2:]), blend=False)


@pytest.mark.parametrize("host", ["diffusers", "native"])
def test_model_blend_from_a_checkpoint_in_the_other_layout(host, case, tmp_path):
    dc.check_model_blend(case, host, tmp_path)


def test_detection_of_every_format_and_of_checkpoints(case, tmp_path):
    dc.check_formats_detected(case, dc.FORMATS, tmp_path)
    shape = lambda k: (4, 16)  # noqa: E731
    assert detect_architecture(["model.diffusion_model.layers.0.attention.qkv.weight",
                                "model.diffusion_model.cap_embedder.1.weight"], shape)[0] == "zimage"
    assert detect_architecture(["transformer.all_x_embedder.2-1.weight"], shape)[0] == "zimage"
    # CLIP's encoder layers are no Z-Image layers
    assert detect_architecture(["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"],
                               shape)[0] != "zimage"


def test_inspect_maps_a_real_size_file_onto_the_real_tree(tmp_path):
    dc.check_inspect(tmp_path, {  # to_q alone; the fused qkv on all three; one MLP layer
        "diffusion_model.layers.29.attention.to_q.lora_A.weight": (1, 3840),
        "diffusion_model.layers.29.attention.to_q.lora_B.weight": (3840, 1),
        "lora_unet_layers_3_attention_qkv.lora_down.weight": (1, 3840),
        "lora_unet_layers_3_attention_qkv.lora_up.weight": (11520, 1),
        "lora_unet_noise_refiner_1_feed_forward_w1.lora_down.weight": (1, 3840),
        "lora_unet_noise_refiner_1_feed_forward_w1.lora_up.weight": (10240, 1)}, "zimage", 1 + 3 + 1)


def by_keyword(model, x):  # a host may name the arguments (the pipeline passes them in order)
    with torch.no_grad():
        return torch.stack(model(x=x["x"], t=x["t"], cap_feats=x["cap"]).sample)


@pytest.mark.parametrize("call", [run, by_keyword], ids=["positional", "keywords"])
def test_a_blended_start_runs_on_lists_of_latents(case, tmp_path, call):
    """diffusers' Z-Image takes and returns one tensor per image: the streams repeat those
    lists (network/blend.py); outside the region blend=1 is the model's own prediction, inside
    the one pass."""
    dc.write_format(tmp_path / "net.safetensors", dc.random_network(zimage_native(case.model)),
                    "diffusers", case.parts)
    trees = {"unet": copy.deepcopy(case.model)}
    base = call(trees["unet"], inputs())
    outs = {}
    for blend in (0, 1):
        engine = make_engine(trees, "zimage", tmp_path, latent=(H, W))
        assert engine.activate(plan(f"<lora:net:1:region=left:blend={blend}>", "zimage", steps=2)) == []
        engine.set_step(0)
        try:
            outs[blend] = call(trees["unet"], inputs())
        finally:
            engine.deactivate()
    assert outs[1].shape == base.shape
    torch.testing.assert_close(outs[1][..., W // 2:], base[..., W // 2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][..., :W // 2], outs[0][..., :W // 2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[1], outs[0], atol=1e-3)


def test_the_original_tree_finds_the_image_after_the_padded_caption_and_before_its_own_padding():
    """ComfyUI's and Forge Neo's NextDiT join [caption, image], each padded at its end to a
    multiple of 32: a 6×5 grid's 30 tokens start 32 before the end of a 64-row joint sequence,
    and the noise refiner's 32 rows hold them first (diffusers' tree puts the image first)."""
    from netweave.network.tokens import Tokens
    from netweave.network.zimage_keys import DIFFUSERS, NATIVE, ZIMAGE
    native, diffusers = ZIMAGE.tokens[NATIVE], ZIMAGE.tokens[DIFFUSERS]
    assert native.image_place(Tokens.JOINT, 64, 30) == (32, 1)
    assert native.image_place(Tokens.IMAGE, 32, 30) == (0, 1)
    assert diffusers.image_place(Tokens.JOINT, 64, 30) == (0, 1)
    assert native.image_place(Tokens.JOINT, 64 + 32, 64) == (32, 1)  # no padding needed
