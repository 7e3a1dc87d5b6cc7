"""What the WebUI adapters (A1111/Forge, SD.Next) share: where their network folders and
NetWeave's mask folder are, and the script's options argument. Reads the host's
`modules.shared` / `modules.paths` when called, so both hosts' modules fit."""
from __future__ import annotations

import functools
import json
import os
import sys
from typing import Dict, Optional, Tuple

from ..library import Library
from ..masks import check_mask_name, decode_image
from ..report import INFOTEXT_KEYS, Report
from ..settings import Settings

KINDS = ("lora", "lyco", "loractl", "model")
TITLE = "NetWeave"


def data_folder(name: str) -> str:
    from modules import paths, shared
    base = getattr(shared.cmd_opts, "data_dir", None) or getattr(paths, "data_path", None) or "."
    return os.path.join(base, name)


def mask_folder() -> str:
    """The mask folder setting, else `netweave-masks` in the host's data folder."""
    return settings().mask_dir or data_folder("netweave-masks")


def library() -> Library:
    """The host's Lora and checkpoint folders (Forge classic and Neo take more: --lora-dirs,
    --ckpt-dirs); messages name them relative to the WebUI."""
    from modules import paths, shared
    models = getattr(paths, "models_path", None) or "models"
    opts = shared.cmd_opts
    lora = (getattr(opts, "lora_dir", None) or os.path.join(models, "Lora"),
            *(getattr(opts, "lora_dirs", None) or ()))
    ckpt = (getattr(opts, "ckpt_dir", None) or os.path.join(models, "Stable-diffusion"),
            *(getattr(opts, "ckpt_dirs", None) or ()))
    return _library(lora, ckpt, getattr(paths, "script_path", None) or os.getcwd())


@functools.lru_cache(maxsize=8)
def _library(lora: Tuple[str, ...], ckpt: Tuple[str, ...], base: str) -> Library:
    return Library(list(lora), list(ckpt), base=base)  # one per folder set: its hashes are kept


def inline_masks(options) -> Dict:
    """The script's options argument: {"masks": {name: base64 PNG}} (or that as JSON text)."""
    if isinstance(options, str):
        options = json.loads(options) if options.strip() else {}
    found = {}
    for name, data in ((options or {}).get("masks") or {}).items():
        check_mask_name(name)
        found[name] = decode_image(data, f"mask '{name}'")
    return found


def write_report(params: dict, report: Report) -> None:
    """A generation's report (session.py) to the console (new problems, one line each, as the
    host's own extensions print) and into p.extra_generation_params, which becomes every
    image's infotext: problems, masks used, `Lora hashes`, `<model:>` hashes."""
    for line in report.unsaid():
        _console(f"NetWeave: {line}")
    for key in INFOTEXT_KEYS:
        params.pop(key, None)
    params.update(report.infotext())


def _console(line: str) -> None:
    """A line on the console; during sampling, above the host's progress bar (tqdm), not
    inside it."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(line, file=sys.stderr)
    else:
        tqdm.write(line, file=sys.stderr)


class TagNames:
    """The `lora`, `lyco`, `loractl` and `model` entries of the host's extra-network registry:
    taken for NetWeave's handlers at run time (the registry is cleared and refilled after
    scripts load, so never at import), and given back when NetWeave is switched off."""

    def __init__(self, handler_class):
        self.ours = {kind: handler_class(kind) for kind in KINDS}
        self.originals: Dict[str, object] = {}

    def take(self, p, quiet=None) -> None:
        """`quiet(handler, p)`: how the host's own `lora` handler is made to load nothing
        (default: activated with no tags, as A1111's own loop does for unmentioned handlers)."""
        from modules import extra_networks
        registry = extra_networks.extra_network_registry
        for kind in KINDS:
            current = registry.get(kind)
            if current is not None and current is not self.ours[kind]:
                self.originals[kind] = current
                if kind == "lora":  # the built-in loads nothing from now on
                    (quiet or _activate_nothing)(current, p)
            registry[kind] = self.ours[kind]

    def give_back(self) -> None:
        from modules import extra_networks
        registry = extra_networks.extra_network_registry
        for kind in KINDS:
            if registry.get(kind) is self.ours[kind]:
                if kind in self.originals:
                    registry[kind] = self.originals[kind]
                else:
                    del registry[kind]


def _activate_nothing(handler, p) -> None:
    handler.activate(p, [])


class ScriptParts:
    """The NetWeave script's title, show, ui, process and before_process_batch, for every
    WebUI: an adapter mixes this into its host's `scripts.Script`, sets `adapter` (with
    take_names(p) and off()) and defines `batch(p, prompts, options)` (prompts with tags)."""

    adapter = None
    _was_on: Optional[bool] = None  # whether NetWeave applied the tags of the last generation

    def title(self):
        return TITLE

    def show(self, is_img2img):
        from modules import scripts
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr  # builds nothing global: safe to call twice
        with gr.Accordion(TITLE, open=False):
            enabled = gr.Checkbox(value=True, label="Apply lora/lyco/loractl/model tags with NetWeave")
            options = gr.Textbox(value="", visible=False, label="NetWeave options (JSON)")
        return [enabled, options]

    def process(self, p, enabled=True, options=""):
        on = bool(enabled and settings().enabled)
        if on != ScriptParts._was_on:
            forget_conds(p)
        ScriptParts._was_on = on
        if on:
            self.adapter.take_names(p)
        else:  # the built-in gets its names back
            self.adapter.off()

    def before_process_batch(self, p, enabled=True, options="", **kwargs):
        if enabled and settings().enabled:
            self.batch(p, list(kwargs.get("prompts", p.prompts)), options)


COND_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")


def forget_conds(p) -> None:
    """The host's prompt encodings kept across generations (A1111, Forge, Neo: class-level
    [key, cond] lists, keyed by the prompts, steps and extra networks' parameters) are
    forgotten: they were made with the other side applying the text encoders' networks."""
    for name in COND_CACHES:
        cache = getattr(p, name, None)
        if isinstance(cache, list) and cache:
            cache[0] = None


def settings() -> Settings:
    from modules import shared
    return Settings.from_options(getattr(shared.opts, "data", {}) or {}, _say_once)


_SAID = set()


def _say_once(message: str) -> None:
    """A bad setting, on the console once (settings are read many times per generation)."""
    if message not in _SAID:
        _SAID.add(message)
        print(f"NetWeave: {message}", file=sys.stderr)


def register_settings() -> None:
    """on_ui_settings: NetWeave's options in the host's Settings page, section "NetWeave"."""
    import gradio as gr
    from dataclasses import fields

    from modules import shared
    for f in fields(Settings):
        choices = Settings.choices(f.name)
        shared.opts.add_option("netweave_" + f.name, shared.OptionInfo(
            f.default, Settings.LABELS[f.name], gr.Radio if choices else None,
            {"choices": choices} if choices else None, section=("netweave", TITLE)))


def ui_tab(masks, context) -> list:
    """on_ui_tabs: the NetWeave tab (masks, explain) as the host wants it."""
    import gradio as gr

    from .. import tab
    with gr.Blocks(analytics_enabled=False) as blocks:
        tab.build(masks, context)
    return [(blocks, TITLE, "netweave")]
