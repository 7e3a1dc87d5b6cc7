"""The Forge adapter in stand-ins of Forge 2's host modules (tests/forge_host, after Forge HEAD
dfdcbab), driving the real LDM UNet (`stable-diffusion-sdkit`) and a transformers CLIP whose
layers are Forge's layer classes, through real sampling steps under torch.inference_mode()."""
import os

import numpy as np
import pytest
import torch

import forge_family as ff

HOST = os.path.join(os.path.dirname(__file__), "forge_host")
PATHS = [HOST, os.path.join(HOST, "sd_forge_lora")]  # Forge puts extension folders on sys.path
SWAPPED = ("modules", "backend", "networks", "extra_networks_lora", "forge_model")


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    """Forge's `modules`, `backend` and `networks` in sys.modules for this file only (the A1111
    and Neo stand-ins share those names)."""
    with ff.host_modules(PATHS, SWAPPED):
        try:
            yield _start(tmp_path_factory.mktemp("forge"))
        finally:
            from netweave.extension.webui import forge as adapter
            adapter.ADAPTER.off()


@pytest.fixture(autouse=True)
def clean(request, forge):
    """No error reported by a denoiser callback during a test (Forge reports them and samples
    on, so they would pass unseen); tests that raise on purpose are marked `raises`."""
    from modules import script_callbacks
    script_callbacks.errors.clear()
    yield
    if "raises" not in request.keywords:
        assert script_callbacks.errors == [], script_callbacks.errors


def _start(root):
    from extra_networks_lora import ExtraNetworkLora
    from forge_model import StableDiffusion
    from modules import extra_networks, paths, script_callbacks, shared

    from netweave.devtools.synthetic import write_network
    shared.sd_model = StableDiffusion()
    shared.cmd_opts.lora_dir = str(root / "Lora")
    shared.cmd_opts.data_dir = str(root)
    paths.models_path = str(root)
    os.makedirs(shared.cmd_opts.lora_dir)
    from netweave.extension.webui import forge as adapter
    trees = adapter.ForgeAdapter.trees(shared.sd_model)
    spatial = lambda t: "time_embedding" not in t.name  # noqa: E731
    for name, fmt, seed, comps in (("style", "lora", 1, ("unet", "te1")),
                                   ("texture", "loha", 2, ("unet", "te1")),
                                   ("words", "lora", 3, ("te1",))):
        write_network(root / "Lora" / f"{name}.safetensors", trees, fmt, "kohya", "sd1",
                      seed=seed, scale=0.2, components=comps, select=spatial)
    extra_networks.initialize()  # after scripts load; then the built-in registers "lora"
    builtin = ExtraNetworkLora()
    script_callbacks.on_before_ui(lambda: extra_networks.register_extra_network(builtin))
    script_callbacks.before_ui_callback()
    return adapter, builtin, shared.sd_model


def generate(prompt, **kw):
    from netweave.extension.webui import forge as adapter
    return ff.generate(adapter, [], prompt, **kw)


def target(adapter, name):
    return ff.target(adapter, name)


def snapshot(model):
    from netweave.extension.webui import forge as adapter
    return ff.snapshot(adapter, model)


same = ff.same


TO_Q = "input_blocks.1.1.transformer_blocks.0.attn2.to_q"  # a Forge Linear, IN01


def test_strengths_follow_the_steps_on_forge_layers(forge):
    adapter, _, model = forge
    generate("warm up <lora:style:0.1>")
    t = target(adapter, "output_blocks.3.1.transformer_blocks.0.attn1.to_v")  # OUT03
    out, seen = generate("a fox <lora:style:0@0,1@0.5> <lora:texture:0.5:out=0.5>", steps=4,
                         record=t)
    assert len(out.images) == 1 and "NetWeave errors" not in out.infotexts[0]
    assert [step for step, *_ in seen] == [0, 1, 2, 3]
    for step, _, now in seen:
        assert now.get(0, 0.0) == (0.0 if step < 2 else 1.0)
        assert now[1] == pytest.approx(0.25)


def test_a_plain_module_linear_is_patched_in_place(forge):
    from backend.operations import ForgeOperations
    adapter, _, model = forge
    layer = model.forge_objects.unet.model.diffusion_model.get_submodule(TO_Q)
    assert type(layer) is ForgeOperations.Linear and not isinstance(layer, torch.nn.Linear)
    adapter.ADAPTER.off()  # weights stay merged between generations
    pristine = layer.weight.detach().clone()
    during = []
    hook = layer.register_forward_hook(lambda m, a, o: during.append(m.weight.detach().clone()))
    try:
        generate("a <lora:style:1>", steps=2)
    finally:
        hook.remove()
    assert target(adapter, TO_Q).module is layer
    assert during and not torch.equal(during[0], pristine)  # Forge's forward read the merge
    adapter.ADAPTER.off()
    assert torch.equal(layer.weight.detach(), pristine)


