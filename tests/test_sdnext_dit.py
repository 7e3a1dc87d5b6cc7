"""SD.Next's Z-Image, Qwen-Image, SD3 and Wan 2.2 pipelines through the SD.Next adapter, in the
stand-ins of SD.Next's host modules (tests/sdnext_host: SD3's text from SD.Next's own prompt
parser, the others' from the pipeline, sd_hijack_te's prompt cache on every loader,
true_cfg_scale from cfg_true), on the tiny pipelines of tinypipes.py loaded from folders as
SD.Next loads them (tokenizers at the pipelines' text lengths, as SD.Next encodes)."""
import pytest
import torch

from test_dit_standalone import clip_lora, recorded, transformer_lora
from test_sdnext import same, sdnext_host
from test_sdnext_flux import (PROMPT, STEPS, check_a_lora_and_no_tags, draw,
                              engine_of_a_generation, weights)
from tinypipes import FAMILIES, write_pipeline

# SD.Next's shared.sd_model_type for each (modules/modeldata.get_model_type)
TYPES = {"zimage": "zimage", "qwenimage": "qwen", "sd3": "sd3", "wan22": "wanai"}


def from_folder(folder, arch):
    """The pipeline as SD.Next's loader leaves it (pipelines/model_*.py: encode_prompt
    hijacked)."""
    from diffusers import DiffusionPipeline
    from modules import sd_hijack_te
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    for name in ("tokenizer", "tokenizer_3"):  # no shorter than the pipelines' defaults
        if getattr(pipe, name, None) is not None and arch != "zimage":
            getattr(pipe, name).model_max_length = 1024
    sd_hijack_te.init_hijack(pipe)
    return pipe


def load(arch):
    """The pipeline as SD.Next loads it; a LoRA on the transformer, and for SD3 one on CLIP-L."""
    def make(root):
        pipe = from_folder(write_pipeline(root / f"tiny{arch}", arch), arch)
        transformer_lora(root / "Lora" / "dit.safetensors", pipe.transformer)
        if arch == "sd3":
            clip_lora(root / "Lora" / "clipl.safetensors", pipe.text_encoder)
        return pipe
    return make


@pytest.fixture(scope="module", params=FAMILIES)
def host(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"sdnext_{arch}")
    with sdnext_host(root, load(arch), TYPES[arch]) as (adapter, builtin):
        yield arch, adapter, builtin


def test_trees_and_architecture_from_sdnexts_pipeline(host):
    arch, adapter, _ = host
    engine, pipe = engine_of_a_generation(adapter, arch)
    if arch == "sd3":
        assert engine.trees["te1"] is pipe.text_encoder and engine.trees["te2"] is pipe.text_encoder_2
    if arch == "wan22":  # both experts resident: one engine each
        assert engine.engines["low"].trees["unet"] is pipe.transformer_2


def test_a_lora_changes_the_image_and_no_tags_is_sdnexts_own(host):
    arch, adapter, _ = host
    check_a_lora_and_no_tags(adapter, arch, "dit")


def test_each_call_gets_its_rows(host):
    """SD3 and Z-Image call the transformer once with both prompts, Qwen-Image (with
    cfg_true) and Wan once per prompt; `neg=0` changes the picture only through those rows."""
    arch, adapter, _ = host
    extra = {"cfg_true": 4.0} if arch == "qwenimage" else {}
    with recorded(adapter.ADAPTER.engine_for(), "set_rows") as rows:
        lora, _, _ = draw(adapter, arch, f"{PROMPT} <lora:dit:1>", **extra)
        neg0, out, _ = draw(adapter, arch, f"{PROMPT} <lora:dit:1:neg=0>", **extra)
    expected = {"sd3": [[True, False]], "zimage": [[False, True]],
                "qwenimage": [[False], [True]], "wan22": [[False], [True]]}[arch]
    assert rows[-len(expected) * STEPS:] == expected * STEPS
    assert "NetWeave errors" not in out.extra_generation_params
    assert not same(neg0, lora)


