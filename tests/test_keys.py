"""Every row of docs/design.md §3's key table, as the plan it compiles to (SD1 and SDXL)."""
import pytest

from helpers import one_network, series
from netweave.network.plan import CompileContext, compile_prompt

S = 4  # steps


@pytest.mark.parametrize("text,arch,check", [
    # te, te1, te2: text-encoder strengths; SDXL's two encoders separately
    ("<lora:n:te=0.5>", "sd1", lambda n: series(n.base.effective("te1", "BASE")) == [0.5] * S),
    ("<lora:n:te1=0.3:te2=0.7>", "sdxl",
     lambda n: series(n.base.strength["te1"]) == [0.3] * S and series(n.base.strength["te2"]) == [0.7] * S),
    ("<lora:n:te=0.4:te2=0.7>", "sdxl",
     lambda n: series(n.base.strength["te1"]) == [0.4] * S and series(n.base.strength["te2"]) == [0.7] * S),
    # unet
    ("<lora:n:unet=0.25>", "sd1",
     lambda n: series(n.base.strength["unet"]) == [0.25] * S and series(n.base.strength["te1"]) == [1] * S),
    # in / mid / out and the down / up aliases
    ("<lora:n:in=0.5>", "sd1", lambda n: series(n.base.blocks["IN07"]) == [0.5] * S
     and series(n.base.blocks["OUT07"]) == [1] * S),
    ("<lora:n:down=0.5>", "sd1", lambda n: series(n.base.blocks["IN00"]) == [0.5] * S),
    ("<lora:n:mid=0>", "sdxl", lambda n: series(n.base.blocks["M00"]) == [0] * S),
    ("<lora:n:up=2>", "sdxl", lambda n: series(n.base.blocks["OUT08"]) == [2] * S
     and series(n.base.blocks["BASE"]) == [1] * S),
    ("<lora:n:out=0@0,1@1>", "sd1", lambda n: series(n.base.blocks["OUT00"]) == [0, 0, 0, 1]),
    # lbw / w: vectors and presets
    ("<lora:n:lbw=OUTS>", "sd1", lambda n: series(n.base.blocks["OUT11"]) == [1] * S
     and series(n.base.blocks["OUT03"]) == [0] * S and series(n.base.blocks["BASE"]) == [1] * S),
    ("<lora:n:w=" + ",".join(["0.5"] * 26) + ">", "sd1",
     lambda n: all(series(v) == [0.5] * S for v in n.base.blocks.values())),
    ("<lora:n:lbw=" + ",".join(["0.5"] * 12) + ">", "sdxl",
     lambda n: series(n.base.blocks["IN04"]) == [0.5] * S and series(n.base.blocks["IN00"]) == [0] * S),
    ("<lora:n:lbw=" + ",".join(["0.5"] * 20) + ">", "sdxl",
     lambda n: series(n.base.blocks["IN00"]) == [0.5] * S),
    # BASE, INxx, M00, OUTxx: one block's multiplier
    ("<lora:n:BASE=0>", "sd1", lambda n: series(n.base.effective("te1", "BASE")) == [0] * S),
    ("<lora:n:IN04=0.5:M00=0.25:OUT11=2>", "sd1", lambda n: series(n.base.blocks["IN04"]) == [0.5] * S
     and series(n.base.blocks["M00"]) == [0.25] * S and series(n.base.blocks["OUT11"]) == [2] * S),
    ("<lora:n:in04=0.5>", "sdxl", lambda n: series(n.base.blocks["IN04"]) == [0.5] * S),
    # start, stop, step=a-b windows (steps, fractions, percent)
    ("<lora:n:start=3>", "sd1", lambda n: series(n.base.strength["unet"]) == [0, 0, 1, 1]),
    ("<lora:n:stop=0.5>", "sd1", lambda n: series(n.base.strength["te1"]) == [1, 1, 0, 0]),
    ("<lora:n:step=2-3>", "sd1", lambda n: series(n.base.strength["unet"]) == [0, 1, 1, 0]),
    ("<lora:n:step=0%-34%>", "sd1", lambda n: series(n.base.strength["unet"]) == [1, 1, 0, 0]),
    # hr, hrte, hrunet: the hires pass
    ("<lora:n:0.5:hr=1>", "sd1", lambda n: series(n.hires.strength["unet"]) == [1, 1]
     and series(n.base.strength["unet"]) == [0.5] * S),
    ("<lora:n:hrte=0.2>", "sd1", lambda n: series(n.hires.strength["te1"]) == [0.2, 0.2]
     and series(n.hires.strength["unet"]) == [1, 1]),
    ("<lora:n:hrunet=0.2>", "sd1", lambda n: series(n.hires.strength["unet"]) == [0.2, 0.2]),
    # region
    ("<lora:n:region=mask1&left>", "sd1", lambda n: n.to_dict()["region"] == "mask1&left"),
    # interp
    ("<lora:n:0@0,1@1:interp=linear>", "sd1",
     lambda n: series(n.base.strength["unet"]) == [0, 0.333333, 0.666667, 1]),
    ("<lora:n:0@0,1@1>", "sd1", lambda n: series(n.base.strength["unet"]) == [0, 0, 0, 1]),
    # neg
    ("<lora:n:neg=0.5>", "sd1", lambda n: n.neg == 0.5),
    ("<lora:n>", "sd1", lambda n: n.neg == 1.0),
    # dyn, x
    ("<lora:n:dyn=8>", "sd1", lambda n: n.tag.dyn == 8),
    ("<lora:n:lbw=" + ",".join(["X"] * 17) + ":x=0.3>", "sd1",
     lambda n: series(n.base.blocks["OUT11"]) == [0.3] * S),
])
def test_key(text, arch, check):
    n = one_network(text, steps=S, arch=arch, hires_steps=2)
    assert check(n), n.to_dict()


