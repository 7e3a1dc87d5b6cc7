"""The SD.Next adapter in stand-ins of SD.Next's host modules (tests/sdnext_host, after the
sdnext source read for the issue), on a real diffusers pipeline (the tiny default model)."""
import contextlib
import importlib
import os
import sys

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

HOST = os.path.join(os.path.dirname(__file__), "sdnext_host")
HOST_MODULES = ("modules", "installer")


def _host_module(name):
    return any(name == m or name.startswith(m + ".") for m in HOST_MODULES)


@contextlib.contextmanager
def sdnext_host(root, make_model, model_type):
    """SD.Next's `modules` (and `installer`) in sys.modules while the block runs (A1111's
    stand-ins share the name), started in SD.Next's order: the model loaded
    (`make_model(root)` → the pipeline, its network files written under root/Lora), the
    script modules imported, the registry refilled, then each tab's runner
    initialised and its UI built. Yields (the adapter module, the built-in Lora)."""
    saved = {k: v for k, v in sys.modules.items() if _host_module(k)}
    for k in saved:
        del sys.modules[k]
    sys.modules.pop("netweave.extension.webui.sdnext", None)  # imported below, against these
    sys.path.insert(0, HOST)
    try:
        from modules import extra_networks, paths, scripts_manager, shared
        shared.cmd_opts.lora_dir, shared.cmd_opts.data_dir = str(root / "Lora"), str(root)
        os.makedirs(shared.cmd_opts.lora_dir)
        shared.sd_model, shared.sd_model_type = make_model(root), model_type
        # load_scripts imports it (anew: `from … import` would reuse a package attribute)
        adapter = importlib.import_module("netweave.extension.webui.sdnext")
        entry = os.path.join(paths.extensions_dir, "netweave", "scripts", "netweave_entry.py")
        scripts_manager.scripts_data.append(scripts_manager.ScriptClassData(
            adapter.NetWeaveScript, entry, os.path.dirname(entry), adapter))
        scripts_manager.create_runners()
        extra_networks.initialize()  # after scripts load; then the defaults register
        extra_networks.register_default_extra_networks()
        for runner, control in ((scripts_manager.scripts_txt2img, False),
                                (scripts_manager.scripts_control, True)):
            runner.initialize_scripts(is_img2img=False, is_control=control)
            runner.setup_ui()
        yield adapter, extra_networks.extra_network_registry["lora"]
        adapter.ADAPTER.off()
    finally:
        sys.path.remove(HOST)
        for k in [k for k in sys.modules if _host_module(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def sdnext(tmp_path_factory):
    from netweave.devtools.synthetic import write_network
    from netweave.extension.standalone.models import tiny_model
    model = tiny_model()

    def load(root):
        spatial = lambda t: "time_embedding" not in t.name  # noqa: E731
        for name, fmt, comps, seed in (("style", "lora", ("unet", "te1"), 1),
                                       ("words", "lora", ("te1",), 2)):
            write_network(root / "Lora" / f"{name}.safetensors", model.trees(), fmt, "kohya",
                          "sd1", seed=seed, scale=0.3, components=comps, select=spatial)
        return model.pipe
    with sdnext_host(tmp_path_factory.mktemp("sdnext"), load, "sd") as (adapter, builtin):
        yield adapter, builtin, model


def generate(adapter, prompt, enabled=True, options="", **kw):
    """A txt2img generation with NetWeave's checkbox `enabled`."""
    from modules import processing, scripts_manager
    p = processing.StableDiffusionProcessing(prompt=prompt, script_args=[0, enabled, options],
                                             scripts=scripts_manager.scripts_txt2img, **kw)
    return processing.process_images(p), p


def same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_tags_follow_the_steps_through_sdnexts_callback(sdnext):
    adapter, builtin, model = sdnext
    from modules import processing_callbacks
    engine_steps = []
    generate(adapter, "warm up")
    engine = adapter.ADAPTER.engine_for()
    original = engine.set_step

    def spy(k, phase="base"):
        original(k, phase)
        (t,) = engine.keymap.lookup("lora_unet_up_blocks_1_attentions_0_proj_in")
        engine_steps.append((k, dict(engine.strengths(t))))
    engine.set_step = spy
    processing_callbacks.calls.clear()
    try:
        out, p = generate(adapter, "a fox <lora:style:0@0,1@0.5:out=0.5> <lyco:style:0.2:in=0>",
                          steps=4)
    finally:
        engine.set_step = original
    assert len(out.images) == 1 and "NetWeave errors" not in out.extra_generation_params
    assert processing_callbacks.calls == [0, 1, 2, 3]  # SD.Next's own callback still runs
    assert [k for k, _ in engine_steps] == [0, 1, 2, 3]
    for k, now in engine_steps:
        assert now.get(0, 0.0) == (0.0 if k < 2 else 0.5) and now[1] == pytest.approx(0.2)
    assert all(items == [] for items in builtin.seen)  # the built-in never sees our tags


def test_text_encoder_schedule_swaps_the_embeddings(sdnext):
    adapter = sdnext[0]
    swapped = []
    original = adapter.ADAPTER.step_end

    def spy(pipe, step, timestep, kwargs):
        before = kwargs.get("prompt_embeds")
        out = original(pipe, step, timestep, kwargs)
        swapped.append(before is not None and not torch.equal(before, out["prompt_embeds"]))
        return out
    adapter.ADAPTER.step_end = spy
    try:
        out, p = generate(adapter, "a fox <lora:words:te=0@0,1@0.5:unet=0>", steps=4)
    finally:
        adapter.ADAPTER.step_end = original
    assert p.task_args["callback_on_step_end"] == spy
    assert swapped == [False, True, False, False]  # after step 1: step 2 starts te = 1


def test_bad_tags_and_disabling(sdnext, capsys):
    adapter, builtin, _ = sdnext
    out, p = generate(adapter, "a <lora:nope:1> <lora:style:0.5:regio=left>")
    assert len(out.images) == 1
    errors = out.extra_generation_params["NetWeave errors"]
    assert "no lora named 'nope'" in errors and "regio" in errors
    assert "NetWeave: " in capsys.readouterr().err
    builtin.seen.clear()
    from modules import extra_networks
    generate(adapter, "a <lora:style:0.5>", enabled=False)
    assert extra_networks.extra_network_registry["lora"] is builtin
    assert builtin.seen[0] == [["style", "0.5"]]
    assert adapter.ADAPTER.engine.plan is None


def test_routes_and_entry_script(sdnext, repo_root):
    adapter = sdnext[0]
    from modules import script_callbacks, scripts
    app = FastAPI()
    script_callbacks.app_started_callback(None, app)
    client = TestClient(app)
    names = {n["name"] for n in client.get("/netweave/v1/networks").json()["networks"]}
    assert names == {"style", "words"}
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "netweave_entry_sdnext", os.path.join(repo_root, "scripts", "netweave_entry.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NetWeaveScript is adapter.NetWeaveScript
    assert issubclass(module.NetWeaveScript, scripts.Script)


def test_hires_pass_follows_hr_strengths(sdnext):
    adapter = sdnext[0]
    generate(adapter, "warm up")
    engine = adapter.ADAPTER.engine_for()
    original, seen = engine.set_step, []

    def spy(k, phase="base"):
        original(k, phase)
        (t,) = engine.keymap.lookup("lora_unet_up_blocks_1_attentions_0_proj_in")
        seen.append((phase, k, dict(engine.strengths(t))))
    engine.set_step = spy
    try:
        out, p = generate(adapter, "a <lora:style:1:hr=0.25>", steps=3, enable_hr=True,
                          hr_second_pass_steps=2)
    finally:
        engine.set_step = original
    assert [(ph, k) for ph, k, _ in seen] == [("base", 0), ("base", 1), ("base", 2),
                                              ("hires", 0), ("hires", 1)]
    assert [now[0] for ph, _, now in seen] == [1.0, 1.0, 1.0, 0.25, 0.25]


def test_builtin_lora_is_released_whatever_its_filter(sdnext):
    """Issue 16 item 7: after the built-in fused a LoRA (NetWeave off), NetWeave on with no tag
    draws the fresh image. SD.Next's own call passes exclude=[the text encoders] unless
    lora_apply_te, and its changed() compares only under the same include/exclude key."""
    adapter, builtin, _ = sdnext
    fresh = generate(adapter, "a fox")[0].images[0]
    for apply_te in (False, True):
        generate(adapter, "a fox <lora:style:1>", enabled=False, lora_apply_te=apply_te)
        assert builtin.fused == {"text_encoder": ["style"] if apply_te else [], "unet": ["style"]}
        out, _ = generate(adapter, "a fox", lora_apply_te=apply_te)
        assert builtin.fused == {"text_encoder": [], "unet": []}
        assert same(out.images[0], fresh)


def test_prompt_cache_keeps_each_modes_text_encoder(sdnext):
    """Issue 16 item 8: SD.Next's prompt-embedding cache key is the same in both modes (the
    tags stay in p.network_data); NetWeave applies `words` (text encoder only) where the
    built-in, with lora_apply_te off, does not. Each mode's image is its own fresh one, after
    the other mode encoded the same prompt, and again from the cache."""
    adapter = sdnext[0]
    from modules import prompt_parser_diffusers
    prompt = "a fox <lora:words:1>"

    def draw(enabled):
        out, p = generate(adapter, prompt, enabled=enabled)
        return out.images[0], [x.items for x in p.network_data["lora"]]
    prompt_parser_diffusers.cache.clear()
    ours, _ = draw(True)
    builtin_after_ours, builtin_items = draw(False)
    prompt_parser_diffusers.cache.clear()
    builtin, _ = draw(False)
    ours_after_builtin, our_items = draw(True)
    assert not same(ours, builtin)
    assert same(builtin_after_ours, builtin) and same(ours_after_builtin, ours)
    assert same(draw(False)[0], builtin) and same(draw(True)[0], ours)  # both cached now
    assert builtin_items == [["words", "1"]]  # the mark: only while NetWeave holds the names
    assert our_items[0] == ["words", "1"] and our_items[1][0].startswith("netweave:te=")


def test_prompt_cache_and_the_hires_text_encoder(sdnext):
    """The hires pass encodes the prompt again with the text encoders at hires step 0
    (`hrte=0`: pristine); the cache must not hand it the base pass's encoding."""
    adapter = sdnext[0]
    from modules import prompt_parser_diffusers, shared
    prompt, kw = "a fox <lora:words:1:hrte=0>", dict(steps=3, enable_hr=True,
                                                    hr_second_pass_steps=2)
    shared.opts.sd_textencoder_cache_size = 0
    try:
        uncached = generate(adapter, prompt, **kw)[0].images[0]
    finally:
        shared.opts.sd_textencoder_cache_size = 4
    prompt_parser_diffusers.cache.clear()
    assert same(generate(adapter, prompt, **kw)[0].images[0], uncached)
    assert same(generate(adapter, prompt, **kw)[0].images[0], uncached)  # from the cache


def test_control_runs_netweave_as_txt2img_does(sdnext):
    """Issue 16 item 9: SD.Next's Control runner keeps NetWeave's script (an extension script
    runs there only if its title is in installer.control_extensions when the runner
    initialises); through the UI (script arguments given) and the API (alwayson_scripts
    dropped: the UI defaults) Control draws what txt2img draws, and a no-tag Control image
    after a tagged txt2img carries nothing over."""
    adapter, builtin, _ = sdnext
    import installer
    from modules import scripts_manager
    from modules.api import control as api
    from modules.control import run
    assert "NetWeave" in installer.control_extensions
    assert [s.title() for s in scripts_manager.scripts_control.alwayson_scripts] == ["NetWeave"]
    tagged = "a fox <lora:style:1:in=0>"  # in=0: a NetWeave key the built-in would ignore
    txt_tag, txt_plain = (generate(adapter, x)[0] for x in (tagged, "a fox"))
    assert not same(txt_tag.images[0], txt_plain.images[0])
    assert txt_tag.extra_generation_params["Lora hashes"].startswith("style: ")

    out = run.control_run(0, True, "", prompt=tagged)  # the UI: its own script arguments
    hashes = txt_tag.extra_generation_params["Lora hashes"]
    assert same(out.images[0], txt_tag.images[0])
    assert out.extra_generation_params["Lora hashes"] == hashes
    generate(adapter, tagged)
    out = api.post_control({"prompt": "a fox",
                            "alwayson_scripts": {"NetWeave": {"args": [True, ""]}}})
    assert same(out.images[0], txt_plain.images[0])
    assert "Lora hashes" not in out.extra_generation_params
    out = api.post_control({"prompt": tagged})
    assert same(out.images[0], txt_tag.images[0])
    generate(adapter, tagged, enabled=False)  # the built-in holds the names again
    out = api.post_control({"prompt": tagged})
    assert same(out.images[0], txt_tag.images[0])
    assert builtin.fused == {"text_encoder": [], "unet": []}
    out = run.control_run(0, False, "", prompt=tagged)  # switched off in Control's own UI
    assert builtin.fused["unet"] == ["style"] and not same(out.images[0], txt_tag.images[0])
