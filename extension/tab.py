"""The NetWeave tab: masks (list, upload, draw, presets, invert, feather, rename, delete,
preview over the last image) and explain (plan table and heatmap of a prompt). Built with
Gradio; every action goes through the mask store, so the folder on disk is the truth."""
from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Callable, Optional

from ..network.explain import explain_table, heatmap
from ..network.plan import CompileContext, compile_prompt
from . import mask_tools
from .masks import MaskError, MaskStore, check_mask_name
from .settings import Settings


def drawing(gr):
    """A canvas to paint a mask on: Gradio 4+ (Forge, the standalone page) has ImageEditor,
    Gradio 3.41 (A1111 1.8–1.10) a sketch tool on gr.Image; mask_tools.from_drawing reads both."""
    if hasattr(gr, "ImageEditor"):  # painted pixels are the mask (their alpha), any colour
        return gr.ImageEditor(type="pil", canvas_size=(256, 256), image_mode="RGBA",
                              elem_id="netweave_mask_editor", sources=(), layers=False,
                              brush=gr.Brush(colors=["#ff4020"], color_mode="fixed",
                                             default_size=24))
    return gr.Image(source="canvas", tool="sketch", type="pil", shape=(256, 256),
                    brush_radius=12, elem_id="netweave_mask_editor")


# A1111, Forge and SD.Next all give their txt2img prompt box and steps slider these ids (inside
# gradioApp()'s root); the slider's number field holds its value. Unreadable: what Explain has.
TAKE_PROMPT_JS = ("(prompt, steps) => { const root = typeof gradioApp === 'function' ?"
                  " gradioApp() : document;"
                  " const box = root.querySelector('#txt2img_prompt textarea');"
                  " const n = root.querySelector('#txt2img_steps input[type=number]');"
                  " const k = n ? parseInt(n.value, 10) : NaN;"
                  " return [box ? box.value : prompt, k >= 1 ? k : steps]; }")


