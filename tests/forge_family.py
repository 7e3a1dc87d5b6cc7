"""What the Forge 2 and Forge Neo WebUI tests share (tests/test_forge.py, tests/test_neo.py):
the host's stand-in modules swapped into sys.modules for one test file, one generation through
the host's processing with NetWeave's script, and the weights of the model's trees."""
import contextlib
import sys

import torch

ADAPTERS = ("a1111", "ldm", "forge", "neo")  # netweave.extension.webui's host modules


def _forget_adapters():
    """`from netweave.extension.webui import forge` reads the package's attribute before
    sys.modules: adapters imported on one host's stand-ins must go from both."""
    package = sys.modules.get("netweave.extension.webui")
    for name in ADAPTERS:
        if package is not None and name in vars(package):
            delattr(package, name)


@contextlib.contextmanager
def host_modules(paths, names):
    """The host's stand-ins (folders `paths` first on sys.path) as the modules `names` (and
    their submodules) and NetWeave's WebUI adapters, for the duration; then what was there."""
    def ours(k):
        return any(k == s or k.startswith(s + ".") for s in
                   tuple(names) + tuple(f"netweave.extension.webui.{a}" for a in ADAPTERS))
    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    _forget_adapters()
    sys.path[:0] = paths
    try:
        yield
    finally:
        for p in paths:
            sys.path.remove(p)
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        _forget_adapters()
        sys.modules.update(saved)


def generate(adapter, scripts_before, prompt, enabled=True, options="", record=None,
             unet_calls=None, scripts_after=(), **kw):
    """One txt2img through the host's processing stand-in, NetWeave's script after
    `scripts_before` (and before `scripts_after`, which take no arguments); `record`: a
    target whose strengths are noted at every denoiser call (step, is_hr_pass, strengths);
    `unet_calls`: each UNet call's (cond_or_uncond, the rows NetWeave described), from a
    pre-hook after NetWeave's."""
    from modules import processing, script_callbacks, scripts
    runner = scripts.ScriptRunner([*scripts_before, adapter.NetWeaveScript(), *scripts_after])
    args = [enabled, options]
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, scripts=runner,
                                                    script_args=args, **kw)
    seen = []

    def recorder(params):
        e = adapter.ADAPTER.engine
        seen.append((params.denoiser.step, params.denoiser.p.is_hr_pass,
                     dict(e.strengths(record)) if record is not None and e.plan else None))
    script_callbacks.on_cfg_denoiser(recorder)
    unet = adapter.ADAPTER.trees(p.sd_model)["unet"]
    hook = unet.register_forward_pre_hook(
        lambda m, a, kw: unet_calls.append((kw["transformer_options"]["cond_or_uncond"],
                                            adapter.ADAPTER.engine.runtime.rows)),
        with_kwargs=True) if unet_calls is not None else None
    try:
        return processing.process_images(p), seen
    finally:
        script_callbacks.callback_map["cfg_denoiser"].remove(recorder)
        if hook is not None:
            hook.remove()


def target(adapter, path):
    (t,) = [t for t in adapter.ADAPTER.engine.keymap.targets if t.path == path]
    return t


def snapshot(adapter, model):
    """Every parameter of the model's trees, copied."""
    return {f"{c}.{k}": v.detach().clone() for c, tree in adapter.ADAPTER.trees(model).items()
            for k, v in tree.named_parameters()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rows_run(generate_here, adapter, free_memory):
    """A batch of two prompts with per-prompt networks and neg=0, the UNet batch whole
    (uncond and cond chunks in one call) or split by memory (one chunk per call): each call's
    rows are described from its cond_or_uncond, unconds first as the host batches."""
    from backend import memory_management
    calls = []
    memory_management.free_memory = free_memory  # 1.5e6: one chunk of 2 images per call
    try:
        out, _ = generate_here(["a <lora:style:1:neg=0>", "b <lora:texture:1>"], batch_size=2,
                               steps=2, unet_calls=calls)
    finally:
        memory_management.free_memory = float("inf")
    assert "NetWeave errors" not in out.infotexts[0]
    expected = [[1, 0]] if free_memory == float("inf") else [[1], [0]]
    assert [marks for marks, _ in calls] == expected * 2
    for marks, rows in calls:
        assert rows.prompts == tuple(j for _ in marks for j in range(2))
        assert rows.uncond == tuple(m == 1 for m in marks for _ in range(2))
    entries = adapter.ADAPTER.engine.entries
    assert [(e.net.name, e.owner) for e in entries] == [("style", 0), ("texture", 1)]
    return out


def bad_tag_run(generate_here, capsys, **kw):
    """An unknown network, a misspelt key, a strength that is no number: the image is made,
    the tags stay in the infotext's prompt, every problem is in the infotext and the console."""
    out, _ = generate_here("a <lora:nope:1> <lora:style:0.5:regio=left> <lora:style:x>", **kw)
    assert len(out.images) == 1
    info = out.infotexts[0]
    assert info.startswith("a <lora:nope:1>")
    assert "NetWeave errors:" in info and "no lora named 'nope'" in info and "regio" in info
    assert "NetWeave: " in capsys.readouterr().err