def test_forge_lora_never_applies_our_tags_and_gets_them_back_when_disabled(forge):
    import networks
    from modules import extra_networks
    adapter, builtin, model = forge
    adapter.ADAPTER.off()
    pristine = snapshot(model)
    loader = model.forge_objects.unet.lora_loader
    builtin.seen.clear()
    networks.calls.clear()
    generate("a <lora:style:0.5> <lyco:texture:0.5>")
    assert builtin.seen == [] and all(names == [] for names in networks.calls)
    assert extra_networks.extra_network_registry["lora"] is adapter.ADAPTER.names.ours["lora"]
    assert model.forge_objects.unet.lora_patches == {} and loader.backup == {}
    adapter.ADAPTER.off()
    assert same(snapshot(model), pristine)
    generate("a <lora:style:0.5>", enabled=False)  # Forge's own LoRA: it merges its patch
    assert extra_networks.extra_network_registry["lora"] is builtin
    assert builtin.seen[-1] == [["style", "0.5"]] and adapter.ADAPTER.engine.plan is None
    key = "unet." + networks.PATCHED["unet"][len("diffusion_model."):]
    merged = snapshot(model)
    assert torch.allclose(merged[key], pristine[key] + 0.005)
    generate("a <lora:style:0.5>")  # NetWeave again: Forge's merge is put back first
    adapter.ADAPTER.off()
    assert same(snapshot(model), pristine)  # nothing of Forge's LoRA was taken as pristine


@pytest.mark.parametrize("free_memory", [float("inf"), 1.5e6])
def test_rows_come_from_cond_or_uncond(forge, free_memory):
    _rows_run(forge, free_memory)


def _rows_run(forge, free_memory):
    return ff.rows_run(generate, forge[0], free_memory)


def test_split_and_whole_batches_give_the_same_images(forge):
    whole = _rows_run(forge, float("inf"))
    split = _rows_run(forge, 1.5e6)
    for a, b in zip(whole.images, split.images):
        assert torch.allclose(a, b, atol=1e-4)
    plain, _ = generate(["a <lora:style:1>", "b <lora:texture:1>"], batch_size=2, steps=2)
    assert not torch.allclose(whole.images[0], plain.images[0], atol=1e-4)  # neg=0 acted
    assert torch.allclose(whole.images[1], plain.images[1], atol=1e-4)  # on its prompt only


def test_a_bad_tag_never_stops_a_generation(forge, capsys):
    ff.bad_tag_run(generate, capsys)


def test_lora_hashes_are_forges_own(forge):
    """Forge's hashes.py hashes the whole file where A1111 hashes the tensor data (the real
    Forge wrote ea2b6f8b7154 for the file A1111 hashed as 2dd6a9065710): `Lora hashes` says
    what Forge's own Lora would."""
    import hashlib

    from modules import shared
    out, _ = generate("a fox <lora:style:0.5>")
    path = os.path.join(shared.cmd_opts.lora_dir, "style.safetensors")
    whole = hashlib.sha256(open(path, "rb").read()).hexdigest()[:12]
    assert f'Lora hashes: "style: {whole}"' in out.infotexts[0], out.infotexts[0]


def test_hires_pass_uses_its_own_steps_strengths_and_latent(forge):
    adapter = forge[0]
    generate("warm up <lora:style:0.1>")
    t = target(adapter, "output_blocks.3.1.transformer_blocks.0.attn1.to_v")
    out, seen = generate("a <lora:style:1:hr=0.25>", steps=3, enable_hr=True,
                         hr_second_pass_steps=2, record=t)
    base = [now for _, hr, now in seen if not hr]
    hires = [now for _, hr, now in seen if hr]
    assert base == [{0: 1.0}] * 3 and hires == [{0: 0.25}] * 2
    assert adapter.ADAPTER.engine.latent == (16, 16)  # the upscaled latent
    out, _ = generate("a <lora:style:1:region=left>", steps=2, enable_hr=True,
                      hr_second_pass_steps=2)
    assert "NetWeave errors" not in out.infotexts[0]


