"""Positions by noise level in the plan: what a host without sigmas gets (a warning at the
item, the item left out), the hires pass's own sigmas, neg= on a model without negative rows,
and explain showing the sigmas and where each position landed."""
import json

import numpy as np
import pytest

from helpers import series
from netweave.extension.session import compile_context
from netweave.extension.settings import Settings
from netweave.network.explain import SIGMA_ROW, TICK, explain_table, heatmap
from netweave.network.plan import CompileContext, compile_prompt
from netweave.network.sigma import flow_sigmas, pass_sigmas

SHIFTED = flow_sigmas(4, 3.0)  # 1, 0.9, 0.75, 0.5


def compile(prompt, **kw):
    kw.setdefault("steps", 4)
    return compile_prompt(prompt, CompileContext(**kw))


def test_without_sigmas_each_sigma_item_warns_at_its_column_and_is_left_out():
    prompt = "a cat <lora:n:0.5:unet=0@0,1@s0.5:start=s0.8:stop=0.9>"
    plan = compile(prompt)
    (unet, start) = plan.errors
    assert (unet.severity, start.severity) == ("warning", "warning")
    assert unet.column == prompt.index("unet=") + 1 and start.column == prompt.index("start=") + 1
    assert "unet=" in unet.message and "s0.5" in unet.message and "no sigmas" in unet.message
    assert unet.message.endswith("it is ignored")
    assert unet.snippet.splitlines()[1] == " " * prompt[prompt.index("<"):].index("unet=") + "^"
    n, = plan.networks
    # unet= left out: it follows te (0.5); start= left out; stop=0.9, a fraction, still counts
    assert series(n.base.strength["unet"]) == [0.5, 0.5, 0.5, 0]
    assert n.base.landed == ()


def test_a_step_range_with_a_sigma_is_one_item():
    plan = compile("<lora:n:1:step=s0.9-3>")
    err, = plan.errors
    assert "step=" in err.message and err.column == len("<lora:n:1:") + 1
    assert series(plan.networks[0].base.strength["unet"]) == [1, 1, 1, 1]  # no window at all
    on = compile("<lora:n:1:step=s0.9-3>", sigmas=SHIFTED)
    assert on.errors == () and series(on.networks[0].base.strength["unet"]) == [0, 1, 1, 0]


def test_strict_tags_skip_a_tag_whose_sigmas_are_missing():
    plan = compile("<lora:n:blend=s0.5:region=left>", strict=True)
    err, = plan.errors
    assert err.severity == "error" and plan.networks == ()
    assert "strict tags" in err.message and "ignored" not in err.message


def test_the_hires_pass_uses_its_own_sigmas_or_warns_for_that_pass():
    prompt = "<lora:n:1@s1,0@s0.75>"
    both = compile(prompt, hires_steps=3, sigmas=SHIFTED, hires_sigmas=flow_sigmas(3, 3.0))
    n, = both.networks
    assert both.errors == ()
    assert series(n.base.strength["unet"]) == [1, 1, 0, 0]
    assert series(n.hires.strength["unet"]) == [1, 1, 0]  # 1, 0.857, 0.6: 0.75 before step 3
    base_only = compile(prompt, hires_steps=3, sigmas=SHIFTED)
    err, = base_only.errors
    assert err.message.startswith("in the hires pass, te=") and err.severity == "warning"
    n, = base_only.networks
    assert series(n.base.strength["unet"]) == [1, 1, 0, 0]
    assert series(n.hires.strength["unet"]) == [1, 1, 1]  # left out of the hires pass only


def test_hires_keys_need_only_the_hires_sigmas():
    plan = compile("<lora:n:1:hr=0@0,1@s0.7>", hires_steps=3, hires_sigmas=flow_sigmas(3, 3.0))
    assert plan.errors == ()
    assert series(plan.networks[0].hires.strength["unet"]) == [0, 0, 1]
    plan = compile("<lora:n:1:hr=0@0,1@s0.7>", hires_steps=3, sigmas=SHIFTED)
    assert len(plan.errors) == 1 and "hr=" in plan.errors[0].message