# The DiTs' text encoders (issue 19): te3= sets SD3.5's T5 alone; each text encoder's block key
# (CLIP, T5, QWEN3, QWENVL, UMT5, any case) scales that encoder's block only; in=/out= stay groups.
def _te(n, te, block, pass_="base"):
    return series(getattr(n, pass_).effective(te, block))


@pytest.mark.parametrize("text,arch,check", [
    ("<lora:n:te3=0.5>", "sd3", lambda n: _te(n, "te3", "T5") == [0.5] * S
     and _te(n, "te1", "BASE") == [1] * S and _te(n, "te2", "BASE") == [1] * S),
    ("<lora:n:0.8:te3=0@0,1@1>", "sd3", lambda n: _te(n, "te3", "T5") == [0, 0, 0, 1]
     and _te(n, "te1", "BASE") == [0.8] * S and series(n.base.strength["unet"]) == [0.8] * S),
    # hrte replaces te3 in the hires pass as it does te1 and te2; without it te3 carries on
    ("<lora:n:te3=0.5:hrte=0.2>", "sd3", lambda n: _te(n, "te3", "T5") == [0.5] * S
     and _te(n, "te3", "T5", "hires") == [0.2, 0.2]
     and _te(n, "te1", "BASE", "hires") == [0.2, 0.2]),
    ("<lora:n:te3=0.5:hrunet=0>", "sd3", lambda n: _te(n, "te3", "T5", "hires") == [0.5, 0.5]),
    ("<lora:n:1:t5=0:BASE=0.5>", "sd3", lambda n: _te(n, "te3", "T5") == [0] * S
     and _te(n, "te1", "BASE") == [0.5] * S and _te(n, "te2", "BASE") == [0.5] * S
     and series(n.base.effective("unet", "D00")) == [1] * S),
    ("<lora:n:1:t5=0>", "flux", lambda n: _te(n, "te2", "T5") == [0] * S
     and _te(n, "te1", "CLIP") == [1] * S and series(n.base.effective("unet", "S05")) == [1] * S),
    ("<lora:n:1:Clip=0.5:in=0:out=0.25>", "flux", lambda n: _te(n, "te1", "CLIP") == [0.5] * S
     and _te(n, "te2", "T5") == [1] * S and series(n.base.blocks["IN"]) == [0] * S
     and series(n.base.blocks["OUT"]) == [0.25] * S and series(n.base.blocks["D00"]) == [1] * S),
    ("<lora:n:1:T5=0.25>", "chroma", lambda n: _te(n, "te2", "T5") == [0.25] * S),
    ("<lora:n:1:qwen3=0.5>", "zimage", lambda n: _te(n, "te1", "QWEN3") == [0.5] * S
     and series(n.base.effective("unet", "S00")) == [1] * S),
    ("<lora:n:1:QwenVL=0@0,1@1>", "qwenimage", lambda n: _te(n, "te1", "QWENVL") == [0, 0, 0, 1]
     and series(n.base.blocks["D00"]) == [1] * S),
    ("<lora:n:1:umt5=0:in=0.5>", "wan22", lambda n: _te(n, "te1", "UMT5") == [0] * S
     and series(n.base.blocks["IN"]) == [0.5] * S and series(n.base.blocks["B00"]) == [1] * S),
])
def test_text_encoder_key_on_a_dit(text, arch, check):
    plan = compile_prompt(text, CompileContext(arch=arch, steps=S, hires_steps=2))
    assert plan.errors == ()  # the key applies here: not even a warning
    assert check(plan.networks[0]), plan.networks[0].to_dict()


def test_te3_takes_positions_by_noise_level_like_the_other_strength_keys():
    ctx = CompileContext(arch="sd3", steps=S, sigmas=(1.0, 0.75, 0.5, 0.25))
    n = compile_prompt("<lora:n:te3=0@0,1@s0.5>", ctx).networks[0]
    assert _te(n, "te3", "T5") == [0, 0, 1, 1] and _te(n, "te1", "BASE") == [1] * S
    plan = compile_prompt("<lora:n:te3=0@0,1@s0.5>", CompileContext(arch="sd3", steps=S))
    assert [(e.severity, e.column) for e in plan.errors] == [("warning", 9)]
    assert "te3=" in plan.errors[0].message and "sigmas" in plan.errors[0].message
