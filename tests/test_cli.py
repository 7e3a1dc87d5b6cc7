"""The command-line contract of `python -m netweave explain` (other tools rely on it)."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from netweave.network.blocks import SD1_BLOCKS, SDXL_BLOCKS

PROMPT = ("a cat <lora:pixel:te=0.1@0,0.6@0.5:unet=1:in=0:mid=1:out=0:region=mask1> "
          "<model:anime_v3:0.7> <lora:bad:te=?>")


def run(*args):
    return subprocess.run([sys.executable, "-m", "netweave", *args], capture_output=True,
                          text=True, timeout=60)


def test_json_contract():
    result = run("explain", PROMPT, "--steps", "30", "--hires-steps", "10", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prompt"] == "a cat" and out["steps"] == 30
    (err,) = out["errors"]
    assert set(err) >= {"message", "column", "snippet"} and err["column"] == PROMPT.index("?") + 1
    pixel, model = out["networks"]
    assert (pixel["kind"], pixel["name"], pixel["region"], pixel["interp"]) == \
        ("lora", "pixel", "mask1", "step")
    assert model["kind"] == "model" and model["region"] is None
    assert set(pixel["strength"]) == {"te", "te1", "te2", "te3", "unet"}  # te3: SD3.5's T5
    assert pixel["strength"]["te"] == [0.1] * 15 + [0.6] * 15
    assert pixel["strength"]["unet"] == [1.0] * 30
    assert list(pixel["blocks"]) == list(SD1_BLOCKS)
    assert all(len(v) == 30 for v in pixel["blocks"].values())
    assert pixel["blocks"]["IN05"] == [0.0] * 30 and pixel["blocks"]["M00"] == [1.0] * 30
    assert model["strength"]["unet"] == [0.7] * 30
    assert pixel["hires"]["strength"]["te"] == [0.1] * 5 + [0.6] * 5
    assert len(pixel["hires"]["blocks"]["OUT11"]) == 10


def test_json_sdxl_blocks_and_no_hires():
    out = json.loads(run("explain", "<lora:x:lbw=OUTALL>", "--steps", "3", "--arch", "sdxl",
                         "--json").stdout)
    n = out["networks"][0]
    assert list(n["blocks"]) == list(SDXL_BLOCKS) and n["hires"] is None
    assert n["blocks"]["OUT05"] == [1.0] * 3 and n["blocks"]["IN04"] == [0.0] * 3


def test_explain_shows_the_blended_start_generate_runs():
    """A regional network without blend= takes the setting's default (15 % of the pass, as
    `generate` compiles it); blend=0 is one pass."""
    default = run("explain", "<lora:x:1:region=left>", "--steps", "20")
    assert "blended start: steps 1–3 (then one pass)" in default.stdout, default.stdout
    off = run("explain", "<lora:x:1:region=left:blend=0>", "--steps", "20")
    assert "one pass from step 1" in off.stdout, off.stdout


def test_table_and_png(tmp_path):
    png = tmp_path / "plan.png"
    result = run("explain", PROMPT, "--steps", "30", "--png", str(png))
    assert result.returncode == 0, result.stderr
    assert "lora:pixel" in result.stdout and "1–15: 0.1  16–30: 0.6" in result.stdout
    assert "IN00–IN11" in result.stdout and "error at column" in result.stdout
    img = Image.open(png)
    assert img.format == "PNG" and img.width >= 420
    pixels = img.convert("RGB").getcolors(1 << 20)
    assert len(pixels) > 10  # cells, text and legend were drawn


def test_errors_still_exit_zero():
    result = run("explain", "<lora:x:te=abc> <lora:", "--steps", "5", "--json")
    assert result.returncode == 0
    assert len(json.loads(result.stdout)["errors"]) == 2


@pytest.mark.parametrize("args", [
    ["explain", "x"],  # --steps is required
    ["explain", "x", "--steps", "0"],
    ["explain", "x", "--steps", "abc"],
    ["explain", "x", "--steps", "3", "--arch", "sd9"],
    ["explain", "x", "--steps", "3", "--sigmas", "1,0.5"],  # one sigma per step
    ["explain", "x", "--steps", "3", "--sigmas", "1,a,0.5"],
    ["explain", "x", "--steps", "3", "--sigmas", "0.5,1,0.2"],  # sigmas never rise
    ["explain", "x", "--steps", "3", "--sigmas", "1,0.5,0.2", "--shift", "3"],
    ["explain", "x", "--steps", "3", "--shift", "0"],
    ["explain", "x", "--steps", "3", "--hires-sigmas", "1,0.5"],  # no hires pass
    ["explain", "x", "--steps", "3", "--hires-steps", "-1"],
    ["frobnicate"],
    [],
])
def test_bad_arguments_exit_2(args, capsys):
    from netweave.extension.standalone.cli import main
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2 and capsys.readouterr().err


def test_a_bad_argument_exits_the_process_with_2():
    result = run("explain", "x", "--steps", "0")
    assert result.returncode == 2 and result.stderr


def test_unwritable_png_is_a_clear_failure(tmp_path):
    result = run("explain", "<lora:x>", "--steps", "2", "--png", str(tmp_path / "no" / "dir.png"))
    assert result.returncode == 1 and "cannot write" in result.stderr


def test_the_heatmap_follows_the_table_and_clips_no_label():
    """Issue 16 item 11: panels in the table's order (not sorted by region); every label,
    long titles and short passes' step labels included, lies inside the image and no two
    labels on one line overlap."""
    from PIL import ImageDraw

    from netweave.network.explain import explain_table, heatmap
    from netweave.network.plan import CompileContext, compile_prompt
    prompt = ("<lora:zeta_with_a_long_name_that_goes_on_and_on:1:region=right:te=0.1@0,0.6@0.5>"
              " <lora:alpha:0.5:hr=1> <lora:mid:1:region=left>")
    plan = compile_prompt(prompt, CompileContext(steps=3, hires_steps=2))
    texts = []
    img = heatmap(plan, texts)
    draw = ImageDraw.Draw(img)
    boxes = [(draw.textbbox(xy, t), t) for xy, t in texts]
    for (x0, y0, x1, y1), t in boxes:
        assert 0 <= x0 and x1 <= img.width and 0 <= y0 and y1 <= img.height, t
    for i, (a, ta) in enumerate(boxes):
        for b, tb in boxes[i + 1:]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, (ta, tb)
    table_order = [line.split()[1] for line in explain_table(plan).splitlines()
                   if line.startswith("#")]
    titles = [t.split()[0] for _, t in texts if t.startswith("lora:")]
    assert titles == table_order == ["lora:zeta_with_a_long_name_that_goes_on_and_on",
                                     "lora:alpha", "lora:mid"]


@pytest.mark.slow
def test_explain_places_noise_level_positions_with_given_or_shifted_sigmas():
    prompt = "<lora:x:unet=0@0,1@s0.5:start=s0.8> <lora:y:1@s0.5>"
    shifted = json.loads(run("explain", prompt, "--steps", "4", "--arch", "flux", "--shift",
                             "3", "--json").stdout)
    assert shifted["sigmas"] == pytest.approx([1, 0.9, 0.75, 0.5]) and shifted["errors"] == []
    x = shifted["networks"][0]
    assert x["strength"]["unet"] == [0, 0, 0, 1]  # sigma 0.5 is the last of 4 steps
    assert [(p["item"], p["sigma"]) for p in x["sigma_positions"]] == \
        [("unet=", 0.5), ("start=", 0.8)]
    given = run("explain", prompt, "--steps", "4", "--hires-steps", "2", "--sigmas",
                "10,5,1,0.1", "--hires-sigmas", "0.6,0.3")
    assert given.returncode == 0, given.stderr
    assert "sigma per step  1: 10  2: 5  3: 1  4: 0.1" in given.stdout
    assert "hires sigma per step  1: 0.6  2: 0.3" in given.stdout
    # s0.5 lies 0.5/0.9 of the way from step 3 (sigma 1) to step 4 (0.1); in the hires
    # pass a third of the way from step 1 (0.6) to step 2 (0.3); s0.8 is above 0.6: step 1
    assert "by noise level: unet=s0.5 at step 3.56  start=s0.8 at step 3.22" in given.stdout
    assert "by noise level: unet=s0.5 at step 1.33  start=s0.8 at step 1\n" in given.stdout
    none = json.loads(run("explain", prompt, "--steps", "4", "--json").stdout)
    assert none["sigmas"] is None
    assert [e["severity"] for e in none["errors"]] == ["warning"] * 3
    assert all("no sigmas" in e["message"] for e in none["errors"])
