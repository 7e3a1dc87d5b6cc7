"""Stand-ins for SD.Next's host modules (vladmandic/sdnext 058a7f0cf, read for NetWeave: the
extra-network registry cleared after scripts load, activate once per pass right before the
prompt is encoded, with step= and include/exclude by signature, no per-step script callback,
p.task_args merged over the pipeline arguments; the built-in Lora's changed() keyed by
include/exclude, the prompt-embedding cache, the Control runner's title filter and its default
script arguments). Only what NetWeave touches; ../installer.py is SD.Next's top-level module.

The Flux.1 / Chroma path follows the same commit: modules/modeldata.py (sd_model_type 'f1',
'chroma' from the pipeline class), pipelines/model_flux.py and model_chroma.py (FluxPipeline,
ChromaPipeline; sd_hijack_te.init_hijack), modules/processing_prompt.py (Flux through
PromptEmbedder, Chroma as text), modules/prompt_parser_diffusers.py (Flux: encode_prompt per
prompt, no negative), modules/processing_args.py and processing_diffusers.py (guidance_scale,
true_cfg_scale from p.cfg_true, task_args last), modules/sd_hijack_te.py (the encode cache
keyed by prompt text), modules/lora/networks.py (the built-in's default components include
'transformer')."""
