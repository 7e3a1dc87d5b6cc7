"""Wan 2.2 A14B on Forge Neo: the checkpoint is the high-noise expert, Neo's refiner the
low-noise one, switched inside the denoiser (tests/neo_host/modules/sd_samplers_common.py
apply_refiner: its state dict loaded into the same modules, or a new model loaded), the
original put back by the refiner script's postprocess (modules/processing_scripts/refiner.py).
NetWeave follows the switch with each expert's own plans (extension/webui/neo.py): the weights
at every step are the hand merge of that expert's pristine weights and its strengths, the
model's output is that merge's, and everything ends bit for bit as it was."""
import pytest
import torch
from safetensors.torch import save_file

import forge_family as ff
from test_neo import STEPS, clean, neo  # noqa: F401 (fixtures)

SWITCH_SIGMA = 4.0  # the stand-in sampler's sigmas are 8, 5.5, 3, 0.5: the refiner from step 2
SWITCH = 2
RANK, ALPHA = 2, 1.0
PREFIX = "model.diffusion_model."


def _write_lora(path, unet, seed):
    """A LoRA in ComfyUI's names on every linear layer of the Wan tree: {path: ΔW at 1}."""
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear):
            down = torch.randn(RANK, m.weight.shape[1], generator=g) * 0.2
            up = torch.randn(m.weight.shape[0], RANK, generator=g) * 0.2
            key = f"diffusion_model.{name}"
            sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                       f"{key}.alpha": torch.tensor(ALPHA)})
            deltas[name] = up @ down * (ALPHA / RANK)
    save_file(sd, str(path))
    return deltas


class Wan:
    """The high-noise expert loaded as Neo's checkpoint, the low-noise one a checkpoint file
    beside it (the same tree, other weights), and the networks."""

    def __init__(self, neo):
        import neo_model
        from modules import sd_models, shared
        from modules_forge import main_entry
        self.neo = neo
        folder = neo.root / "Stable-diffusion"
        self.model = neo_model.Wan()
        self.unet = self.model.forge_objects.unet.model.diffusion_model
        self.high = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        g = torch.Generator().manual_seed(21)
        self.low = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).contiguous()
                    for k, v in self.high.items()}
        self.info = {}
        for name, weights in (("wan_high", self.high), ("wan_low", self.low)):
            path = folder / f"{name}.safetensors"
            save_file({PREFIX + k: v for k, v in weights.items()}, str(path))
            self.info[name] = sd_models.CheckpointInfo(str(path))
            self.info[name].register()
        shared.opts.data["sd_model_checkpoint"] = "wan_high"
        main_entry.refresh_model_loading_parameters()
        self.model.sd_checkpoint_info = self.info["wan_high"]
        lora = neo.root / "Lora"
        self.deltas = {name: _write_lora(lora / f"{name}.safetensors", self.unet, seed)
                       for name, seed in (("x_high_noise", 11), ("x_low_noise", 12), ("y", 13),
                                          ("z_high_noise", 14))}

    def load(self):
        """The high-noise expert is Neo's loaded model (as after forge_model_reload)."""
        from modules import sd_models, shared
        shared.opts.data["sd_model_checkpoint"] = "wan_high"
        sd_models.model_data.forge_hash = str(sd_models.model_data.forge_loading_parameters)
        shared.sd_model = self.model

    def expected(self, pristine, strengths):
        """pristine + Σ strength·ΔW on every layer a network touches."""
        out = dict(pristine)
        for name, s in strengths.items():
            for path, dw in self.deltas[name].items():
                key = path + ".weight"
                out[key] = out[key] + s * dw
        return out


@pytest.fixture(scope="module")
def wan(neo):  # noqa: F811
    return Wan(neo)


@pytest.fixture
def refiner(clean, wan):  # noqa: F811
    """The Wan model loaded, Neo's refiner settings at their defaults; afterwards the SD1.5
    model again and every setting back."""
    from modules import sd_samplers_common, shared
    saved = dict(shared.opts.data)
    wan.load()
    yield wan
    clean.adapter.ADAPTER.off()
    shared.opts.data.clear()
    shared.opts.data.update(saved)
    sd_samplers_common.ORIGINAL_CHECKPOINT = None
    with torch.no_grad():
        wan.unet.load_state_dict(wan.high)
    shared.sd_model = clean.sd1


