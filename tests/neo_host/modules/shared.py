"""modules/shared.py (Neo): A1111 v1.10's, with the built-in Lora's options."""
from . import same_as

same_as("forge_host", "shared", globals())

opts.data.setdefault("lora_add_hashes_to_infotext", True)