def test_weights_are_bit_identical_after_generation_and_after_an_exception(forge):
    adapter, _, model = forge
    adapter.ADAPTER.off()
    pristine = snapshot(model)
    generate("a <lora:style:0@0,1@0.5> <lora:words:1> <lora:texture:1:region=left>", steps=3)
    adapter.ADAPTER.off()
    assert same(snapshot(model), pristine)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate("a <lora:style:1> <lora:texture:0.5>", steps=3, fail_at_step=1)
    adapter.ADAPTER.off()
    assert same(snapshot(model), pristine)


def test_inference_tensors_are_merged_and_restored(forge):
    adapter, _, model = forge
    adapter.ADAPTER.off()
    layer = model.forge_objects.unet.model.diffusion_model.get_submodule(TO_Q)
    with torch.inference_mode():  # as Forge's LoRA loader creates parameters
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    assert layer.weight.is_inference()
    pristine = layer.weight.detach().clone()
    out, _ = generate("a <lora:style:0@0,1@0.5>", steps=2)
    assert "NetWeave errors" not in out.infotexts[0]
    adapter.ADAPTER.off()  # outside inference mode, as Forge's process() is
    assert torch.equal(layer.weight.detach(), pristine)


def _effective(layer):
    from backend.operations import get_weight_and_bias
    return get_weight_and_bias(layer)[0].detach().clone()


def test_scaled_weights_merge_on_the_weight_the_layer_computes_with(forge):
    adapter, _, model = forge
    adapter.ADAPTER.off()
    layer = model.forge_objects.unet.model.diffusion_model.get_submodule(TO_Q)
    generate("a <lora:style:1>", steps=1)
    plain = _effective(layer)
    adapter.ADAPTER.off()
    adapter.ADAPTER.engine = None  # a fresh engine sees the scaled layer
    w = layer.weight.detach().clone()
    layer.weight = torch.nn.Parameter(w * 4, requires_grad=False)  # stored ×4, computed ×0.25
    layer.scale_weight = torch.nn.Parameter(torch.tensor(0.25), requires_grad=False)
    try:
        generate("a <lora:style:1>", steps=1)
        assert torch.allclose(_effective(layer), plain, atol=1e-6)
        adapter.ADAPTER.off()
        assert torch.equal(layer.weight.detach(), w * 4)
    finally:
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        layer.scale_weight = None
        adapter.ADAPTER.engine = None


@pytest.mark.parametrize("maker", ["gguf_linear", "gguf_f16_linear"])
def test_a_quantized_layer_takes_its_network_beside_it(forge, maker):
    """Forge's GGUF Linear (its weight a ParameterGGUF with `gguf_cls`) is never written: the
    network runs beside it (network/quantized.py), and the image still changes there. So does
    an F16/F32 tensor of a GGUF file, a ParameterGGUF without a quant class (`gguf_cls` None;
    Neo's real GGUF SD1 left the network out on its 96 F16 conv and small layers: "its weight
    is stored quantized (ParameterGGUF, torch.float16)")."""
    from backend import operations
    from forge_model import StableDiffusion
    from modules import shared

    from netweave.network.quantized import dequantize
    adapter, _, model = forge

    def quantize(unet):
        block = unet.get_submodule(TO_Q.rsplit(".", 1)[0])
        block.to_q = getattr(operations, maker)(block.to_q)
    adapter.ADAPTER.off()
    quantized = StableDiffusion(unet_layers=quantize)
    shared.sd_model = quantized
    try:
        pristine = snapshot(quantized)
        out, seen = generate("a <lora:style:1>", steps=2)
        info = out.infotexts[0]
        assert "NetWeave errors:" not in info and len(out.images) == 1
        engine = adapter.ADAPTER.engine
        (q,) = [t for t in engine.keymap.targets if t.path == TO_Q]
        assert q.quant is not None and engine.strengths(q) == {0: 1.0}
        assert q.shape == tuple(q.module.weight.shape)  # the real shape
        assert engine.pristine_bytes and not any(k[0] == id(q.module) for k in engine._pristine)
        if maker == "gguf_f16_linear":
            assert torch.equal(dequantize(q.module), q.module.weight.detach().float())
        adapter.ADAPTER.off()
        assert same(snapshot(quantized), pristine)
    finally:
        shared.sd_model = model


CONV = "input_blocks.1.0.in_layers.2"  # a 3x3 conv, IN01


@pytest.mark.parametrize("tag", ["<lora:style:1:region=left>", "<lora:texture:1>",
                                 "<lora:texture:1:region=left>"])
