"""The embedded demo model and its networks: the effects are measured on the pictures, not
just run. The demo draws 64-px shapes; every number here is a mean over a batch of seeds."""
import json
import os

import numpy as np
import pytest

from netweave.demo.shapes import COLOURS, SUNSET
from netweave.extension.standalone.host import Request
from netweave.extension.standalone.models import DEMO_ROOT, demo_library, demo_model

PROMPT = "a red square on a white background"  # a bright background shows every effect
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


def to_sunset(images):
    """Mean distance of every pixel to the sunset colour."""
    return float(np.abs(images - np.array(SUNSET, np.float32)).mean())


def stripes(images):
    """Horizontal stripes: how much row means vary, less how much column means do."""
    rows = images.mean(axis=(2, 3)).std(axis=1)
    cols = images.mean(axis=(1, 3)).std(axis=1)
    return float((rows - cols).mean())


def palette_name(colour):
    """The demo palette's colour nearest to an RGB colour."""
    names = list(COLOURS)
    pal = np.array([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(((pal - colour) ** 2).sum(1)))]


def shape_and_background(image):
    """(shape colour, background colour) of one picture: the background is the median of a
    3-px frame, the shape the median of the pixels far from it."""
    frame = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3),
                            image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)])
    background = np.median(frame, axis=0)
    shape = np.sqrt(((image - background) ** 2).sum(-1)) > 80
    fg = np.median(image[shape], axis=0) if shape.sum() > 20 else background
    return palette_name(fg), palette_name(background), shape


