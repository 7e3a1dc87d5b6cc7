"""The Forge Neo adapter in stand-ins of Neo's host modules (tests/neo_host, after
Haoming02/sd-webui-forge-classic branch `neo`), driving real torch models in the module paths
Neo holds — the LDM UNet (SD1.5), Flux in BFL's layout, diffusers' Qwen-Image transformer —
with transformers' CLIP and T5 and, for Z-Image, Qwen-Image and Wan, text encoders in Neo's own
module trees (tests/neo_host/backend/nn), their layers Neo's layer classes, through Neo's
sampling path (patcher loads, cfg1 optimisation, cond_or_uncond chunks) under
torch.inference_mode()."""
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import forge_family as ff

HOST = os.path.join(os.path.dirname(__file__), "neo_host")
PATHS = [HOST, os.path.join(HOST, "sd_forge_lora"), os.path.join(HOST, "sd_forge_lora_schedule")]
SWAPPED = ("modules", "modules_forge", "backend", "networks", "extra_networks_lora", "control",
           "neo_model")
STEPS = 4


@pytest.fixture(scope="module")
def neo(tmp_path_factory):
    """Neo's `modules`, `backend`, `networks` and the built-in schedule's `control` in
    sys.modules for this file only (the A1111 and Forge stand-ins share those names)."""
    with ff.host_modules(PATHS, SWAPPED):
        try:
            yield _start(tmp_path_factory.mktemp("neo"))
        finally:
            from netweave.extension.webui import neo as adapter
            adapter.ADAPTER.off()


class Host:
    def __init__(self, adapter, builtin, schedule, sd1, root):
        self.adapter, self.builtin, self.schedule, self.sd1, self.root = \
            adapter, builtin, schedule, sd1, root
        self.models = {}

    def model(self, family):
        """The SD1.5, Flux or Qwen-Image model, made once, with its networks written."""
        import neo_model
        if family == "sd1":
            return self.sd1
        if family not in self.models:
            self.models[family] = getattr(neo_model, family)()
            trees = self.adapter.NeoAdapter.trees(self.models[family])
            _write(self.root, family, trees)
        return self.models[family]


def _write(root, family, trees):
    from netweave.devtools.synthetic import write_network
    if family == "QwenImage":  # its encoder's files: written by the tests that use them
        trees = {"unet": trees["unet"]}
    arch = {"Flux": "flux", "QwenImage": "qwenimage"}.get(family, "sd1")
    prefix = {"Flux": "flux_", "QwenImage": "qwen_"}.get(family, "")
    spatial = lambda t: "time_embedding" not in t.name  # noqa: E731
    for name, fmt, seed, comps in (("style", "lora", 1, ("unet", "te1")),
                                   ("texture", "loha", 2, ("unet", "te1")),
                                   ("words", "lora", 3, ("te1",))):
        if set(comps) & set(trees):
            write_network(root / "Lora" / f"{prefix}{name}.safetensors", trees, fmt, "kohya",
                          arch, seed=seed, scale=0.2, components=comps, select=spatial)


def _start(root):
    import control
    from extra_networks_lora import ExtraNetworkLora
    from modules import extra_networks, paths, script_callbacks, shared
    from neo_model import StableDiffusion

    shared.sd_model = StableDiffusion()
    shared.cmd_opts.lora_dir = str(root / "Lora")
    shared.cmd_opts.ckpt_dir = str(root / "Stable-diffusion")
    shared.cmd_opts.data_dir = str(root)
    paths.models_path = str(root)
    os.makedirs(shared.cmd_opts.lora_dir)
    os.makedirs(shared.cmd_opts.ckpt_dir)
    from netweave.extension.webui import neo as adapter
    _write(root, "StableDiffusion", adapter.NeoAdapter.trees(shared.sd_model))
    extra_networks.initialize()  # after scripts load; then the built-in registers "lora"
    builtin = ExtraNetworkLora()
    script_callbacks.on_before_ui(lambda: extra_networks.register_extra_network(builtin))
    script_callbacks.before_ui_callback()
    return Host(adapter, builtin, control.LoRAControl, shared.sd_model, root)


