"""modules/sd_models.py (Neo): Forge 2's `model_data.get_sd_model()`, and what the refiner
meets: CheckpointInfo (`filename`, `name_for_extra`, `short_title`, `title`), the lists
`checkpoints_list` / `checkpoint_aliases`, get_closet_checkpoint_match (an alias, else the
shortest title containing the text), select_checkpoint (opts.sd_model_checkpoint), and
forge_model_reload: when model_data's loading parameters changed since the last load, the
model is dropped and a new one loaded (backend/loader.py) as shared.sd_model, its
`sd_checkpoint_info` set; unchanged, the loaded model stays."""
import os

from . import same_as, shared

same_as("forge_host", "sd_models", globals())

checkpoints_list = {}
checkpoint_aliases = {}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.title = self.short_title = self.name_for_extra

    def register(self):
        checkpoints_list[self.title] = self
        for alias in (self.title, self.name, self.filename):
            checkpoint_aliases[alias] = self


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    if search_string in checkpoint_aliases:
        return checkpoint_aliases[search_string]
    found = sorted((info for info in checkpoints_list.values() if search_string in info.title),
                   key=lambda info: len(info.title))
    return found[0] if found else None


def select_checkpoint():
    return get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint"))


model_data.forge_loading_parameters = {}  # noqa: F821 (Forge 2's, from same_as)
model_data.forge_hash = ""  # noqa: F821


def forge_model_reload():
    from backend.loader import forge_loader
    current = str(model_data.forge_loading_parameters)  # noqa: F821
    if model_data.forge_hash == current:  # noqa: F821
        return shared.sd_model, False
    shared.sd_model = None  # Neo: model_data.sd_model = None, unload_all_models, gc
    info = model_data.forge_loading_parameters["checkpoint_info"]  # noqa: F821
    sd_model = forge_loader(info.filename)
    sd_model.sd_checkpoint_info = info
    model_data.forge_hash = current  # noqa: F821
    shared.sd_model = sd_model
    return sd_model, True
