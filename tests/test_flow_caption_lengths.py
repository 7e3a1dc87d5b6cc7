"""A regional text-encoder network on Z-Image and Qwen-Image when the captions of one
transformer call differ in length (issue 19): Z-Image takes a list of captions of each one's
own length, and runs its negative prompt in the same call as the prompt; Qwen-Image pads the
captions of one encode_prompt to the longest and runs the negative prompt in a call of its
own. Through the real pipelines' loops (FlowRun, extension/flow_run.py) and through the engine
alone (a batch of two prompts), every row's output must be, token by token, the pipeline's
transformer with the caption encoded by the hand-merged encoder inside the region and by the
plain encoder outside it (the negative prompt's rows: plain everywhere)."""
import contextlib

import pytest
import torch

from engine_helpers import assert_pristine, make_engine, plan, snapshot
from test_dit_text_encoders import CASES, hand_merged, lm_paths, write_lora
from tinypipes import qwen_pipeline, zimage_pipeline

from netweave.extension.flow_families import FAMILIES
from netweave.extension.flow_run import FlowRun

STEPS, SIZE, LATENT = 2, 64, (8, 8)  # 4×4 patches; region=left: the latent's columns 0–3
STRENGTH = 0.8
TAG = f"<lora:words:{STRENGTH}:unet=0:region=left>"
KEYS = {"zimage": CASES["zimage-qwen3model"][6]["diffusers"],
        "qwenimage": CASES["qwenimage"][6]["diffusers"]}
BUILD = {"zimage": zimage_pipeline, "qwenimage": qwen_pipeline}


@pytest.fixture(scope="module", params=["zimage", "qwenimage"])
def setup(request, tmp_path_factory):
    arch = request.param
    folder = tmp_path_factory.mktemp(arch)
    pipe = BUILD[arch]()
    deltas = write_lora(folder / "words.safetensors", pipe.text_encoder, lm_paths, KEYS[arch])
    return arch, pipe, hand_merged(pipe.text_encoder, deltas, STRENGTH), folder


@contextlib.contextmanager
def encoder(pipe, te):
    """The pipeline encoding with `te` (the hand-merged reference encoder)."""
    plain, pipe.text_encoder = pipe.text_encoder, te
    try:
        yield
    finally:
        pipe.text_encoder = plain