@pytest.fixture
def clean(neo):
    """No error reported by a script hook or a denoiser callback during the test (Neo reports
    them and samples on, so they would pass unseen)."""
    from modules import script_callbacks, scripts
    script_callbacks.errors.clear()
    scripts.reported.clear()
    yield neo
    assert script_callbacks.errors == [] and scripts.reported == [], \
        (script_callbacks.errors, scripts.reported)


@pytest.fixture
def online(neo):
    """Neo's on-the-fly LoRA: the setting on and the model stored in a low-bit dtype (Neo
    keeps fp32/fp16/bf16 models merged whatever the setting says)."""
    from backend.args import dynamic_args
    dynamic_args.online_lora = True
    models = [neo.sd1, *neo.models.values()]
    for m in models:
        m.forge_objects_original.unet.model.storage_dtype = torch.float8_e4m3fn
    try:
        yield neo
    finally:
        dynamic_args.online_lora = False
        for m in models:
            m.forge_objects_original.unet.model.storage_dtype = torch.float32


def generate(prompt, **kw):
    """With Neo's built-in schedule script before NetWeave's, as Neo orders built-ins."""
    import control

    from netweave.extension.webui import neo as adapter
    kw.setdefault("steps", STEPS)
    return ff.generate(adapter, [control.LoRAControl()], prompt, **kw)


def use(neo, family):
    """Make `family` the loaded model (Neo: shared.sd_model) for one test."""
    from modules import shared
    neo.adapter.ADAPTER.off()
    shared.sd_model = neo.model(family)
    return shared.sd_model


@pytest.fixture
def loaded(neo):
    yield
    from modules import shared
    neo.adapter.ADAPTER.off()
    shared.sd_model = neo.sd1


def target(neo, name):
    return ff.target(neo.adapter, name)


def snapshot(model):
    from netweave.extension.webui import neo as adapter
    return ff.snapshot(adapter, model)


same = ff.same


def errors_in(out, allowed=None):
    """Whether the infotext has a NetWeave problem other than warnings that say `allowed`."""
    info = out.infotexts[0]
    if allowed is not None:
        info = re.sub(r"warning: [^\"]*?" + re.escape(allowed) + r"[^\"]*", "", info)
    return "error: " in info or "warning: " in info


OUT03 = "output_blocks.3.1.transformer_blocks.0.attn1.to_v"
IN01 = "input_blocks.1.1.transformer_blocks.0.attn2.to_q"


# ---- SD1.5 -----------------------------------------------------------------------------------
def test_strengths_follow_the_steps_on_neo_layers(clean):
    from backend.operations import ForgeOperations
    neo = clean
    generate("warm up <lora:style:0.1>", steps=1)
    t = target(neo, OUT03)
    assert type(t.module) is ForgeOperations.Linear
    out, seen = generate("a fox <lora:style:0@0,1@0.5> <lora:texture:0.5:out=0.5>", record=t)
    assert len(out.images) == 1 and not errors_in(out)
    assert [step for step, *_ in seen] == [0, 1, 2, 3]
    for step, _, now in seen:
        assert now.get(0, 0.0) == (0.0 if step < 2 else 1.0)
        assert now[1] == pytest.approx(0.25)


