"""Schedules resolved over N steps: positions, holds, the six interp modes, windows."""
import math

import numpy as np
import pytest

from helpers import one_network, series
from netweave.network.schedule import CURVES, evaluate, window_mask
from netweave.parser import INTERPOLATIONS, parse


def sched(text):
    return parse(f"<lora:n:{text}>").tags[0].te


def test_design_example_fraction_positions_30_steps():
    v = series(one_network("<lora:n:te=0.1@0,0.6@0.5>").base.strength["te1"])
    assert v == [0.1] * 15 + [0.6] * 15  # 0.1 on steps 1-15, 0.6 from step 16


def test_design_example_step_numbers_30_steps():
    v = series(one_network("<lora:n:te=0.1@1,0.6@6>").base.strength["te1"])
    assert v == [0.1] * 5 + [0.6] * 25  # 0.1 on steps 1-5, 0.6 from step 6


def test_design_example_loractl_linear_ramp():
    v = one_network("<loractl:x:0@0,1@1>").base.strength["unet"]
    assert np.allclose(v, np.arange(30) / 29)


def test_hold_before_first_and_after_last_keyframe():
    v = series(evaluate(sched("0.2@5,0.8@8"), 10, "linear"))
    assert v[:5] == [0.2] * 5 and v[7:] == [0.8] * 3
    assert v[5:7] == [0.4, 0.6]


def test_last_position_decides_fraction_or_step():
    # last position <= 1: fractions; > 1: step numbers
    assert series(evaluate(sched("0@0,1@1"), 3, "step")) == [0, 0, 1]
    assert series(evaluate(sched("0@1,1@2"), 3, "step")) == [0, 1, 1]


def test_percent_is_always_a_fraction():
    # 50% is step index 2 of 5 whether the other positions are fractions or step numbers
    assert series(evaluate(sched("1@50%,0@1"), 5, "step")) == [1, 1, 1, 1, 0]  # 0@1: the end
    assert series(evaluate(sched("0@2,1@50%"), 5, "step")) == [0, 0, 1, 1, 1]  # 0@2: step 2
    assert series(evaluate(sched("0@0%,1@50%"), 5, "step")) == [0, 0, 1, 1, 1]


def test_unsorted_keyframes_are_sorted():
    assert series(evaluate(sched("1@0.5,0@0"), 5, "step")) == [0, 0, 1, 1, 1]


def test_single_step_pass():
    # the only step sits at progress 0
    assert series(evaluate(sched("0@0,1@1"), 1, "linear")) == [0.0]
    assert series(evaluate(sched("0.3@0,1@0.5"), 1, "step")) == [0.3]
    assert series(one_network("<lora:n:0.5>", steps=1).base.strength["unet"]) == [0.5]


@pytest.mark.parametrize("interp", INTERPOLATIONS)
def test_interp_modes_at_keyframes_and_between(interp):
    v = evaluate(sched("0@0,1@1"), 5, interp)  # t = 0, .25, .5, .75, 1
    assert v[0] == 0 and v[-1] == 1
    t = np.array([0.25, 0.5, 0.75])
    expected = {
        "step": [0, 0, 0],
        "linear": t,
        "ease_in": t ** 2,
        "ease_out": 1 - (1 - t) ** 2,
        "ease_in_out": [2 * 0.25 ** 2, 0.5, 1 - 2 * 0.25 ** 2],
        "cosine": (1 - np.cos(math.pi * t)) / 2,
    }[interp]
    assert np.allclose(v[1:4], expected)


def test_interp_modes_are_distinct():
    t = np.linspace(0.05, 0.45, 5)
    curves = {name: np.asarray(f(t)) for name, f in CURVES.items()}
    names = sorted(curves)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.allclose(curves[a], curves[b]), (a, b)


def test_interp_applies_between_every_pair():
    v = evaluate(sched("0@0,1@0.5,0@1"), 5, "linear")
    assert series(v) == [0, 0.5, 1, 0.5, 0]


def test_repeated_position_jumps():
    assert series(evaluate(sched("0@0,0@0.5,1@0.5,1@1"), 5, "linear")) == [0, 0, 1, 1, 1]


def test_windows_in_fractions_steps_percent():
    w = parse("<lora:n:start=0.25:stop=75%>").tags[0].window
    assert series(window_mask(w, 5)) == [0, 1, 1, 0, 0]
    w = parse("<lora:n:step=2-4>").tags[0].window
    assert series(window_mask(w, 5)) == [0, 1, 1, 1, 0]


def test_window_multiplies_strength():
    v = series(one_network("<lora:n:0.5:start=2>", steps=3).base.strength["te1"])
    assert v == [0, 0.5, 0.5]


def test_default_interp_setting():
    n = one_network("<lora:n:0@0,1@1>", steps=3, default_interp="linear")
    assert series(n.base.strength["unet"]) == [0, 0.5, 1]
    n = one_network("<lora:n:0@0,1@1:interp=step>", steps=3, default_interp="linear")
    assert series(n.base.strength["unet"]) == [0, 0, 1]
