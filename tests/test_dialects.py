"""Every dialect NetWeave reads (A1111, SD.Next, loractl, lora-block-weight), with examples
from each one's own documentation, and every example of the README's tag table."""
import pytest

from helpers import one_network, one_tag, series
from netweave.parser import (BlockWeights, Keyframe, Mask, Not, Position, Scaled, Schedule,
                             Union_, VectorEntry, parse)

C = Schedule.const


def kf(*pairs):
    return Schedule(keys=tuple(Keyframe(v, Position(p)) for v, p in pairs))


# (tag text, {field: expected value}) -- each row one documented example.
A1111 = [
    ("<lora:name>", {"te": None, "unet": None}),
    ("<lora:name:0.8>", {"te": C(0.8), "unet": None}),
    ("<lora:name:0.8:0.5>", {"te": C(0.8), "unet": C(0.5)}),
    ("<lora:name:te=0.8:unet=0.5:dyn=16>", {"te": C(0.8), "unet": C(0.5), "dyn": 16}),
    ("<lora:name:0.8:0.5:16>", {"te": C(0.8), "unet": C(0.5), "dyn": 16}),
    ("<lyco:Model:1:0.5:13>", {"kind": "lyco", "te": C(1), "unet": C(0.5), "dyn": 13}),
    ("<lyco:Model:1:unet=0.5:dyn=13>", {"te": C(1), "unet": C(0.5), "dyn": 13}),
    ("<lyco:Model:dyn=13:te=1:unet=0.5>", {"te": C(1), "unet": C(0.5), "dyn": 13}),
]
SDNEXT = [
    ("<lora:name:1.0>", {"te": C(1.0)}),
    ("<lora:name:te=0.5:unet=1.5>", {"te": C(0.5), "unet": C(1.5)}),
    ("<lora:name:1.0:in=0:mid=1:out=0>", {"groups": (("in", C(0)), ("mid", C(1)), ("out", C(0)))}),
    ("<lora:name:te=0.1@1,0.6@6>", {"te": kf((0.1, 1), (0.6, 6))}),
    ("<lora:name:0.1@0,0.9@1>", {"te": kf((0.1, 0), (0.9, 1))}),
    ("<lora:name:1.0:dyn=16>", {"dyn": 16}),
]
LORACTL = [
    ("<lora:network:0@0,1@0.5,0@1>", {"te": kf((0, 0), (1, 0.5), (0, 1))}),
    ("<lora:pixel:1:0@5,1@6>", {"te": C(1), "unet": kf((0, 5), (1, 6))}),
    ("<lora:pixel:te=1:unet=0@0,1@1>", {"te": C(1), "unet": kf((0, 0), (1, 1))}),
    ("<lora:network:0.5:hr=1.0>", {"te": C(0.5), "hr": C(1.0)}),
    ("<lora:network:0@0,1@1:hr=1@0,0@1>", {"te": kf((0, 0), (1, 1)), "hr": kf((1, 0), (0, 1))}),
    ("<lora:n:hrte=0.2:hrunet=0.3>", {"hrte": C(0.2), "hrunet": C(0.3)}),
    ("<loractl:network:0.5:hr=1.0>", {"kind": "loractl", "te": C(0.5), "hr": C(1.0)}),
    ("<lora:n:0~0;1~0.5>", {"te": kf((0, 0), (1, 0.5))}),
    ("<lora:n:0@0,1>", {"te": kf((0, 0), (1, 1))}),  # a value without position sits at 1
]
LBW = [
    ("<lora:name:1:lbw=OUTALL>", {"lbw": BlockWeights(preset="OUTALL")}),
    ("<lora:name:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1>",
     {"lbw": BlockWeights(entries=tuple(VectorEntry("num", float(v)) for v in
                                        [1, 0, 0, 0, 0, 0, 0, 0] + [1] * 9))}),
    ("<lora:name:1:1:lbw=IN02>", {"te": C(1), "unet": C(1), "lbw": BlockWeights(preset="IN02")}),
    ("<lora:name:1:lbw=ALL:start=10>", {"window.start": Position(10, "step")}),
    ("<lora:name:1:lbw=ALL:stop=10>", {"window.stop": Position(10, "step")}),
    ("<lora:name:1:lbw=ALL:step=5-10>", {"window.start": Position(5, "step"),
                                         "window.last": Position(10, "step")}),
    ("<lora:name:0.5:lbw=ROUT:x=0.7>", {"lbw": BlockWeights(preset="ROUT"), "x": 0.7}),
    ("<lora:name:1:w=ALL>", {"lbw": BlockWeights(preset="ALL")}),
    ("<lora:name:1:ALL>", {"lbw": BlockWeights(preset="ALL")}),  # legacy positional preset
    ("<lora:name:1:0,0,1,1>", {"lbw": BlockWeights(entries=tuple(
        VectorEntry("num", float(v)) for v in (0, 0, 1, 1)))}),  # legacy positional vector
    ("<lyco:name:1:1:lbw=IN02>", {"kind": "lyco", "lbw": BlockWeights(preset="IN02")}),
    ("<lora:n:lbw=1,R,U,X,X+0.2,X-0.1>", {"lbw": BlockWeights(entries=(
        VectorEntry("num", 1.0), VectorEntry("R"), VectorEntry("U"), VectorEntry("X", 0.0),
        VectorEntry("X", 0.2), VectorEntry("X", -0.1)))}),
]
README_EXAMPLES = [
    ("<lora:pixel:te=0.1@0,0.6@0.5:unet=1:in=0:mid=1:out=0:region=mask1>",
     {"te": kf((0.1, 0), (0.6, 0.5)), "unet": C(1), "region": Mask("mask1"),
      "groups": (("in", C(0)), ("mid", C(1)), ("out", C(0)))}),
    ("<model:anime_v3:0.7>", {"kind": "model", "name": "anime_v3", "te": C(0.7)}),
    ("<loractl:x:0@0,1@1>", {"kind": "loractl", "te": kf((0, 0), (1, 1))}),
    ("<lora:sub folder/my lora v2:0.5>", {"name": "sub folder/my lora v2"}),
    ("<LORA:Name:TE=0.5:UNET=1>", {"kind": "lora", "name": "Name", "te": C(0.5), "unet": C(1)}),
    ("<lora:n:region=mask1+left*0.5>",
     {"region": Union_((Mask("mask1"), Scaled(Mask("left"), 0.5)))}),
    ("<lora:n:region=!top>", {"region": Not(Mask("top"))}),
    ("<lora:n:interp=ease_in_out:neg=0>", {"interp": "ease_in_out", "neg": 0.0}),
    ("<lora:n:te=1@50%>", {"te": Schedule(keys=(Keyframe(1, Position(50, "percent")),))}),
    # the DiTs' text encoders: SD3.5's te3, and each encoder's block by its key, any case
    ("<lora:s:te3=0.5>", {"te3": C(0.5), "te": None, "te2": None}),
    ("<lora:f:1:t5=0>", {"te": C(1), "blocks": (("T5", C(0)),)}),
    ("<lora:s:1:t5=0:base=0.5>", {"blocks": (("BASE", C(0.5)), ("T5", C(0)))}),
    ("<lora:z:1:qwen3=0.5>", {"blocks": (("QWEN3", C(0.5)),)}),
    ("<lora:n:1:umt5=0:QwenVL=1:Clip=2:in=0>", {"groups": (("in", C(0)),), "blocks": (
        ("CLIP", C(2)), ("QWENVL", C(1)), ("UMT5", C(0)))}),
]
# positions by noise level: s followed by a sigma (any case), in every place a position goes
SIGMA = [
    ("<lora:x:unet=1@s1,0@s0.5>", {"unet": Schedule(keys=(
        Keyframe(1, Position(1, "sigma")), Keyframe(0, Position(0.5, "sigma"))))}),
    ("<loractl:x:0~S14.6;1~s.5e-1>", {"te": Schedule(keys=(
        Keyframe(0, Position(14.6, "sigma")), Keyframe(1, Position(0.05, "sigma"))))}),
    ("<lora:x:0@0,1@s0.75,0@1>", {"te": Schedule(keys=(
        Keyframe(0, Position(0)), Keyframe(1, Position(0.75, "sigma")),
        Keyframe(0, Position(1))))}),
    ("<lora:x:1:start=s0.8:stop=s0.3>", {"window.start": Position(0.8, "sigma"),
                                        "window.stop": Position(0.3, "sigma")}),
    ("<lora:x:1:step=s0.9-12>", {"window.start": Position(0.9, "sigma"),
                                 "window.last": Position(12, "step")}),
    ("<lora:x:1:start = s2>", {"window.start": Position(2, "sigma")}),  # above 1: a sigma still
    ("<lora:x:1:region=left:blend=s0.6>", {"blend": Position(0.6, "sigma")}),
    ("<lora:x:1:in=0@0,1@s0.5:IN04=1@s1>", {
        "groups": (("in", Schedule(keys=(Keyframe(0, Position(0)),
                                         Keyframe(1, Position(0.5, "sigma"))))),),
        "blocks": (("IN04", Schedule(keys=(Keyframe(1, Position(1, "sigma")),))),)}),
]


