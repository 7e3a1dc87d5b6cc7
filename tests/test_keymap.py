"""Key mapping by structure: LDM (A1111, Forge) and diffusers (SD.Next, standalone) trees of
SD1, SD2 and SDXL, HF CLIP with and without `text_model.`, OpenCLIP's fused attention."""
import json
import os
import subprocess
import sys

import pytest
import torch

from netweave.network.keymap import PATCHABLE, KeyMap, diffusers_to_ldm, ldm_to_diffusers
from tinymodels import ARCHS, TREES, Wrapper, diffusers_unet, hf_text, ldm_trees, ldm_unet

SDXL_ONLY_DIFFUSERS = {("unet", "add_embedding.linear_1"), ("unet", "add_embedding.linear_2")}


@pytest.fixture(scope="module", params=ARCHS)
def both(request):
    arch = request.param
    return arch, KeyMap(TREES["ldm"](arch)), KeyMap(TREES["diffusers"](arch))


def test_ldm_and_diffusers_trees_give_the_same_targets(both):
    arch, ldm, diff = both
    a = {(t.component, t.name): tuple(t.weight.shape) for t in ldm.targets}
    b = {(t.component, t.name): tuple(t.weight.shape) for t in diff.targets}
    # this ldm predates SDXL's label_emb (sgm's "sequential"); everything else matches
    extra = SDXL_ONLY_DIFFUSERS if arch == "sdxl" else set()
    assert set(b) - set(a) == extra and set(a) <= set(b)
    assert all(a[k] == b[k] for k in a)
    assert len(a) > 200


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_patchable_module_is_a_target(layout, arch):
    trees = TREES[layout](arch)
    km = KeyMap(trees)
    mapped = {(t.component, t.path) for t in km.targets}
    for component, root in trees.items():
        for path, module in root.named_modules():
            if isinstance(module, PATCHABLE + (torch.nn.MultiheadAttention,)):
                # an MHA's out_proj is reached through the MHA (its forward reads the weight);
                # text_projection follows the encoder and no LoRA format trains it
                if path.endswith("attn.out_proj") or path.endswith("text_projection"):
                    continue
                assert (component, path) in mapped, (component, path)


@pytest.mark.parametrize("arch", ARCHS)
def test_ldm_diffusers_conversion_round_trips(arch):
    ldm, diff = ldm_unet(arch), diffusers_unet(arch)
    ldm_modules, diff_modules = dict(ldm.named_modules()), dict(diff.named_modules())
    for path, module in ldm_modules.items():
        if not isinstance(module, PATCHABLE):
            continue
        d = ldm_to_diffusers(path, ldm)
        assert d in diff_modules, path
        assert diff_modules[d].weight.shape == module.weight.shape
        assert diffusers_to_ldm(d, diff) == path


# hosts.md §5.2/5.3 worked examples, on the tiny trees' indices
@pytest.mark.parametrize("key,ldm_path,block", [
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
     "input_blocks.4.1.transformer_blocks.0.attn2.to_k", "IN04"),
    ("lora_unet_up_blocks_2_resnets_2_conv1", "output_blocks.8.0.in_layers.2", "OUT08"),
    ("lora_unet_mid_block_resnets_1_time_emb_proj", "middle_block.2.emb_layers.1", "M00"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "input_blocks.3.0.op", "IN03"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", "output_blocks.2.1.conv", "OUT02"),
    ("lora_unet_conv_in", "input_blocks.0.0", "IN00"),
    ("lora_unet_conv_out", "out.2", None),
    ("lora_unet_time_embedding_linear_2", "time_embed.2", None),
    ("lora_unet_input_blocks_4_1_proj_in", "input_blocks.4.1.proj_in", "IN04"),  # LDM-style
    ("unet.down_blocks.1.attentions.0.proj_out", "input_blocks.4.1.proj_out", "IN04"),  # PEFT
    ("lycoris_down_blocks_1_attentions_0_proj_out", "input_blocks.4.1.proj_out", "IN04"),
    ("oft_unet_output_blocks_5_1_transformer_blocks_0_ff_net_2",
     "output_blocks.5.1.transformer_blocks.0.ff.net.2", "OUT05"),
])
def test_worked_examples_sd1(key, ldm_path, block):
    km = KeyMap({"unet": ldm_unet("sd1")})
    (target,) = km.lookup(key)
    assert target.path == ldm_path and target.block == block


def test_sdxl_upsampler_follows_structure_where_a1111_misses_it():
    km = KeyMap({"unet": ldm_unet("sdxl")})
    (target,) = km.lookup("lora_unet_up_blocks_0_upsamplers_0_conv")
    assert target.path == "output_blocks.2.2.conv"  # SDXL: up level 0 has attention


