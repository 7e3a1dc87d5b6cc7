"""The embedded Flux-architecture demo (`--checkpoint demo-flux`) and its networks: what the
UNet demo's tests measure, on a FluxTransformer2DModel with true CFG. Every number is a mean
over one batch of 4 seeds, 20 steps, the demo's CFG 4 (demo/README.md has the values)."""
import os

import numpy as np
import pytest

from netweave.extension.library import Library
from netweave.extension.standalone.flow_models import demo_flux_library, demo_flux_model
from netweave.extension.standalone.host import DiffusersHost, Request

from test_demo import caption_counts, change, region_moves, stripes

PROMPT = "a red square on a white background"
SEEDS = 4


@pytest.fixture(scope="module")
def host():
    return DiffusersHost(demo_flux_model(), Library([demo_flux_library()], []))


@pytest.fixture(scope="module")
def base(host):
    return draw(host, "")


def draw(host, tags, prompt=PROMPT, result=False):
    out = host.txt2img(Request(f"{prompt} {tags}".strip(), steps=20, seed=0, width=64,
                               height=64, batch_size=SEEDS, cfg_scale=host.model.default_cfg))
    assert out.errors == []
    images = np.stack([np.asarray(im, dtype=np.float32) for im in out.images])
    return (images, out) if result else images


def test_the_demo_is_a_small_flux_with_true_cfg(host):
    model = host.model
    assert model.arch == "flux" and not model.distilled and model.default_cfg == 4.0
    assert model.size == 64 and model.vae_scale == 8 and model.latent(64, 64) == (16, 16)
    t = model.pipe.transformer.config
    assert (t.in_channels, t.num_layers, t.num_single_layers) == (16, 2, 4)


@pytest.mark.slow
def test_the_base_model_draws_what_the_caption_says(host):
    right_shape, right_background, pictures = caption_counts(lambda p: draw(host, "", prompt=p))
    assert right_background >= 0.9 * pictures, (right_background, pictures)
    assert right_shape >= 0.9 * pictures, (right_shape, pictures)


def test_a_regional_lora_tints_its_half(host, base):
    """flux_sunset (kohya format) on the image tokens of one half: toward the sunset colour
    there; the other half changes far less (attention carries a little across)."""
    for region, moved_in, moved_out, changed_in, changed_out in region_moves(
            lambda tags: draw(host, tags), base, "flux_sunset"):
        assert moved_in > 25, (region, moved_in)
        assert abs(moved_out) < 0.4 * moved_in, (region, moved_out, moved_in)
        assert changed_out < 0.5 * changed_in, region


def test_a_schedule_by_noise_level_changes_less_than_the_constant_one(host, base):
    """start=s0.5: on from where the pipeline's sigma falls to 0.5 (step 13 of 20 at the
    demo's shift): a smaller change than the network all the way, as a late start by steps."""
    whole = change(draw(host, "<lora:flux_sunset:1>"), base)
    late, result = draw(host, "<lora:flux_sunset:1:start=s0.5>", result=True)
    assert 0 < change(late, base) < 0.6 * whole, (change(late, base), whole)
    sigmas = result.plan.sigmas
    assert sigmas[0] == pytest.approx(1.0) and sigmas[12] > 0.5 > sigmas[13]


def test_double_and_single_block_groups_select_where_a_lora_acts(host, base):
    """flux_stripes (diffusers/PEFT format) paints its stripes with both kinds of block:
    without either (double=0, single=0) they are gone; without both it is not applied."""
    plain = stripes(base)
    full = stripes(draw(host, "<lora:flux_stripes:1>"))
    assert full > plain + 15, (full, plain)
    for gone in ("double=0", "single=0"):
        assert stripes(draw(host, f"<lora:flux_stripes:1:{gone}>")) < plain + 0.2 * (full - plain)
    assert np.array_equal(draw(host, "<lora:flux_stripes:1:double=0:single=0>"), base)


def test_neg_acts_on_the_negative_pass(host):
    sunset = draw(host, "<lora:flux_sunset:1>")
    assert change(draw(host, "<lora:flux_sunset:1:neg=0>"), sunset) > 5.0


def test_both_file_formats_land_on_every_layer(host):
    from netweave.network.keymap import KeyMap
    from netweave.network.loader import load_network
    from safetensors import safe_open

    folder = demo_flux_library()
    keymap = KeyMap(host.model.trees())
    assert sorted(os.listdir(folder)) == ["flux_stripes.safetensors", "flux_sunset.safetensors"]
    with safe_open(os.path.join(folder, "flux_sunset.safetensors"), "pt") as f:
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in f.keys()
        assert "lora_unet_single_blocks_3_linear1.alpha" in f.keys()
    with safe_open(os.path.join(folder, "flux_stripes.safetensors"), "pt") as f:
        assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in f.keys()
    for name in os.listdir(folder):
        net = load_network(os.path.join(folder, name), keymap, "flux")
        assert net.unmatched == () and net.layers and net.arch == "flux", name


def test_generate_runs_the_flux_demo(tmp_path, capsys):
    from netweave.extension.standalone.cli import main
    out = tmp_path / "flux.png"
    assert main(["generate", "--checkpoint", "demo-flux", "--prompt",
                 "a blue circle on a yellow background <lora:flux_sunset:1:region=left>",
                 "--steps", "8", "--out", str(out), "--mask-dir", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert out.exists() and "Model: demo-flux" in text and "CFG scale: 4.0" in text
    assert 'Lora hashes: "flux_sunset: ' in text