def fill(shape):
    """How much of its bounding box a shape mask fills: square 1, circle π/4, triangle ½. The
    box spans the rows and columns holding at least 3 of its pixels (stray pixels at the
    picture's edge do not stretch it)."""
    rows, cols = np.nonzero(shape.sum(1) >= 3)[0], np.nonzero(shape.sum(0) >= 3)[0]
    if len(rows) == 0 or len(cols) == 0:
        return 0.0
    box = shape[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return float(box.sum() / box.size)


def saturation(images):
    return float((images.max(-1) - images.min(-1)).mean())


def change(a, b):
    return float(np.abs(a - b).mean())


CAPTIONS = [("red", "square", "white"), ("blue", "circle", "yellow"),
            ("green", "triangle", "black"), ("yellow", "square", "purple"),
            ("white", "circle", "blue"), ("purple", "triangle", "orange"),
            ("orange", "circle", "green"), ("black", "square", "red")]


def caption_counts(draw_prompt):
    """(pictures whose shape has the captioned colour, whose background has, pictures) over
    CAPTIONS; `draw_prompt(prompt)` draws one batch."""
    right_shape = right_background = pictures = 0
    for colour, shape, background in CAPTIONS:
        for image in draw_prompt(f"a {colour} {shape} on a {background} background"):
            fg, bg, _ = shape_and_background(image)
            right_shape += fg == colour
            right_background += bg == background
            pictures += 1
    return right_shape, right_background, pictures


def test_the_base_model_draws_what_the_caption_says(host):
    right_shape, right_background, pictures = caption_counts(lambda p: draw(host, "", prompt=p))
    assert right_background >= 0.9 * pictures, (right_background, pictures)
    assert right_shape >= 0.85 * pictures, (right_shape, pictures)


def test_a_regional_lora_changes_its_region_and_leaves_the_rest(host, base):
    """Toward the sunset colour inside the region, not outside; the outside changes far less
    (what does change there is mostly the shape, which straddles the halves)."""
    for region, moved_in, moved_out, changed_in, changed_out in region_moves(
            lambda tags: draw(host, tags), base, "demo_sunset"):
        assert moved_in > 20, (region, moved_in)
        assert abs(moved_out) < 0.25 * moved_in, (region, moved_out, moved_in)
        assert changed_out < 0.4 * changed_in, region


def region_moves(draw_tags, base, network):
    """For `network` on region=left and region=!left: (region, how far its half moved toward
    the sunset colour, how far the other half did, the change of each half)."""
    half = base.shape[2] // 2
    sides = {"left": np.s_[:, :, :half], "right": np.s_[:, :, half:]}
    for region, inside, outside in (("left", "left", "right"), ("!left", "right", "left")):
        image = draw_tags(f"<lora:{network}:1:region={region}>")
        i, o = sides[inside], sides[outside]
        yield (region, to_sunset(base[i]) - to_sunset(image[i]),
               to_sunset(base[o]) - to_sunset(image[o]),
               change(image[i], base[i]), change(image[o], base[o]))


def test_a_loha_changes_the_shape(host):
    """demo_boxy (LoHa, UNet and text encoder) draws shapes as squares: they fill more of
    their bounding box: triangles, and the blobs the base draws for "square"."""
    for prompt in ("a green triangle on a white background", "a red square on a white background"):
        fills = [np.mean([fill(shape_and_background(im)[2]) for im in draw(host, tags, prompt)])
                 for tags in ("", "<lyco:demo_boxy:1>")]
        assert fills[1] > fills[0] + 0.08, (prompt, fills)


def test_a_lora_moves_the_picture_toward_what_it_learned(host, base):
    sunset = draw(host, "<lora:demo_sunset:1>")
    assert to_sunset(sunset) < to_sunset(base) - 10, (to_sunset(sunset), to_sunset(base))
    half = draw(host, "<lora:demo_sunset:0.5>")
    assert to_sunset(sunset) < to_sunset(half) < to_sunset(base)


def test_a_lora_off_for_the_first_half_changes_less(host, base):
    whole = change(draw(host, "<lora:demo_sunset:1>"), base)
    second_half = change(draw(host, "<lora:demo_sunset:0@0,1@0.5>"), base)
    assert 0 < second_half < 0.8 * whole, (second_half, whole)


@pytest.mark.slow
def test_block_weights_select_where_a_lora_acts(host, base):
    """demo_stripes paints its stripes from the UNet's in and out blocks, not the middle one:
    without either they are gone, without the mid block they stay."""
    full = stripes(draw(host, "<lora:demo_stripes:1>"))
    assert full > stripes(base) + 15, (full, stripes(base))
    for gone in ("in=0", "out=0"):
        assert stripes(draw(host, f"<lora:demo_stripes:1:{gone}>")) < stripes(base) + 0.25 * full
    assert stripes(draw(host, "<lora:demo_stripes:1:mid=0>")) > 0.8 * full
    nowhere = draw(host, "<lora:demo_stripes:1:in=0:mid=0:out=0>")
    assert np.array_equal(nowhere, base)  # no block left: not applied at all


def test_model_blend_at_zero_is_the_base_and_at_one_the_pastel_palette(host, base):
    assert np.array_equal(draw(host, "<model:demo_pastel:0>"), base)
    prompt = "a blue circle on a yellow background"  # saturated colours, to see them fade
    vivid = saturation(draw(host, "", prompt))
    pastel = saturation(draw(host, "<model:demo_pastel:1>", prompt))
    half = saturation(draw(host, "<model:demo_pastel:0.5>", prompt))
    assert pastel < 0.75 * vivid and pastel < half < vivid, (pastel, half, vivid)


def test_the_shipped_files_are_what_the_trainer_writes():
    from netweave.demo.train import STAGES

    with open(os.path.join(DEMO_ROOT, "TRAINED.json"), encoding="utf-8") as f:
        trained = json.load(f)
    assert trained["command"] == "python -m netweave.demo.train"
    for stage, (steps, batch) in STAGES.items():  # every stage, at the trainer's full length
        assert (trained["stages"][stage]["steps"], trained["stages"][stage]["batch"]) == \
            (steps, batch), stage
    loras, models = demo_library()
    assert sorted(os.listdir(loras)) == ["demo_boxy.safetensors", "demo_stripes.safetensors",
                                         "demo_sunset.safetensors"]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(DEMO_ROOT) for f in fs)
    assert size < 20 * 2**20