def _get(tag, field):
    obj = tag
    for part in field.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("text,expected",
                         A1111 + SDNEXT + LORACTL + LBW + README_EXAMPLES + SIGMA)
def test_documented_examples_parse(text, expected):
    tag = one_tag(text)
    for field, value in expected.items():
        assert _get(tag, field) == value, (field, _get(tag, field))


def test_unknown_keys_of_other_dialects_warn_and_keep_the_tag():
    # SD.Next's module=, lora-block-weight's lbwe=: read, warned about, never a crash.
    parsed = parse("<lora:name:1.0:module=unet> <lora:name:1:lbw=MIDD:lbwe=ATTNON>")
    assert len(parsed.tags) == 2
    assert [e.severity for e in parsed.errors] == ["warning", "warning"]
    assert "module" in parsed.errors[0].message and "lbwe" in parsed.errors[1].message


# ---- the semantics that follow from those examples, as plans ---------------------------
def test_a1111_unet_defaults_to_te():
    n = one_network("<lora:name:0.8>", steps=4)
    assert series(n.base.strength["unet"]) == [0.8] * 4
    assert series(n.base.strength["te1"]) == [0.8] * 4


def test_named_te_wins_over_positional_as_in_a1111():
    parsed = parse("<lora:name:0.3:te=0.8>")
    assert parsed.tags[0].te == C(0.8)
    (said,) = parsed.errors  # a warning that says which counts, not a bare "given twice"
    assert said.severity == "warning" and "in its slot and as te=" in said.message
    assert "named one counts" in said.message
    assert not parse("<lora:name:te=0.8:0.3>").errors  # the slot after the name: A1111 drops it
    assert "given twice" in parse("<lora:name:te=0.3:te=0.8>").errors[0].message