def run(prompt, refine=True, before=(), **kw):
    """One txt2img with Neo's refiner script after NetWeave's (the built-ins after the
    extensions' scripts), or in `before`; the diffusion model's weights and the model object
    noted at every denoiser call, after NetWeave's callback, and every UNet call's inputs
    and output."""
    import control
    from modules import script_callbacks, shared
    from modules.processing_scripts.refiner import ScriptRefiner

    from netweave.extension.webui import neo as adapter
    steps, calls = [], []

    def note(params):
        model = shared.sd_model
        unet = model.forge_objects.unet.model.diffusion_model
        steps.append((params.denoiser.step, model,
                      {k: v.detach().clone() for k, v in unet.state_dict().items()}))
        if unet not in hooks:
            hooks[unet] = unet.register_forward_hook(
                lambda m, args, kwargs, out: calls.append((m, args, kwargs, out.clone())),
                with_kwargs=True)

    hooks = {}
    script_callbacks.on_cfg_denoiser(note)
    if refine:
        kw.setdefault("refiner_checkpoint", "wan_low")
        kw.setdefault("refiner_switch_at", SWITCH_SIGMA)
    scripts = [ScriptRefiner()]
    try:
        kw.setdefault("cfg_scale", 1.0)
        out, _ = ff.generate(adapter, [control.LoRAControl(), *before], prompt,
                             scripts_after=() if before else scripts, steps=STEPS, **kw)
    finally:
        script_callbacks.callback_map["cfg_denoiser"].remove(note)
        for h in hooks.values():
            h.remove()
    assert len(out.images) == kw.get("n_iter", 1)
    return out, steps, calls


def assert_weights(got, want):
    assert got.keys() == want.keys()
    wrong = [k for k in want if not torch.allclose(got[k], want[k], atol=1e-6, rtol=0)]
    assert wrong == [], wrong


def settings(**opts):
    from modules import shared
    shared.opts.data.update(opts)


def outputs_match(calls, weights_at):
    """Each UNet call's output against a Wan tree of its own (its other parameters are every
    Wan's) holding the hand-merged weights of that call's step."""
    import neo_model
    ref = neo_model.NeoWan()
    for i, (_, args, kwargs, out) in enumerate(calls):
        with torch.no_grad():
            ref.load_state_dict(weights_at(i))
        with torch.inference_mode():
            torch.testing.assert_close(ref(*args, **kwargs), out, atol=1e-5, rtol=1e-5)


PROMPT = "a fox <lora:x_high_noise:0.8> <lora:y:0.5:high=1:low=0.25>"


@pytest.mark.parametrize("fast,by_steps", [(True, False), (False, True)],
                         ids=["state_dict", "new_model"])
def test_each_expert_gets_its_own_plans_through_the_switch(refiner, fast, by_steps):
    """Before the switch the high-noise expert with x_high_noise at 0.8 and y at 0.5·1; from
    it the low-noise one with x_low_noise (Neo's replacement) at 0.8 and y at 0.5·0.25, on
    the low-noise expert's pristine weights; the model's outputs are those merges'. Then:
    state dict path, after Neo's postprocess the modules hold the original checkpoint bit for
    bit; new model, the first model is put back bit for bit and NetWeave lets go of both."""
    from modules import shared
    wan = refiner
    settings(refiner_fast_sd=fast, refiner_use_steps=by_steps)
    switch = {"refiner_switch_at": SWITCH / STEPS} if by_steps else {}
    out, steps, calls = run(PROMPT, cfg_scale=7.0, **switch)  # uncond and cond rows
    info = out.infotexts[0]
    assert "NetWeave errors" not in info, info
    assert "Refiner: wan_low" in info and "x_low_noise" in info.split("Lora hashes")[1]
    high = wan.expected(wan.high, {"x_high_noise": 0.8, "y": 0.5})
    low = wan.expected(wan.low, {"x_low_noise": 0.8, "y": 0.125})
    assert [k for k, *_ in steps] == list(range(STEPS))
    for k, model, weights in steps:
        assert_weights(weights, high if k < SWITCH else low)
        assert (model is wan.model) == (fast or k < SWITCH)
    outputs_match(calls, lambda i: high if i < SWITCH else low)
    adapter = refiner.neo.adapter.ADAPTER
    if fast:
        assert same_weights(wan.unet, wan.high)
        assert adapter.engine.plan is None  # restored before Neo loaded the original back
    else:
        low_model = shared.sd_model
        assert low_model is not wan.model and same_weights(wan.unet, wan.high)
        assert same_weights(low_model.forge_objects.unet.model.diffusion_model, wan.low)
        assert adapter.engine is None  # nothing of either model held


