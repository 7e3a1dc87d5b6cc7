"""modules/control/run.py (SD.Next), with no control units (the result is then a txt2img):
control_run builds the processing object from its fields, and control_process runs it with
the control runner's scripts: the script arguments it was given, else init_default_script_args.
The real control_run takes its UI fields positionally, ahead of *input_script_args."""
from .. import processing, scripts_manager
from ..api import script


def control_run(*input_script_args, prompt='', negative_prompt='', steps=4, cfg_scale=6.0,
                seed=1, width=64, height=64, batch_size=1, lora_apply_te=None,
                override_script_name=None, override_script_args=None):
    p = processing.StableDiffusionProcessing(
        prompt=prompt, negative_prompt=negative_prompt, steps=steps, cfg_scale=cfg_scale,
        seed=seed, width=width, height=height, batch_size=batch_size,
        lora_apply_te=lora_apply_te)
    p.ops = ['control']
    return control_process(p, list(input_script_args))


def control_process(p, input_script_args=None):
    p.scripts = scripts_manager.scripts_control
    p.script_args = input_script_args or []
    if len(p.script_args) == 0:
        p.script_args = script.init_default_script_args(p.scripts)
    return processing.process_images(p)