def test_sd3s_text_encoder_network_runs_through_netweaves_own_encoding(host):
    arch, adapter, _ = host
    if arch != "sd3":
        pytest.skip("the CLIP-L network is written for SD3 alone")
    fresh, _, _ = draw(adapter, arch, PROMPT)
    te, out, p = draw(adapter, arch, f"{PROMPT} <lora:clipl:1>")
    assert "NetWeave errors" not in out.extra_generation_params
    assert p.task_args["pooled_prompt_embeds"] is not None and not same(te, fresh)
    assert same(draw(adapter, arch, PROMPT)[0], fresh)  # SD.Next's cache kept its own


def test_wan_experts_each_get_their_strength_and_both_come_back(host):
    arch, adapter, _ = host
    if arch != "wan22":
        pytest.skip("Wan 2.2's two experts")
    from modules import shared
    pipe = shared.sd_model
    before = weights()
    name = "blocks.0.ffn.net.2"
    layers = [dict(m.named_modules())[name] for m in (pipe.transformer, pipe.transformer_2)]
    pristine = [layer.weight.detach().clone() for layer in layers]
    moved, handles = [], []
    for i, m in enumerate((pipe.transformer, pipe.transformer_2)):
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, i=i: moved.append((i, not torch.equal(layers[i].weight, pristine[i])))))
    try:
        _, out, _ = draw(adapter, arch, f"{PROMPT} <lora:dit:1:high>", steps=6, cfg_scale=1.0)
    finally:
        for h in handles:
            h.remove()
    assert "NetWeave errors" not in out.extra_generation_params
    assert adapter.ADAPTER.context(6).expert == "high"  # the tab's explain: the first's plan
    assert {i for i, _ in moved} == {0, 1}  # both experts ran
    assert all(changed == (i == 0) for i, changed in moved)  # the LoRA on the high one only
    draw(adapter, arch, PROMPT)
    for b, a in zip(before, weights()):
        assert all(torch.equal(b[k], a[k]) for k in b)


def test_the_builtins_diffusers_adapters_leave_netweave_the_models_layers(host):
    """SD.Next's built-in loads a LoRA through diffusers (PEFT) where it has no native loader
    (Wan, Qwen-Image: lora_overrides.allow_native; every model with lora_force_diffusers),
    into `transformer` and, for `:low`, `transformer_2` (lora_diffusers.load_per_module), and
    when a request drops it, it only disables the adapters: the layers stay PEFT wrappers. A
    model loaded, the built-in's LoRA used (NetWeave off) and dropped, then NetWeave: its LoRA
    draws what it draws on the model without them (it found none of its layers: "20 of its
    layers name no layer of this model", and the tag did nothing), and the wrappers are gone.
    Needs peft (SD.Next installs it, and so does setup.sh): skipped without."""
    arch, adapter, _ = host
    if arch not in ("wan22", "qwenimage"):
        pytest.skip("SD.Next's built-in loads Wan and Qwen-Image LoRAs through diffusers")
    from diffusers.utils import USE_PEFT_BACKEND
    if not USE_PEFT_BACKEND:
        pytest.skip("diffusers loads LoRAs only with peft installed")
    from modules import shared
    model = shared.sd_model
    reference, _, _ = draw(adapter, arch, f"{PROMPT} <lora:dit:1>")
    pipe = from_folder(model.name_or_path, arch)  # the same model, loaded again
    shared.sd_model = pipe
    try:
        draw(adapter, arch, PROMPT, enabled=False)  # the built-in's turn: NetWeave off
        folder = shared.cmd_opts.lora_dir  # a folder and a weight_name: offline, as a file is not
        pipe.load_lora_weights(folder, weight_name="dit.safetensors", adapter_name="dit")
        if arch == "wan22":  # `<lora:dit:1:low>`: the same adapter on the low-noise expert
            pipe.load_lora_weights(folder, weight_name="dit.safetensors", adapter_name="dit",
                                   load_into_transformer_2=True)
        assert any(pipe.get_list_adapters().values())
        pipe.disable_lora()  # the built-in, at a request without its LoRA
        lora, out, _ = draw(adapter, arch, f"{PROMPT} <lora:dit:1>")
        assert "NetWeave errors" not in out.extra_generation_params, out.extra_generation_params
        assert same(lora, reference)
        assert not any(pipe.get_list_adapters().values())
    finally:
        shared.sd_model = model
    assert same(draw(adapter, arch, f"{PROMPT} <lora:dit:1>")[0], reference)