def test_the_entry_script_picks_neo(neo, repo_root):
    import importlib.util

    from modules import scripts
    spec = importlib.util.spec_from_file_location(
        "netweave_entry_neo_test", os.path.join(repo_root, "scripts", "netweave_entry.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NetWeaveScript is neo.adapter.NetWeaveScript
    assert issubclass(module.NetWeaveScript, scripts.Script)


def test_weights_are_bit_identical_after_generation_and_after_an_exception(clean):
    neo = clean
    neo.adapter.ADAPTER.off()
    pristine = snapshot(neo.sd1)
    generate("a <lora:style:0@0,1@0.5> <lora:words:1> <lora:texture:1:region=left>", steps=2)
    neo.adapter.ADAPTER.off()
    assert same(snapshot(neo.sd1), pristine)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate("a <lora:style:1> <lora:texture:0.5>", steps=2, fail_at_step=1)
    neo.adapter.ADAPTER.off()
    assert same(snapshot(neo.sd1), pristine)


def test_a_bad_tag_never_stops_a_generation(clean, capsys):
    ff.bad_tag_run(generate, capsys, steps=1)


def _neo_lora_round_trip(neo):
    """NetWeave on, off (Neo's own LoRA merges or wraps its patch), on again: Neo's LoRA never
    sees NetWeave's tags, and what it did never becomes NetWeave's pristine weights."""
    import networks
    from modules import extra_networks
    neo.adapter.ADAPTER.off()
    pristine = snapshot(neo.sd1)
    neo.builtin.seen.clear()
    networks.calls.clear()
    out, _ = generate("a <lora:style:0.5> <lyco:texture:0.5>", steps=1)
    assert not errors_in(out)
    assert neo.builtin.seen == [] and all(names == [] for names in networks.calls)
    assert extra_networks.extra_network_registry["lora"] is neo.adapter.ADAPTER.names.ours["lora"]
    neo.adapter.ADAPTER.off()
    assert same(snapshot(neo.sd1), pristine)
    off, _ = generate("a <lora:style:0.5>", enabled=False, steps=1)
    assert extra_networks.extra_network_registry["lora"] is neo.builtin
    assert neo.builtin.seen[-1] == [["style", "0.5"]] and neo.adapter.ADAPTER.engine.plan is None
    return pristine, off


def test_neo_lora_merged_never_applies_our_tags_and_is_put_back(clean):
    import networks
    neo = clean
    pristine, _ = _neo_lora_round_trip(neo)
    key = "unet." + networks.PATCHED["unet"]["sd1"][len("diffusion_model."):]
    assert torch.allclose(snapshot(neo.sd1)[key], pristine[key] + 0.005)  # Neo merged it
    assert neo.sd1.forge_objects_original.unet.backup  # and keeps the Parameter it replaced
    generate("a <lora:style:0.5>", steps=1)  # NetWeave again: Neo's merge is put back first
    assert not neo.sd1.forge_objects_original.unet.backup
    neo.adapter.ADAPTER.off()
    assert same(snapshot(neo.sd1), pristine)


def test_neo_lora_online_never_applies_our_tags_and_leaves_no_wrapper(clean, online):
    import networks
    from backend.patcher.base import OnlineLoRAPatch
    neo = clean
    pristine, _ = _neo_lora_round_trip(neo)
    assert same(snapshot(neo.sd1), pristine)  # online: Neo never writes the weights
    layer = neo.sd1.forge_objects.unet.model.get_submodule(
        networks.PATCHED["unet"]["sd1"].rsplit(".", 1)[0])
    assert any(isinstance(f, OnlineLoRAPatch) for f in layer.weight_function)
    during = []
    hook = layer.register_forward_hook(lambda m, a, o: during.append(list(m.weight_function)))
    try:
        out, _ = generate("a <lora:style:0.5>", steps=1)
    finally:
        hook.remove()
    assert not errors_in(out) and during and all(fs == [] for fs in during)
    neo.adapter.ADAPTER.off()
    assert same(snapshot(neo.sd1), pristine)


@pytest.mark.parametrize("mode", ["merged", "online"])
def test_neos_schedule_never_acts_on_a_tag_netweave_applies(clean, request, mode):
    """`<lora:style:[0@0,1@1]>`: NetWeave's schedule (progress k/N, linear), and Neo's built-in
    schedule reads the tag, then does nothing: no strength set, no assertion raised."""
    neo = clean
    if mode == "online":
        request.getfixturevalue("online")
    import control
    control.log.clear()
    neo.schedule.applied.clear()
    generate("warm up <lora:style:0.1>", steps=1)
    t = target(neo, OUT03)
    out, seen = generate("a fox <lora:style:[0@0,1@1]>", record=t)
    assert not errors_in(out), out.infotexts[0]
    assert neo.schedule.applied == [] and neo.schedule.mapping == {}
    assert [now.get(0, 0.0) for _, _, now in seen] == pytest.approx([0, 0.25, 0.5, 0.75])
    assert control.log == ([] if mode == "online" else
                           ["LoRA Control requires on-the-fly Patching"])  # Neo's own check


def test_neos_schedule_acts_when_netweave_is_off(clean, online):
    """The baseline: NetWeave switched off, Neo's LoRA loads the file online and its schedule
    sets the patch's strength at every step (t = step / steps, linear)."""
    neo = clean
    neo.schedule.applied.clear()
    out, _ = generate("a fox <lora:style:[0@0,1@1]>", enabled=False)
    assert len(out.images) == 1
    steps = [s for s, _, _ in neo.schedule.applied]
    assert steps and [w for *_, w in neo.schedule.applied] == \
        pytest.approx([s / STEPS for s in steps])


@pytest.mark.parametrize("free_memory", [float("inf"), 1.5e6])
def test_rows_come_from_cond_or_uncond(clean, free_memory):
    ff.rows_run(generate, clean.adapter, free_memory)


def test_cfg_one_runs_no_negative_rows_and_neg_warns(clean):
    calls = []
    out, _ = generate("a <lora:style:1:neg=0>", cfg_scale=1.0, steps=2, unet_calls=calls)
    assert [marks for marks, _ in calls] == [[0], [0]]  # Neo's cfg1 optimisation
    assert "neg=" in out.infotexts[0] and len(out.images) == 1


def test_hires_pass_uses_its_own_steps_strengths_and_latent(clean):
    neo = clean
    generate("warm up <lora:style:0.1>", steps=1)
    t = target(neo, OUT03)
    out, seen = generate("a <lora:style:1:hr=0.25>", steps=3, enable_hr=True,
                         hr_second_pass_steps=2, record=t)
    assert [now for _, hr, now in seen if not hr] == [{0: 1.0}] * 3
    assert [now for _, hr, now in seen if hr] == [{0: 0.25}] * 2
    assert neo.adapter.ADAPTER.engine.latent == (16, 16)


def test_a_model_change_before_sampling_is_reported_not_sampled_with(clean):
    """Another script swaps the diffusion model in process_before_every_sampling's place (a
    refiner, an expert): NetWeave's weights are put back and the user is told."""
    import neo_model
    from modules import scripts
    neo = clean
    swapped = neo_model.StableDiffusion().forge_objects.unet  # another model's UNet

    class Swap(scripts.Script):
        def title(self):
            return "swap"

        def ui(self, is_img2img):
            return None

        def process_before_every_sampling(self, p, *args, **kwargs):
            p.sd_model.forge_objects.unet = swapped

    from modules import processing
    runner = scripts.ScriptRunner([Swap(), neo.adapter.NetWeaveScript()])
    neo.adapter.ADAPTER.off()
    pristine = snapshot(neo.sd1)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a <lora:style:1>", steps=2,
                                                    script_args=[True, ""], scripts=runner)
    out = processing.process_images(p)
    assert "the model changed before sampling" in out.infotexts[0]
    assert same(snapshot(neo.sd1), pristine)


def test_a_family_netweave_does_not_map_keeps_neos_lora(clean, capsys):
    """Neo's Lumina 2 (say): the tags stay Neo's; the console says why, once."""
    from modules import extra_networks, shared
    neo = clean

    class Lumina2(type(neo.sd1)):
        pass
    other = Lumina2.__new__(Lumina2)
    other.__dict__.update(neo.sd1.__dict__)
    shared.sd_model = other
    try:
        neo.builtin.seen.clear()
        out, _ = generate("a <lora:style:0.5>")
        generate("a <lora:style:0.5>")
    finally:
        shared.sd_model = neo.sd1
    assert extra_networks.extra_network_registry["lora"] is neo.builtin
    assert neo.builtin.seen == [[["style", "0.5"]]] * 2 and not errors_in(out)
    assert capsys.readouterr().err.count("Lumina2 model is not one NetWeave maps") == 1


LEFT_OUT = "which hold no image token of their own"  # a regional network's text layers


def test_a_refiner_switch_leaves_the_generation_to_neo(clean, capsys):
    """Neo swaps the weights for its refiner inside the denoiser: on any family but Wan (whose
    refiner is its second expert, tests/test_neo_refiner.py) NetWeave steps aside, the tags
    are Neo's LoRA's, nothing of NetWeave's is merged."""
    from modules import extra_networks, scripts
    neo = clean

    class Refiner(scripts.Script):  # what Neo's refiner script's setup and processing set
        def title(self):
            return "Refiner"

        def ui(self, is_img2img):
            return None

        def before_process(self, p, *args):
            p.refiner_checkpoint_info, p.refiner_switch_at = object(), 0.8

    import control
    neo.adapter.ADAPTER.off()
    pristine = snapshot(neo.sd1)
    neo.builtin.seen.clear()
    out, _ = ff.generate(neo.adapter, [control.LoRAControl(), Refiner()], "a <lora:style:0.5>",
                         steps=1)
    assert extra_networks.extra_network_registry["lora"] is neo.builtin
    engine = neo.adapter.ADAPTER.engine
    assert neo.builtin.seen == [[["style", "0.5"]]] and (engine is None or engine.plan is None)
    assert "switches to a refiner model" in capsys.readouterr().err
    neo.sd1.forge_objects_original.unet.unpatch_model()  # Neo's own merge, put back
    assert same(snapshot(neo.sd1), pristine)


# ---- Flux (BFL layout, Neo's nn/flux.py names) -------------------------------------------------
def test_flux_blocks_schedules_and_text_encoders(clean, loaded):
    neo = clean
    model = use(neo, "Flux")
    trees = neo.adapter.NeoAdapter.trees(model)
    assert set(trees) == {"unet", "te1", "te2"} and neo.adapter.NeoAdapter.arch(model) == "flux"
    pristine = snapshot(model)
    generate("warm up <lora:flux_style:0.1>", cfg_scale=1.0)
    engine = neo.adapter.ADAPTER.engine
    assert engine.arch == "flux"
    qkv = target(neo, "double_blocks.0.img_attn.qkv")
    single = target(neo, "single_blocks.1.linear1")
    assert {t.component for t in engine.keymap.targets} >= {"unet", "te1"}
    out, seen = generate("a fox <lora:flux_style:0@0,1@0.5:D00=0.5:single=0>", cfg_scale=1.0,
                         record=qkv)
    assert not errors_in(out), out.infotexts[0]
    assert [now.get(0, 0.0) for *_, now in seen] == [0.0, 0.0, 0.5, 0.5]
    assert engine.strengths(single).get(0, 0.0) == 0.0
    neo.adapter.ADAPTER.off()
    assert same(snapshot(model), pristine)


def test_flux_region_and_model_blend_merged_and_online(clean, loaded, online):
    """A regional network on Flux's image tokens and `<model:>` from an original single
    file, with Neo in online mode (its own LoRA would wrap weights; NetWeave still merges
    its static ones and runs the regional one beside): the image changes, the weights come
    back bit for bit."""
    neo = clean
    model = use(neo, "Flux")
    pristine = snapshot(model)
    other = {k: (v + 0.05 * torch.randn_like(v)).contiguous()
             for k, v in model.forge_objects.unet.model.diffusion_model.state_dict().items()}
    save_file({f"model.diffusion_model.{k}": v for k, v in other.items()},
              str(neo.root / "Stable-diffusion" / "fluxother.safetensors"))
    plain, _ = generate("a fox", cfg_scale=1.0)
    out, _ = generate("a fox <lora:flux_style:1:region=left> <model:fluxother:0.5>",
                      cfg_scale=1.0)
    assert not errors_in(out, LEFT_OUT), out.infotexts[0]
    left, right = (out.images[0] - plain.images[0]).abs().chunk(2, dim=-1)
    assert float(left.max()) > 0 and float(right.max()) > 0  # the model blend acts everywhere
    neo.adapter.ADAPTER.off()
    assert same(snapshot(model), pristine)


# ---- Qwen-Image (diffusers' names, as Neo's nn/qwen.py) ----------------------------------------
def test_qwen_image_region_acts_on_its_half_only(clean, loaded):
    neo = clean
    model = use(neo, "QwenImage")
    assert neo.adapter.NeoAdapter.arch(model) == "qwenimage"
    assert set(neo.adapter.NeoAdapter.trees(model)) == {"unet", "te1"}
    pristine = snapshot(model)
    plain, _ = generate("a fox", cfg_scale=1.0, steps=1)
    out, _ = generate("a fox <lora:qwen_style:2:region=left>", cfg_scale=1.0, steps=1)
    assert not errors_in(out, LEFT_OUT), out.infotexts[0]
    diff = (out.images[0] - plain.images[0]).abs()
    w = diff.shape[-1] // 2
    inside, outside = float(diff[..., :w].mean()), float(diff[..., w:].mean())
    assert inside > 100 * outside  # outside, only what joint attention carries over
    glob, _ = generate("a fox <lora:qwen_style:2>", cfg_scale=1.0, steps=1)
    assert float((glob.images[0] - plain.images[0]).abs()[..., w:].mean()) > 100 * outside
    neo.adapter.ADAPTER.off()
    assert same(snapshot(model), pristine)


# ---- every family's trees, at the module paths Neo's backend/nn holds --------------------------
NEO_PATHS = {  # layers of Neo's nn/lumina.py (NextDiT, Z-Image) and nn/wan.py (WanModel)
    "ZImage": ("layers.0.attention.qkv", "layers.0.attention.out", "layers.0.feed_forward.w1",
               "layers.0.feed_forward.w3", "layers.0.adaLN_modulation.0",
               "noise_refiner.0.attention.qkv", "context_refiner.0.feed_forward.w2",
               "x_embedder", "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2",
               "final_layer.linear", "final_layer.adaLN_modulation.1"),
    "Wan": ("blocks.0.self_attn.q", "blocks.0.self_attn.o", "blocks.0.cross_attn.k",
            "blocks.0.cross_attn.o", "blocks.0.ffn.0", "blocks.0.ffn.2", "text_embedding.0",
            "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
            "head.head")}


def _engine_named(name, unet, text):
    """An object shaped as Neo's diffusion engine of class `name` (what the adapter reads)."""
    from types import SimpleNamespace as NS

    from backend.patcher.clip import JointTextEncoder
    cls = type(name, (), {})
    model = cls()
    model.forge_objects = NS(unet=NS(model=NS(diffusion_model=unet)),
                             clip=NS(cond_stage_model=JointTextEncoder(text)))
    return model


@pytest.mark.parametrize("family", sorted(NEO_PATHS))
def test_neos_original_trees_map_at_neos_paths(neo, family):
    import tinydits

    from netweave.network.keymap import KeyMap
    native = {"ZImage": lambda: tinydits.zimage_native(tinydits.zimage_transformer()),
              "Wan": lambda: tinydits.wan_native(tinydits.wan_transformer())}[family]()
    model = _engine_named(family, native, {"clip_l": torch.nn.Linear(2, 2)})
    trees = neo.adapter.NeoAdapter.trees(model)
    assert trees == {"unet": native}  # no text encoder of theirs in this JointTextEncoder
    assert neo.adapter.NeoAdapter.arch(model) == {"ZImage": "zimage", "Wan": "wan22"}[family]
    mapped = {t.path for t in KeyMap(trees).targets}
    assert set(NEO_PATHS[family]) <= mapped, set(NEO_PATHS[family]) - mapped


def test_text_encoders_by_family(neo):
    """SDXL: clip_l and clip_g; Flux: clip_l and t5xxl; Chroma: t5xxl, NetWeave's te2 as on
    Flux; Z-Image: qwen3, Qwen-Image: qwen25_7b, Wan: umt5xxl, each te1; an unknown family: no
    architecture."""
    names = ("clip_l", "clip_g", "t5xxl", "qwen3", "qwen25_7b", "umt5xxl")
    text = {n: torch.nn.Linear(2, 2) for n in names}
    expected = {"StableDiffusionXL": {"te1": "clip_l", "te2": "clip_g"},
                "Flux": {"te1": "clip_l", "te2": "t5xxl"}, "Chroma": {"te2": "t5xxl"},
                "ZImage": {"te1": "qwen3"}, "QwenImage": {"te1": "qwen25_7b"},
                "Wan": {"te1": "umt5xxl"}}
    for name, components in expected.items():
        trees = neo.adapter.NeoAdapter.trees(_engine_named(name, "unet", text))
        assert trees == {"unet": "unet", **{c: text[n] for c, n in components.items()}}, name
    assert neo.adapter.NeoAdapter.arch(_engine_named("Lumina2", "unet", text)) is None


# ---- the text encoders of Z-Image, Qwen-Image and Wan 2.2 (Neo's own classes) ---------------
def neo_text_layers(te):
    """{a layer's name inside the decoder or the T5 (`layers.0.self_attn.q_proj`,
    `encoder.block.0.layer.0.SelfAttention.q`): its path in Neo's tree}, from Neo's classes by
    hand: Qwen3_4B's and Qwen25_7BVLI's language model under `model.` (not Qwen2.5-VL's vision
    tower, `visual.`), IntegratedT5's encoder under `transformer.`."""
    out = {}
    for path, m in te.named_modules():
        root = path.split(".", 1)[0]
        if isinstance(m, torch.nn.Linear) and root in ("model", "transformer"):
            out[path[len(root) + 1:]] = path
    return out


def neo_encode(te, ids=torch.tensor([[3, 7, 9, 11, 1], [5, 2, 8, 4, 1]])):
    """The encoder's last hidden state, called as Neo's text engines call it."""
    with torch.no_grad():
        return te.transformer(ids) if hasattr(te, "transformer") else te(ids)[0]


def _us(name):
    return name.replace(".", "_")


# family: (architecture, Neo's JointTextEncoder entry, the transformer in Neo's layout, the
# encoder (neo_model), its lbw block, {format: the key of a layer a file of it writes}).
# `neo` is Neo's own LoRA naming (`text_encoders.` + the layer's state-dict path in
# cond_stage_model: models_forge/packages/comfy/lora.py model_lora_keys_clip), the only one
# Neo's LoRA reads for these encoders.
NEO_TEXT = {
    "ZImage": ("zimage", "qwen3", lambda t: t.zimage_native(t.zimage_transformer()),
               "qwen3_text", "QWEN3", {
                   "neo": lambda n: f"text_encoders.qwen3.model.{n}",
                   "comfy": lambda n: f"text_encoders.qwen3_4b.transformer.model.{n}",
                   "kohya": lambda n: f"lora_te_model_{_us(n)}"}),
    "QwenImage": ("qwenimage", "qwen25_7b", lambda t: t.qwen_transformer(), "qwen25_text",
                  "QWENVL", {
                      "neo": lambda n: f"text_encoders.qwen25_7b.model.{n}",
                      "comfy": lambda n: f"text_encoders.qwen25_7b.transformer.model.{n}",
                      "kohya": lambda n: f"lora_te1_model_language_model_{_us(n)}"}),
    "Wan": ("wan22", "umt5xxl", lambda t: t.wan_native(t.wan_transformer()), "umt5_text", "UMT5", {
        "neo": lambda n: f"text_encoders.umt5xxl.transformer.{n}",  # ComfyUI's too
        "kohya": lambda n: f"lora_te1_{_us(n)}"}),
}


def _neo_text_trees(neo, family):
    import neo_model
    import tinydits
    arch, entry, unet, make, _, _ = NEO_TEXT[family]
    te = getattr(neo_model, make)()
    model = _engine_named(family, unet(tinydits), {entry: te})
    trees = neo.adapter.NeoAdapter.trees(model)
    assert trees["te1"] is te and neo.adapter.NeoAdapter.arch(model) == arch
    return arch, te, trees


def _apply_text(trees, arch, root, tag):
    from engine_helpers import make_engine, plan
    engine = make_engine(trees, arch, root)
    assert engine.activate(plan(tag, arch, steps=2)) == []
    engine.apply_te(engine.segment_at(0))
    return engine


@pytest.mark.parametrize("family,fmt", [(f, fmt) for f, spec in NEO_TEXT.items()
                                        for fmt in spec[5]])
def test_text_encoder_files_merge_the_hand_merged_delta_at_neos_paths(neo, family, fmt, tmp_path):
    """Every layer of the language model (the T5) in Neo's tree, named as each format names
    it, takes exactly the ΔW a hand merge adds; the vision tower is left alone; restore is
    bit-exact."""
    from engine_helpers import assert_pristine, snapshot as tree_snapshot
    from test_dit_text_encoders import hand_merged, write_lora
    arch, te, trees = _neo_text_trees(neo, family)
    layers = neo_text_layers(te)
    assert len(layers) == 14  # 2 layers × 7 projections (attention 4, MLP 3)
    deltas = write_lora(tmp_path / "words.safetensors", te, neo_text_layers,
                        NEO_TEXT[family][5][fmt])
    expected = hand_merged(te, deltas, 0.8)
    plain, before = neo_encode(te), tree_snapshot(trees)
    engine = _apply_text(trees, arch, tmp_path, "<lora:words:0.8>")
    assert {t.path for t in engine.keymap.targets if t.component == "te1"} == set(layers.values())
    now, want = dict(te.named_parameters()), dict(expected.named_parameters())
    wrong = [k for k in want if not torch.allclose(now[k], want[k], atol=1e-6)]
    assert wrong == []  # every parameter: the layers by their ΔW, the rest (visual) as it was
    out = neo_encode(te)
    torch.testing.assert_close(out, neo_encode(expected), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)
    engine.deactivate()
    assert_pristine(trees, before)
    torch.testing.assert_close(neo_encode(te), plain, atol=0, rtol=0)


@pytest.mark.parametrize("family", sorted(NEO_TEXT))
def test_te_and_lbw_set_the_strength_of_neos_text_encoders_and_te0_leaves_them(neo, family,
                                                                               tmp_path):
    from engine_helpers import assert_pristine, snapshot as tree_snapshot
    from test_dit_text_encoders import hand_merged, write_lora

    from netweave.network.blocks import BLOCKS
    arch, te, trees = _neo_text_trees(neo, family)
    block = NEO_TEXT[family][4]
    deltas = write_lora(tmp_path / "words.safetensors", te, neo_text_layers,
                        NEO_TEXT[family][5]["neo"])
    plain, before = neo_encode(te), tree_snapshot(trees)
    lbw = ",".join("0.25" if b == block else "1" for b in BLOCKS[arch])  # its block first
    for tag, strength in (("<lora:words:te=0.5:unet=1>", 0.5),
                          (f"<lora:words:1:lbw={lbw}>", 0.25)):
        expected = neo_encode(hand_merged(te, deltas, strength))
        engine = _apply_text(trees, arch, tmp_path, tag)
        torch.testing.assert_close(neo_encode(te), expected, atol=1e-5, rtol=1e-5)
        engine.deactivate()
    engine = _apply_text(trees, arch, tmp_path, "<lora:words:te=0:unet=1>")
    assert_pristine(trees, before)  # nothing merged
    torch.testing.assert_close(neo_encode(te), plain, atol=0, rtol=0)
    engine.deactivate()
    assert_pristine(trees, before)


def test_qwen_image_text_encoder_lora_in_a_neo_generation(clean, loaded):
    """Neo's Qwen-Image generating: a LoRA of `qwen25_7b` in Neo's own names changes every
    encoding Neo makes (prompt and negative) exactly as a hand merge and the image with it;
    `te=0` leaves every encoding bit for bit; a regional one conditions its half as the global
    one does and leaves the other half as without it; the weights come back bit for bit."""
    from test_dit_text_encoders import hand_merged, write_lora
    neo = clean
    model = use(neo, "QwenImage")
    te = model.forge_objects.clip.cond_stage_model.qwen25_7b
    deltas = write_lora(neo.root / "Lora" / "qwen_words.safetensors", te, neo_text_layers,
                        NEO_TEXT["QwenImage"][5]["neo"])
    merged = hand_merged(te, deltas, 0.8)
    pristine = snapshot(model)
    seen = []
    hook = te.register_forward_hook(lambda m, args, out: seen.append((args[0], out[0].clone())))
    try:
        def run(prompt):
            seen.clear()
            out, _ = generate(prompt, cfg_scale=1.0, steps=1)
            assert seen and not errors_in(out, LEFT_OUT), out.infotexts[0]
            return out.images[0], list(seen)
        plain, plain_seen = run("a fox")
        image, encoded = run("a fox <lora:qwen_words:0.8>")
        for ids, got in encoded:
            torch.testing.assert_close(got, neo_encode(merged, ids.clone()), atol=1e-5, rtol=1e-5)
            assert not torch.allclose(got, plain_seen[0][1], atol=1e-3)
        assert float((image - plain).abs().max()) > 1e-3
        neo.adapter.ADAPTER.off()
        assert same(snapshot(model), pristine)
        off, zero = run("a fox <lora:qwen_words:te=0:unet=1>")
        assert len(zero) == len(plain_seen)
        for (ids, got), (_, want) in zip(zero, plain_seen):
            assert torch.equal(got, want)
        torch.testing.assert_close(off, plain, atol=0, rtol=0)
        left, _ = run("a fox <lora:qwen_words:0.8:region=left>")
    finally:
        hook.remove()
    w = plain.shape[-1] // 2
    assert float((left - plain)[..., :w].abs().max()) > 1e-3
    torch.testing.assert_close(left[..., :w], image[..., :w], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(left[..., w:], plain[..., w:], atol=1e-4, rtol=1e-4)
    neo.adapter.ADAPTER.off()
    assert same(snapshot(model), pristine)
