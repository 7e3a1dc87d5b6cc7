"""Stand-ins for SD.Next's host modules (vladmandic/sdnext 058a7f0cf, read for NetWeave: the
extra-network registry cleared after scripts load, activate once per pass right before the
prompt is encoded, with step= and include/exclude by signature, no per-step script callback,
p.task_args merged over the pipeline arguments; the built-in Lora's changed() keyed by
include/exclude, the prompt-embedding cache, the Control runner's title filter and its default
script arguments). Only what NetWeave touches; ../installer.py is SD.Next's top-level module."""
