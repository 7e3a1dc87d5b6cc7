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


# ---- positions by noise level (s0.5) -----------------------------------------------------------
def flux_sigmas(steps=4, shift=3.0):
    """The sigmas diffusers' flow-matching scheduler calls the model with, as Flux's pipeline
    sets it up (sigmas 1 … 1/N, shifted)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    return tuple(float(s) for s in scheduler.sigmas[:steps])


SHIFTED = flux_sigmas()  # 1, 0.9, 0.75, 0.5: most of the pass at high noise


def on_sigmas(text, sigmas=SHIFTED, **kw):
    return one_network(text, steps=len(sigmas), sigmas=sigmas, **kw)


def test_flow_sigmas_are_the_schedulers():
    from netweave.network.sigma import flow_sigmas
    assert np.allclose(SHIFTED, [1.0, 0.9, 0.75, 0.5])
    assert np.allclose(flow_sigmas(4, 3.0), SHIFTED)
    assert np.allclose(flow_sigmas(8, 1.0), flux_sigmas(8, 1.0))


def test_a_sigma_lands_on_its_step_and_between_steps_linearly():
    from netweave.network.sigma import sigma_index
    assert [sigma_index(s, SHIFTED) for s in SHIFTED] == [0, 1, 2, 3]
    assert sigma_index(0.8, SHIFTED) == pytest.approx(1 + 0.1 / 0.15)
    assert sigma_index(5.0, SHIFTED) == 0  # above the first sigma: the start
    assert sigma_index(0.25, SHIFTED) == pytest.approx(3.5)  # toward sigma 0, the pass's end
    assert sigma_index(0.0, SHIFTED) == 4
    # a sigma repeated: the first step at that level
    assert sigma_index(0.5, (1.0, 0.5, 0.5, 0.2)) == 1


def test_half_the_noise_is_not_half_the_steps_on_a_shifted_schedule():
    by_noise = on_sigmas("<lora:n:unet=0@0,1@s0.5>").base.strength["unet"]
    by_steps = on_sigmas("<lora:n:unet=0@0,1@50%>").base.strength["unet"]
    assert series(by_noise) == [0, 0, 0, 1]  # sigma 0.5 is the last of 4 steps
    assert series(by_steps) == [0, 0, 1, 1]


def test_linear_ramp_between_sigma_keyframes():
    v = on_sigmas("<loractl:n:1@s0.9,0@s0.5>").base.strength["unet"]
    assert series(v) == [1, 1, 0.5, 0]  # held before s0.9 (step 2), ramp to s0.5 (step 4)
    v = on_sigmas("<lora:n:0@s1,1@s0.8:interp=linear>").base.strength["unet"]
    assert series(v) == [0, 0.6, 1, 1]  # s0.8 lies 2/3 of the way from step 2 to step 3


def test_sigma_keyframes_mix_with_plain_ones_each_in_its_own_unit():
    # the plain positions still decide fraction or step among themselves
    assert series(on_sigmas("<lora:n:0@0,1@s0.75,0@1:interp=linear>").base.strength["unet"]) \
        == [0, 0.5, 1, 0]  # 0 and 1 fractions: steps 1 and 4; s0.75 step 3
    assert series(on_sigmas("<lora:n:0@2,1@s0.75>").base.strength["unet"]) == [0, 0, 1, 1]
    # 75 % of 4 steps is step index 2.25, s0.9 index 1
    assert series(on_sigmas("<lora:n:1@s0.9,0@75%>").base.strength["unet"]) == [1, 1, 1, 0]


def test_windows_by_noise_level():
    def window(text):
        return series(on_sigmas(f"<lora:n:1:{text}>").base.strength["unet"])
    assert window("start=s0.8") == [0, 0, 1, 1]  # on where sigma is at or below 0.8
    assert window("stop=s0.75") == [1, 1, 0, 0]  # off from the step at sigma 0.75
    assert window("step=s0.9-s0.75") == [0, 1, 1, 0]  # steps at sigma 0.9 through 0.75
    assert window("stop=s0.3") == [1, 1, 1, 1]  # no step reaches sigma 0.3
    assert window("start=s0.3") == [0, 0, 0, 0]
    assert window("start=s2:stop=0.9") == [1, 1, 1, 0]  # mixed with a fraction


def test_blend_by_noise_level():
    def blended(position):
        return on_sigmas(f"<lora:n:1:region=left:blend={position}>").base.blend
    assert blended("s0.7") == 3  # the steps at sigma 1, 0.9, 0.75 run blended
    assert blended("s0.9") == 1
    assert blended("s2") == 0  # above the first sigma: nothing before it
    assert blended("s0") == 4
