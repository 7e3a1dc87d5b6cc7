"""The embedded demo model and its networks: the effects are measured on the pictures, not
just run. The demo draws 64-px shapes; every number here is a mean over a batch of seeds."""
import json
import os

import numpy as np
import pytest

from netweave.extension.diffusers_host import Request
from netweave.extension.models import DEMO_ROOT, demo_library, demo_model

PROMPT = "a yellow circle on a blue background"
SEEDS = 4  # one batch: seeds 0..3


@pytest.fixture(scope="module")
def host():
    from netweave.demo.showcase import host
    return host()


@pytest.fixture(scope="module")
def base(host):
    return draw(host, "")


def draw(host, tags, prompt=PROMPT):
    result = host.txt2img(Request(f"{prompt} {tags}".strip(), steps=20, seed=0, width=64,
                                  height=64, batch_size=SEEDS))
    assert result.errors == []
    return np.stack([np.asarray(im, dtype=np.float32) for im in result.images])  # [N, H, W, 3]


def warmth(images):
    """Red minus blue: the sunset LoRA pulls every colour toward orange-red."""
    return float((images[..., 0] - images[..., 2]).mean())


def change(a, b):
    return float(np.abs(a - b).mean())


def test_the_demo_draws_what_the_caption_says(host, base):
    """A yellow shape on blue: blue dominates the border, yellow the middle."""
    border = np.concatenate([base[:, :4].reshape(-1, 3), base[:, -4:].reshape(-1, 3)])
    centre = base[:, 24:40, 24:40].reshape(-1, 3)
    assert border[:, 2].mean() > border[:, 0].mean() + 60  # blue background
    assert centre[:, 0].mean() > centre[:, 2].mean() + 60  # yellow: red + green, no blue
    red = draw(host, "", "a red square on a white background")
    assert red[:, :4].mean() > 180  # white border


def test_regional_lora_changes_its_region_only(host, base):
    left = draw(host, "<lora:demo_sunset:1:region=left>")
    full = draw(host, "<lora:demo_sunset:1>")
    gain_left = warmth(left[:, :, :26]) - warmth(base[:, :, :26])
    gain_right = warmth(left[:, :, 38:]) - warmth(base[:, :, 38:])
    assert gain_left > 60, gain_left
    assert abs(gain_right) < 0.25 * gain_left, (gain_left, gain_right)
    assert warmth(full[:, :, 38:]) - warmth(base[:, :, 38:]) > 60  # unmasked: both sides


def test_a_lora_off_for_the_first_half_changes_less(host, base):
    whole = change(draw(host, "<lora:demo_sunset:1>"), base)
    second_half = change(draw(host, "<lora:demo_sunset:0@0,1@0.5>"), base)
    assert 0 < second_half < 0.8 * whole, (second_half, whole)


def test_block_weights_select_where_a_lora_acts(host, base):
    stripes = draw(host, "<lora:demo_stripes:1>")
    # stripes run across: rows differ from the next row much more than columns do
    rows = lambda im: float(np.abs(np.diff(im, axis=1)).mean())  # noqa: E731
    cols = lambda im: float(np.abs(np.diff(im, axis=2)).mean())  # noqa: E731
    assert rows(stripes) - cols(stripes) > rows(base) - cols(base) + 5
    nowhere = draw(host, "<lora:demo_stripes:1:in=0:mid=0:out=0>")
    assert np.array_equal(nowhere, base)  # no block left: not applied at all
    no_out = change(draw(host, "<lora:demo_stripes:1:out=0>"), base)
    assert 0 < no_out < change(stripes, base)


def test_loha_changes_the_shape(host, base):
    def fill(images):
        """How much of the yellow shape's bounding box it fills (circle π/4, square 1)."""
        ratios = []
        for im in images:
            yellow = (im[..., 0] > 150) & (im[..., 1] > 150) & (im[..., 2] < 120)
            ys, xs = np.nonzero(yellow)
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            ratios.append(yellow.sum() / box)
        return float(np.mean(ratios))
    assert fill(draw(host, "<lyco:demo_boxy:1>")) > fill(base) + 0.08


def test_model_blend_at_zero_is_the_base_and_at_one_the_pastel_palette(host, base):
    assert np.array_equal(draw(host, "<model:demo_pastel:0>"), base)
    pastel = draw(host, "<model:demo_pastel:1>")
    assert pastel.mean() > base.mean() + 25
    half = draw(host, "<model:demo_pastel:0.5>")
    assert base.mean() < half.mean() < pastel.mean()


def test_the_shipped_files_are_what_the_trainer_writes():
    with open(os.path.join(DEMO_ROOT, "TRAINED.json"), encoding="utf-8") as f:
        trained = json.load(f)
    assert trained["command"] == "python -m netweave.demo.train"
    loras, models = demo_library()
    assert sorted(os.listdir(loras)) == ["demo_boxy.safetensors", "demo_stripes.safetensors",
                                         "demo_sunset.safetensors"]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEMO_ROOT) for f in fs)
    assert size < 20 * 2**20


def test_the_trainer_runs_end_to_end_and_its_files_load(tmp_path):
    """`--quick`: every stage for a few steps; the model loads and every key of every network
    lands on a layer of it."""
    from netweave.demo.train import main
    from netweave.network.keymap import KeyMap
    from netweave.network.loader import load_network

    assert main(["--quick", "--out", str(tmp_path / "w")]) == 0
    model = demo_model(str(tmp_path / "w"))
    assert model.size == 64 and model.vae_scale == 4
    keymap = KeyMap(model.trees())
    loras, _ = demo_library(str(tmp_path / "w"))
    kinds = {}
    for name in sorted(os.listdir(loras)):
        net = load_network(os.path.join(loras, name), keymap, "sd1")
        assert net.unmatched == () and net.layers
        kinds[name] = sorted(net.algorithms)
    assert kinds == {"demo_boxy.safetensors": ["loha"], "demo_stripes.safetensors": ["lora"],
                     "demo_sunset.safetensors": ["lora"]}
