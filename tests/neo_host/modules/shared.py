"""modules/shared.py (Neo): A1111 v1.10's, with the built-in Lora's options."""
from . import same_as

same_as("forge_host", "shared", globals())

opts.data.setdefault("lora_add_hashes_to_infotext", True)
opts.data.setdefault("sd_model_checkpoint", None)
# the refiner's settings (modules/shared_options.py, section "Refiner")
opts.data.setdefault("refiner_fast_sd", False)
opts.data.setdefault("refiner_use_steps", False)
opts.data.setdefault("refiner_lora_replacement", "high_noise=low_noise")