def same_weights(unet, want):
    got = unet.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("fast", [True, False], ids=["state_dict", "new_model"])
def test_a_high_only_tag_leaves_the_low_noise_expert_pristine(refiner, fast):
    wan = refiner
    settings(refiner_fast_sd=fast)
    out, steps, _ = run("a fox <lora:y:0.7:high>")
    assert "NetWeave errors" not in out.infotexts[0], out.infotexts[0]
    for k, _, weights in steps:
        if k < SWITCH:
            assert_weights(weights, wan.expected(wan.high, {"y": 0.7}))
        else:
            assert all(torch.equal(weights[n], wan.low[n]) for n in wan.low)


@pytest.mark.parametrize("fast", [True, False], ids=["state_dict", "new_model"])
def test_a_missing_replacement_is_reported_and_the_generation_completes(refiner, fast):
    """z_high_noise has no z_low_noise: after the switch it is left out (the low-noise expert
    pristine there) and the infotext says so; x_high_noise goes on as x_low_noise."""
    wan = refiner
    settings(refiner_fast_sd=fast)
    out, steps, _ = run("a fox <lora:z_high_noise:1> <lora:x_high_noise:0.5>")
    info = out.infotexts[0]
    assert "lora:z_high_noise: the low-noise expert takes 'z_low_noise' in its place" in info
    for k, _, weights in steps:
        want = wan.expected(wan.high, {"z_high_noise": 1.0, "x_high_noise": 0.5}) \
            if k < SWITCH else wan.expected(wan.low, {"x_low_noise": 0.5})
        assert_weights(weights, want)
    assert same_weights(wan.unet, wan.high)


def test_neos_replacements_setting_renames_the_files(refiner):
    """Neo's "Lora Replacements", one `before=after` a line, each applied in turn: x_high_noise
    becomes x_low_noise, then y_noise, which is missing (reported, left out)."""
    wan = refiner
    settings(refiner_fast_sd=True, refiner_lora_replacement="high_noise=low_noise\nx_low=y")
    out, steps, _ = run("a fox <lora:x_high_noise:1>")
    assert "takes 'y_noise' in its place" in out.infotexts[0]
    assert_weights(steps[-1][2], wan.low)


def test_without_extra_networks_the_switch_is_still_followed(refiner):
    """Extra networks disabled: Neo activates none at the switch and deactivates none at the
    end, and its refiner script's postprocess runs before NetWeave's (NetWeave's tags are
    still read from the prompt): the switch is seen at the denoiser callback, and at the end
    the original checkpoint Neo loaded back is taken as pristine; bit for bit again."""
    from modules.processing_scripts.refiner import ScriptRefiner
    wan = refiner
    settings(refiner_fast_sd=True)
    out, steps, _ = run(PROMPT, before=[ScriptRefiner()], disable_extra_networks=True)
    low = wan.expected(wan.low, {"x_low_noise": 0.8, "y": 0.125})
    assert_weights(steps[-1][2], low)
    assert same_weights(wan.unet, wan.high)
    assert refiner.neo.adapter.ADAPTER.engine.plan is None


def test_after_neos_own_lora_on_the_state_dict_path_netweave_samples_pristine_experts(refiner):
    """Neo's "Reload state_dict only" leaves `current_lora_hash` at str([]) after the switch,
    the text of no networks, so the next load_networks([]) finds nothing to do and the
    patchers keep the refiner pass's LoRA patches (seen in the real Neo: every later image
    without a tag changed). NetWeave's generation after Neo's own <lora:x_high_noise:1>
    samples each expert's pristine weights, and they end bit for bit."""
    wan = refiner
    settings(refiner_fast_sd=True)
    _, steps, _ = run("a fox <lora:x_high_noise:1>", enabled=False)  # Neo's own LoRA
    assert not all(torch.equal(steps[-1][2][k], wan.low[k]) for k in wan.low)  # it patched
    out, steps, _ = run("a fox")
    assert "NetWeave errors" not in out.infotexts[0], out.infotexts[0]
    for k, _, weights in steps:
        assert_weights(weights, wan.high if k < SWITCH else wan.low)
    assert same_weights(wan.unet, wan.high)