@contextlib.contextmanager
def transformer_calls(transformer):
    """Each call as the pipeline makes it (before every other pre-hook) and its output as the
    pipeline gets it (after every forward hook)."""
    seen = []

    def before(module, args, kwargs):
        seen.append({"args": args, "kwargs": kwargs})

    def after(module, args, kwargs, out):
        seen[-1]["out"] = out[0] if isinstance(out, tuple) else out.sample
    handles = [transformer.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
               transformer.register_forward_hook(after, with_kwargs=True)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def encode(pipe, arch, text, b):
    """The pipeline's own encode_prompt for `b` rows of `text`: (embeds, mask or None)."""
    with torch.no_grad():
        if arch == "zimage":
            return pipe.encode_prompt([text] * b, device="cpu", do_classifier_free_guidance=False,
                                      max_sequence_length=16)[0], None
        return pipe.encode_prompt(text, device="cpu", num_images_per_prompt=b)


def text_of(arch, call):
    return call["args"][2] if arch == "zimage" else call["kwargs"]["encoder_hidden_states"]


def with_text(arch, call, text):
    if arch == "zimage":
        a = call["args"]
        return a[:2] + (text,) + a[3:], call["kwargs"]
    return call["args"], dict(call["kwargs"], encoder_hidden_states=text)


def forward(pipe, arch, args, kwargs):
    with torch.no_grad():
        out = pipe.transformer(*args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out.sample
    return torch.stack(out) if isinstance(out, list) else out


def left(arch, out):
    """The output's part inside region=left: Z-Image's latents (…, h, w), Qwen-Image's packed
    4×4 patches row by row."""
    if arch == "zimage":
        m = torch.zeros(LATENT, dtype=torch.bool)
        m[:, :LATENT[1] // 2] = True
        return m.view(1, 1, 1, *LATENT).expand(out.shape)
    m = torch.zeros(LATENT[0] // 2, LATENT[1] // 2, dtype=torch.bool)
    m[:, :LATENT[1] // 4] = True
    return m.reshape(1, -1, 1).expand(out.shape)


def generate(arch, pipe, folder, prompt, negative, b):
    """The pipeline's own loop through FlowRun (as the standalone host and SD.Next run it):
    (each transformer call, the engine's warnings)."""
    trees = FAMILIES[arch].trees(pipe)
    engine = make_engine(trees, arch, folder, latent=LATENT)
    before = snapshot(trees)
    p = plan(f"{prompt} {TAG}", arch, steps=STEPS)
    assert engine.activate(p) == []
    run = FlowRun(engine, pipe, arch, "cpu", p.prompt, negative, b, True, STEPS)
    guidance = {"guidance_scale": 3.0} if arch == "zimage" else {"true_cfg_scale": 3.0}
    try:
        with transformer_calls(pipe.transformer) as seen, torch.no_grad():
            pipe(**run.first_args(), **guidance, num_inference_steps=STEPS, height=SIZE,
                 width=SIZE, max_sequence_length=run.length, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(5),
                 callback_on_step_end=lambda pipe_, i, t, kw: run.step_end(i))
    finally:
        run.close()
        errors = list(engine.errors)
        engine.deactivate()
    assert_pristine(trees, before)
    return seen, errors


@pytest.mark.parametrize("prompt,negative,b", [
    ("a red square", "blue", 1),  # the negative prompt shorter
    ("a red square", "a blue circle on white background", 2),  # longer; two rows each
    ("red", "blue", 1),  # one length (as before)
])
def test_each_row_is_conditioned_by_its_own_captions_encoding_inside_the_region(
        setup, prompt, negative, b):
    arch, pipe, merged, folder = setup
    pos, _ = encode(pipe, arch, prompt, b)
    neg, _ = encode(pipe, arch, negative, b)
    with encoder(pipe, merged):
        net, _ = encode(pipe, arch, prompt, b)
    lengths = {tuple(t.shape) for t in (list(pos) + list(neg))}
    assert (len(lengths) == 1) == (prompt == "red")  # the cases are what they claim
    seen, errors = generate(arch, pipe, folder, prompt, negative, b)
    assert not errors, errors
    per_step = 1 if arch == "zimage" else 2  # Z-Image: one call of [prompt; negative]
    assert len(seen) == STEPS * per_step
    acted = 0.0
    for call in seen:
        text = text_of(arch, call)
        if arch == "zimage":  # [the prompt's b captions; the negative prompt's b]
            assert all(torch.equal(t, u) for t, u in zip(text, list(pos) + list(neg)))
            variant = list(net) + list(text[b:])
            negative_rows = torch.arange(2 * b) >= b
        else:  # a call per prompt, each padded on its own
            is_neg = text.shape == neg.shape and torch.equal(text, neg)
            assert is_neg or torch.equal(text, pos)
            variant = text if is_neg else net
            negative_rows = torch.full((b,), is_neg)
        plain = forward(pipe, arch, call["args"], call["kwargs"])
        with_net = forward(pipe, arch, *with_text(arch, call, variant))
        inside = left(arch, plain) & ~negative_rows.view(-1, *[1] * (plain.dim() - 1))
        expected = torch.where(inside, with_net, plain)
        got = torch.stack(call["out"]) if isinstance(call["out"], list) else call["out"]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        if bool(inside.any()):
            acted = max(acted, float((with_net - plain)[inside].abs().max()))
    assert acted > 1e-2  # the network's text changes the prediction inside the region


TEXTS = ["a red square on white background", "blue"]


def encode_batch(pipe, arch):
    """The two prompts of TEXTS in one encode_prompt: Z-Image's list, or Qwen-Image's
    padded tensor (and its mask)."""
    with torch.no_grad():
        if arch == "zimage":
            return pipe.encode_prompt(TEXTS, device="cpu", do_classifier_free_guidance=False,
                                      max_sequence_length=16)[0], None
        return pipe.encode_prompt(TEXTS, device="cpu")


def batch_call(arch, text, mask):
    torch.manual_seed(2)
    if arch == "zimage":
        return {"args": ([torch.randn(4, 1, *LATENT) for _ in TEXTS], torch.full((2,), 0.4),
                         text), "kwargs": {}}
    h, w = LATENT[0] // 2, LATENT[1] // 2
    return {"args": (), "kwargs": dict(
        hidden_states=torch.randn(2, h * w, 16), encoder_hidden_states=text,
        encoder_hidden_states_mask=mask, timestep=torch.full((2,), 0.4),
        img_shapes=[[(1, h, w)]] * 2, return_dict=False)}


def engine_call(arch, pipe, folder, call, variant):
    """The call through the engine with the regional network and the host's encodings
    (`variant`: a function of the engine's own encoding with the network): (output, warnings)."""
    trees = FAMILIES[arch].trees(pipe)
    before = snapshot(trees)
    engine = make_engine(trees, arch, folder, latent=LATENT)
    assert engine.activate(plan(f"x {TAG}", arch, steps=STEPS)) == []
    try:
        seg = engine.segment_at(0)
        engine.apply_te(seg, variant=0)  # the engine's own merge of the network
        net, _ = encode_batch(pipe, arch)
        engine.apply_te(seg)
        engine.set_text_variants(text_of(arch, call), {0: variant(net)})
        engine.set_step(0)
        got = forward(pipe, arch, call["args"], call["kwargs"])
        errors = list(engine.errors)
    finally:
        engine.deactivate()
    assert_pristine(trees, before)
    return got, errors


def test_a_batch_of_captions_of_different_lengths_on_the_engine(setup):
    """A host with two prompts in one batch gives the engine their encodings as the model
    takes them: Z-Image a list of two lengths, Qwen-Image padded to the longer with a mask.
    Row by row, inside the region the network's encoding of that row's own caption."""
    arch, pipe, merged, folder = setup
    plain, mask = encode_batch(pipe, arch)
    with encoder(pipe, merged):
        net, net_mask = encode_batch(pipe, arch)
    if arch == "zimage":
        assert plain[0].shape != plain[1].shape
    else:
        assert torch.equal(mask, net_mask) and not bool(mask.all())  # padded: a mask
    call = batch_call(arch, plain, mask)
    reference = forward(pipe, arch, call["args"], call["kwargs"])
    with_net = forward(pipe, arch, *with_text(arch, call, net))
    got, errors = engine_call(arch, pipe, folder, call, lambda v: v)
    assert not errors, errors
    inside = left(arch, reference)
    torch.testing.assert_close(got, torch.where(inside, with_net, reference), atol=1e-5, rtol=1e-5)
    for r in range(2):  # the network acts on each row's own caption
        assert float((with_net - reference)[r][inside[r]].abs().max()) > 1e-3


def test_an_encoding_of_other_lengths_than_the_prompts_is_a_warning_not_a_silent_no_op(setup):
    """A host whose encoding with the network has other lengths than the prompt's (which the
    pipelines never make: the network changes no token) cannot be matched row by row: the
    network's text part is left out, and the engine says so naming both shapes."""
    arch, pipe, _, folder = setup
    plain, mask = encode_batch(pipe, arch)
    call = batch_call(arch, plain, mask)
    reference = forward(pipe, arch, call["args"], call["kwargs"])
    short = (lambda v: [v[0], v[1][:-1]]) if arch == "zimage" else (lambda v: v[:, :-1])
    got, errors = engine_call(arch, pipe, folder, call, short)
    shapes = "7×24, 1×24" if arch == "zimage" else f"{plain.shape[1] - 1}×24"
    assert len(errors) == 1 and "lora:words: regional on the text encoders" in errors[0] \
        and f"2 rows of {shapes} are not the prompt's 2" in errors[0], errors
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)  # the plain text's