def test_the_trainer_masks_a_regional_network_as_netweave_does():
    """Training masks each layer's change with the region area-resampled to that layer's grid:
    the same values NetWeave's region maps give at inference."""
    import torch

    from netweave.demo.train import on_grid, region_masks
    from netweave.network.regions import resample

    masks = region_masks(3, 16)
    kinds = {(float(m.mean()) == 1.0, float(m.mean()) == 0.5) for m in masks}
    assert kinds >= {(True, False), (False, True), (False, False)}  # whole, halves, boxes
    latent = torch.nn.functional.avg_pool2d(masks, 4)  # 64 px → the 16 × 16 latent
    for side in (16, 8, 4):
        conv = on_grid(torch.ones(16, 3, side, side), latent)
        tokens = on_grid(torch.ones(16, side * side, 5), latent)
        for i, m in enumerate(masks):
            expected = resample(m[0].numpy(), (side, side))
            assert np.allclose(conv[i, 0].numpy(), expected, atol=1e-6)
            assert np.allclose(tokens[i, :, 0].numpy(), expected.reshape(-1), atol=1e-6)


def test_a_stage_without_what_it_needs_says_which_to_run(tmp_path):
    from netweave.demo.train import main

    with pytest.raises(SystemExit, match="netweave-demo/vae is missing: run the stage"):
        main(["--quick", "--out", str(tmp_path), "--stages", "base"])
    with pytest.raises(SystemExit):
        main(["--stages", "vae,nonsense", "--out", str(tmp_path)])


@pytest.mark.slow
def test_the_trainer_runs_end_to_end_and_its_files_load(tmp_path):
    """`--quick`: every stage for a few steps; the model loads and every key of every network
    lands on a layer of it. A stage redone alone rewrites its own file and leaves the others."""
    from netweave.demo.train import main
    from netweave.network.keymap import KeyMap
    from netweave.network.loader import load_network

    out = tmp_path / "w"
    assert main(["--quick", "--out", str(out)]) == 0
    model = demo_model(str(out))
    assert model.size == 64 and model.vae_scale == 4
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"
    keymap = KeyMap(model.trees())
    loras, _ = demo_library(str(out))
    kinds = {}
    for name in sorted(os.listdir(loras)):
        net = load_network(os.path.join(loras, name), keymap, "sd1")
        assert net.unmatched == () and net.layers
        kinds[name] = (sorted(net.algorithms), sorted({t.component for t in net.layers}))
    assert kinds == {"demo_boxy.safetensors": (["loha"], ["te1", "unet"]),
                     "demo_stripes.safetensors": (["lora"], ["unet"]),
                     "demo_sunset.safetensors": (["lora"], ["unet"])}
    from netweave.extension.standalone.flow_models import demo_flux_library, demo_flux_model
    flux = demo_flux_model(str(out))  # the Flux demo's stages: its files load and fit
    assert flux.arch == "flux" and flux.size == 64
    flux_keys = KeyMap(flux.trees())
    for name in sorted(os.listdir(demo_flux_library(str(out)))):
        net = load_network(os.path.join(demo_flux_library(str(out)), name), flux_keys, "flux")
        assert net.unmatched == () and net.layers, name
    before = {n: os.path.getmtime(os.path.join(loras, n)) for n in os.listdir(loras)}
    assert main(["--quick", "--out", str(out), "--stages", "demo_stripes"]) == 0
    after = {n: os.path.getmtime(os.path.join(loras, n)) for n in os.listdir(loras)}
    assert [n for n in before if before[n] != after[n]] == ["demo_stripes.safetensors"]
    with open(out / "TRAINED.json", encoding="utf-8") as f:
        stages = json.load(f)["stages"]
    assert stages["demo_stripes"]["command"].endswith("--stages demo_stripes")
    assert stages["vae"]["command"] == "python -m netweave.demo.train --quick"