def test_a_quantized_conv_takes_its_network_beside_it(forge, tag):
    """A 3x3 conv stored in a GGUF file (F16, as city96's SD1 files keep convs; Neo's GGUF
    Conv2d) runs every network beside it: a region's box (the real Neo raised "mat1 and mat2
    shapes cannot be multiplied" on region=left: a quantized layer's view was a Linear) and
    LoHa (its ΔW's stub was a Linear too: 't() expects a tensor with <= 2 dimensions')."""
    from backend import operations
    from forge_model import StableDiffusion
    from modules import shared
    adapter, _, model = forge

    def quantize(unet):
        parent, name = CONV.rsplit(".", 1)
        block = unet.get_submodule(parent)
        block[int(name)] = operations.gguf_f16_conv(block[int(name)])
    def rounded(unet):  # the same conv in float, its weight the F16 one: merged, not beside
        conv = unet.get_submodule(CONV)
        conv.weight.data = conv.weight.data.half().float()

    def picture(prompt):
        out, _ = generate(prompt, steps=2)
        assert "NetWeave errors:" not in out.infotexts[0] and len(out.images) == 1
        return np.asarray(out.images[0], dtype=np.float32)
    adapter.ADAPTER.off()
    quantized = StableDiffusion(unet_layers=quantize)
    shared.sd_model = quantized
    try:
        pristine = snapshot(quantized)
        beside = picture("a " + tag)
        (q,) = [t for t in adapter.ADAPTER.engine.keymap.targets if t.path == CONV]
        assert q.quant is not None
        adapter.ADAPTER.off()
        assert same(snapshot(quantized), pristine)
        shared.sd_model = StableDiffusion(unet_layers=rounded)
        merged, untagged = picture("a " + tag), picture("a")
        assert np.abs(beside - merged).max() < 1e-3  # the conv's delta beside it, to rounding (0.07 without it)
    finally:
        shared.sd_model = model


def test_loras_and_checkpoints_in_the_extra_folders_are_found(forge, tmp_path):
    """Forge classic and Neo take more folders (--lora-dirs, --ckpt-dirs: modules/cmd_args.py,
    appended; Neo's built-in LoRA walks lora_dir and every lora_dirs): NetWeave's library
    reads them too (the real Neo: "no lora named 'zt_both' in the Lora folder" for a file in
    --lora-dirs that Neo's own LoRA loaded)."""
    import shutil

    from modules import shared
    extra = tmp_path / "more"
    extra.mkdir()
    shutil.copy(os.path.join(shared.cmd_opts.lora_dir, "style.safetensors"),
                extra / "elsewhere.safetensors")
    shared.cmd_opts.lora_dirs, shared.cmd_opts.ckpt_dirs = [str(extra)], [str(tmp_path)]
    try:
        out, _ = generate("a <lora:elsewhere:1>", steps=1)
        assert "NetWeave errors" not in out.infotexts[0]
        from netweave.extension.webui.common import library
        assert str(tmp_path) in library().model_dirs
    finally:
        del shared.cmd_opts.lora_dirs, shared.cmd_opts.ckpt_dirs


def test_text_rows_of_captions_of_their_own_lengths(forge):
    """A language model's captions keep their own lengths (Neo's Z-Image Qwen3: the prompt's
    11 tokens, the empty negative's 8): the rows handed to set_text_variants are then one
    (tokens, width) each, as the engine takes Z-Image's; they were concatenated, and the real
    Neo reported "Sizes of tensors must match" at every step of a scheduled te= and sampled
    without the text-encoder change. Equal lengths (CLIP's 77) stay one tensor."""
    from netweave.extension.webui.ldm import _crossattn
    cond, uncond = torch.randn(2, 11, 8), torch.randn(1, 8, 8)
    rows = _crossattn(cond, uncond)
    assert isinstance(rows, list) and [tuple(r.shape) for r in rows] == [(11, 8), (11, 8), (8, 8)]
    assert torch.equal(rows[1], cond[1]) and torch.equal(rows[2], uncond[0])
    assert torch.equal(_crossattn(cond, cond[:1]), torch.cat([cond, cond[:1]]))
    both = _crossattn({"crossattn": cond, "vector": None}, {"crossattn": uncond, "vector": None})
    assert isinstance(both, list) and len(both) == 3


