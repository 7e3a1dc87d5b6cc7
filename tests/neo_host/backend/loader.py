"""backend/loader.py (Neo): `forge_loader(checkpoint)` builds a new diffusion engine for a
checkpoint file, its family guessed from the keys (huggingface_guess; its `unet_key_prefix`
is `model.diffusion_model.` for the files here, `preprocess_state_dict` leaves them as they
are). Only Wan's checkpoints are loaded from files in these tests: a new `neo_model.Wan`
whose diffusion model takes the file's weights (its text encoder built as every Wan's is)."""
from backend.state_dict import load_state_dict, try_filter_state_dict
from backend.utils import load_torch_file

UNET_KEY_PREFIX = ["model.diffusion_model."]


def unet_state_dict(filename):
    """The diffusion model's state dict of a checkpoint file, as apply_refiner and the refiner
    script read it (load_torch_file, preprocess_state_dict, the guess's unet_key_prefix)."""
    return try_filter_state_dict(load_torch_file(filename), UNET_KEY_PREFIX)


def forge_loader(sd, additional_state_dicts=None):
    import neo_model
    model = neo_model.Wan()
    load_state_dict(model.forge_objects.unet.model.diffusion_model, unet_state_dict(sd))
    return model