def build(store: MaskStore, context: Callable[[int], CompileContext],
          last_image: Callable[[], Optional[object]] = lambda: None,
          settings: Optional[Settings] = None, prompt_source=None, steps_source=None):
    """The tab's contents, inside the caller's gr.Blocks / gr.Tab; `settings`: a Settings
    panel for hosts without a settings page of their own (the standalone page);
    `prompt_source`, `steps_source`: the generation's prompt box and steps, for Explain's
    "take the prompt" button (a WebUI's are read in the browser)."""
    import gradio as gr

    def readable():
        """(name, image) of every mask whose file reads; a broken file leaves the rest listed."""
        for n in store:
            try:
                yield n, store[n]
            except (KeyError, MaskError):
                continue

    def listing():
        return [(mask_tools.overlay(img, None), n) for n, img in readable()]

    def choices():
        return gr.update(choices=list(store))

    def done(message, name=None):
        return listing(), gr.update(choices=list(store), value=name), message

    def save(name, image):
        try:
            check_mask_name(name)
            if image is None:
                raise MaskError("nothing to save: upload, draw or pick a preset first")
            store.put(name, image)
        except MaskError as exc:
            return listing(), choices(), str(exc)
        return done(f"saved '{name}'", name)

    def save_drawing(name, drawing):
        return save(name, mask_tools.from_drawing(drawing))

    def save_preset(name, which, width, height):
        return save(name, mask_tools.preset(which, int(width), int(height)))

    def change(name, how, radius):
        try:
            img = store[name]
        except KeyError:
            return listing(), choices(), f"no mask named '{name}'"
        except MaskError as exc:
            return listing(), choices(), str(exc)
        store.put(name, mask_tools.invert(img) if how == "invert" else mask_tools.feather(img, radius))
        return done(f"{how}ed '{name}'", name)

    def rename(name, new):
        try:
            check_mask_name(new)
            img = store[name]
        except (KeyError, MaskError) as exc:
            return listing(), choices(), str(exc) if isinstance(exc, MaskError) else f"no mask named '{name}'"
        store.put(new, img)
        store.delete(name)
        return done(f"renamed '{name}' to '{new}'", new)

    def delete(name):
        try:
            store.delete(name)
        except (KeyError, MaskError):
            return listing(), choices(), f"no mask named '{name}'"
        return done(f"deleted '{name}'")

    def preview(name):
        try:
            return mask_tools.overlay(store[name], last_image())
        except (KeyError, MaskError):
            return None

    def explain(prompt, steps):
        plan = compile_prompt(prompt or "", context(int(steps)))
        errors = "\n".join(f"column {e.column}: {e.message}\n{e.snippet}" for e in plan.errors)
        return explain_table(plan), heatmap(plan), errors or "no problems"

    with gr.Tab("Masks"):
        with gr.Row():
            gallery = gr.Gallery(value=listing, label="Masks", elem_id="netweave_masks",
                                 columns=6, height=220)
        with gr.Row():
            name = gr.Textbox(label="Name", elem_id="netweave_mask_name")
            chosen = gr.Dropdown(choices=list(store), label="Mask", elem_id="netweave_mask_pick")
        status = gr.Textbox(label="", interactive=False, elem_id="netweave_mask_status")
        with gr.Tab("Draw"):
            editor = drawing(gr)
            save_drawn = gr.Button("Save drawing", elem_id="netweave_mask_save_drawing")
        with gr.Tab("Upload"):
            upload = gr.Image(type="pil", label="Mask image (white = inside)")
            save_upload = gr.Button("Save upload")
        with gr.Tab("Preset"):
            which = gr.Dropdown(choices=list(mask_tools.PRESETS), value="left half", label="Preset")
            width = gr.Number(value=512, precision=0, label="Width")
            height = gr.Number(value=512, precision=0, label="Height")
            save_pre = gr.Button("Save preset", elem_id="netweave_mask_save_preset")
        with gr.Row():
            radius = gr.Slider(0, 64, value=8, step=1, label="Feather radius (px)")
            feather_b = gr.Button("Feather")
            invert_b = gr.Button("Invert")
            new_name = gr.Textbox(label="New name")
            rename_b = gr.Button("Rename")
            delete_b = gr.Button("Delete", variant="stop")
        shown = gr.Image(label="Preview over the last image", type="pil")
        outs = [gallery, chosen, status]
        save_drawn.click(save_drawing, [name, editor], outs)
        save_upload.click(save, [name, upload], outs)
        save_pre.click(save_preset, [name, which, width, height], outs)
        feather_b.click(lambda n, r: change(n, "feather", r), [chosen, radius], outs)
        invert_b.click(lambda n, r: change(n, "invert", r), [chosen, radius], outs)
        rename_b.click(rename, [chosen, new_name], outs)
        delete_b.click(delete, [chosen], outs)
        chosen.change(preview, [chosen], [shown])
    with gr.Tab("Explain"):
        prompt = gr.Textbox(label="Prompt to explain", lines=3, elem_id="netweave_explain_prompt")
        take = gr.Button("Take the txt2img prompt and steps", elem_id="netweave_take_prompt")
        steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="netweave_explain_steps")
        if prompt_source is not None:
            take.click(lambda text, n: (text, n), [prompt_source, steps_source or steps],
                       [prompt, steps])
        else:  # a WebUI's tab cannot wire to its txt2img box: read the box in the browser
            js = "js" if int(gr.__version__.split(".")[0]) >= 4 else "_js"
            take.click(None, [prompt, steps], [prompt, steps], **{js: TAKE_PROMPT_JS})
        go = gr.Button("Explain", elem_id="netweave_explain")
        table = gr.Textbox(label="Plan", lines=12, elem_id="netweave_plan")
        problems = gr.Textbox(label="Problems", lines=3, elem_id="netweave_explain_errors")
        image = gr.Image(label="Heatmap", type="pil")
        go.click(explain, [prompt, steps], [table, image, problems])
    if settings is not None:
        with gr.Tab("Settings"):
            shown = [f.name for f in fields(Settings) if f.name not in Settings.HOST_ONLY]
            inputs = []
            for name in shown:
                value, label, options = getattr(settings, name), Settings.LABELS[name], \
                    Settings.choices(name)
                if options:
                    inputs.append(gr.Radio(options, value=value, label=label))
                elif isinstance(value, bool):
                    inputs.append(gr.Checkbox(value=value, label=label))
                elif isinstance(value, str):
                    inputs.append(gr.Textbox(value=value, label=label))
                else:
                    inputs.append(gr.Number(value=value, precision=0, label=label))
            apply = gr.Button("Apply", elem_id="netweave_settings_apply")
            said = gr.Textbox(label="", interactive=False, elem_id="netweave_settings_status")

            def set_all(*values):
                try:
                    new = dataclasses.replace(settings, **dict(zip(shown, values))).check()
                except (TypeError, ValueError, OverflowError) as exc:
                    return str(exc)
                for name in shown:
                    setattr(settings, name, getattr(new, name))
                return "applied"
            apply.click(set_all, inputs, [said])