def test_neg_on_a_model_without_negative_rows_warns_and_counts_as_one():
    prompt = "<lora:n:1:neg=0.3>"
    plan = compile(prompt, arch="flux", negative_rows=False)
    err, = plan.errors
    assert err.severity == "warning" and err.column == prompt.index("neg=") + 1
    assert err.message == ("Flux has no negative prompt rows (guidance-distilled); neg= is "
                           "ignored")
    assert plan.networks[0].neg == 1.0
    assert compile(prompt, arch="flux").networks[0].neg == 0.3  # a model with negative rows
    assert compile("<lora:n:1>", arch="flux", negative_rows=False).errors == ()


@pytest.mark.parametrize("sigmas,words", [
    ((1.0, 0.5), "2 values for 4 steps"),
    ((1.0, 0.5, 0.7, 0.1), "never rise"),
    ((1.0, 0.5, float("nan"), 0.1), "finite"),
    ((1.0, 0.5, 0.2, -0.1), "≥ 0"),
])
def test_a_context_refuses_sigmas_that_are_not_a_pass(sigmas, words):
    with pytest.raises(ValueError, match=words):
        CompileContext(steps=4, sigmas=sigmas)
    assert pass_sigmas(sigmas, 4) is None
    # a host's sigmas that cannot be a pass count as none: the tags warn, nothing fails
    ctx = compile_context("sd1", Settings(), 4, sigmas=sigmas)
    assert ctx.sigmas is None


def test_a_context_keeps_sigmas_as_a_tuple_of_floats():
    ctx = CompileContext(steps=4, sigmas=np.array(SHIFTED, dtype=np.float32))
    assert isinstance(ctx.sigmas, tuple) and all(type(s) is float for s in ctx.sigmas)
    with pytest.raises(ValueError, match="no hires pass"):
        CompileContext(steps=4, hires_sigmas=SHIFTED)


def test_explain_shows_the_sigmas_and_where_each_position_landed():
    plan = compile("a <lora:n:unet=1@s1,0@s0.5:start=s0.8:interp=linear>", arch="flux",
                   sigmas=SHIFTED)
    text = explain_table(plan)
    assert "sigma per step  1: 1  2: 0.9  3: 0.75  4: 0.5" in text
    assert "by noise level: unet=s1 at step 1  unet=s0.5 at step 4  start=s0.8 at step 2.67" \
        in text
    assert "IN  " in text and "1–2: 0  3–4: 0.333→0" in text  # the Flux family's rows
    out = json.loads(json.dumps(plan.to_dict()))
    assert out["sigmas"] == list(SHIFTED) and out["hires_sigmas"] is None
    n = out["networks"][0]
    assert n["strength"]["unet"] == pytest.approx([0, 0, 1 / 3, 0])
    assert [p["item"] for p in n["sigma_positions"]] == ["unet=", "unet=", "start="]
    assert [p["sigma"] for p in n["sigma_positions"]] == [1, 0.5, 0.8]
    assert n["sigma_positions"][2]["step"] == pytest.approx(1 + 1 + 0.1 / 0.15)
    assert "sigma per step" not in explain_table(compile("<lora:n:1>"))


def test_the_heatmap_has_a_sigma_row_and_ticks_where_positions_landed():
    plan = compile("<lora:n:1@s1,0@s0.5:interp=linear>", sigmas=SHIFTED)
    texts = []
    img = np.asarray(heatmap(plan, texts))
    said = [t for _, t in texts]
    assert SIGMA_ROW in said and "steps 1-4, sigma 1 to 0.5" in said
    assert (img == np.array(TICK, dtype=np.uint8)).all(axis=-1).sum() > 10
    texts = []
    plain = np.asarray(heatmap(compile("<lora:n:1@0,0@1>"), texts))
    assert SIGMA_ROW not in [t for _, t in texts]
    assert (plain == np.array(TICK, dtype=np.uint8)).all(axis=-1).sum() == 0