def test_a_second_batch_samples_the_refiner_from_its_start(refiner):
    """Neo switches once per generation (ORIGINAL_CHECKPOINT stays set until its postprocess):
    the second batch runs on the low-noise expert throughout, with its plans."""
    wan = refiner
    settings(refiner_fast_sd=True)
    out, steps, _ = run("a fox <lora:x_high_noise:0.8>", n_iter=2)
    low = wan.expected(wan.low, {"x_low_noise": 0.8})
    assert [k for k, *_ in steps] == list(range(STEPS)) * 2
    for i, (k, _, weights) in enumerate(steps):
        first = i < STEPS and k < SWITCH
        assert_weights(weights, wan.expected(wan.high, {"x_high_noise": 0.8}) if first else low)
    assert same_weights(wan.unet, wan.high)


def test_switching_by_steps_tells_wan2gps_phases_where_each_expert_starts(refiner):
    """opts.refiner_use_steps: Neo switches at the first step k with k / steps ≥ 0.5, step 2,
    which the plans know before sampling, so Wan2GP's `1,0.5;0.25` puts 1 and 0.5 on the
    high-noise expert's two steps and 0.25 on the low-noise one's (no warning)."""
    wan = refiner
    settings(refiner_fast_sd=True, refiner_use_steps=True)
    out, steps, _ = run("a fox <lora:y:1,0.5;0.25>", refiner_switch_at=0.5)
    assert "NetWeave errors" not in out.infotexts[0], out.infotexts[0]
    want = [wan.expected(wan.high, {"y": 1.0}), wan.expected(wan.high, {"y": 0.5}),
            wan.expected(wan.low, {"y": 0.25}), wan.expected(wan.low, {"y": 0.25})]
    for k, _, weights in steps:
        assert_weights(weights, want[k])


def test_without_a_refiner_nothing_changes(refiner):
    """No refiner: one plan set, no expert (`high` warns as before), no switch."""
    wan = refiner
    out, steps, _ = run("a fox <lora:x_high_noise:0.8> <lora:y:0.5:high>", refine=False)
    assert "runs one denoiser here" in out.infotexts[0]
    for _, model, weights in steps:
        assert model is wan.model
        assert_weights(weights, wan.expected(wan.high, {"x_high_noise": 0.8, "y": 0.5}))
    assert refiner.neo.adapter.ADAPTER._turns is None
    refiner.neo.adapter.ADAPTER.off()
    assert same_weights(wan.unet, wan.high)


# ---- the engine's part: weights the host rewrote ---------------------------------------------
@pytest.mark.parametrize("pristine_on_cpu", [False, True])
def test_rewritten_takes_the_hosts_new_weights_as_pristine(neo, tmp_path,  # noqa: F811
                                                           pristine_on_cpu):
    """A scheduled LoRA (0.5, then 1 from step 2) merged at step 1; the host copies other
    weights into the same Parameters (torch's load_state_dict); `rewritten` merges the plan
    again on those at step 1, step 2 follows, and deactivate leaves the host's weights bit for
    bit. With `plans`, those take over at step 1 instead."""
    import neo_model
    from engine_helpers import make_engine, plan
    unet = neo_model.NeoWan()
    first = {k: v.clone() for k, v in unet.state_dict().items()}
    other = {k: v + 0.1 for k, v in first.items()}
    deltas = {name: _write_lora(tmp_path / f"{name}.safetensors", unet, seed)
              for name, seed in (("x", 5), ("w", 6))}

    def merged(strengths):
        out = dict(other)
        for name, s in strengths.items():
            for path, dw in deltas[name].items():
                out[path + ".weight"] = out[path + ".weight"] + s * dw
        return out
    for plans, want in ((None, {"x": 0.5}), ([plan("<lora:w:0.25>", "wan22", steps=4)],
                                             {"w": 0.25})):
        with torch.no_grad():
            unet.load_state_dict(first)
        engine = make_engine({"unet": unet}, "wan22", tmp_path, pristine_on_cpu=pristine_on_cpu)
        assert engine.activate(plan("<lora:x:0.5@0,1@0.5>", "wan22", steps=4)) == []
        engine.set_step(1)
        with torch.no_grad():
            unet.load_state_dict(other)
        assert engine.rewritten(("unet",), plans=plans) == []
        assert engine.position == ("base", 1)
        assert_weights(unet.state_dict(), merged(want))
        if plans is None:
            engine.set_step(2)
            assert_weights(unet.state_dict(), merged({"x": 1.0}))
        engine.deactivate()
        assert same_weights(unet, other)
