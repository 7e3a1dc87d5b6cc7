"""modules/shared.py at Forge dfdcbab: the parts NetWeave meets are A1111 v1.10.1's."""
from . import same_as_a1111

same_as_a1111("shared", globals())

opts.data.setdefault("sd_lora", "None")  # Forge's "always add this LoRA" setting
