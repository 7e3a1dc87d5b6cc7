"""modules/processing.py + processing_diffusers.process_base + processing_args (SD.Next):
per batch before_process_batch (tags in the prompts) → parse_prompts → process_batch →
process_base: parse again (the stripped prompts keep p.network_data), activate_filtered,
encode the prompt through the prompt-embedding cache, the pipeline call with
diffusers_callback, p.task_args merged last; the hires pass encodes again (through the cache)
and calls the pipeline again with the same arguments; deactivate (no force) before decode;
postprocess. Images come back as float arrays (output_type "np") so tests compare them
exactly.

The text arguments by pipeline (processing_prompt.set_prompt, processing_args.set_pipeline_args):
pipelines whose class name holds 'StableDiffusion' (SD, SDXL, SD3) or 'Flux' (not Flux2) get
embeddings from prompt_parser_diffusers (Flux: T5's and the pooled CLIP vector, and the
negative prompt as text, since that parser makes no negative for Flux; SD3: the three encoders'
embeddings and pooled vectors, the negative's too); every other pipeline (Chroma, Z-Image,
Qwen-Image, Wan), or any when p.task_args holds 'prompt', gets the prompts as text (the "fixed"
parser) and encodes them itself. guidance_scale is the CFG scale (Flux.1: its distilled
guidance, no negative rows); true_cfg_scale is p.cfg_true when > -1 (Flux and Qwen-Image run
their negative prompt only when it is > 1); num_frames is p.frames (1 unless a video tab sets
it). The step callback's tensors are the pipeline's _callback_tensor_inputs when it takes both
prompt_embeds and negative_prompt_embeds. A video pipeline's output is its frames
(processing_diffusers: `output.frames`), the first video's here."""
import inspect

import torch

from . import extra_networks, prompt_parser_diffusers, shared
from .processing_callbacks import diffusers_callback


class Processed:
    def __init__(self, p, images):
        self.images = images
        self.extra_generation_params = dict(p.extra_generation_params)


class StableDiffusionProcessing:
    def __init__(self, prompt="", negative_prompt="", steps=4, cfg_scale=6.0, width=64,
                 height=64, seed=1, batch_size=1, script_args=(), scripts=None,
                 enable_hr=False, hr_second_pass_steps=0, lora_apply_te=None, clip_skip=1,
                 cfg_true=0.0):
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.steps, self.cfg_scale, self.width, self.height = steps, cfg_scale, width, height
        self.seed, self.batch_size = seed, batch_size
        self.script_args, self.per_script_args, self.scripts = tuple(script_args), {}, scripts
        self.task_args, self.network_data, self.extra_generation_params = {}, {}, {}
        self.enable_hr, self.hr_second_pass_steps = enable_hr, hr_second_pass_steps
        self.lora_apply_te, self.clip_skip, self.cfg_true = lora_apply_te, clip_skip, cfg_true
        self.disable_extra_networks, self.ops = False, ['txt2img']


def process_images(p):
    p.scripts.process(p)
    p.all_prompts = [p.prompt] * p.batch_size
    p.prompts, p.negative_prompts = list(p.all_prompts), [p.negative_prompt] * p.batch_size
    p.seeds = [p.seed + i for i in range(p.batch_size)]
    p.scripts.before_process_batch(p, batch_number=0, prompts=p.prompts, seeds=p.seeds,
                                   subseeds=p.seeds)
    p.prompts, p.network_data = extra_networks.parse_prompts(p.prompts)
    p.scripts.process_batch(p, batch_number=0, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
    images = process_base(p)
    processed = Processed(p, images)
    p.scripts.postprocess(p, processed)
    return processed


def process_base(p):
    pipe = shared.sd_model
    p.prompts, p.network_data = extra_networks.parse_prompts(p.prompts, p.network_data)
    extra_networks.activate_filtered(p)  # networks patch weights before the prompt is encoded
    args = set_pipeline_args(p, pipe)
    out = pipe(**args)
    if p.enable_hr:  # no re-activation without a refiner prompt: the same networks, callback
        args = set_pipeline_args(p, pipe, steps=p.hr_second_pass_steps or p.steps)
        out = pipe(**args)
    extra_networks.deactivate(p)
    return list(out.images) if hasattr(out, "images") else list(out.frames[0])


def set_pipeline_args(p, pipe, steps=None):
    possible = set(inspect.signature(type(pipe).__call__).parameters)
    args = {}
    cls = type(pipe).__name__
    embedder = 'StableDiffusion' in cls or ('Flux' in cls and 'Flux2' not in cls)
    if not embedder or 'prompt' in p.task_args:  # the pipeline encodes
        args.update(prompt=list(p.prompts), negative_prompt=list(p.negative_prompts))
    else:
        embeds = prompt_parser_diffusers.encode(pipe, p, p.prompts, p.negative_prompts, p.steps,
                                                p.cfg_scale > 1)
        args["prompt_embeds"] = embeds["prompt_embeds"]
        if 'pooled_prompt_embeds' in possible:
            args["pooled_prompt_embeds"] = embeds["pooled"]
        if 'negative_pooled_prompt_embeds' in possible and embeds["negative_pooled"] is not None:
            args["negative_pooled_prompt_embeds"] = embeds["negative_pooled"]
        if embeds["negative_prompt_embeds"] is None:  # Flux: the negative prompt as text
            args["negative_prompt"] = list(p.negative_prompts)
        else:
            args["negative_prompt_embeds"] = embeds["negative_prompt_embeds"]
    if "prompt_embeds" not in args and "negative_prompt_embeds" not in args:
        args.update(prompt_2=list(p.prompts), negative_prompt_2=list(p.negative_prompts))
    args.update({"num_inference_steps": steps or p.steps, "guidance_scale": p.cfg_scale,
                 "height": p.height, "width": p.width, "output_type": "np",
                 "generator": torch.Generator("cpu").manual_seed(p.seeds[0]),
                 "callback_on_step_end": diffusers_callback,
                 "num_frames": getattr(p, "frames", 1)})
    if p.cfg_true is not None and p.cfg_true > -1:
        args["true_cfg_scale"] = p.cfg_true
    both = {'prompt_embeds', 'negative_prompt_embeds'} <= possible
    args["callback_on_step_end_tensor_inputs"] = list(pipe._callback_tensor_inputs) if both \
        else ['latents']
    args = {k: v for k, v in args.items() if k in possible}
    args.update({k: v for k, v in p.task_args.items() if k in possible})
    return args