def test_loractl_pixel_unet_off_until_step_5():
    n = one_network("<lora:pixel:1:0@5,1@6>", steps=20)
    # step interp for <lora:>: 0 through step 5, 1 from step 6 (positions are step numbers)
    assert series(n.base.strength["unet"]) == [0] * 5 + [1] * 15
    assert series(n.base.strength["te1"]) == [1] * 20


def test_loractl_tag_defaults_to_linear():
    n = one_network("<loractl:x:0@0,1@1>", steps=5)
    assert series(n.base.strength["unet"]) == [0, 0.25, 0.5, 0.75, 1]


def test_loractl_hr_ramps_down_in_hires():
    n = one_network("<loractl:network:0@0,1@1:hr=1@0,0@1>", steps=3, hires_steps=5)
    assert series(n.hires.strength["unet"]) == [1, 0.75, 0.5, 0.25, 0]
    assert series(n.hires.strength["te1"]) == [1, 0.75, 0.5, 0.25, 0]


def test_hires_defaults_follow_loractl():
    n = one_network("<lora:n:te=0.2:unet=0.7:hrunet=0.9>", steps=2, hires_steps=2)
    assert series(n.hires.strength["te1"]) == [0.2, 0.2]  # hrte <- te
    assert series(n.hires.strength["unet"]) == [0.9, 0.9]
    n = one_network("<lora:n:te=0.2:unet=0.7>", steps=2, hires_steps=2)
    assert series(n.hires.strength["unet"]) == [0.7, 0.7]  # hrunet <- unet


def test_sdnext_block_groups_multiply_unet():
    n = one_network("<lora:name:1.0:in=0:mid=1:out=0>", steps=2)
    assert series(n.base.effective("unet", "IN04")) == [0, 0]
    assert series(n.base.effective("unet", "M00")) == [1, 1]
    assert series(n.base.effective("unet", "OUT05")) == [0, 0]
    assert series(n.base.effective("te1", "BASE")) == [1, 1]


def test_lbw_start_stop_step_windows():
    assert series(one_network("<lora:n:1:start=10>", steps=12).base.strength["unet"]) == \
        [0] * 9 + [1] * 3
    assert series(one_network("<lora:n:1:stop=10>", steps=12).base.strength["unet"]) == \
        [1] * 9 + [0] * 3
    assert series(one_network("<lora:n:1:step=5-10>", steps=12).base.strength["unet"]) == \
        [0] * 4 + [1] * 6 + [0] * 2


def test_lbw_x_fills_placeholders():
    n = one_network("<lora:n:1:lbw=1,X,X+0.2,X-0.1,0,0,0,0,0,0,0,0,0,0,0,0,0:x=0.5>", steps=1)
    assert n.lbw[:4] == (1.0, 0.5, 0.7, 0.4)
    assert series(n.base.blocks["IN01"]) == [0.5]
    assert series(n.base.blocks["IN02"]) == [0.7]