@pytest.mark.parametrize("projection", [False, True])
def test_hf_text_with_and_without_text_model_level(projection):
    te = hf_text(projection=projection)
    has_level = any(n.startswith("text_model.") for n, _ in te.named_modules())
    assert has_level == projection  # transformers 5 dropped the level in CLIPTextModel only
    km = KeyMap({"te1": te})
    for key in ("lora_te_text_model_encoder_layers_1_self_attn_q_proj",
                "lora_te1_text_model_encoder_layers_1_self_attn_q_proj",
                "text_encoder.text_model.encoder.layers.1.self_attn.q_proj",
                "text_encoder.encoder.layers.1.self_attn.q_proj"):
        (target,) = km.lookup(key)
        assert target.name == "encoder.layers.1.self_attn.q_proj" and target.block == "BASE"


def test_openclip_fused_attention_chunks():
    trees = ldm_trees("sdxl")
    km = KeyMap(trees)
    mha = trees["te2"].model.transformer.resblocks[1].attn
    for i, proj in enumerate("qkv"):
        (target,) = km.lookup(f"lora_te2_text_model_encoder_layers_1_self_attn_{proj}_proj")
        assert target.module is mha and target.param == "in_proj_weight"
        assert target.chunk == (i, 3)
        assert target.weight.data_ptr() == mha.in_proj_weight[i * 48].data_ptr()
    (out,) = km.lookup("lora_te2_text_model_encoder_layers_1_self_attn_out_proj")
    assert out.param == "out_proj.weight" and out.weight is mha.out_proj.weight
    (fc1,) = km.lookup("lora_te2_text_model_encoder_layers_1_mlp_fc1")
    assert fc1.path == "model.transformer.resblocks.1.mlp.c_fc"
    # te1 names never reach te2 and the other way round
    assert km.lookup("lora_te1_text_model_encoder_layers_1_mlp_fc1")[0].component == "te1"


def test_checkpoint_tensor_keys():
    trees = ldm_trees("sdxl")
    km = KeyMap(trees)
    hits = km.lookup_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
    n = 48  # the tiny OpenCLIP's width: q, k and v are row thirds of in_proj_weight
    assert sorted((p.src, p.length, p.src_rows) for p, _ in hits) == [(0, n, 3 * n), (n, n, 3 * n),
                                                                      (2 * n, n, 3 * n)]
    assert not any(is_bias for _, is_bias in hits)
    ((piece, is_bias),) = km.lookup_tensor("model.diffusion_model.input_blocks.4.1.proj_in.bias")
    assert is_bias and piece.target.path == "input_blocks.4.1.proj_in" and piece.whole
    # an HF-named q_proj (diffusers folder) on an OpenCLIP host: the q chunk, read whole
    ((piece, is_bias),) = km.lookup_tensor(
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight")
    assert piece.target.chunk == (0, 3) and piece.whole and not is_bias
    assert km.lookup_tensor("first_stage_model.encoder.conv_in.weight") == []


def test_unknown_tree_is_a_clear_error():
    with pytest.raises(ValueError, match="neither an LDM nor a diffusers UNet"):
        KeyMap({"unet": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="no CLIP text model"):
        KeyMap({"te1": torch.nn.Linear(2, 2)})


A1111_TRANSFORMERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  ".venv", "a1111-transformers")
CHILD = """
import json, sys
sys.path.insert(0, "tests")
import transformers
from tinymodels import Wrapper, clip_config
from netweave.network.keymap import KeyMap
te = Wrapper(transformer=transformers.CLIPTextModel(clip_config(32)))
km = KeyMap({"te1": te})
layer = km.lookup("lora_te_text_model_encoder_layers_1_self_attn_q_proj")[0]
print(json.dumps({"version": transformers.__version__, "path": layer.path,
                  "targets": {t.name: list(t.weight.shape) for t in km.targets}}))
"""


def test_a1111_transformers_4_30_tree_maps_the_same(repo_root):
    """A1111 runs transformers 4.30, whose CLIPTextModel keeps `text_model.`; same targets."""
    env = dict(os.environ, PYTHONPATH=A1111_TRANSFORMERS)
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                            cwd=repo_root, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert child["version"] == "4.30.2"
    assert child["path"] == "transformer.text_model.encoder.layers.1.self_attn.q_proj"
    ours = KeyMap({"te1": Wrapper(transformer=hf_text(32))})
    assert child["targets"] == {t.name: list(t.weight.shape) for t in ours.targets}
