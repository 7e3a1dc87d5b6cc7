"""The SD.Next adapter in stand-ins of SD.Next's host modules (tests/sdnext_host, after the
sdnext source read for the issue), on a real diffusers pipeline (the tiny default model)."""
import os
import sys

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

HOST = os.path.join(os.path.dirname(__file__), "sdnext_host")


@pytest.fixture(scope="module")
def sdnext(tmp_path_factory):
    """SD.Next's `modules` in sys.modules for this file only (A1111's stand-ins share the name)."""
    saved = {k: v for k, v in sys.modules.items() if k == "modules" or k.startswith("modules.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, HOST)
    try:
        from modules import extra_networks, shared

        from netweave.extension.standalone.models import tiny_model
        from netweave.devtools.synthetic import write_network
        root = tmp_path_factory.mktemp("sdnext")
        model = tiny_model()
        shared.sd_model, shared.sd_model_type = model.pipe, "sd"
        shared.cmd_opts.lora_dir, shared.cmd_opts.data_dir = str(root / "Lora"), str(root)
        os.makedirs(shared.cmd_opts.lora_dir)
        spatial = lambda t: "time_embedding" not in t.name  # noqa: E731
        for name, fmt, comps, seed in (("style", "lora", ("unet", "te1"), 1),
                                       ("words", "lora", ("te1",), 2)):
            write_network(root / "Lora" / f"{name}.safetensors", model.trees(), fmt, "kohya",
                          "sd1", seed=seed, scale=0.3, components=comps, select=spatial)
        from netweave.extension.webui import sdnext as adapter

        class BuiltinLora(extra_networks.ExtraNetwork):
            def __init__(self):
                super().__init__("lora")
                self.seen = []

            def activate(self, p, params_list, step=0, include=None, exclude=None):
                self.seen.append([x.items for x in params_list])

            def deactivate(self, p, force=False):
                pass
        builtin = BuiltinLora()
        extra_networks.initialize()  # after scripts load; then the defaults register
        extra_networks.register_extra_network(builtin)
        yield adapter, builtin, model
        adapter.ADAPTER.off()
    finally:
        sys.path.remove(HOST)
        for k in [k for k in sys.modules if k == "modules" or k.startswith("modules.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def generate(adapter, prompt, enabled=True, options="", **kw):
    from modules import processing, scripts
    runner = scripts.ScriptRunner([adapter.NetWeaveScript()])
    p = processing.StableDiffusionProcessing(prompt=prompt, script_args=[0, enabled, options],
                                             scripts=runner, **kw)
    return processing.process_images(p), p


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