# ---- Forge Neo's [w@t] schedule --------------------------------------------------------------
def test_forge_neo_brackets_ramp_on_its_own_progress():
    """Neo reads t as sampling_step/steps (step k of N at k/N) and ramps between keyframes,
    holding the last value after it (extensions-builtin/sd_forge_lora_schedule in Neo)."""
    from netweave.network.plan import CompileContext, compile_prompt
    tag = one_tag("<lora:turbo:[1@0,0@0.2]>")
    assert tag.interp == "linear" and tag.unet is None
    assert tag.te.keys == (Keyframe(1.0, Position(0.0, "progress")),
                           Keyframe(0.0, Position(0.2, "progress")))
    plan = compile_prompt("a <lora:turbo:[1@0,0@0.2]>", CompileContext(steps=10))
    assert list(plan.networks[0].base.strength["unet"]) == pytest.approx(
        [1.0, 0.5, 0, 0, 0, 0, 0, 0, 0, 0])  # a turbo LoRA on the first two steps (Neo #1439)
    # where Neo's k/N differs from NetWeave's k/(N-1): 0.5 of 5 steps is step 2.5, not 2
    plan = compile_prompt("a <lora:x:[0@0,1@0.5]>", CompileContext(steps=5))
    assert list(plan.networks[0].base.strength["unet"]) == pytest.approx([0, 0.4, 0.8, 1, 1])


def test_forge_neo_brackets_keep_percent_and_sigma_units_and_an_explicit_interp():
    tag = one_tag("<lora:x:[1@0,0@50%,1@s0.3]:interp=step>")
    assert [k.at.unit for k in tag.te.keys] == ["progress", "percent", "sigma"]
    assert tag.interp == "step"


@pytest.mark.parametrize("bad", ["<lora:x:[1@0,0.5]>", "<lora:x:[1@0,0@0.5>", "<lora:x:[]>"])
def test_a_broken_bracket_is_an_error_at_its_column(bad):
    parsed = parse("a " + bad + " b")
    assert not parsed.tags and parsed.errors[0].severity == "error"
    assert parsed.text == "a b"


# ---- Wan2GP's expert phases -------------------------------------------------------------------
def test_wan2gp_phases_set_each_expert():
    tag = one_tag("<lora:x:1;0>")
    assert tag.experts == (("high", C(1)), ("low", C(0))) and tag.te is None
    tag = one_tag("<lora:x:0.9,0.8;1.2,1.1,1>")
    assert [k.value for k in tag.experts[1][1].keys] == [1.2, 1.1, 1.0]
    assert {k.at.unit for _, s in tag.experts for k in s.keys} == {"phase"}
    assert one_tag("<lora:x:high=0.9,0.8:low=1.2,1.1,1>") == tag  # the keyed spelling


def test_wan2gp_values_step_through_each_experts_own_steps():
    """As Wan2GP spreads them: n values over an expert's M steps, value i on steps
    [i·M/n, (i+1)·M/n)."""
    from netweave.network.plan import CompileContext, compile_prompt
    prompt = "a <lora:x:0.9,0.8;1.2,1.1,1>"
    high = compile_prompt(prompt, CompileContext(arch="wan22", steps=10, expert="high",
                                                 switch_step=4))
    low = compile_prompt(prompt, CompileContext(arch="wan22", steps=10, expert="low",
                                                switch_step=4))
    assert not high.errors and not low.errors
    assert list(high.networks[0].base.strength["unet"][:4]) == pytest.approx([0.9, 0.9, 0.8, 0.8])
    assert list(low.networks[0].base.strength["unet"][4:]) == pytest.approx(
        [1.2, 1.2, 1.1, 1.1, 1.0, 1.0])
    unsaid = compile_prompt(prompt, CompileContext(arch="wan22", steps=10, expert="low"))
    assert "does not say at which step" in unsaid.errors[0].message
    assert list(unsaid.networks[0].base.strength["unet"]) == pytest.approx(
        [1.2] * 4 + [1.1] * 3 + [1.0] * 3)


@pytest.mark.parametrize("bad, says", [("<lora:x:1;0;1>", "two lists of numbers"),
                                       ("<lora:x:1;R>", "two lists of numbers"),
                                       ("<lora:x:1:1;0>", "first slot")])
def test_wan2gp_phases_that_are_not_two_lists_of_numbers_are_said(bad, says):
    parsed = parse(bad)
    assert says in parsed.errors[0].message