def test_the_entry_script_picks_the_forge_adapter(forge, repo_root):
    import importlib.util

    from modules import scripts
    spec = importlib.util.spec_from_file_location(
        "netweave_entry_forge_test", os.path.join(repo_root, "scripts", "netweave_entry.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from netweave.extension.webui import forge as adapter
    assert module.NetWeaveScript is adapter.NetWeaveScript
    assert issubclass(module.NetWeaveScript, scripts.Script)


def test_sdxl_trees_are_clip_l_and_clip_g(forge):
    from types import SimpleNamespace as NS
    adapter = forge[0]
    text = NS(clip_l=object(), clip_g=object())
    model = NS(is_sdxl=True, forge_objects=NS(unet=NS(model=NS(diffusion_model="unet")),
                                              clip=NS(cond_stage_model=text)))
    assert adapter.ForgeAdapter.trees(model) == {"unet": "unet", "te1": text.clip_l,
                                                 "te2": text.clip_g}
    assert adapter.ForgeAdapter.arch(model) == "sdxl"


class BlendProbe:
    """Hooks on Forge's diffusion model around NetWeave's blend hooks (network/blend.py),
    added at the first denoiser call, after the engine attached its own: the host's call,
    what the UNet itself receives, the doubled prediction and the blended one."""

    def __init__(self, unet):
        self.unet, self.handles, self.calls = unet, [], []

    def on_denoiser(self, params):
        if self.handles:
            return
        self.handles = [
            self.unet.register_forward_pre_hook(self.host_call, with_kwargs=True, prepend=True),
            self.unet.register_forward_pre_hook(self.unet_call, with_kwargs=True),
            self.unet.register_forward_hook(self.doubled, prepend=True),
            self.unet.register_forward_hook(self.blended)]

    def host_call(self, module, args, kwargs):
        options = kwargs["transformer_options"]
        self.calls.append({"marks": list(options["cond_or_uncond"]), "host": options,
                           "b": args[0].shape[0]})

    def unet_call(self, module, args, kwargs):
        self.calls[-1].update(rows=args[0].shape[0], inside=kwargs["transformer_options"])

    def doubled(self, module, args, out):
        self.calls[-1]["doubled"] = out.detach().clone()

    def blended(self, module, args, out):
        self.calls[-1]["blended"] = out.detach().clone()

    def remove(self):
        for h in self.handles:
            h.remove()


def test_a_blended_step_on_forges_chunks_blends_each_row_by_its_prompts_region(forge):
    """Two prompts, each with its own regional network blended at every step, the UNet batch
    whole (uncond and cond chunks in one call) or one chunk per call. Inside the UNet, Forge's
    chunk options describe the doubled batch (cond_or_uncond twice, the row marks and indices
    with it, sigmas one chunk's); each row's prediction is the "without" half outside its
    prompt's region and the "with" half inside it; whole and split batches draw the same."""
    whole = _blended_run(forge, float("inf"))
    split = _blended_run(forge, 1.5e6)
    for a, b in zip(whole.images, split.images):
        assert torch.allclose(a, b, atol=1e-4)


def _blended_run(forge, free_memory):
    from backend import memory_management
    from modules import processing, script_callbacks
    adapter, _, model = forge
    probe = BlendProbe(adapter.ADAPTER.trees(model)["unet"])
    script_callbacks.on_cfg_denoiser(probe.on_denoiser)
    memory_management.free_memory = free_memory
    try:
        out, _ = generate(["a <lora:style:te=0:unet=1:region=left:blend=1>",
                           "b <lora:texture:te=0:unet=1:region=right:blend=1>"],
                          batch_size=2, steps=2)
    finally:
        memory_management.free_memory = float("inf")
        script_callbacks.callback_map["cfg_denoiser"].remove(probe.on_denoiser)
        probe.remove()
    assert "NetWeave errors" not in out.infotexts[0]
    assert len(probe.calls) == (2 if free_memory == float("inf") else 4)
    for call in probe.calls:
        marks, b, inside = call["marks"], call["b"], call["inside"]
        per = b // len(marks)
        assert call["rows"] == 2 * b and call["doubled"].shape[0] == 2 * b
        assert inside["cond_or_uncond"] == marks * 2 and call["host"]["cond_or_uncond"] == marks
        assert inside["sigmas"].shape[0] == per  # one chunk's: chunks · sigmas = the rows
        sigmas = inside["sigmas"]
        assert torch.equal(inside["cond_mark"], processing.compute_cond_mark(marks * 2, sigmas))
        assert (inside["cond_indices"], inside["uncond_indices"]) == \
            processing.compute_cond_indices(marks * 2, sigmas)
        without, with_ = call["doubled"][:b], call["doubled"][b:]
        w = without.shape[-1] // 2
        for r in range(b):
            inside_cols, outside_cols = ((slice(0, w), slice(w, None)) if r % per == 0
                                         else (slice(w, None), slice(0, w)))  # prompt 0: left
            got = call["blended"][r]
            assert torch.allclose(got[..., outside_cols], without[r][..., outside_cols])
            assert torch.allclose(got[..., inside_cols], with_[r][..., inside_cols])
            assert not torch.allclose(with_[r][..., inside_cols], without[r][..., inside_cols])
    return out
