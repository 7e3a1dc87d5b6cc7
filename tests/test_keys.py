"""Every row of docs/design.md §3's key table, as the plan it compiles to (SD1 and SDXL)."""
import pytest

from helpers import one_network, series

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
